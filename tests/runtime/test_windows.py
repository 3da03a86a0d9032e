"""Windows: north-up resampling against the scene, vehicle <-> window geometry, streaming by blocks."""

import dataclasses
import json

import cv2
import numpy as np
import pytest

from sarloc.core.errors import SarlocError
from sarloc.core.scene import load_scene
from sarloc.eval.report import load_truth, truth_at
from sarloc.runtime.strips import StripFile
from sarloc.runtime.types import Strip, StripMeta
from sarloc.runtime.windows import (
    WindowBatch,
    WindowStream,
    extract_windows,
    vehicle_from_window,
    window_ground_xy,
)
from sarloc.sim.flight import simulate_flight

WIN, MAP_GSD = 32, 10.0


@pytest.fixture(scope="module")
def smooth_scene(synth_scene):
    """The synthetic scene with its SAR band-limited (speckle makes interpolation error dominate otherwise)."""
    sc = load_scene(synth_scene)
    return dataclasses.replace(sc, sar_gray=cv2.GaussianBlur(sc.sar_gray, (0, 0), 1.5))


def bilinear(img, ax, ay):
    x0 = np.floor(ax).astype(int)
    y0 = np.floor(ay).astype(int)
    fx, fy = ax - x0, ay - y0
    return (
        img[y0, x0] * (1 - fx) * (1 - fy)
        + img[y0, x0 + 1] * fx * (1 - fy)
        + img[y0 + 1, x0] * (1 - fx) * fy
        + img[y0 + 1, x0 + 1] * fx * fy
    )


def map_crop(scene, centre_xy, window_px, gsd):
    """What the north-up basemap shows around a ground point (independent of the runtime code)."""
    x0, dx, _, y0, _, dy = scene.frame.geotransform
    k = np.arange(window_px) + 0.5 - window_px / 2
    gx = centre_xy[0] + k[None, :] * gsd
    gy = centre_xy[1] - k[:, None] * gsd
    col, row = (gx - x0) / dx, (gy - y0) / dy
    return bilinear(scene.sar_gray.astype(np.float64), col - 0.5, row - 0.5)


def fly(scene, out, heading, gsd_m=None, width=64, rows=96, across_offset_m=0.0):
    simulate_flight(
        scene, out, "straight", heading_deg=heading, strip_width_px=width, strip_rows=rows, n_strips=1, gsd_m=gsd_m,
        across_offset_m=across_offset_m, seed=1,
    )  # fmt: skip
    return StripFile(out / "strip_0000.npy").read(), load_truth(out / "truth.json")


def check_against_truth(scene, strip, truth, batch, min_corr):
    assert len(batch) > 0
    veh = truth_at(truth, batch.t_s)
    ground = window_ground_xy(veh, batch.centres_px, strip.meta, width_px=batch.width_px)
    corrs = []
    for w, g in zip(batch.windows, ground, strict=True):
        ref = map_crop(scene, g, WIN, MAP_GSD)
        corrs.append(np.corrcoef(w.ravel(), ref.ravel())[0, 1])
    assert min(corrs) > min_corr, corrs
    return corrs


@pytest.mark.parametrize("heading", [0.0, 37.0, 90.0, 200.0])
def test_windows_are_north_up_crops_of_the_scene(smooth_scene, tmp_path, heading):
    strip, truth = fly(smooth_scene, tmp_path / "f", heading, across_offset_m=30.0)
    batch = extract_windows(strip.pixels, strip.meta, MAP_GSD, WIN, stride_px=12)
    assert batch.windows.shape[1:] == (WIN, WIN) and batch.windows.dtype == np.float32
    assert batch.heading_deg == pytest.approx(heading) and batch.width_px == 64
    check_against_truth(smooth_scene, strip, truth, batch, 0.95)
    # the geometry of the batch: centres inside the strip, times from the centre rows
    e = WIN / 2 * (abs(np.cos(np.radians(heading))) + abs(np.sin(np.radians(heading))))
    assert batch.centres_px[:, 0].min() >= e - 1e-9 and batch.centres_px[:, 0].max() <= 64 - e + 1e-9
    assert batch.centres_px[:, 1].min() >= e - 1e-9 and batch.centres_px[:, 1].max() <= 96 - e + 1e-9
    np.testing.assert_allclose(batch.t_s, strip.meta.t0_s + batch.along_row / strip.meta.row_rate_hz)
    np.testing.assert_allclose(batch.across_m, (batch.centres_px[:, 0] - 32) * 10.0 + 30.0)
    assert list(batch.index) == sorted(set(batch.index))


