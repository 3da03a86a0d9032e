"""Simulated flights (truth consistency, tracks inside the scene, determinism) and the fix report."""

import itertools
import json

import numpy as np
import pytest
from helpers import write_plain_scene

from sarloc.core.errors import ConfigError, SarlocError
from sarloc.core.scene import load_scene
from sarloc.eval.report import format_report, load_truth, plot_track, score_fixes, truth_at
from sarloc.runtime.sources import open_source
from sarloc.sim.flight import TRACKS, simulate_flight


def inverse_gt(gt, x, y):
    """Metric -> continuous pixel through a GDAL geotransform, solved independently of sarloc."""
    x0, a, b, y0, c, d = gt
    m = np.array([[a, b], [c, d]])
    cr = np.linalg.solve(m, np.stack([np.ravel(x) - x0, np.ravel(y) - y0]))
    return cr[0].reshape(np.shape(x)), cr[1].reshape(np.shape(x))


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


def vectors(heading_deg):
    p = np.radians(heading_deg)
    return np.array([np.sin(p), np.cos(p)]), np.array([np.cos(p), -np.sin(p)])


def check_truth_consistency(flight, scene, to_pixel, cols=None):
    """Strip pixel (i, j) == scene SAR at vehicle(t(j + .5)) + ((i + .5 - W/2) * gsd + off) * right."""
    truth = load_truth(flight / "truth.json")
    img = scene.sar_gray.astype(np.float64)
    for s in truth["strips"]:
        pix = np.load(flight / s["image"])
        side = json.loads((flight / f"{s['strip_id']}.json").read_text())
        w, gsd = s["width_px"], s["gsd_m"]
        assert pix.shape == (s["rows"], w) and side["heading_deg"] == s["heading_deg"]
        j = np.arange(s["rows"])
        veh = truth_at(truth, side["t0_s"] + (j + 0.5) / side["row_rate_hz"])
        _, right = vectors(side["heading_deg"])
        for i in cols if cols is not None else [w // 2]:
            g = veh + ((i + 0.5 - w / 2) * gsd + side["across_offset_m"]) * right
            c, r = to_pixel(g[:, 0], g[:, 1])
            np.testing.assert_allclose(pix[:, i], bilinear(img, c - 0.5, r - 0.5), atol=2e-4, rtol=1e-6)
    return truth


@pytest.fixture(scope="module")
def scene(synth_scene):
    return load_scene(synth_scene)


@pytest.mark.parametrize("track", TRACKS)
def test_strips_sample_the_scene_at_the_truth_position(scene, tmp_path, track):
    out = simulate_flight(scene, tmp_path / "f", track, strip_width_px=40, strip_rows=48, across_offset_m=25.0, seed=2)
    gt = scene.frame.geotransform
    truth = check_truth_consistency(out, scene, lambda x, y: inverse_gt(gt, x, y), cols=[0, 20, 39])
    assert truth["track"] == track and truth["frame"]["crs"] == "EPSG:32631" and len(truth["strips"]) >= 2


def footprint_px(strip, gt, offset_m):
    _fwd, right = vectors(strip["heading_deg"])
    half = strip["width_px"] * strip["gsd_m"] / 2
    pts = [
        np.array(p) + b * right
        for p in (strip["vehicle_start_xy_m"], strip["vehicle_end_xy_m"])
        for b in (offset_m - half, offset_m + half)
    ]
    pts = np.array(pts)
    return np.stack(inverse_gt(gt, pts[:, 0], pts[:, 1]), axis=1)


@pytest.mark.parametrize("track", TRACKS)
def test_tracks_stay_inside_the_image_with_arbitrary_headings(scene, tmp_path, track):
    for k, heading in enumerate((None, 13.0, 251.7)):
        out = simulate_flight(
            scene, tmp_path / f"{k}", track, heading_deg=heading, strip_width_px=32, strip_rows=40, seed=k,
            across_offset_m=-20.0,
        )  # fmt: skip
        truth = load_truth(out / "truth.json")
        strips = truth["strips"]
        for s in strips:
            px = footprint_px(s, scene.frame.geotransform, -20.0)
            assert px.min() >= 1.0 and px[:, 0].max() <= 255.0 and px[:, 1].max() <= 255.0, (track, heading, px)
            fwd, _ = vectors(s["heading_deg"])
            length = np.subtract(s["vehicle_end_xy_m"], s["vehicle_start_xy_m"])
            np.testing.assert_allclose(length, s["rows"] * s["gsd_m"] * fwd, atol=1e-6)
        t0 = [s["t0_s"] for s in strips]
        assert t0 == sorted(t0) and t0[0] == 1_700_000_000.0
        heads = [round(s["heading_deg"], 6) for s in strips]
        if heading is not None:
            assert heads[0] == pytest.approx(heading)
        if track == "straight":
            assert len(set(heads)) == 1
        elif track == "lawnmower":
            a, b = sorted(set(heads))  # two legs at least, flown in opposite directions
            assert b - a == pytest.approx(180.0)
        else:
            assert all(a != b for a, b in itertools.pairwise(heads)) and len(strips) >= 3
        if track != "lawnmower":  # contiguous: each strip starts where the previous ended, at that time
            for a, b in itertools.pairwise(strips):
                np.testing.assert_allclose(a["vehicle_end_xy_m"], b["vehicle_start_xy_m"], atol=1e-6)
                assert b["t0_s"] == pytest.approx(a["t_end_s"])


def test_simulation_is_deterministic(scene, tmp_path):
    kw = dict(track="curve", strip_width_px=32, strip_rows=40, seed=5, speckle_looks=4.0, prior_sigma_m=30.0)
    a = simulate_flight(scene, tmp_path / "a", **kw)
    b = simulate_flight(scene, tmp_path / "b", **kw)
    c = simulate_flight(scene, tmp_path / "c", **{**kw, "seed": 6})
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "truth.json" in names
    for n in names:
        if n != "truth.json":
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / "strip_0000.npy").read_bytes() != (c / "strip_0000.npy").read_bytes()


