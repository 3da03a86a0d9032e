"""Property-based fuzzing of the parsers (part 2; shared machinery in ``fuzz_common.py``, rule in docs/reliability.md):
strip files and sidecars, stream frames (``FrameDecoder``).
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
import pytest
from fuzz_common import (
    ACCEPTED,
    CASES,
    _encode,
    damaged_seed,
    fuzz,
    json_text_damage,
    json_value,
    json_value_huge,
    mutated,
    odd_arrays,
    outcome,
    quiet_opencv,  # noqa: F401  (module fixture)
    small_max_pixels,  # noqa: F401  (module fixture)
    time_limit,
    to_json_text,
    work_fixture,  # noqa: F401  (module fixture)
    write,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sarloc.core.errors import SarlocError
from sarloc.runtime.frames import FRAME_HEADER, MAGIC, FrameDecoder, encode_frame
from sarloc.runtime.strips import StripFile, meta_from_dict, read_sidecar
from sarloc.runtime.types import StripMeta

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning")


# ==================================================================================== 3. strips and frames

SIDE = {"gsd_m": 2.0, "heading_deg": 37.0, "t0_s": 1_700_000_000.0, "row_rate_hz": 10.0, "scale": "linear_0_1"}
SIDE_FULL = {
    **SIDE,
    "schema": 1,
    "strip_id": "s1",
    "across_offset_m": 5.0,
    "prior_xy_m": [100.0, 200.0],
    "prior_lonlat_deg": [2.0, 48.0],
    "prior_sigma_m": 50.0,
}


def check_meta(m: Any) -> None:
    if isinstance(m, StripMeta):
        assert isinstance(m.strip_id, str) and m.strip_id
        for v in (m.gsd_m, m.t0_s, m.row_rate_hz, m.across_offset_m):
            assert isinstance(v, float) and math.isfinite(v)


@fuzz(300)
@given(obj=json_value)
def test_meta_from_dict_random(obj):
    check_meta(outcome("strip sidecar: meta_from_dict / read_sidecar", lambda: meta_from_dict(obj, "fuzz")))


@fuzz(500)
@given(obj=st.sampled_from([SIDE, SIDE_FULL]).flatmap(mutated), sid=st.one_of(st.none(), st.text(max_size=5)))
def test_meta_from_dict_mutated(obj, sid):
    check_meta(outcome("strip sidecar: meta_from_dict / read_sidecar", lambda: meta_from_dict(obj, "fuzz", sid)))


@fuzz(250)
@given(
    data=st.one_of(
        json_text_damage(json.dumps(SIDE_FULL)),
        st.sampled_from([SIDE, SIDE_FULL]).flatmap(mutated).map(to_json_text),
    )
)
def test_read_sidecar_damaged(work, data):
    p = write(work / "strip_side.json", data)
    check_meta(outcome("strip sidecar: meta_from_dict / read_sidecar", lambda: read_sidecar(p)))


def _strip_seeds() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(2)
    f = rng.random((12, 7)).astype(np.float32)
    f[2, 3] = np.nan
    return [
        (".npy", _encode(".npy", f)),
        (".npy", _encode(".npy", rng.integers(0, 255, (12, 7), dtype=np.uint8))),
        (".npy", _encode(".npy", rng.integers(0, 65535, (9, 5, 2), dtype=np.uint16))),
        (".npy", _encode(".npy", np.asfortranarray(rng.random((6, 4))))),
        (".tif", _encode(".tif", f)),
        (".tif", _encode(".tif", rng.integers(0, 65535, (12, 7), dtype=np.uint16))),
        (".png", _encode(".png", rng.integers(0, 255, (12, 7), dtype=np.uint8))),
    ]


STRIP_SEEDS = _strip_seeds()


@st.composite
def strip_images(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["seed", "damaged", "array", "array", "bytes", "special"]))
    if kind == "seed":
        return draw(st.sampled_from(STRIP_SEEDS))
    if kind == "damaged":
        return draw(damaged_seed(STRIP_SEEDS))
    if kind == "bytes":
        ext = draw(st.sampled_from([".npy", ".tif", ".png"]))
        return ext, draw(st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"II*\x00"])) + draw(st.binary(max_size=800))
    if kind == "special":  # pickled objects, structured dtypes, 0-size, a header claiming more rows than stored
        arr = draw(
            st.sampled_from(
                [
                    np.array([[1, "a"], [None, 2.0]], dtype=object),
                    np.zeros((3, 3), dtype=[("a", "<f4"), ("b", "<i2")]),
                    np.zeros((0, 5), np.float32),
                    np.zeros((5, 0), np.uint8),
                    np.float32(1.0),
                    np.full((4, 4), np.nan, np.float32),
                    np.full((4, 4), 3e38, np.float32),
                    np.full((4, 4), 1e308, np.float64),
                    np.array([[1e308, -1e308], [0.0, 5.0]]),
                ]
            )
        )
        data = _encode(".npy", arr)
        if draw(st.booleans()) and arr.ndim == 2 and arr.size:
            data = data.replace(str(arr.shape).encode(), str((arr.shape[0] * 1000, arr.shape[1])).encode(), 1)
        return ".npy", data
    arr = draw(odd_arrays())
    ext = draw(st.sampled_from([".npy", ".npy", ".tif"]))
    try:
        return ext, _encode(ext, arr)
    except Exception:
        return ".npy", _encode(".npy", arr)


@fuzz(1000)
@given(
    img=strip_images(),
    side=st.one_of(st.sampled_from([SIDE, {**SIDE, "scale": "db"}, {**SIDE, "scale": "display8"}]), st.builds(dict)),
    bad_side=st.one_of(st.none(), st.none(), st.none(), st.sampled_from([SIDE, SIDE_FULL]).flatmap(mutated)),
    via_sidecar=st.booleans(),
)
def test_strip_file_read(work, img, side, bad_side, via_sidecar):
    ext, data = img
    d = work / "strips"
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    image = write(d / f"s{ext}", data)
    sidecar = write(d / "s.json", to_json_text(bad_side if bad_side is not None else side))

    def run():
        return StripFile(sidecar if via_sidecar else image).read()

    s = outcome("strip files: StripFile(...).read()", run)
    if not isinstance(s, SarlocError):
        assert s.pixels.ndim == 2 and s.pixels.dtype == np.float32 and np.isfinite(s.pixels).all()


# --- stream framing: FrameDecoder never raises; every fed frame is decoded, counted as a drop or still buffered

DEC_LIMITS = {"max_rows": 64, "max_cols": 64, "max_payload_bytes": 1 << 16, "max_header_bytes": 2048}
_DROPS = ("dropped_crc", "dropped_malformed", "dropped_nonfinite", "resyncs")
FRAME_META = StripMeta("fz", gsd_m=2.0, heading_deg=10.0, t0_s=0.0, row_rate_hz=10.0, scale="linear_0_1")


@st.composite
def frame_pixels(draw) -> np.ndarray:
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32]))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return draw(hnp.arrays(dtype, shape, elements=st.floats(0, 1, width=32) if dtype == np.float32 else None))


@st.composite
def valid_frames(draw, n: int = 1) -> list[bytes]:
    scale = draw(st.sampled_from(["linear_0_1", "db", "display8"]))
    meta = StripMeta("fz", gsd_m=2.0, heading_deg=10.0, t0_s=0.0, row_rate_hz=10.0, scale=scale)
    return [encode_frame(meta, draw(frame_pixels()), row0=draw(st.integers(0, 100))) for _ in range(n)]


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    idx = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *idx], [*idx, len(data)], strict=True) if b > a]


def _feed(data: bytes, cuts: list[int], datagrams: bool = False) -> tuple[FrameDecoder, list]:
    dec = FrameDecoder(**DEC_LIMITS)
    out = []
    for c in _chunks(data, cuts):
        out += dec.feed(c)
        assert (
            dec.buffered_bytes <= FRAME_HEADER.size + DEC_LIMITS["max_header_bytes"] + DEC_LIMITS["max_payload_bytes"]
        )
        if datagrams:
            dec.end_datagram()
    dec.end_datagram()
    assert dec.buffered_bytes == 0
    return dec, out


def _events(dec: FrameDecoder) -> int:
    s = dec.stats
    return s.frames_ok + sum(getattr(s, k) for k in _DROPS)


def _decode_case(data: bytes, cuts: list[int], datagrams: bool = False) -> tuple[FrameDecoder, list]:
    CASES["stream frames: FrameDecoder.feed"] += 1
    with time_limit():
        dec, out = _feed(data, cuts, datagrams)  # no exception of any kind is allowed here
    assert len(out) == dec.stats.frames_ok
    ACCEPTED["stream frames: FrameDecoder.feed"] += bool(out)
    for b in out:
        assert b.pixels.dtype == np.float32 and np.isfinite(b.pixels).all()
    if data:
        assert _events(dec) >= 1, dec.stats  # something was decoded or counted
    return dec, out


@fuzz(450)
@given(
    data=st.binary(max_size=3000),
    magic=st.booleans(),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    dgram=st.booleans(),
)
def test_frame_decoder_random_bytes(data, magic, cuts, dgram):
    if magic:  # make (broken) headers likely
        data = data.replace(b"\x00", MAGIC + b"\x01", 3)
    _decode_case(data, cuts, dgram)


@fuzz(400)
@given(
    frames=valid_frames(3),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    cuts=st.lists(st.integers(0, 3000), max_size=4),
)
def test_frame_decoder_mutated_frames(frames, flips, cut, cuts):
    b = bytearray(b"".join(frames))
    for pos, val in flips:
        b[pos % len(b)] = val
    if cut is not None:
        del b[cut % len(b) :]
    dec, _ = _decode_case(bytes(b), cuts)
    if not flips and cut is None:
        assert dec.stats.frames_ok == 3


def forge_frame(hdr: Any, payload: bytes, flags: int = 1, version: int = 1) -> bytes:
    """A frame with an arbitrary header JSON and a correct CRC (reaches the header/metadata validation)."""
    hj = to_json_text(hdr).encode("utf-8", "surrogatepass") if not isinstance(hdr, bytes) else hdr
    crc = zlib.crc32(payload, zlib.crc32(hj))
    return FRAME_HEADER.pack(MAGIC, version, flags, len(hj), len(payload), crc) + hj + payload


FRAME_HDR = {**FRAME_META.to_dict(), "row0": 0, "rows": 2, "cols": 3, "dtype": "float32"}


@fuzz(350)
@given(
    hdr=st.one_of(st.just(FRAME_HDR).flatmap(mutated), json_value_huge),
    payload=st.one_of(
        st.just(np.zeros((2, 3), np.float32).tobytes()),
        st.just(np.full((2, 3), np.nan, np.float32).tobytes()),
        st.binary(max_size=48),
    ),
    flags=st.integers(0, 255),
    version=st.sampled_from([1, 1, 1, 0, 2, 255]),
)
def test_frame_decoder_forged_headers(hdr, payload, flags, version):
    good = encode_frame(FRAME_META, np.ones((2, 2), np.float32))
    dec, out = _decode_case(forge_frame(hdr, payload, flags, version) + good, [])
    assert out and out[-1].meta.strip_id == "fz", dec.stats  # the good frame behind is never lost


@fuzz(200)
@given(garbage=st.lists(st.binary(max_size=300), min_size=3, max_size=3), frames=valid_frames(2))
def test_frame_decoder_garbage_loses_no_frame(garbage, frames):
    garbage = [g.replace(MAGIC, b"").replace(b"SLS", b"") for g in garbage]
    dec, _ = _decode_case(garbage[0] + frames[0] + garbage[1] + frames[1] + garbage[2], [])
    assert dec.stats.frames_ok == 2, dec.stats
