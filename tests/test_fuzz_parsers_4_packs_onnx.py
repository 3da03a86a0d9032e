"""Property-based fuzzing of the parsers (part 3; shared machinery in ``fuzz_common.py``, rule in docs/reliability.md):
map packs, ONNX models and their manifests (``OrtEncoder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fuzz_common import (
    ACCEPTED,
    CASES,
    DEMO,
    ONNX_PARSER,
    TINY_MAN,
    TINY_ONNX,
    _encode,
    fuzz,
    json_text_damage,
    json_value,
    json_value_huge,
    mutated,
    odd_arrays,
    outcome,
    quiet_opencv,  # noqa: F401  (module fixture)
    small_max_pixels,  # noqa: F401  (module fixture)
    to_json_text,
    work_fixture,  # noqa: F401  (module fixture)
    write,
)
from hypothesis import given
from hypothesis import strategies as st

from sarloc.core.errors import SarlocError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning")


# =============================================================================================== 4. map packs


@pytest.fixture(scope="module")
def pack_base(work) -> tuple[Path, dict[str, bytes]]:
    from sarloc.sim.packs import synthetic_pack

    src = work / "pack_src"
    synthetic_pack(src, 500, dim=16)
    return src, {p.name: p.read_bytes() for p in src.iterdir()}


def _pack_case(work: Path, files: dict[str, bytes]) -> None:
    from sarloc.mappack.pack import MapPack, pack_info, read_pack_manifest, verify_map_pack

    d = work / "pack"
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for name, data in files.items():
        write(d / name, data)
    name = "map packs: MapPack / read_pack_manifest / verify_map_pack / pack_info"
    ok = 0
    for fn in (read_pack_manifest, lambda p: MapPack(p), verify_map_pack, lambda p: MapPack(p, verify=True), pack_info):
        r = outcome(name, lambda fn=fn: fn(d))
        ok += not isinstance(r, SarlocError)
        if isinstance(r, MapPack):
            assert r.embeddings.shape == (len(r), r.dim) and r.tiles.shape == (len(r),)
    CASES[name] -= 4  # one input, five entry points: count it once (accepted: by all five)
    ACCEPTED[name] += (ok == 5) - ok


PACK_MAN_VALUES = st.one_of(
    json_value_huge,
    st.sampled_from(["embeddings.npy", "tiles.npy", "pack.json", "float16", "float32", "<f2", "a" * 300]),
    st.integers(-5, 600),
)


@st.composite
def pack_manifests(draw, base: dict) -> Any:
    man = draw(mutated(base))
    if draw(st.booleans()):
        sect = draw(st.sampled_from(["embeddings", "tiles", "grid", "encoder", "files"]))
        if isinstance(man.get(sect), dict) and man[sect]:
            man[sect][draw(st.sampled_from(sorted(man[sect])))] = draw(PACK_MAN_VALUES)
    if draw(st.integers(0, 9)) == 0:
        man["files"] = draw(
            st.dictionaries(st.sampled_from(["embeddings.npy", "x/../tiles.npy", "a" * 300, "", "\x00"]), json_value)
        )
    return man


@fuzz(600)
@given(data=st.data())
def test_map_pack_manifest_mutated(work, pack_base, data):
    _, files = pack_base
    base = json.loads(files["pack.json"])
    if data.draw(st.integers(0, 5)) == 0:
        text = data.draw(json_text_damage(files["pack.json"].decode()))
    else:
        text = to_json_text(data.draw(pack_manifests(base)))
    _pack_case(work, {**files, "pack.json": text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")})


@fuzz(450)
@given(data=st.data())
def test_map_pack_npy_damaged(work, pack_base, data):
    _, files = pack_base
    name = data.draw(st.sampled_from(["embeddings.npy", "tiles.npy"]))
    kind = data.draw(st.sampled_from(["cut", "flip", "bytes", "array", "missing"]))
    b = bytearray(files[name])
    if kind == "cut":
        del b[data.draw(st.integers(0, len(b) - 1)) :]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            b[data.draw(st.integers(0, min(len(b) - 1, 200)))] = data.draw(st.integers(0, 255))
    elif kind == "bytes":
        b = bytearray(data.draw(st.binary(max_size=600)))
    elif kind == "array":
        b = bytearray(_encode(".npy", data.draw(odd_arrays(max_dims=3))))
    new = {**files, name: bytes(b)}
    if kind == "missing":
        del new[name]
    if data.draw(st.booleans()):  # keep the manifest's sha256 consistent so the shape checks are reached
        from sarloc.core.artifacts import sha256_bytes

        man = json.loads(files["pack.json"])
        man["files"][name] = sha256_bytes(bytes(b))
        new["pack.json"] = json.dumps(man).encode()
    _pack_case(work, new)


# ===================================================================================== 5. ONNX / engine files


ONNX_MAN_PARSER = "ONNX manifests: OrtEncoder (manifest JSON)"


def _check_encoder(enc: Any) -> None:
    from sarloc.backends.encoders import OrtEncoder

    if isinstance(enc, OrtEncoder):
        c, h, w = enc.input_chw
        assert enc.embed_dim > 0 and enc.window_px > 0 and min(c, h, w) > 0
        assert isinstance(enc.input_name, str) and enc.preprocess is not None


def _encoder_case(work: Path, parser: str, model: bytes, man: Any, verify: bool = True, **known) -> None:
    from sarloc.backends.encoders import OrtEncoder

    d = work / "onnx"
    d.mkdir(exist_ok=True)
    write(d / "m.onnx", model)
    write(d / "m.json", man if isinstance(man, (bytes, str)) else to_json_text(man))
    _check_encoder(outcome(parser, lambda: OrtEncoder(d / "m.onnx", verify_sha256=verify, threads=1), **known))


@fuzz(880)
@given(data=st.data())
def test_ort_encoder_damaged_model(work, data):
    from sarloc.core.artifacts import sha256_bytes

    kind = data.draw(st.sampled_from(["cut", "flip", "flip", "bytes"]))
    b = bytearray(TINY_ONNX)
    if kind == "cut":
        del b[data.draw(st.integers(0, len(b) - 1)) :]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    else:
        b = bytearray(data.draw(st.binary(max_size=400)))
    model = bytes(b)
    _encoder_case(work, ONNX_PARSER, model, {**TINY_MAN, "sha256": sha256_bytes(model)})


@fuzz(120)
@given(frac=st.floats(0.0, 1.0, exclude_max=True))
def test_ort_encoder_truncated_demo_model(work, frac):
    model = (DEMO / "sar_encoder.onnx").read_bytes()
    man = json.loads((DEMO / "sar_encoder.json").read_text())
    man["file"] = "m.onnx"
    _encoder_case(work, ONNX_PARSER, model[: int(frac * len(model))], man, verify=False)


@fuzz(900)
@given(man=st.just(TINY_MAN).flatmap(lambda b: mutated(b, 4)), sha_ok=st.booleans())
def test_ort_encoder_manifest_mutated(work, man, sha_ok):
    if sha_ok and isinstance(man, dict) and "sha256" in man:
        man["sha256"] = TINY_MAN["sha256"]
    known = {}
    _encoder_case(work, ONNX_MAN_PARSER, TINY_ONNX, man, **known)


@fuzz(150)
@given(data=st.one_of(json_text_damage(json.dumps(TINY_MAN)), json_value_huge.map(to_json_text)))
def test_ort_encoder_manifest_damaged_text(work, data):
    _encoder_case(work, ONNX_MAN_PARSER, TINY_ONNX, data)