def test_prior_and_speckle(scene, tmp_path):
    clean = simulate_flight(scene, tmp_path / "c", n_strips=2, strip_width_px=32, strip_rows=40, seed=3)
    out = simulate_flight(
        scene, tmp_path / "f", n_strips=2, strip_width_px=32, strip_rows=40, seed=3, speckle_looks=2.0,
        prior_sigma_m=40.0,
    )  # fmt: skip
    truth = load_truth(out / "truth.json")
    for s in truth["strips"]:
        side = json.loads((out / f"{s['strip_id']}.json").read_text())
        d = np.subtract(side["prior_xy_m"], s["vehicle_start_xy_m"])
        assert 0 < np.hypot(*d) < 5 * 40.0 and side["prior_sigma_m"] == 40.0
        lon, lat = side["prior_lonlat_deg"]
        assert 1.0 < lon < 2.5 and 45.0 < lat < 47.0  # EPSG:32631 around (400 km, 5100 km)
        noisy, ref = np.load(out / s["image"]), np.load(clean / s["image"])
        assert 1.0 < np.std(noisy - ref) < 10.0  # 2-look speckle: about 4 dB
    # same plan with and without noise: the truth does not depend on the noise
    assert load_truth(clean / "truth.json")["strips"] == truth["strips"]


def test_plain_and_rotated_frames(tmp_path):
    rng = np.random.default_rng(0)
    sar = np.exp(rng.normal(0, 0.3, (120, 150))).astype(np.float32)
    opt = rng.integers(0, 255, (120, 150, 3)).astype(np.uint8)
    plain = load_scene(write_plain_scene(tmp_path / "plain", opt, sar))
    out = simulate_flight(plain, tmp_path / "p", "curve", strip_width_px=20, strip_rows=24, seed=1)
    gsd = 5.0  # gsd_m_estimate of write_plain_scene: metric x = col * gsd, y = -row * gsd
    check_truth_consistency(out, plain, lambda x, y: (x / gsd, -y / gsd), cols=[0, 10, 19])
    # a rotated, non-square-pixel projected geotransform
    th = np.radians(25.0)
    gt = [500000.0, 4.0 * np.cos(th), 6.0 * np.sin(th), 4200000.0, 4.0 * np.sin(th), -6.0 * np.cos(th)]
    rot = load_scene(
        write_plain_scene(tmp_path / "rot", opt, sar, {"crs": "EPSG:32633", "geotransform": gt, "gsd_m": [4.0, 6.0]})
    )
    out = simulate_flight(rot, tmp_path / "r", "lawnmower", strip_width_px=16, strip_rows=20, heading_deg=77.0, seed=2)
    truth = check_truth_consistency(out, rot, lambda x, y: inverse_gt(gt, x, y), cols=[0, 8, 15])
    for s in truth["strips"]:
        px = footprint_px(s, gt, 0.0)
        assert px.min() >= 1 and px[:, 0].max() <= 149 and px[:, 1].max() <= 119


