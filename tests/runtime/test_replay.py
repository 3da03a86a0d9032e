"""`sarloc replay` checks the artifacts of the recording: map pack (its manifest), verifier and shortlister too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import demo_flight

from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
from sarloc.core.artifacts import sha256_file
from sarloc.core.errors import ArtifactError


@pytest.fixture(scope="module")
def flight1(tmp_path_factory) -> Path:
    """A generated scene, its map pack (shipped demo model) and a one-strip flight."""
    return demo_flight(tmp_path_factory.mktemp("flight1"), scene_seed=11, heading_deg=30.0, flight_seed=1, n_strips=1)


def _record(flight: Path, root: Path) -> tuple[Path, Path, Path]:
    """Copy the pack and the export under ``root``, run the daemon on them; returns (records, pack, export)."""
    from sarloc.runtime.daemon import load_run_config, run

    pack, export = root / "pack", root / "export"
    shutil.copytree(flight / "pack", pack)
    shutil.copytree(MODEL_DIR, export)
    cfg = load_run_config(
        None,
        source=f"dir://{flight / 'strips'}",
        export=str(export),
        pack=str(pack),
        out=str(root / "run"),
        follow=False,
        mavlink=False,
    )
    assert run(cfg, install_signals=False)["fixes"] == 1
    return root / "run" / "records.jsonl", pack, export


def _start(records: Path) -> dict:
    return json.loads(records.read_text().splitlines()[0])


def test_start_record_names_the_pack_manifest_verifier_and_shortlister(flight1, tmp_path):
    records, pack, export = _record(flight1, tmp_path)
    art = _start(records)["artifacts"]
    assert art["pack_manifest"] == sha256_file(pack / "pack.json")
    assert art["verifier"] == sha256_file(export / "verifier.json")
    assert art["shortlister"] == sha256_file(export / "shortlister.json")
    assert art["encoder"] == json.loads((export / "sar_encoder.json").read_text())["sha256"]
    assert art["refiner"] == sha256_file(export / "refiner.onnx")


def test_replay_of_unchanged_artifacts_is_identical(flight1, tmp_path):
    from sarloc.eval.replay import replay

    records, _, _ = _record(flight1, tmp_path)
    res = replay(records, tmp_path / "replay")
    assert res["identical"], res


def _edit_json(path: Path, **fields) -> None:
    man = json.loads(path.read_text())
    man.update(fields)
    path.write_text(json.dumps(man, indent=2))


@pytest.mark.parametrize(
    ("where", "name"),
    [("pack", "pack.json"), ("export", "verifier.json"), ("export", "shortlister.json")],
)
def test_replay_refuses_changed_artifacts(flight1, tmp_path, where, name):
    from sarloc.eval.replay import replay

    records, pack, export = _record(flight1, tmp_path)
    changed = (pack if where == "pack" else export) / name
    _edit_json(changed, meta={"edited": "after the recording"})  # still loads; only its hash differs
    with pytest.raises(ArtifactError) as e:
        replay(records, tmp_path / "replay")
    msg = str(e.value)
    assert "\n" not in msg and str(changed) in msg and "record a new session" in msg, msg
    assert not (tmp_path / "replay" / "records.jsonl").exists()  # refused before re-running the session


def test_replay_refuses_a_recording_without_the_pack_hash(flight1, tmp_path):
    """A recording by an older sarloc (``pack`` held the encoder's hash) cannot prove the pack is the same."""
    from sarloc.eval.replay import replay

    records, pack, _ = _record(flight1, tmp_path)
    lines = records.read_text().splitlines()
    start = json.loads(lines[0])
    start["artifacts"] = {k: v for k, v in start["artifacts"].items() if k in ("encoder", "refiner")}
    start["artifacts"]["pack"] = json.loads((pack / "pack.json").read_text())["parent_sha256"]
    records.write_text("\n".join([json.dumps(start), *lines[1:]]) + "\n")
    with pytest.raises(ArtifactError, match=r"pack\.json.*record a new session"):
        replay(records, tmp_path / "replay")