def test_finer_strip_is_antialiased_and_resampled_to_map_gsd(smooth_scene, tmp_path):
    strip, truth = fly(smooth_scene, tmp_path / "f", 37.0, gsd_m=5.0, width=100, rows=140)
    batch = extract_windows(strip.pixels, strip.meta, MAP_GSD, WIN, stride_px=16)
    assert batch.map_gsd_m == MAP_GSD and batch.windows.shape[1:] == (WIN, WIN)
    check_against_truth(smooth_scene, strip, truth, batch, 0.9)
    yy, xx = np.mgrid[:140, :100].astype(np.float32)
    # resampled: across a north-up 5 m strip, stripes 32 strip px (160 m) apart are 16 map px apart in the windows
    north = dataclasses.replace(strip.meta, heading_deg=0.0)
    w = extract_windows(np.cos(2 * np.pi * xx / 32.0), north, MAP_GSD, WIN, stride_px=16).windows
    spectrum = np.abs(np.fft.rfft(w.mean(1), axis=-1)).mean(0)
    assert np.argmax(spectrum) == WIN // 16, spectrum.round(1)
    # antialiased: a checkerboard at the strip's Nyquist frequency (beyond what the map can show) is mostly
    # removed, where plain bilinear resampling folds it back into the windows ...
    checker = ((xx + yy) % 2) * 2.0 - 1.0
    aa = extract_windows(checker, strip.meta, MAP_GSD, WIN, stride_px=16).windows.std()
    raw = extract_windows(checker, strip.meta, MAP_GSD, WIN, stride_px=16, antialias=False).windows.std()
    assert aa < 0.15 and aa < 0.5 * raw, (aa, raw)
    # ... while detail the map can show (a 320 m period) keeps its amplitude
    slow = extract_windows(np.cos(2 * np.pi * xx / 64.0), strip.meta, MAP_GSD, WIN, stride_px=16).windows
    assert slow.std() > 0.6, slow.std()


def test_vehicle_and_window_positions_are_inverse():
    rng = np.random.default_rng(0)
    for heading in (0.0, 37.0, 123.4, 271.0):
        meta = StripMeta("s", 2.5, heading, 0.0, 4.0, across_offset_m=-17.0)
        centres = rng.uniform(0, 200, (20, 2))
        veh = rng.uniform(-1e6, 1e6, (20, 2))
        g = window_ground_xy(veh, centres, meta, width_px=120)
        np.testing.assert_allclose(vehicle_from_window(g, centres, meta, width_px=120), veh, atol=1e-6)
        # the offset is perpendicular to the track (no along-track part): (c - W/2) * gsd + across_offset_m to the
        # right of the heading
        right = np.array([np.cos(np.radians(heading)), -np.sin(np.radians(heading))])
        across = (centres[:, 0] - 60) * 2.5 - 17.0
        np.testing.assert_allclose(g - veh, across[:, None] * right, atol=1e-6)
        # an overriding heading wins over the metadata: the offset is to the right of that heading, both ways
        h2 = heading + 90.0
        right2 = np.array([np.cos(np.radians(h2)), -np.sin(np.radians(h2))])
        g2 = window_ground_xy(veh, centres, meta, heading_deg=h2, width_px=120)
        np.testing.assert_allclose(g2 - veh, across[:, None] * right2, atol=1e-6)
        np.testing.assert_allclose(vehicle_from_window(g2, centres, meta, heading_deg=h2, width_px=120), veh, atol=1e-6)


