"""Strip sources: files, watched folders, UDP/TCP framing (real sockets on 127.0.0.1), fuzzing of the decoders."""

import json
import os
import queue
import threading
import time

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sarloc.core.errors import SarlocError
from sarloc.core.scene import normalise_sar
from sarloc.runtime.frames import FRAME_HEADER, MAGIC, FrameDecoder, encode_frame, encode_frames
from sarloc.runtime.sources import DirSource, TcpSource, UdpSource, open_source
from sarloc.runtime.strips import StripFile, meta_from_dict
from sarloc.runtime.types import Strip, StripMeta
from sarloc.sim.senders import TcpStripServer, send_strip_tcp, send_strip_udp

SIDE = {"gsd_m": 2.0, "heading_deg": 37.0, "t0_s": 1_700_000_000.0, "row_rate_hz": 10.0}


def expected(raw, scale):
    return normalise_sar(raw, scale)[..., 0]


def write_strip(folder, name, arr, scale="linear_0_1", ext=".npy", **extra):
    """Image first, sidecar last (the writer contract)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = folder / f"{name}{ext}"
    if ext == ".npy":
        np.save(img, arr)
    elif ext == ".tif":
        tifffile.imwrite(img, arr)
    else:
        cv2.imwrite(str(img), arr)
    (folder / f"{name}.json").write_text(json.dumps({**SIDE, "scale": scale, **extra}))
    return img


def collect(blocks):
    blocks = list(blocks)
    by = {}
    for b in blocks:
        by.setdefault(b.meta.strip_id, []).append(b)
    return blocks, {k: np.concatenate([b.pixels for b in v]) for k, v in by.items()}


def run_in_thread(src):
    """Iterate a source in a thread; return (thread, queue of blocks)."""
    q = queue.Queue()

    def work():
        for b in src:
            q.put(b)
        q.put(None)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    return th, q


def drain(q, timeout_s=10.0):
    out, t_end = [], time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        try:
            b = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if b is None:
            return out
        out.append(b)
    raise AssertionError("source did not finish in time")


# --------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "ext, dtype, scale",
    [
        (".npy", np.float32, "linear_0_1"),
        (".tif", np.float32, "db"),
        (".png", np.uint8, "display8"),
        (".png", np.uint16, "display8"),
    ],
)
def test_file_round_trip_in_blocks(tmp_path, ext, dtype, scale):
    rng = np.random.default_rng(0)
    if dtype == np.float32:
        arr = rng.uniform(0.01, 1.0, (150, 33)).astype(np.float32) * (1 if scale == "linear_0_1" else -20)
    else:
        arr = rng.integers(0, np.iinfo(dtype).max, (150, 33)).astype(dtype)
    img = write_strip(tmp_path, "s", arr, scale, ext, strip_id="abc")
    src = open_source(f"file://{img}", block_rows=64)
    blocks, whole = collect(src)
    assert [b.row0 for b in blocks] == [0, 64, 128]
    assert [b.final for b in blocks] == [False, False, True]
    assert all(b.pixels.shape[0] <= 64 and b.pixels.dtype == np.float32 for b in blocks)
    assert blocks[0].meta.strip_id == "abc" and blocks[0].meta.scale == "db" and blocks[0].meta.heading_deg == 37.0
    np.testing.assert_allclose(whole["abc"], expected(arr, scale), rtol=1e-6, atol=1e-5)
    assert src.stats.strips_ok == 1
    # the sidecar path and a bare path work too
    assert np.array_equal(StripFile(tmp_path / "s.json").read().pixels, whole["abc"])
    assert len(list(open_source(str(img)))) == 3


def test_nonfinite_pixels_filled_or_refused(tmp_path, caplog):
    rng = np.random.default_rng(1)
    arr = rng.uniform(0.1, 1.0, (100, 20)).astype(np.float32)
    few = arr.copy()
    few.flat[rng.choice(few.size, 40, replace=False)] = np.nan  # 2 %
    write_strip(tmp_path, "few", few)
    with caplog.at_level("WARNING"):
        sf = StripFile(tmp_path / "few.npy")
    assert sf.n_nonfinite == 40 and "NaN/Inf" in caplog.text
    pix = sf.read().pixels
    assert np.isfinite(pix).all()
    fill = np.nanmean(few.astype(np.float64))
    np.testing.assert_allclose(pix[np.isnan(few)], 10 * np.log10(fill), rtol=1e-5)
    many = arr.copy()
    many[:10] = np.inf  # 10 %
    write_strip(tmp_path, "many", many)
    with pytest.raises(SarlocError, match=r"many\.npy.*NaN/Inf.*limit 5%"):
        StripFile(tmp_path / "many.npy")


def test_file_errors_are_one_line_and_name_the_file(tmp_path):
    good = np.ones((20, 10), np.float32)
    cases = {}
    write_strip(tmp_path, "nosidecar", good)
    (tmp_path / "nosidecar.json").unlink()
    cases["nosidecar.npy"] = "sidecar"
    img = write_strip(tmp_path, "trunc", good)
    img.write_bytes(img.read_bytes()[:-30])
    cases["trunc.npy"] = "unreadable"
    img = write_strip(tmp_path, "corrupt", (good * 200).astype(np.uint8), "display8", ".png")
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    cases["corrupt.png"] = "decoded"
    write_strip(tmp_path, "ndim", np.ones(20, np.float32))
    cases["ndim.npy"] = "shape"
    write_strip(tmp_path, "dtype", np.ones((20, 10), np.complex64))
    cases["dtype.npy"] = "dtype"
    write_strip(tmp_path, "empty", good)
    (tmp_path / "empty.npy").write_bytes(b"")
    cases["empty.npy"] = "unreadable"
    write_strip(tmp_path, "field", good)
    (tmp_path / "field.json").write_text(json.dumps({**SIDE, "scale": "linear_0_1", "gsd_m": "two"}))
    cases["field.json"] = "gsd_m"
    write_strip(tmp_path, "missing", good)
    (tmp_path / "missing.json").write_text(json.dumps({"gsd_m": 1.0, "scale": "db", "t0_s": 0.0}))
    cases["missing.json"] = "row_rate_hz"
    write_strip(tmp_path, "badjson", good)
    (tmp_path / "badjson.json").write_text('{"gsd_m": 1.0,')
    cases["badjson.json"] = "malformed JSON"
    write_strip(tmp_path, "scale", good, scale="kelvin")
    cases["scale.json"] = "scale"
    for name, word in cases.items():
        with pytest.raises(SarlocError) as ei:
            StripFile(tmp_path / name)
        msg = str(ei.value)
        assert "\n" not in msg and name.split(".")[0] in msg and word in msg, msg


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_keys = st.sampled_from(
    ["strip_id", "gsd_m", "heading_deg", "t0_s", "row_rate_hz", "across_offset_m", "scale", "prior_xy_m",
     "prior_lonlat_deg", "prior_sigma_m", "schema", "other"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    base=st.fixed_dictionaries({}, optional={k: st.just(v) for k, v in {**SIDE, "scale": "db"}.items()}),
    extra=st.dictionaries(_keys, _values, max_size=5),
    top=st.one_of(st.just(None), _values),
)
def test_sidecar_fuzz_raises_only_sarloc_error(base, extra, top):
    obj = {**base, **extra} if top is None else top
    try:
        m = meta_from_dict(obj, "fuzz.json", "fuzz")
    except SarlocError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.json")
    else:
        assert isinstance(m, StripMeta) and m.gsd_m > 0 and m.row_rate_hz > 0 and np.isfinite(m.t0_s)


# --------------------------------------------------------------------------------------------------- dir://


def test_dir_source_reads_complete_strips_skips_corrupt_and_ignores_partial(tmp_path, caplog):
    rng = np.random.default_rng(2)
    a = rng.uniform(0.1, 1, (70, 12)).astype(np.float32)
    c = rng.uniform(0.1, 1, (30, 12)).astype(np.float32)
    write_strip(tmp_path, "s_a", a)
    img = write_strip(tmp_path, "s_b", a)
    img.write_bytes(img.read_bytes()[:200])  # corrupt: truncated image with a valid sidecar
    write_strip(tmp_path, "s_c", c, strip_id="third")
    np.save(tmp_path / "s_d.npy", a)  # image without sidecar: incomplete
    (tmp_path / "s_e.json.tmp").write_text("{")  # a sidecar being written
    (tmp_path / ".s_f.json").write_text(json.dumps({**SIDE, "scale": "db"}))
    np.save(tmp_path / ".s_f.npy", a)
    (tmp_path / "truth.json").write_text("{}")  # unrelated JSON
    src = open_source(f"dir://{tmp_path}", follow=False, block_rows=32)
    with caplog.at_level("WARNING"):
        blocks, whole = collect(src)
    assert list(whole) == ["s_a", "third"]
    np.testing.assert_allclose(whole["s_a"], expected(a, "linear_0_1"), rtol=1e-6)
    np.testing.assert_allclose(whole["third"], expected(c, "linear_0_1"), rtol=1e-6)
    assert sum(b.final for b in blocks) == 2 and max(b.pixels.shape[0] for b in blocks) == 32
    assert src.stats.strips_ok == 2 and src.stats.strips_skipped == 1
    assert "s_b" in caplog.text


def test_dir_source_follows_new_strips_and_stops(tmp_path):
    tmp_path.joinpath("in").mkdir()
    folder = tmp_path / "in"
    write_strip(folder, "s0", np.full((10, 8), 0.5, np.float32))
    src = DirSource(folder, follow=True, poll_s=0.02, block_rows=64)
    th, q = run_in_thread(src)
    first = q.get(timeout=5)
    assert first.meta.strip_id == "s0"
    # a writer: image, then a temp sidecar, then the atomic rename
    np.save(folder / "s1.npy", np.full((10, 8), 0.25, np.float32))
    time.sleep(0.1)
    assert q.empty()  # image without sidecar: not complete yet
    tmp = folder / "s1.json.tmp"
    tmp.write_text(json.dumps({**SIDE, "scale": "linear_0_1"}))
    os.replace(tmp, folder / "s1.json")
    second = q.get(timeout=5)
    assert second.meta.strip_id == "s1" and second.final
    src.stop()
    th.join(timeout=5)
    assert not th.is_alive() and src.stats.strips_ok == 2


# --------------------------------------------------------------------------------------------------- streams


def make_strip(rows=100, cols=40, dtype=np.float32, sid="net", row0=0, final=True):
    rng = np.random.default_rng(rows + cols)
    if dtype == np.float32:
        px = rng.uniform(0.01, 1.0, (rows, cols)).astype(np.float32)
    else:
        px = rng.integers(0, np.iinfo(dtype).max, (rows, cols)).astype(dtype)
    scale = "linear_0_1" if dtype == np.float32 else "display8"
    meta = StripMeta(sid, 2.0, 123.4, 1.7e9, 20.0, across_offset_m=-5.0, scale=scale, prior_xy_m=(1.0, 2.0))
    return Strip(meta, px, row0, final)


def test_encode_frames_respects_max_bytes_and_flags():
    s = make_strip(100, 40)
    frames = encode_frames(s, max_bytes=2000)
    assert len(frames) > 5 and all(len(f) <= 2000 for f in frames)
    flags = [FRAME_HEADER.unpack_from(f)[2] for f in frames]
    assert flags[-1] == 1 and not any(flags[:-1])
    assert all(FRAME_HEADER.unpack_from(f)[2] == 0 for f in encode_frames(make_strip(final=False), 2000))
    with pytest.raises(SarlocError, match="does not fit"):
        encode_frames(make_strip(10, 20000), max_bytes=60_000)


def test_udp_round_trip_in_blocks():
    s8 = make_strip(90, 50, np.uint16, sid="u16")
    sf = make_strip(70, 40, sid="f32")
    src = UdpSource("127.0.0.1", 0, block_rows=16, max_strips=2, idle_timeout_s=10)
    th, q = run_in_thread(src)
    n = send_strip_udp([s8, sf], "127.0.0.1", src.port, max_bytes=1500)
    assert n >= 15
    blocks, whole = collect(drain(q))
    th.join(timeout=5)
    src.close()
    np.testing.assert_allclose(whole["u16"], expected(s8.pixels, "display8"), rtol=1e-6)
    np.testing.assert_allclose(whole["f32"], expected(sf.pixels, "linear_0_1"), rtol=1e-6)
    assert all(b.pixels.shape[0] <= 16 for b in blocks) and sum(b.final for b in blocks) == 2
    assert blocks[0].meta.prior_xy_m == (1.0, 2.0) and blocks[0].meta.across_offset_m == -5.0
    assert src.stats.frames_ok == n and src.stats.strips_ok == 2 and src.stats.dropped_crc == 0


def test_tcp_client_reconnects_to_a_strip_server():
    a, b = make_strip(60, 30, sid="a"), make_strip(50, 30, np.uint8, sid="b")
    with TcpStripServer("127.0.0.1", 0) as server:
        src = open_source(
            f"tcp://127.0.0.1:{server.port}", block_rows=64, max_strips=2, idle_timeout_s=10, backoff_s=(0.02, 0.1)
        )
        th, q = run_in_thread(src)
        server.serve(a, max_bytes=3000)  # closes the connection afterwards: the reader reconnects
        server.serve(b, max_bytes=3000)
        _blocks, whole = collect(drain(q))
        th.join(timeout=5)
    np.testing.assert_allclose(whole["a"], expected(a.pixels, "linear_0_1"), rtol=1e-6)
    np.testing.assert_allclose(whole["b"], expected(b.pixels, "display8"), rtol=1e-6)
    assert src.stats.reconnects >= 1 and src.stats.strips_ok == 2


def test_tcp_listen_mode_accepts_senders_one_after_another():
    src = TcpSource("127.0.0.1", 0, listen=True, max_strips=2, idle_timeout_s=10)
    th, q = run_in_thread(src)
    send_strip_tcp(make_strip(40, 20, sid="x"), "127.0.0.1", src.port, max_bytes=900)
    send_strip_tcp(make_strip(30, 20, sid="y"), "127.0.0.1", src.port)
    _, whole = collect(drain(q))
    th.join(timeout=5)
    src.close()
    assert sorted(whole) == ["x", "y"] and whole["x"].shape == (40, 20)


def row0_of(frame):
    hlen = FRAME_HEADER.unpack_from(frame)[3]
    return json.loads(frame[FRAME_HEADER.size : FRAME_HEADER.size + hlen])["row0"]


def test_decoder_drops_corrupt_frames_and_resyncs():
    s = make_strip(60, 30)
    frames = encode_frames(s, max_bytes=1500)
    assert len(frames) >= 6
    bad_crc = bytearray(frames[1])
    bad_crc[-7] ^= 0x40  # flipped payload byte
    truncated = frames[3][: len(frames[3]) // 2]
    bad_json = bytearray(frames[4])
    bad_json[FRAME_HEADER.size + 3] ^= 0x01  # flipped header-JSON byte
    parts = [b"\x00junk", frames[0], bytes(bad_crc), frames[2], b"SLS", truncated, b"garbage SLS1!", bytes(bad_json)]
    stream = b"".join([*parts, *frames[5:]])
    dec = FrameDecoder()
    out = []
    for i in range(0, len(stream), 97):  # arbitrary chunking
        out += dec.feed(stream[i : i + 97])
    dec.end_datagram()
    rows = [row0_of(f) for f in frames]
    assert [b.row0 for b in out] == [r for k, r in enumerate(rows) if k not in (1, 3, 4)]
    st_ = dec.stats
    assert st_.frames_ok == len(frames) - 3
    assert st_.dropped_crc + st_.dropped_malformed >= 3 and st_.dropped_crc >= 1 and st_.resyncs >= 3
    assert dec.buffered_bytes == 0


def test_decoder_refuses_impossible_sizes_without_waiting():
    s = make_strip(10, 10)
    good = encode_frame(s.meta, s.pixels)
    hdr = bytearray(good)
    FRAME_HEADER.pack_into(hdr, 0, MAGIC, 1, 0, 100, 2**31, 0)  # 2 GiB payload claimed
    dec = FrameDecoder()
    out = dec.feed(bytes(hdr[: FRAME_HEADER.size]) + good)
    assert len(out) == 1 and dec.stats.dropped_malformed == 1
    nan = make_strip(10, 10)
    nan.pixels[:2] = np.nan  # 20 % NaN
    assert dec.feed(encode_frame(nan.meta, nan.pixels)) == [] and dec.stats.dropped_nonfinite == 1
    few = make_strip(10, 10)
    few.pixels[0, 0] = np.inf
    (b,) = dec.feed(encode_frame(few.meta, few.pixels))
    assert np.isfinite(b.pixels).all() and dec.stats.nonfinite_filled == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 500), with_magic=st.booleans())
def test_decoder_fuzz_random_bytes_never_raise(data, chunk, with_magic):
    if with_magic:  # make headers more likely
        data = data.replace(b"\x00\x00", MAGIC + b"\x01\x00")
    dec = FrameDecoder(max_payload_bytes=1 << 16)
    for i in range(0, len(data), chunk):
        for b in dec.feed(data[i : i + chunk]):
            assert b.pixels.ndim == 2 and np.isfinite(b.pixels).all()
    dec.end_datagram()
    assert dec.buffered_bytes == 0
    assert all(isinstance(v, int) and v >= 0 for v in dec.stats.as_dict().values())


_GOOD = encode_frames(make_strip(24, 16, np.uint8), max_bytes=700)


@settings(max_examples=200, deadline=None)
@given(garbage=st.lists(st.binary(max_size=200), min_size=len(_GOOD) + 1, max_size=len(_GOOD) + 1))
def test_decoder_fuzz_garbage_between_frames_loses_no_frame(garbage):
    # garbage that cannot start a frame by itself: strip the magic
    garbage = [g.replace(b"SLS1", b"") for g in garbage]
    stream = b"".join(g + f for g, f in zip(garbage, [*_GOOD, b""], strict=True))
    dec = FrameDecoder()
    out = dec.feed(stream)
    assert [b.row0 for b in out] == [row0_of(f) for f in _GOOD]
    assert dec.stats.frames_ok == len(_GOOD)


def test_open_source_errors():
    with pytest.raises(SarlocError, match=r"unknown strip source.*file://.*dir://.*udp://.*tcp://"):
        open_source("http://example.com/strip")
    with pytest.raises(SarlocError, match="HOST:PORT"):
        open_source("udp://127.0.0.1")
    with pytest.raises(SarlocError, match="unknown option"):
        open_source("udp://127.0.0.1:0", follow=True)
    with pytest.raises(SarlocError, match="folder not found"):
        open_source("dir:///nonexistent/folder")


def test_decoder_skips_intact_frames_over_the_limits():
    big, small = make_strip(40, 30, sid="big"), make_strip(5, 30, sid="small")
    dec = FrameDecoder(max_rows=10)
    out = dec.feed(encode_frame(big.meta, big.pixels) + encode_frame(small.meta, small.pixels))
    assert [b.meta.strip_id for b in out] == ["small"]
    assert dec.stats.dropped_malformed == 1 and dec.stats.resyncs == 0 and dec.stats.dropped_crc == 0


@pytest.mark.parametrize("field", ["gsd_m", "row_rate_hz", "t0_s", "heading_deg", "across_offset_m", "prior_sigma_m"])
def test_strip_meta_number_beyond_float_range_is_refused(field):
    """An integer beyond the float range (JSON parses it) gave OverflowError in StripMeta's checks."""
    from sarloc.runtime.types import StripMeta

    kw = dict(strip_id="s", gsd_m=2.0, heading_deg=10.0, t0_s=0.0, row_rate_hz=5.0) | {field: 10**400}
    with pytest.raises(SarlocError, match=f"bad metadata: {field}=1000"):
        StripMeta(**kw)


def test_a_folder_without_dir_scheme_says_to_use_dir(tmp_path):
    from sarloc.runtime.sources import open_source

    with pytest.raises(SarlocError, match=r"is a folder: use dir://"):
        list(open_source(str(tmp_path)))