def test_dir_source_replays_a_simulated_flight(scene, tmp_path):
    out = simulate_flight(scene, tmp_path / "f", "lawnmower", strip_width_px=32, strip_rows=40, seed=4)
    truth = load_truth(out / "truth.json")
    blocks = list(open_source(f"dir://{out}", follow=False, block_rows=16))
    finals = [b for b in blocks if b.final]
    assert [b.meta.strip_id for b in finals] == [s["strip_id"] for s in truth["strips"]]
    first = np.concatenate([b.pixels for b in blocks if b.meta.strip_id == "strip_0000"])
    np.testing.assert_array_equal(first, np.load(out / "strip_0000.npy"))
    assert finals[0].meta.heading_deg == truth["strips"][0]["heading_deg"] and finals[0].meta.gsd_m == 10.0


def test_simulate_errors(scene, tmp_path):
    with pytest.raises(SarlocError, match="does not fit"):
        simulate_flight(scene, tmp_path / "a", strip_width_px=200, strip_rows=300)
    with pytest.raises(SarlocError, match="does not fit"):
        simulate_flight(scene, tmp_path / "b", strip_width_px=32, strip_rows=40, n_strips=50)
    with pytest.raises(ConfigError, match="track"):
        simulate_flight(scene, tmp_path / "c", track="spiral")
    with pytest.raises(ConfigError, match="strip_rows"):
        simulate_flight(scene, tmp_path / "c", strip_rows=0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(SarlocError, match="not empty"):
        simulate_flight(scene, tmp_path / "d", strip_width_px=32, strip_rows=40)


# ------------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def flight(scene, tmp_path_factory):
    return simulate_flight(scene, tmp_path_factory.mktemp("fl") / "f", "curve", strip_width_px=32, strip_rows=40)


def test_truth_at_interpolates_within_strips_and_is_nan_outside(flight):
    truth = load_truth(flight / "truth.json")
    s = truth["strips"][1]
    mid = 0.5 * (s["t0_s"] + s["t_end_s"])
    np.testing.assert_allclose(truth_at(truth, mid), np.mean([s["vehicle_start_xy_m"], s["vehicle_end_xy_m"]], 0))
    assert truth_at(truth, [s["t0_s"], s["t_end_s"]]).shape == (2, 2)
    assert np.isnan(truth_at(truth, truth["strips"][0]["t0_s"] - 10)).all()
    assert np.isnan(truth_at(truth, truth["strips"][-1]["t_end_s"] + 10)).all()


def write_fixes(path, truth, errors_m, extra_lines=(), truncate=False):
    """Trusted fixes with known errors (east offsets), then untrusted/null/other records."""
    s = truth["strips"]
    lines = []
    for k, e in enumerate(errors_m):
        st = s[k % len(s)]
        t = st["t0_s"] + 0.3 * (st["t_end_s"] - st["t0_s"])
        x, y = truth_at(truth, t)
        lines.append({"type": "fix", "t_s": t, "xy_m": [x + e, y], "trusted": True, "confidence": 0.9})
    lines += list(extra_lines)
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    if truncate:
        text += '{"type": "fix", "t_s": 1700000001.0, "xy_m": [1.0,'
    path.write_text(text)
    return path


def test_score_fixes_known_statistics(flight, tmp_path):
    truth = load_truth(flight / "truth.json")
    t0 = truth["strips"][0]["t0_s"]
    x0, y0 = truth_at(truth, t0 + 1)
    extra = [
        {"type": "fix", "t_s": t0 + 1, "xy_m": [x0, y0], "trusted": False, "confidence": 0.3},
        {"type": "fix", "t_s": t0 + 2, "xy_m": None, "trusted": False, "confidence": 0.0},
        {"t_s": t0 + 3, "xy_m": [x0 + 5000, y0], "trusted": False, "confidence": 0.1},
        {"type": "status", "t_s": t0 + 4, "cpu": 0.5},
    ]
    path = write_fixes(tmp_path / "fixes.jsonl", truth, [10.0, 30.0, 60.0, 150.0, 250.0], extra, truncate=True)
    st = score_fixes(path, flight / "truth.json")
    assert st["n_records"] == 8 and st["n_trusted"] == 5 and st["n_abstained"] == 3
    assert st["abstain_pct"] == pytest.approx(37.5) and st["bad_lines"] == 1 and st["n_scored"] == 5
    assert st["median_m"] == pytest.approx(60.0, abs=1e-6) and st["max_m"] == pytest.approx(250.0, abs=1e-6)
    assert st["p90_m"] == pytest.approx(np.percentile([10, 30, 60, 150, 250], 90), abs=1e-6)
    assert st["within_50_pct"] == pytest.approx(40.0) and st["within_100_pct"] == pytest.approx(60.0)
    assert st["within_200_pct"] == pytest.approx(80.0) and st["false_fix_rate"] == pytest.approx(0.2)
    assert score_fixes(path, truth, false_radius_m=100.0)["false_fix_rate"] == pytest.approx(0.4)
    # re-thresholding on confidence: the 0.3 record becomes trusted (error 0), the 0.1 one stays out
    re = score_fixes(path, truth, threshold=0.25)
    assert re["n_trusted"] == 6 and re["within_50_pct"] == pytest.approx(50.0)
    table = format_report(st)
    assert "median error" in table and "60.0 m" in table and "false-fix rate (> 200 m)" in table
    empty = score_fixes([], truth)
    assert empty["n_records"] == 0 and empty["median_m"] is None and "-" in format_report(empty)


def test_plot_track_writes_a_png(flight, scene, tmp_path):
    truth = load_truth(flight / "truth.json")
    path = write_fixes(tmp_path / "fixes.jsonl", truth, [5.0, 80.0, 400.0])
    out = plot_track(path, flight / "truth.json", scene.optical, scene.frame, tmp_path / "track.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    out2 = plot_track(path, truth, None, None, tmp_path / "metric.png")
    assert out2.is_file()
    out3 = plot_track(path, truth, scene.sar_gray, None, tmp_path / "affine.png")
    assert out3.is_file()
    assert not list(tmp_path.glob(".*.tmp"))


def test_geographic_frame_round_trip_and_flight(tmp_path):
    from sarloc.core.geo import metric_to_pixel, pixel_metric_affine

    rng = np.random.default_rng(1)
    sar = np.exp(rng.normal(0, 0.3, (160, 160))).astype(np.float32)
    opt = rng.integers(0, 255, (160, 160, 3)).astype(np.uint8)
    meta = {"crs": "EPSG:4326", "geotransform": [10.0, 0.0005, 0.0, 60.0, 0.0, -0.0005], "gsd_m": None}
    sc = load_scene(write_plain_scene(tmp_path / "geo", opt, sar, meta))
    assert pixel_metric_affine(sc.frame)[1] is False  # lon/lat pixels are not affine in UTM metres
    c, r = rng.uniform(0, 160, 50), rng.uniform(0, 160, 50)
    x, y = sc.frame.pixel_to_metric(c, r)
    cc, rr = metric_to_pixel(sc.frame, x, y)
    np.testing.assert_allclose(np.stack([cc, rr]), np.stack([c, r]), atol=1e-6)
    out = simulate_flight(sc, tmp_path / "f", "straight", strip_width_px=16, strip_rows=20, heading_deg=30.0)
    check_truth_consistency(out, sc, lambda x, y: metric_to_pixel(sc.frame, x, y), cols=[0, 15])
