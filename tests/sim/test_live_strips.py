"""Live strip cutter: geometry against simulate_flight, live emission, turns, framing, UDP, geo placement."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from sarloc.core.errors import ConfigError, SarlocError
from sarloc.core.geo import sample_metric
from sarloc.core.scene import load_scene
from sarloc.runtime.frames import FrameDecoder, encode_frames
from sarloc.runtime.sources import UdpSource
from sarloc.runtime.types import Strip, heading_vectors
from sarloc.runtime.windows import WindowStream, vehicle_from_window, window_ground_xy
from sarloc.sim.flight import DEFAULT_T_START_S, simulate_flight
from sarloc.sim.live_strips import StripCutter, StripCutterConfig, UdpStripFeeder, geo_place_scene
from sarloc.sim.scenes import SynthConfig, write_scene

DT_S = 0.0625  # binary-exact sample period: sample times t0 + k * DT_S are exact


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = write_scene(tmp_path_factory.mktemp("scene") / "s", SynthConfig(width_px=320, height_px=320, seed=5))
    return load_scene(d)


def _push_all(cutter: StripCutter, samples) -> list[Strip]:
    """Push samples one at a time; check that no block holds a row whose centre time is after the last sample."""
    out: list[Strip] = []
    for s in samples:
        for b in cutter.push(*s):
            last_row_t = float(b.meta.row_time_s(b.row0 + b.pixels.shape[0] - 0.5))
            assert last_row_t <= s[0] + 1e-9, (b.meta.strip_id, b.row0, last_row_t, s[0])
            out.append(b)
    return out


def _whole(blocks: list[Strip]) -> dict[str, Strip]:
    """Reassemble blocks into whole strips, checking row continuity and that only the last block is final."""
    by: dict[str, list[Strip]] = {}
    for b in blocks:
        by.setdefault(b.meta.strip_id, []).append(b)
    out = {}
    for sid, bs in by.items():
        assert [b.row0 for b in bs] == list(np.cumsum([0] + [b.pixels.shape[0] for b in bs[:-1]]))
        assert [b.final for b in bs] == [False] * (len(bs) - 1) + [True]
        assert all(b.meta == bs[0].meta for b in bs)
        out[sid] = Strip(bs[0].meta, np.concatenate([b.pixels for b in bs]))
    return out


def test_straight_flight_matches_simulate_flight(scene, tmp_path):
    rows, width, offset_m, speed_mps, heading_deg = 48, 40, 25.0, 30.0, 37.0
    flight = simulate_flight(
        scene,
        tmp_path / "flight",
        heading_deg=heading_deg,
        strip_width_px=width,
        strip_rows=rows,
        n_strips=1,
        speed_mps=speed_mps,
        seed=3,
        across_offset_m=offset_m,
    )
    truth = json.loads((flight / "truth.json").read_text())["strips"][0]
    sim = np.load(flight / "strip_0000.npy")
    t0 = DEFAULT_T_START_S
    start = np.array(truth["vehicle_start_xy_m"])
    fwd, right = heading_vectors(heading_deg)

    def vehicle(t):
        return start + (np.asarray(t)[..., None] - t0) * speed_mps * fwd

    cfg = StripCutterConfig(width_px=width, max_rows=rows, block_rows=16, across_offset_m=offset_m, straight_s=2.0)
    cutter = StripCutter(scene, cfg)
    ks = np.arange(-32, int(rows / 3.0 / DT_S) + 40)  # 2 s of straight flight before t0, then past the strip end
    blocks = _push_all(cutter, [(t0 + k * DT_S, *vehicle(t0 + k * DT_S), heading_deg, speed_mps) for k in ks])
    blocks += cutter.finish()
    strips = _whole(blocks)
    s0 = strips["strip_000000"]
    m = s0.meta
    assert (m.t0_s, m.heading_deg, m.gsd_m, m.across_offset_m, m.scale) == (t0, heading_deg, 10.0, offset_m, "db")
    assert m.row_rate_hz == pytest.approx(speed_mps / 10.0)
    assert s0.pixels.dtype == np.float32 and s0.pixels.shape == (rows, width)
    np.testing.assert_allclose(s0.pixels, sim, rtol=0, atol=1e-4)
    assert len(strips) >= 2  # the flight goes on straight: the next strip starts where the first ended

    t = cutter.truth()
    t0_truth = t["strips"][0]
    assert t0_truth["end_reason"] == "max_rows" and t0_truth["rows"] == rows
    np.testing.assert_allclose(t0_truth["vehicle_start_xy_m"], truth["vehicle_start_xy_m"], atol=1e-6)
    np.testing.assert_allclose(t0_truth["vehicle_end_xy_m"], truth["vehicle_end_xy_m"], atol=1e-5)
    assert t0_truth["vehicle_start_lonlat_deg"] is not None
    json.dumps(t)

    # geometry: windows of the streamed strip map back to the true vehicle position
    ws = WindowStream(map_gsd_m=10.0, window_px=12, stride_px=6)
    batches = [ws.push(b) for b in blocks if b.meta.strip_id == "strip_000000"]
    centres = np.concatenate([bt.centres_px for bt in batches])
    assert len(centres) >= 4
    t_s = np.asarray(m.row_time_s(centres[:, 1]))
    v_true = vehicle(t_s)
    ground = (
        start
        + ((t_s - t0) * speed_mps)[:, None] * fwd
        + ((centres[:, 0] - width / 2) * 10.0 + offset_m)[:, None] * right
    )
    np.testing.assert_allclose(window_ground_xy(v_true, centres, m, width_px=width), ground, atol=1e-6)
    err = np.abs(vehicle_from_window(ground, centres, m, width_px=width) - v_true).max()
    assert err < 1e-6
    # pixels at a few strip coordinates = the scene at the ground points
    for i, j in [(0, 0), (width - 1, 5), (17, rows - 1), (3, 31)]:
        g = vehicle(m.row_time_s(j + 0.5)) + ((i + 0.5 - width / 2) * 10.0 + offset_m) * right
        want = sample_metric(scene.sar_gray, scene.frame, np.array(g[0]), np.array(g[1]))
        assert abs(float(s0.pixels[j, i]) - float(want)) < 1e-4


def _turn_trajectory(scene, t_start_s=1000.0):
    """East for 25 s, a 90-degree right turn at 6 deg/s, south for 25 s; 30 m/s, 16 Hz samples."""
    x0, y0 = scene.frame.pixel_to_metric(60.0, 40.0)
    speed, rate_dps = 30.0, 6.0
    t_turn0, t_turn1, t_end = 25.0, 40.0, 65.0
    out = []
    pos = np.array([float(x0), float(y0)])
    course = 90.0
    for k in range(int(t_end / DT_S) + 1):
        t = k * DT_S
        out.append((t_start_s + t, pos[0], pos[1], course, speed))
        if t_turn0 <= t < t_turn1:
            course = 90.0 + rate_dps * (t + DT_S - t_turn0)
        pos = pos + speed * DT_S * heading_vectors(course)[0]
    return out, t_start_s + t_turn0, t_start_s + t_turn1


def test_turn_ends_strip_and_new_one_starts(scene):
    samples, t_turn0, t_turn1 = _turn_trajectory(scene)
    cfg = StripCutterConfig(width_px=32, max_rows=400, block_rows=16, max_turn_deg=5.0, seed=1)
    cutter = StripCutter(scene, cfg)
    blocks = _push_all(cutter, samples)
    blocks += cutter.finish()
    strips = _whole(blocks)
    truth = cutter.truth()["strips"]
    assert list(strips) == ["strip_000000", "strip_000001"] == [s["strip_id"] for s in truth]
    a, b = truth
    assert a["end_reason"] == "turn" and b["end_reason"] == "finish"
    assert a["true_heading_deg"] == pytest.approx(90.0) and b["true_heading_deg"] == pytest.approx(180.0)
    assert a["t_end_s"] <= t_turn0 + 5.0 / 6.0 + 0.2  # ended within the 5-degree tolerance of the turn start
    # started once the course had been within 5 degrees of its new value for 2 s
    assert t_turn1 - 5.0 / 6.0 + 2.0 <= b["t0_s"] <= t_turn1 - 5.0 / 6.0 + 2.0 + 2 * DT_S
    assert strips["strip_000000"].pixels.shape[0] == a["rows"]
    # every pixel is the scene at ground(vehicle(t(row)) + across * right), vehicle linearly interpolated
    ts = np.array([s[0] for s in samples])
    xs = np.array([s[1] for s in samples])
    ys = np.array([s[2] for s in samples])
    for sid, st in strips.items():
        m = st.meta
        tr = np.asarray(m.row_time_s(np.arange(st.pixels.shape[0]) + 0.5))
        _, right = heading_vectors(m.heading_deg)
        across = (np.arange(32) + 0.5 - 16) * m.gsd_m
        gx = np.interp(tr, ts, xs)[:, None] + across * right[0]
        gy = np.interp(tr, ts, ys)[:, None] + across * right[1]
        want = sample_metric(scene.sar_gray, scene.frame, gx, gy)
        np.testing.assert_allclose(st.pixels, want, atol=1e-3, err_msg=sid)
    assert cutter.buffered_samples <= 2.0 / DT_S + 8  # memory bounded


def test_leaving_scene_ends_strip_and_noise_is_seeded(scene):
    x0, y0 = scene.frame.pixel_to_metric(160.0, 250.0)
    samples = [(k * DT_S, float(x0), float(y0) + 30.0 * k * DT_S, 0.0, 30.0) for k in range(int(90 / DT_S))]

    def run(seed):
        cfg = StripCutterConfig(
            width_px=24, max_rows=1000, block_rows=8, heading_noise_deg=2.0, speckle_looks=4.0, seed=seed
        )
        c = StripCutter(scene, cfg)
        blocks = _push_all(c, samples) + c.finish()
        return _whole(blocks), c.truth()["strips"]

    strips, truth = run(7)
    assert [t["end_reason"] for t in truth] == ["left_scene"]
    top = scene.frame.pixel_to_metric(0.0, 0.0)[1]
    assert float(top) - 20.0 <= truth[0]["vehicle_end_xy_m"][1] <= float(top)  # ended at the image's top edge
    assert truth[0]["heading_error_deg"] != 0.0
    assert strips["strip_000000"].meta.heading_deg == pytest.approx(truth[0]["heading_deg"])
    strips2, truth2 = run(7)
    np.testing.assert_array_equal(strips["strip_000000"].pixels, strips2["strip_000000"].pixels)
    assert truth2[0]["heading_deg"] == truth[0]["heading_deg"]
    strips3, _ = run(8)
    assert not np.array_equal(strips["strip_000000"].pixels, strips3["strip_000000"].pixels)


def test_slow_gap_and_bad_samples(scene):
    x0, y0 = scene.frame.pixel_to_metric(160.0, 160.0)
    c = StripCutter(scene, StripCutterConfig(width_px=16, max_rows=64, block_rows=4, min_speed_mps=5.0))
    for k in range(100):  # too slow: no strip
        assert c.push(k * DT_S, float(x0), float(y0) + 2.0 * k * DT_S, 0.0, 2.0) == []
    assert c.active_strip_id is None and c.truth()["strips"] == []
    assert c.push(1.0, float(x0), float(y0), 0.0, 30.0) == []  # not after the previous sample: dropped
    assert c.stats["samples_dropped"] == 1
    with pytest.raises(SarlocError, match="speed_mps") as e:
        c.push(100.0, float(x0), float(y0), 0.0, float("nan"))
    assert "\n" not in str(e.value)
    # steady flight, then a 3 s pause in the samples: the strip ends ("gap")
    blocks = _push_all(c, [(10.0 + k * DT_S, float(x0), float(y0) + 30.0 * k * DT_S, 0.0, 30.0) for k in range(80)])
    blocks += c.push(10.0 + 80 * DT_S + 3.0, float(x0), float(y0) + 200.0, 0.0, 30.0)
    assert blocks and blocks[-1].final
    assert c.truth()["strips"][-1]["end_reason"] == "gap"


def test_blocks_round_trip_through_sls1(scene):
    x0, y0 = scene.frame.pixel_to_metric(100.0, 200.0)
    c = StripCutter(scene, StripCutterConfig(width_px=20, max_rows=40, block_rows=8, across_offset_m=-15.0))
    samples = [(5.0 + k * DT_S, float(x0) + 30.0 * k * DT_S, float(y0), 90.0, 30.0) for k in range(300)]
    blocks = _push_all(c, samples) + c.finish()
    assert len(blocks) >= 5
    dec = FrameDecoder()
    got = []
    for b in blocks:
        got += dec.feed(b"".join(encode_frames(b, max_bytes=700)))  # several frames per block
    assert dec.stats.dropped_crc == dec.stats.dropped_malformed == 0
    rows = lambda bs: {(b.meta.strip_id, b.row0 + r): b.pixels[r] for b in bs for r in range(b.pixels.shape[0])}  # noqa: E731
    want, have = rows(blocks), rows(got)
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_array_equal(have[k], want[k])
    assert {b.meta for b in got} == {b.meta for b in blocks}
    assert sum(b.final for b in got) == sum(b.final for b in blocks)


def test_udp_feeder_reaches_udp_source(scene):
    x0, y0 = scene.frame.pixel_to_metric(100.0, 200.0)
    c = StripCutter(scene, StripCutterConfig(width_px=20, max_rows=24, block_rows=8))
    samples = [(k * DT_S, float(x0) + 30.0 * k * DT_S, float(y0), 90.0, 30.0) for k in range(200)]
    blocks = [b for b in _push_all(c, samples) if b.meta.strip_id == "strip_000000"]
    src = UdpSource("127.0.0.1", 0, idle_timeout_s=2.0, max_strips=1, block_rows=64)
    with src, UdpStripFeeder(f"udp://127.0.0.1:{src.port}", max_bytes=600) as feeder:
        n = feeder.send(blocks)
        assert n == feeder.frames_sent > len(blocks) and feeder.blocks_sent == len(blocks)
        assert feeder.send_errors == 0
        got = list(src)
    assert src.stats.strips_ok == 1
    np.testing.assert_array_equal(np.concatenate([b.pixels for b in got]), np.concatenate([b.pixels for b in blocks]))
    with pytest.raises(SarlocError, match="closed"):
        feeder.send(blocks)
    with pytest.raises(SarlocError, match="udp://HOST:PORT"):
        UdpStripFeeder("tcp://127.0.0.1:5600")


def _unreferenced_scene(tmp_path: Path, gsd_m: float) -> Path:
    d = write_scene(tmp_path / "raw", SynthConfig(width_px=96, height_px=64, seed=2))
    meta = json.loads((d / "scene.json").read_text())
    meta.update(crs=None, geotransform=None, gsd_m=None, gsd_m_estimate=gsd_m, name="raw_pair")
    (d / "scene.json").write_text(json.dumps(meta))
    return d


def test_geo_place_scene(tmp_path):
    raw = _unreferenced_scene(tmp_path, 7.5)
    lat, lon = -33.8688, 151.2093
    out = geo_place_scene(raw, tmp_path / "placed", lat_deg=lat, lon_deg=lon)
    sc = load_scene(out, verify_sha256=True)
    assert sc.name == "raw_pair_placed" and sc.frame.crs == "EPSG:32756"
    assert sc.frame.gsd_m == pytest.approx((7.5, 7.5))
    c_lon, c_lat = (float(v) for v in sc.frame.pixel_to_lonlat(48.0, 32.0))
    d_m = math.hypot((c_lat - lat) * 111_320.0, (c_lon - lon) * 111_320.0 * math.cos(math.radians(lat)))
    assert d_m < 1.0
    _, top_lat = sc.frame.pixel_to_lonlat(48.0, 0.0)
    assert float(top_lat) > c_lat  # north up
    for f in ("optical.png", "sar.tif", "change_mask.png"):
        assert (out / f).is_symlink() and os.path.samefile(out / f, raw / f)
    orig = load_scene(raw)
    np.testing.assert_array_equal(sc.sar_gray, orig.sar_gray)
    # pixel geometry kept: the metric frames differ by the recorded offset only
    off = json.loads((out / "scene.json").read_text())["placement"]["offset_m"]
    xo, yo = orig.frame.pixel_to_metric(np.array([0.0, 96.0]), np.array([0.0, 64.0]))
    xp, yp = sc.frame.pixel_to_metric(np.array([0.0, 96.0]), np.array([0.0, 64.0]))
    np.testing.assert_allclose(xp - xo, off[0], atol=1e-6)
    np.testing.assert_allclose(yp - yo, off[1], atol=1e-6)

    with pytest.raises(SarlocError, match="not empty"):
        geo_place_scene(raw, out, lat_deg=lat, lon_deg=lon)
    assert geo_place_scene(raw, out, lat_deg=10.0, lon_deg=lon, force=True) == out
    with pytest.raises(SarlocError, match=r"raw_pair_placed.*already has a CRS"):
        geo_place_scene(out, tmp_path / "again", lat_deg=lat, lon_deg=lon)
    with pytest.raises(ConfigError, match="lat_deg"):
        geo_place_scene(raw, tmp_path / "x", lat_deg=95.0, lon_deg=lon)
    with pytest.raises(ConfigError, match="lon_deg"):
        geo_place_scene(raw, tmp_path / "x", lat_deg=lat, lon_deg=float("nan"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gsd_m", -1.0),
        ("width_px", 1),
        ("max_rows", 0),
        ("block_rows", 2.5),
        ("min_speed_mps", 0.0),
        ("max_turn_deg", 200.0),
        ("max_speed_change", float("inf")),
        ("across_offset_m", float("nan")),
        ("heading_noise_deg", -1.0),
        ("speckle_looks", 0.0),
        ("seed", -1),
        ("straight_s", True),
        ("max_gap_s", 0.0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        StripCutterConfig(**{field: value})
    msg = str(e.value)
    assert f"{field}=" in msg and "\n" not in msg
