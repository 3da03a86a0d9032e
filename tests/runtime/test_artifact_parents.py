"""The localizer refuses a refiner, verifier or shortlister that does not name the SAR encoder's checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
from sarloc.core.errors import ArtifactError
from sarloc.runtime.localizer import Localizer
from sarloc.runtime.refine import OnnxRefiner, Shortlister, Verifier


@pytest.fixture(scope="module")
def enc():
    from sarloc.backends.encoders import load_encoder

    return load_encoder(MODEL_DIR, "sar")


def _pack(enc) -> SimpleNamespace:
    """A stand-in map pack built with this export (the parent checks come before the pack is used)."""
    keys = ("checkpoint_sha256", "embed_dim", "window_px", "preprocess")
    return SimpleNamespace(manifest={"encoder": {k: enc.manifest.get(k) for k in keys}}, path=Path("pack"))


def _copy(tmp_path: Path, name: str, parent) -> Path:
    """A copy of a demo artifact (and its manifest) whose manifest names ``parent`` (``...``: no field at all)."""
    man = MODEL_DIR / (Path(name).stem + ".json")
    if name.endswith(".onnx"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    m = json.loads(man.read_text())
    if parent is ...:
        del m["parent_sha256"]
    else:
        m["parent_sha256"] = parent
    (tmp_path / man.name).write_text(json.dumps(m))
    return tmp_path / name


def test_demo_artifacts_name_the_encoder_checkpoint(enc):
    ckpt = enc.manifest["checkpoint_sha256"]
    assert OnnxRefiner(MODEL_DIR / "refiner.onnx").encoder_sha256 == ckpt
    assert Verifier.load(MODEL_DIR / "verifier.json").parent_sha256 == ckpt
    assert Shortlister.load(MODEL_DIR / "shortlister.json").parent_sha256 == ckpt


@pytest.mark.parametrize("parent", [None, ...], ids=["null", "absent"])
@pytest.mark.parametrize(
    ("name", "arg", "fix"),
    [
        ("refiner.onnx", "refiner", "re-export"),
        ("verifier.json", "verifier", "re-fit"),
        ("shortlister.json", "shortlister", "re-fit"),
    ],
)
def test_artifact_without_parent_is_refused(enc, tmp_path, parent, name, arg, fix):
    path = _copy(tmp_path, name, parent)
    load = {"refiner": OnnxRefiner, "verifier": Verifier.load, "shortlister": Shortlister.load}[arg]
    with pytest.raises(ArtifactError) as e:
        Localizer(enc, _pack(enc), **{arg: load(path)})
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "names no parent" in msg and fix in msg, msg


@pytest.mark.parametrize(("name", "arg"), [("refiner.onnx", "refiner"), ("verifier.json", "verifier")])
def test_artifact_of_another_checkpoint_is_refused(enc, tmp_path, name, arg):
    path = _copy(tmp_path, name, "0" * 64)
    load = {"refiner": OnnxRefiner, "verifier": Verifier.load}[arg]
    with pytest.raises(ArtifactError, match="000000000000"):
        Localizer(enc, _pack(enc), **{arg: load(path)})