def test_simulated_window_centres_recover_the_vehicle(smooth_scene, tmp_path):
    strip, truth = fly(smooth_scene, tmp_path / "f", 200.0, across_offset_m=-40.0)
    batch = extract_windows(strip.pixels, strip.meta, MAP_GSD, WIN, stride_px=12)
    veh = truth_at(truth, batch.t_s)
    # the true window-centre ground point: ground(cc, rc) from the strip geometry and truth
    fwd = np.array([np.sin(np.radians(200.0)), np.cos(np.radians(200.0))])
    right = np.array([np.cos(np.radians(200.0)), -np.sin(np.radians(200.0))])
    s0 = np.array(json.loads((tmp_path / "f" / "truth.json").read_text())["strips"][0]["vehicle_start_xy_m"])
    g = s0 + batch.along_row[:, None] * 10.0 * fwd + ((batch.centres_px[:, 0] - 32) * 10.0 - 40.0)[:, None] * right
    np.testing.assert_allclose(batch.vehicle_xy_m(g), veh, atol=1e-6)


def test_streaming_by_blocks_gives_the_same_windows(smooth_scene, tmp_path):
    strip, _ = fly(smooth_scene, tmp_path / "f", 37.0, gsd_m=5.0, width=100, rows=140)
    whole = extract_windows(strip.pixels, strip.meta, MAP_GSD, WIN, stride_px=10)
    rng = np.random.default_rng(3)
    stream = WindowStream(MAP_GSD, WIN, 10)
    parts, r, max_buf = [], 0, 0
    while r < strip.pixels.shape[0]:
        n = int(rng.integers(1, 20))
        blk = Strip(strip.meta, strip.pixels[r : r + n], r, r + n >= strip.pixels.shape[0])
        parts.append(stream.push(blk))
        max_buf = max(max_buf, stream.buffered_rows)
        r += n
    got = WindowBatch.concat(parts, WIN)
    assert len(got) == len(whole) > 0
    assert np.array_equal(got.windows, whole.windows)
    np.testing.assert_array_equal(got.centres_px, whole.centres_px)
    np.testing.assert_array_equal(got.index, whole.index)
    np.testing.assert_array_equal(got.t_s, whole.t_s)
    assert max_buf < 0.75 * strip.pixels.shape[0]  # bounded: only the rows the next windows need
    assert stream.buffered_rows == 0 and stream.stats["windows"] == len(whole)


def test_stream_with_missing_rows_skips_windows_and_continues(smooth_scene, tmp_path):
    strip, _ = fly(smooth_scene, tmp_path / "f", 90.0, rows=160)
    whole = extract_windows(strip.pixels, strip.meta, MAP_GSD, WIN, stride_px=8)
    stream = WindowStream(MAP_GSD, WIN, 8)
    out = []
    for r in range(0, 160, 16):
        if r == 48:
            continue  # a lost block
        out.append(stream.push(Strip(strip.meta, strip.pixels[r : r + 16], r, r + 16 >= 160)))
    got = WindowBatch.concat(out, WIN)
    assert stream.stats["row_gaps"] == 1 and stream.stats["windows_skipped"] > 0
    assert 0 < len(got) < len(whole)
    pos = np.searchsorted(whole.index, got.index)
    np.testing.assert_array_equal(whole.index[pos], got.index)
    assert np.array_equal(whole.windows[pos], got.windows)


def test_heading_required_and_narrow_strips_give_no_windows(caplog):
    meta = StripMeta("s", 10.0, None, 0.0, 3.0)
    px = np.zeros((100, 60), np.float32)
    with pytest.raises(SarlocError, match=r"heading.*metadata.*MAVLink"):
        extract_windows(px, meta, MAP_GSD, WIN, 8)
    assert len(extract_windows(px, meta, MAP_GSD, WIN, 8, heading_deg=0.0)) > 0
    with caplog.at_level("WARNING"):
        b = extract_windows(px, meta, MAP_GSD, WIN, 8, heading_deg=45.0)  # needs 32 * sqrt(2) = 45.3 px: ok
        assert len(b) > 0
        b = extract_windows(px[:, :45], meta, MAP_GSD, WIN, 8, heading_deg=45.0)
    assert len(b) == 0 and b.windows.shape == (0, WIN, WIN) and "too narrow" in caplog.text
    with pytest.raises(SarlocError, match="window_px"):
        extract_windows(px, meta, MAP_GSD, 1, 8, heading_deg=0.0)
    with pytest.raises(SarlocError, match="stride_px"):
        WindowStream(MAP_GSD, WIN, 0)
