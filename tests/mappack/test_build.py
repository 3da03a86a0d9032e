"""Map pack building, CRS handling, manifest verification and evaluation against a pack."""

import json
import shutil

import numpy as np
import pytest
from helpers import shared_scene

from sarloc.cli import main
from sarloc.core.errors import ArtifactError, SarlocError
from sarloc.mappack import MapPack, MapPackConfig, PackSearcher, build_map_pack, pack_info, verify_map_pack

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def scene_pack(tiny_export, synth_scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("packs") / "scene_pack"
    cfg = MapPackConfig(stride_px=16, ann=True)
    build_map_pack(synth_scene, tiny_export / "optical_encoder.onnx", out, cfg, progress=False, threads=1)
    return out


@pytest.fixture
def pack_copy(scene_pack, tmp_path):
    d = tmp_path / "pack"
    shutil.copytree(scene_pack, d)
    return d


def _write_geotiff_4326(scene_dir, path, nodata_left_cols=0):
    """Warp a generated (UTM 31N) scene's optical image to EPSG:4326 and write it as a GeoTIFF."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import Affine
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from sarloc.core.scene import load_scene

    sc = load_scene(scene_dir)
    gt = sc.frame.geotransform
    src_tr = Affine(gt[1], gt[2], gt[0], gt[4], gt[5], gt[3])
    img = (np.clip(sc.optical, 0, 1) * 255).astype(np.uint8).transpose(2, 0, 1)
    if nodata_left_cols:
        img[:, :, :nodata_left_cols] = 0
    x1, y1 = gt[0] + gt[1] * sc.width_px, gt[3] + gt[5] * sc.height_px
    bounds = (gt[0], y1, x1, gt[3])
    tr, w, h = calculate_default_transform(sc.frame.crs, "EPSG:4326", sc.width_px, sc.height_px, *bounds)
    dst = np.zeros((3, h, w), np.uint8)
    reproject(img, dst, src_transform=src_tr, src_crs=sc.frame.crs, dst_transform=tr, dst_crs="EPSG:4326",
              resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)  # fmt: skip
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=tr, nodata=0) as ds:  # fmt: skip
        ds.write(dst)
    return path


def test_scene_pack_layout_geometry_and_unit_norm(scene_pack, synth_scene, tiny_export):
    from sarloc.core.scene import load_scene

    pack = MapPack(scene_pack, verify=True)
    man = pack.manifest
    opt = json.loads((tiny_export / "optical_encoder.json").read_text())
    assert man["parent_sha256"] == opt["sha256"] and man["encoder"]["checkpoint_sha256"] == opt["checkpoint_sha256"]
    g = pack.grid
    assert (g["tile_px"], g["stride_px"], g["gsd_m"], g["metric_crs"]) == (64, 16, 10.0, "EPSG:32631")
    assert len(pack) == g["n_rows"] * g["n_cols"] == 13 * 13 and man["tiles"]["skipped"] == 0
    assert pack.embeddings.dtype == np.float16 and pack.dim == opt["embed_dim"]
    assert isinstance(pack.embeddings, np.memmap)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pack.embeddings, np.float32), axis=1), 1.0, atol=2e-3)
    # tile centres are the scene's pixel centres of the tiles, in its metric frame, and lat/lon round-trips
    sc = load_scene(synth_scene)
    t = pack.tiles
    x, y = sc.frame.pixel_to_metric(t["col"] * 16 + 32.0, t["row"] * 16 + 32.0)
    np.testing.assert_allclose(t["x_m"], x, atol=1e-6)
    np.testing.assert_allclose(t["y_m"], y, atol=1e-6)
    lon, lat = sc.frame.pixel_to_lonlat(t["col"] * 16 + 32.0, t["row"] * 16 + 32.0)
    np.testing.assert_allclose(t["lon_deg"], lon, atol=1e-9)
    np.testing.assert_allclose(t["lat_deg"], lat, atol=1e-9)
    # the pack's embeddings are the optical encoder's on the scene's tiles
    from sarloc.backends.encoders import OrtEncoder
    from sarloc.core.preprocess import crop_windows, prepare_windows

    enc = OrtEncoder(tiny_export / "optical_encoder.onnx", threads=1)
    origins = np.stack([t["col"][:8] * 16, t["row"][:8] * 16], axis=1)
    e = enc(prepare_windows(crop_windows(sc.optical_gray, origins, 64), enc.preprocess))
    np.testing.assert_allclose(np.asarray(pack.embeddings[:8], np.float32), e, atol=2e-3)


def test_block_size_does_not_change_the_pack(scene_pack, synth_scene, tiny_export, tmp_path):
    out = tmp_path / "small_blocks"
    cfg = MapPackConfig(stride_px=16, block_tiles=3, batch=5)
    build_map_pack(synth_scene, tiny_export, out, cfg, progress=False, threads=1)
    a, b = MapPack(scene_pack), MapPack(out)
    # rows are written block by block (spatially local); the table says where each row is
    oa, ob = np.lexsort((a.tiles["col"], a.tiles["row"])), np.lexsort((b.tiles["col"], b.tiles["row"]))
    assert not np.array_equal(ob, np.arange(len(b)))
    np.testing.assert_array_equal(a.tiles[oa], b.tiles[ob])
    np.testing.assert_array_equal(np.asarray(a.embeddings)[oa], np.asarray(b.embeddings)[ob])


def test_geotiff_in_epsg4326_is_warped_to_utm_and_round_trips(synth_scene, tiny_export, tmp_path):
    pyproj = pytest.importorskip("pyproj")
    tif = _write_geotiff_4326(synth_scene, tmp_path / "basemap_4326.tif", nodata_left_cols=100)
    out = tmp_path / "pack4326"
    build_map_pack(tif, tiny_export / "optical_encoder.onnx", out, MapPackConfig(tile_m=640.0), progress=False)
    pack = MapPack(out, verify=True)
    g = pack.grid
    assert g["metric_crs"] == "EPSG:32631"  # UTM zone of the centre, not degrees
    assert g["gsd_m"] == pytest.approx(10.0) and g["tile_m"] == pytest.approx(640.0) and g["stride_px"] == 8
    assert pack.manifest["source"]["crs"] == "EPSG:4326" and pack.manifest["source"]["kind"] == "geotiff"
    # nodata (the left 100 columns, and the warp's empty corners) is skipped
    assert pack.manifest["tiles"]["skipped"] > 0 and np.all(pack.tiles["valid_frac"] >= 0.5)
    # tile centres round-trip metric -> lat/lon -> metric within 0.1 m (and through the 4326 file's own grid)
    t = pack.tiles
    x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True).transform(t["lon_deg"], t["lat_deg"])
    assert np.max(np.hypot(x - t["x_m"], y - t["y_m"])) < 0.1
    xs, ys = pack.to_metric(float(t["lon_deg"][0]), float(t["lat_deg"][0]))
    assert np.hypot(xs - t["x_m"][0], ys - t["y_m"][0]) < 0.1
    # fully valid tiles lie inside the original scene's UTM extent (within a pixel or two of warping)
    full = t[t["valid_frac"] == 1.0]
    assert len(full) > 20
    assert 400000.0 - 20 <= full["x_m"].min() - 320 and full["x_m"].max() + 320 <= 402560.0 + 20
    assert 5097440.0 - 20 <= full["y_m"].min() - 320 and full["y_m"].max() + 320 <= 5100000.0 + 20


def test_verify_detects_tampered_and_truncated_files(pack_copy):
    verify_map_pack(pack_copy)
    emb = pack_copy / "embeddings.npy"
    raw = bytearray(emb.read_bytes())
    raw[-3] ^= 0xFF
    emb.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"embeddings\.npy has sha256 .* rebuild"):
        verify_map_pack(pack_copy)
    assert main(["map", "verify", str(pack_copy)]) == 1
    emb.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ArtifactError, match=r"embeddings\.npy is truncated .*sarloc map build"):
        MapPack(pack_copy)  # loading without --verify still catches a short file


def test_truncated_tile_table_and_missing_manifest(pack_copy):
    tiles = pack_copy / "tiles.npy"
    tiles.write_bytes(tiles.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"tiles\.npy is truncated"):
        MapPack(pack_copy)
    (pack_copy / "pack.json").unlink()
    with pytest.raises(ArtifactError, match=r"pack\.json not found"):
        MapPack(pack_copy)


@pytest.mark.parametrize("name", ["a" * 256, "\u00e9" * 128, "..", ".", "sub/embeddings.npy", "line\nbreak"])
def test_manifest_file_name_that_is_no_pack_file_is_refused(pack_copy, name):
    """Regression (exploring fuzz run): a 256-byte name in ``files`` made ``pack_info`` raise OSError (ENAMETOOLONG)."""
    man = json.loads((pack_copy / "pack.json").read_text())
    man["files"][name] = "0" * 64
    (pack_copy / "pack.json").write_text(json.dumps(man))
    for fn in (pack_info, verify_map_pack, MapPack):
        with pytest.raises(ArtifactError, match=r"field 'files' must be .*sarloc map build"):
            fn(pack_copy)


def test_pack_from_another_export_is_refused(scene_pack, tiny_export):
    from sarloc.backends.layout import read_model_manifest

    sar = read_model_manifest(tiny_export / "sar_encoder.onnx")
    MapPack(scene_pack, sar_manifest=sar)  # same export: accepted
    other = {**sar, "checkpoint_sha256": "f" * 64}
    with pytest.raises(ArtifactError, match=r"another|checkpoint ffffffffffff.*rebuild the pack"):
        MapPack(scene_pack, sar_manifest=other)
    with pytest.raises(ArtifactError, match="embed_dim"):
        MapPack(scene_pack, sar_manifest={**sar, "embed_dim": 7})


def test_build_errors_are_one_line(synth_scene, tiny_export, tmp_path, scene_pack):
    with pytest.raises(SarlocError, match="optical encoder"):
        build_map_pack(synth_scene, tiny_export / "sar_encoder.onnx", tmp_path / "p", progress=False)
    with pytest.raises(SarlocError, match="already holds a map pack"):
        build_map_pack(synth_scene, tiny_export, scene_pack, progress=False)
    with pytest.raises(SarlocError, match="--tile-m"):
        build_map_pack(synth_scene, tiny_export, tmp_path / "q", MapPackConfig(tile_m=1000.0), progress=False)
    with pytest.raises(SarlocError, match="not found"):
        build_map_pack(tmp_path / "nope.tif", tiny_export, tmp_path / "r", progress=False)


def test_map_build_on_a_truncated_geotiff_exits_1_and_writes_no_pack(synth_scene, tiny_export, tmp_path, capsys):
    """Regression (artefact fuzzing): a GeoTIFF cut short opens, then failed with a rasterio traceback mid-build."""
    tif = _write_geotiff_4326(synth_scene, tmp_path / "basemap.tif")
    raw = tif.read_bytes()
    tif.write_bytes(raw[: len(raw) * 2 // 3])
    out = tmp_path / "pack"
    args = ["map", "build", "--basemap", str(tif), "--export", str(tiny_export / "optical_encoder.onnx")]
    assert main([*args, "--out", str(out), "--stride-px", "16", "--threads", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reading pixels failed" in err[0] and "re-export it" in err[0], err
    assert not (out / "pack.json").exists()


def test_cli_map_build_info_verify_and_eval_with_pack(synth_scene, tiny_export, tmp_path, capsys):
    out = tmp_path / "clipack"
    args = ["map", "build", "--basemap", str(synth_scene), "--export", str(tiny_export / "optical_encoder.onnx")]
    assert main([*args, "--out", str(out), "--stride-px", "16", "--threads", "1", "--no-progress", "--ann"]) == 0
    assert main(["map", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["tiles"] == 169 and info["ann"] == "ivf" and info["metric_crs"] == "EPSG:32631"
    assert main(["map", "verify", str(out), "--export", str(tiny_export)]) == 0
    js = tmp_path / "eval.json"
    ev = ["eval", "--scene", str(synth_scene), "--export", str(tiny_export), "--pack", str(out), "--queries", "12"]
    assert main([*ev, "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["aligned"]["method"] == "pack-exact" and res["aligned"]["queries"] > 0
    assert 0.0 <= res["aligned"]["recall@10"] <= 1.0 and res["aligned"]["gallery_tiles"] == 169
    assert main([*ev, "--prior-radius-m", "600"]) == 0
    assert main([*ev, "--ann"]) == 0
    assert main(["eval", "--scene", str(synth_scene), "--pack", str(out)]) == 1  # --pack needs --export
    assert "needs --export" in capsys.readouterr().err


def test_pack_searcher_on_a_real_pack_finds_the_optical_tile_itself(scene_pack, synth_scene, tiny_export):
    from sarloc.backends.encoders import OrtEncoder
    from sarloc.core.preprocess import crop_windows, prepare_windows
    from sarloc.core.scene import load_scene

    pack = MapPack(scene_pack)
    sc = load_scene(synth_scene)
    enc = OrtEncoder(tiny_export / "optical_encoder.onnx", threads=1)
    rows = np.array([0, 40, 100, 168])
    t = pack.tiles[rows]
    q = enc(prepare_windows(crop_windows(sc.optical_gray, np.stack([t["col"] * 16, t["row"] * 16], 1), 64)))
    s = PackSearcher(pack)
    for j, res in enumerate(s.search(q, k=5)):
        assert res.rows[0] == rows[j]
    for j, res in enumerate(s.search(q, k=5, ann=True, nprobe=pack.manifest["ann"]["nlist"])):
        assert res.rows[0] == rows[j]
    assert pack_info(scene_pack)["tiles"] == 169


@pytest.mark.shared_data
def test_pack_from_real_scene_france(tiny_export, tmp_path):
    scene = shared_scene("france_s1s2")
    out = tmp_path / "france"
    build_map_pack(scene, tiny_export, out, MapPackConfig(stride_px=64), progress=False, threads=1)
    pack = MapPack(out, verify=True)
    assert pack.metric_crs == "EPSG:32631" and pack.grid["gsd_m"] == 10.0 and len(pack) > 20
    t = pack.tiles
    assert np.all(np.isfinite(t["lat_deg"])) and 44 < np.median(t["lat_deg"]) < 48  # central France


def test_geographic_scene_folder_is_warped(tiny_export, tmp_path):
    pytest.importorskip("rasterio")
    from helpers import write_plain_scene

    from sarloc.sim.scenes import SynthConfig, generate_scene

    arrs = generate_scene(SynthConfig(width_px=160, height_px=160, seed=5))
    gt = [1.70, 1.3e-4, 0.0, 46.0, 0.0, -0.9e-4]  # about 10 m x 10 m at 46 N, but not square in degrees
    scene = write_plain_scene(tmp_path / "geo_scene", arrs["optical"], arrs["sar"],
                              {"crs": "EPSG:4326", "geotransform": gt, "gsd_m_estimate": None})  # fmt: skip
    out = tmp_path / "geo_pack"
    build_map_pack(scene, tiny_export, out, MapPackConfig(tile_m=640.0, stride_m=160.0), progress=False)
    pack = MapPack(out, verify=True)
    assert pack.metric_crs == "EPSG:32631" and pack.grid["stride_px"] == 16 and len(pack) > 4
    t = pack.tiles
    assert np.all((t["lon_deg"] > 1.70) & (t["lon_deg"] < 1.70 + 160 * 1.3e-4))
    assert np.all((t["lat_deg"] < 46.0) & (t["lat_deg"] > 46.0 - 160 * 0.9e-4))
    for i in (0, len(t) - 1):
        x, y = pack.to_metric(float(t["lon_deg"][i]), float(t["lat_deg"][i]))
        assert np.hypot(x - t["x_m"][i], y - t["y_m"][i]) < 0.1


def test_projected_geotiff_on_its_own_grid_equals_the_scene_folder_pack(scene_pack, synth_scene, tiny_export, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    from sarloc.core.scene import load_scene

    sc = load_scene(synth_scene)
    gt = sc.frame.geotransform
    tif = tmp_path / "utm.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=sc.width_px, height=sc.height_px, count=1, dtype="float32",
                       crs=sc.frame.crs, transform=from_origin(gt[0], gt[3], gt[1], -gt[5])) as ds:  # fmt: skip
        ds.write(sc.optical_gray, 1)
    out = tmp_path / "utm_pack"
    build_map_pack(tif, tiny_export, out, MapPackConfig(tile_m=640.0, stride_px=16, block_tiles=5), progress=False)
    a, b = MapPack(scene_pack), MapPack(out)
    assert b.grid["metric_crs"] == "EPSG:32631" and (b.grid["x0_m"], b.grid["y0_m"]) == (gt[0], gt[3])
    oa, ob = np.lexsort((a.tiles["col"], a.tiles["row"])), np.lexsort((b.tiles["col"], b.tiles["row"]))
    np.testing.assert_allclose(a.tiles["x_m"][oa], b.tiles["x_m"][ob])
    np.testing.assert_allclose(a.tiles["y_m"][oa], b.tiles["y_m"][ob])
    ea, eb = np.asarray(a.embeddings, np.float32)[oa], np.asarray(b.embeddings, np.float32)[ob]
    assert np.min(np.sum(ea * eb, axis=1)) > 0.999  # the same pixels through the WarpedVRT
