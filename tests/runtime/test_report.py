"""`sarloc report` outputs for a GIS (GeoJSON, CSV), the same-flight check, the track plot, and the footprint of
`sarloc map info --footprint`: a real daemon run of the shipped demo model over a generated, geo-referenced scene."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pyproj
import pytest
from helpers import demo_flight, run_args

from sarloc.cli import main
from sarloc.eval.report import CSV_COLUMNS, load_fixes, load_truth, plot_track, truth_at
from sarloc.sim.flight import simulate_flight

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    """A generated scene (EPSG:32631), its map pack, a 3-strip flight (``strips/``) and the daemon's records."""
    root = demo_flight(tmp_path_factory.mktemp("report"), scene_seed=11, heading_deg=30.0, flight_seed=1)
    assert main(run_args(root, root / "run", "--no-follow")) == 0
    return root


def _report(flight: Path, truth: Path, *extra: str, records: Path | None = None) -> int:
    return main(
        ["report", "--records", str(records or flight / "run" / "records.jsonl"), "--truth", str(truth), *extra]
    )


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sarloc report: error:") and "\n" not in err, err
    return err


def test_geojson_csv_and_plot_of_a_run(flight, tmp_path, capsys):
    truth_path = flight / "strips" / "truth.json"
    gj, cs, png = tmp_path / "fixes.geojson", tmp_path / "fixes.csv", tmp_path / "track.png"
    args = ["--geojson", str(gj), "--csv", str(cs), "--plot", str(png), "--scene", str(flight / "scene")]
    assert _report(flight, truth_path, *args) == 0
    out = capsys.readouterr().out
    assert "median error" in out and str(gj) in out and str(cs) in out
    fixes, _ = load_fixes(flight / "run" / "records.jsonl")
    truth = load_truth(truth_path)
    assert len(fixes) == 3 and sum(f["trusted"] for f in fixes) >= 2

    fc = json.loads(gj.read_text())  # valid JSON, RFC 7946 FeatureCollection
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    track, points = fc["features"][0], fc["features"][1:]
    assert track["type"] == "Feature" and track["geometry"]["type"] == "LineString"
    assert track["properties"]["kind"] == "truth"
    line = np.array(track["geometry"]["coordinates"])
    to_ll = pyproj.Transformer.from_crs(truth["frame"]["metric_crs"], "EPSG:4326", always_xy=True)
    ends = np.array([s["vehicle_start_xy_m"] for s in truth["strips"]] + [truth["strips"][-1]["vehicle_end_xy_m"]])
    np.testing.assert_allclose(line, np.stack(to_ll.transform(ends[:, 0], ends[:, 1]), axis=1), atol=1e-7)
    assert len(points) == len(fixes)
    for feat, rec in zip(points, fixes, strict=True):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Point"
        lon, lat = feat["geometry"]["coordinates"]  # [lon, lat]: France, not [lat, lon]
        assert -180 <= lon <= 180 and -90 <= lat <= 90 and 0 < lon < 10 and 40 < lat < 52
        want = rec.get("lonlat_deg") or to_ll.transform(*rec["xy_m"])
        assert (lon, lat) == pytest.approx(tuple(want), abs=1e-7)
        p = feat["properties"]
        assert p["kind"] == "fix" and p["strip_id"] == rec["strip_id"] and p["trusted"] is rec["trusted"]
        assert p["t_s"] == rec["t_s"] and p["confidence"] == pytest.approx(rec["confidence"])
        true = truth_at(truth, rec["t_s"])
        assert p["error_m"] == pytest.approx(float(np.hypot(*(np.asarray(rec["xy_m"]) - true))), abs=1e-3)
        assert p["time_utc"].startswith("2023-11-14T") and p["time_utc"].endswith("Z")

    with open(cs, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 1 + len(fixes)
    table = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    for row, feat in zip(table, points, strict=True):
        assert row["strip_id"] == feat["properties"]["strip_id"] and row["metric_crs"] == "EPSG:32631"
        lonlat = (float(row["lon_deg"]), float(row["lat_deg"]))
        assert lonlat == pytest.approx(tuple(feat["geometry"]["coordinates"]), abs=1e-7)
        assert row["trusted"] in ("true", "false") and float(row["error_m"]) < 30.0

    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 50_000
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_foreign_truth_is_refused(flight, tmp_path, capsys):
    # another flight of the same geometry and strip ids (only the seed differs): told apart by the records' source
    other = simulate_flight(
        flight / "scene", tmp_path / "other", "straight", 30.0, strip_width_px=160, strip_rows=160, n_strips=3, seed=2
    )
    gj = tmp_path / "f.geojson"
    capsys.readouterr()  # what simulate_flight logged
    assert _report(flight, other / "truth.json", "--geojson", str(gj)) == 1
    err = _one_line_error(capsys)
    assert "different flights" in err and str(other / "truth.json") in err and "records.jsonl" in err
    assert not gj.exists()
    # a copy of the right truth elsewhere is the same flight
    copy = tmp_path / "copy.json"
    copy.write_bytes((flight / "strips" / "truth.json").read_bytes())
    assert _report(flight, copy) == 0
    capsys.readouterr()
    # records without a start record: strip ids that the truth does not have, or times outside its strips
    fixes, _ = load_fixes(flight / "run" / "records.jsonl")
    recs = tmp_path / "fixes.jsonl"
    recs.write_text("".join(json.dumps({**f, "strip_id": f"strip_9{k:03d}"}) + "\n" for k, f in enumerate(fixes)))
    assert _report(flight, other / "truth.json", records=recs) == 1
    err = _one_line_error(capsys)
    assert "strip_9000" in err and "not in the truth" in err and str(recs) in err
    recs.write_text("".join(json.dumps({**f, "t_s": f["t_s"] + 3600.0}) + "\n" for f in fixes))
    assert _report(flight, other / "truth.json", records=recs) == 1
    assert "in time" in _one_line_error(capsys)


def test_without_geo_reference_geojson_is_refused_and_csv_is_metric(tmp_path, capsys):
    from sarloc.sim.scenes import SynthConfig, write_scene

    scene = write_scene(tmp_path / "scene", SynthConfig(width_px=256, height_px=256, seed=4))
    meta = json.loads((scene / "scene.json").read_text())  # drop the geo-reference: local metres only
    meta.update(crs=None, geotransform=None, gsd_m=None, gsd_m_estimate=10.0)
    (scene / "scene.json").write_text(json.dumps(meta))
    strips = simulate_flight(scene, tmp_path / "strips", "curve", strip_width_px=32, strip_rows=40, n_strips=4)
    truth = load_truth(strips / "truth.json")
    assert truth["frame"]["metric_crs"] is None
    recs = []
    for k, s in enumerate(truth["strips"]):
        t = 0.5 * (s["t0_s"] + s["t_end_s"])
        x, y = truth_at(truth, t)
        xy = None if k == 3 else [x + 10.0 * k, y + (400.0 if k == 2 else 0.0)]
        recs.append({"type": "fix", "strip_id": s["strip_id"], "t_s": t, "xy_m": xy, "trusted": k < 2,
                     "confidence": 0.9 if k < 2 else 0.2})  # fmt: skip
    rp = tmp_path / "records.jsonl"
    rp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    gj, cs = tmp_path / "f.geojson", tmp_path / "f.csv"
    capsys.readouterr()
    assert _report(tmp_path, strips / "truth.json", "--geojson", str(gj), "--csv", str(cs), records=rp) == 1
    err = _one_line_error(capsys)
    assert "no CRS" in err and "--csv" in err and not gj.exists() and not cs.exists()
    png = tmp_path / "t.png"
    assert _report(tmp_path, strips / "truth.json", "--csv", str(cs), "--plot", str(png), records=rp) == 0
    rows = list(csv.DictReader(cs.open(newline="")))
    assert len(rows) == 4 and [r["trusted"] for r in rows] == ["true", "true", "false", "false"]
    assert all(r["lon_deg"] == "" and r["lat_deg"] == "" and r["metric_crs"] == "" for r in rows)
    assert float(rows[1]["x_m"]) == pytest.approx(recs[1]["xy_m"][0], abs=1e-3)
    assert float(rows[1]["error_m"]) == pytest.approx(10.0, abs=1e-3)
    assert float(rows[2]["error_m"]) == pytest.approx(np.hypot(20.0, 400.0), abs=1e-3)  # untrusted: error too
    assert rows[3]["x_m"] == "" and rows[3]["error_m"] == ""
    assert png.read_bytes()[:8] == PNG
    # the library: over a basemap in pixels of the scene, with the truth's affine
    from sarloc.core.scene import load_scene

    sc = load_scene(scene)
    out = plot_track(recs, truth, sc.optical, None, tmp_path / "lib.png", false_radius_m=100.0)
    assert out.read_bytes()[:8] == PNG


def _inside(pt, ring) -> bool:
    """Ray casting: is ``pt`` inside the closed ring?"""
    x, y = pt
    inside = False
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def test_map_info_footprint(flight, tmp_path, capsys):
    fp = tmp_path / "footprint.geojson"
    assert main(["map", "info", str(flight / "pack"), "--footprint", str(fp)]) == 0
    assert str(fp) in capsys.readouterr().out
    fc = json.loads(fp.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 1
    geom = fc["features"][0]["geometry"]
    assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
    ring = geom["coordinates"][0]
    assert len(ring) >= 5 and ring[0] == ring[-1]  # closed
    a = np.array(ring)
    assert np.all((a[:, 0] > 0) & (a[:, 0] < 10) & (a[:, 1] > 40) & (a[:, 1] < 52))  # lon, lat (France)
    area2 = np.sum(a[:-1, 0] * a[1:, 1] - a[1:, 0] * a[:-1, 1])
    assert area2 > 0  # counter-clockwise exterior ring (RFC 7946)
    from sarloc.mappack.pack import MapPack

    pack = MapPack(flight / "pack")
    centre = pack.centres_m().mean(0)
    to_ll = pyproj.Transformer.from_crs(pack.metric_crs, "EPSG:4326", always_xy=True)
    assert _inside(to_ll.transform(*centre), ring)
    for sx, sy in np.array([s["vehicle_start_xy_m"] for s in load_truth(flight / "strips" / "truth.json")["strips"]]):
        assert _inside(to_ll.transform(sx, sy), ring)  # the flight lies over the pack
    # a pack without geo-reference: one line, nothing written
    bare = tmp_path / "bare"
    bare.mkdir()
    man = json.loads((flight / "pack" / "pack.json").read_text())
    man["grid"]["metric_crs"] = None
    (bare / "pack.json").write_text(json.dumps(man))
    fp2 = tmp_path / "bare.geojson"
    assert main(["map", "info", str(bare), "--footprint", str(fp2)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no geo-reference" in err and "\n" not in err and not fp2.exists()
