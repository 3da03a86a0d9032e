"""Public SAR-optical datasets in their published layouts (``sarloc.trainer.data.datasets``): tiny samples are
generated here in each layout (PNG / JPG with OpenCV, GeoTIFF with tifffile), never read from ../shared/data.

The writers below are also used by ``test_datasets_training.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from sarloc.core.errors import ConfigError, SceneError
from sarloc.trainer.data.datasets import (
    LAYOUTS,
    DatasetSpec,
    detect_dataset,
    open_dataset,
    parse_dataset_spec,
)

PX = 48


def _tex(rng: np.random.Generator, n: int = PX, c: int = 1, lo: float = 0, hi: float = 255) -> np.ndarray:
    """A smooth random texture (H, W, C), values in [lo, hi]."""
    a = cv2.GaussianBlur(rng.random((n, n, c)).astype(np.float32), (0, 0), 2.0)
    a = a if a.ndim == 3 else a[..., None]
    a = (a - a.min()) / (np.ptp(a) + 1e-6)
    return lo + a * (hi - lo)


def write_png(path: Path, arr: np.ndarray) -> None:
    """An 8-bit PNG / JPG from (H, W, 1) grey or (H, W, 3) RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.clip(arr, 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), a[..., 0] if a.shape[2] == 1 else a[..., ::-1])


def write_geotiff(path: Path, arr: np.ndarray, pixel_m: float, epsg: int = 32632, planar: bool = False) -> None:
    """A GeoTIFF (H, W, C) with ModelPixelScale, ModelTiepoint and a projected EPSG GeoKey, as GDAL writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    tags = [
        (33550, "d", 3, (pixel_m, pixel_m, 0.0), False),
        (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0), False),
        (34735, "H", len(keys), keys, False),
    ]
    data = np.moveaxis(arr, -1, 0) if planar else arr
    photometric = "rgb" if arr.shape[2] == 3 and arr.dtype == np.uint8 else "minisblack"
    tifffile.imwrite(
        path, data, photometric=photometric, planarconfig="separate" if planar else "contig", extratags=tags
    )


def write_sen12(root: Path, n_spring: int = 3, n_summer: int = 2, px: int = PX, seed: int = 0) -> Path:
    """SEN1-2: ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p<k>.png + s2_1/..., ROIs1868_summer/s1_3/..."""
    rng = np.random.default_rng(seed)
    for season, scene, n in (("ROIs1158_spring", 1, n_spring), ("ROIs1868_summer", 3, n_summer)):
        for k in range(1, n + 1):
            write_png(root / season / f"s1_{scene}" / f"{season}_s1_{scene}_p{k}.png", _tex(rng, px))
            write_png(root / season / f"s2_{scene}" / f"{season}_s2_{scene}_p{k}.png", _tex(rng, px, 3))
    return root


def write_sen12ms(root: Path, n: int = 3, px: int = PX, seed: int = 0, merged_season: bool = True) -> Path:
    """SEN12MS, both variants: ROIs1158_spring_s1/s1_1/*.tif + ROIs1158_spring_s2/s2_1/*.tif (per archive, with an
    lc folder to ignore) and, when ``merged_season``, ROIs1970_fall/s1_7 + s2_7 (merged, one pair). SAR: 2 float32
    dB bands VV=-10, VH=-20 (+ texture); optical: 13 uint16 bands, band b holds 100 * b (+ texture on B4)."""
    rng = np.random.default_rng(seed)

    def pair(sar_path: Path, opt_path: Path) -> None:
        t = _tex(rng, px, 1, -3, 3)[..., 0]
        write_geotiff(sar_path, np.stack([-10 + t, -20 + t], -1).astype(np.float32), 10.0)
        opt = np.stack([np.full((px, px), 100.0 * b) for b in range(1, 14)], -1)
        opt[..., 3] += _tex(rng, px, 1, 0, 50)[..., 0]
        write_geotiff(opt_path, opt.astype(np.uint16), 10.0, planar=True)

    for k in range(1, n + 1):
        name = f"ROIs1158_spring_{{}}_1_p{k}.tif"
        pair(root / "ROIs1158_spring_s1/s1_1" / name.format("s1"), root / "ROIs1158_spring_s2/s2_1" / name.format("s2"))
        write_geotiff(root / "ROIs1158_spring_lc/lc_1" / name.format("lc"), np.ones((px, px, 4), np.uint8), 10.0)
    if merged_season:
        pair(
            root / "ROIs1970_fall/s1_7/ROIs1970_fall_s1_7_p2.tif", root / "ROIs1970_fall/s2_7/ROIs1970_fall_s2_7_p2.tif"
        )
    return root


def write_qxs(root: Path, n: int = 3, seed: int = 0) -> Path:
    """QXS-SAROPT: QXSLAB_SAROPT/sar_256_oc_0.2/<n>.png + opt_256_oc_0.2/<n>.png."""
    rng = np.random.default_rng(seed)
    for k in range(1, n + 1):
        write_png(root / "QXSLAB_SAROPT/sar_256_oc_0.2" / f"{k}.png", _tex(rng))
        write_png(root / "QXSLAB_SAROPT/opt_256_oc_0.2" / f"{k}.png", _tex(rng, c=3))
    return root


def write_os(root: Path, sizes: tuple[int, ...] = (512,), seed: int = 0) -> Path:
    """OSdataset: <size>/train/sar<n>.png + opt<n>.png (3 pairs), <size>/test/ (1 pair)."""
    rng = np.random.default_rng(seed)
    for size in sizes:
        for split, ids in (("train", (1, 2, 3)), ("test", (4,))):
            for k in ids:
                write_png(root / str(size) / split / f"sar{k}.png", _tex(rng))
                write_png(root / str(size) / split / f"opt{k}.png", _tex(rng))
    return root


def write_sar2opt(root: Path, seed: int = 0) -> Path:
    """SAR2Opt: trainA/<name>.jpg (SAR) + trainB/<name>.jpg (optical), 2 pairs; testA/testB 1 pair."""
    rng = np.random.default_rng(seed)
    for split, names in (("train", ("a1", "a2")), ("test", ("b1",))):
        for nm in names:
            write_png(root / f"{split}A" / f"{nm}.jpg", _tex(rng, c=3))  # SAR saved as 3 equal channels
            write_png(root / f"{split}B" / f"{nm}.jpg", _tex(rng, c=3))
    return root


def write_sn6(root: Path, n: int = 2, px: int = PX, seed: int = 0) -> Path:
    """SpaceNet 6: train/AOI_11_Rotterdam/SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_<ids>_tile_<k>.tif
    (4 float32 dB bands, the left 8 columns 0 = no data) + PS-RGB/..._PS-RGB_<ids>_tile_<k>.tif (3 uint8 bands)."""
    rng = np.random.default_rng(seed)
    aoi = root / "train" / "AOI_11_Rotterdam"
    for k in range(1, n + 1):
        ids = f"20190804111224_20190804111453_tile_{k}"
        sar = _tex(rng, px, 4, 20, 60).astype(np.float32)
        sar[:, :8] = 0
        write_geotiff(aoi / "SAR-Intensity" / f"SN6_Train_AOI_11_Rotterdam_SAR-Intensity_{ids}.tif", sar, 0.5, 32631)
        rgb = _tex(rng, px, 3).astype(np.uint8)
        write_geotiff(aoi / "PS-RGB" / f"SN6_Train_AOI_11_Rotterdam_PS-RGB_{ids}.tif", rgb, 0.5, 32631)
    return root


WRITERS = {
    "sen1-2": write_sen12,
    "sen12ms": write_sen12ms,
    "qxs-saropt": write_qxs,
    "osdataset": write_os,
    "sar2opt": write_sar2opt,
    "spacenet6": write_sn6,
}
#: (pairs of the default split, pairs of "all") of each generated sample
COUNTS = {
    "sen1-2": (5, 5),
    "sen12ms": (4, 4),
    "qxs-saropt": (3, 3),
    "osdataset": (3, 4),
    "sar2opt": (2, 3),
    "spacenet6": (2, 2),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_layout_is_listed_detected_and_read(name, tmp_path):
    root = WRITERS[name](tmp_path / name)
    assert detect_dataset(root) == name
    src = open_dataset(name, root)
    assert len(src) == COUNTS[name][0] and src.unpaired == 0
    assert len(open_dataset(None, root, split="all")) == COUNTS[name][1]
    for i in range(len(src)):
        s, o = src.paths(i)
        assert s.is_file() and o.is_file() and s != o
    p = src.read(0)
    assert p.sar.dtype == np.float32 and p.optical.dtype == np.float32
    assert p.sar.shape[:2] == p.optical.shape[:2] == (PX, PX)
    assert p.optical.shape[2] in (1, 3) and 0.0 <= p.optical.min() and p.optical.max() <= 1.5
    assert np.isfinite(p.sar).all() and p.gsd_m > 0
    scene = src.scene(0)
    assert scene.width_px == PX and scene.sar_gray.shape == (PX, PX) and scene.name.startswith(name + ":")
    d = src.describe()
    assert d["name"] == name and d["pairs"] == len(src) and len(d["sha256"]) == 64


def test_sen12_pairs_by_s1_to_s2_and_scales_display8(tmp_path):
    root = write_sen12(tmp_path / "SEN1-2")
    src = open_dataset("sen1-2", root)
    assert src.pairs[0] == (
        "ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p1.png",
        "ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p1.png",
    )
    assert len(open_dataset("sen1-2", root, split="spring")) == 3
    assert len(open_dataset("sen1-2", root, split="ROIs1868_summer")) == 2
    assert len(open_dataset("sen1-2", root, split="spring,summer")) == 5
    raw = cv2.imread(str(src.paths(0)[0]), cv2.IMREAD_UNCHANGED).astype(np.float32)
    p = src.read(0)
    assert p.sar.shape == (PX, PX, 1) and np.allclose(p.sar[..., 0], raw / 255 * 40 - 30, atol=1e-4)
    rgb = cv2.imread(str(src.paths(0)[1]))[..., ::-1].astype(np.float32) / 255
    assert p.optical.shape == (PX, PX, 3) and np.allclose(p.optical, rgb, atol=1e-6)
    assert p.gsd_m == 10.0


def test_sen12ms_bands_db_and_geotiff(tmp_path):
    root = write_sen12ms(tmp_path / "SEN12MS")
    src = open_dataset("sen12ms", root)
    assert (
        "ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p1.tif",
        "ROIs1158_spring_s2/s2_1/ROIs1158_spring_s2_1_p1.tif",
    ) in src.pairs
    assert ("ROIs1970_fall/s1_7/ROIs1970_fall_s1_7_p2.tif", "ROIs1970_fall/s2_7/ROIs1970_fall_s2_7_p2.tif") in src.pairs
    assert all("lc" not in s and "lc" not in o for s, o in src.pairs)  # land cover ignored
    assert len(open_dataset("sen12ms", root, split="fall")) == 1
    p = src.read(0)
    assert p.sar.shape == (PX, PX, 2)  # VV, VH in dB, as stored
    assert abs(float(p.sar[..., 0].mean()) + 10) < 3.1 and abs(float(p.sar[..., 1].mean()) + 20) < 3.1
    assert np.allclose(p.sar[..., 0] - p.sar[..., 1], 10.0, atol=1e-4)
    # RGB = bands 4, 3, 2 of the 13 (planar uint16), reflectance x 1e4
    assert p.optical.shape == (PX, PX, 3)
    assert np.allclose(p.optical[..., 1], 0.03) and np.allclose(p.optical[..., 2], 0.02)
    assert 0.04 <= p.optical[..., 0].min() and p.optical[..., 0].max() <= 0.0451
    assert p.gsd_m == 10.0 and p.meta["crs"] == "EPSG:32632"
    assert p.meta["geotransform"] == [500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0]
    png_root = write_sen12(tmp_path / "SEN1-2")
    with pytest.raises(ConfigError, match=r"is not a SEN12MS .*\.tif/\.tiff files .*found other files"):
        open_dataset("sen12ms", png_root)  # same naming, other format: not mistaken for SEN12MS


def test_qxs_os_sar2opt_pairing_and_scales(tmp_path):
    qxs = open_dataset("qxs", write_qxs(tmp_path / "qxs"))  # an alias; the root holds QXSLAB_SAROPT/
    assert qxs.base.name == "QXSLAB_SAROPT" and qxs.pairs[0] == ("sar_256_oc_0.2/1.png", "opt_256_oc_0.2/1.png")
    os_root = write_os(tmp_path / "os")
    osd = open_dataset("osdataset", os_root)
    assert osd.split == "train" and osd.base == os_root / "512"
    assert osd.pairs == [
        ("train/sar1.png", "train/opt1.png"),
        ("train/sar2.png", "train/opt2.png"),
        ("train/sar3.png", "train/opt3.png"),
    ]
    assert open_dataset("osdataset", os_root, split="test").pairs == [("test/sar4.png", "test/opt4.png")]
    raw = cv2.imread(str(osd.paths(0)[0]), cv2.IMREAD_UNCHANGED).astype(np.float32)
    amp_db = 20 * np.log10(np.maximum(raw, 1) / 255)  # linear amplitude -> dB
    assert np.allclose(osd.read(0).sar[..., 0], amp_db, atol=1e-3)
    assert osd.read(0).optical.shape == (PX, PX, 1)  # a grey optical patch stays one band
    both = write_os(tmp_path / "os2", sizes=(256, 512))
    with pytest.raises(ConfigError, match=r"holds 256/ and 512/ .*give one of them"):
        open_dataset("osdataset", both)
    assert len(open_dataset("osdataset", both / "256")) == 3
    s2o_root = write_sar2opt(tmp_path / "s2o")
    s2o = open_dataset("sar2opt", s2o_root)
    assert s2o.pairs == [("trainA/a1.jpg", "trainB/a1.jpg"), ("trainA/a2.jpg", "trainB/a2.jpg")]
    assert open_dataset("sar2opt", s2o_root, split="test").pairs == [("testA/b1.jpg", "testB/b1.jpg")]
    assert s2o.read(0).sar.shape == (PX, PX, 1)  # SAR JPG stored as RGB -> one band


def test_spacenet6_nodata_becomes_the_change_mask(tmp_path):
    root = write_sn6(tmp_path / "sn6")
    for r in (root, root / "train", root / "train" / "AOI_11_Rotterdam"):  # any of the three roots
        assert detect_dataset(r) == "spacenet6"
    src = open_dataset("spacenet6", root)
    s, o = src.pairs[0]
    assert s.startswith("SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_") and o == s.replace(
        "SAR-Intensity", "PS-RGB"
    )
    p = src.read(0)
    assert p.sar.shape == (PX, PX, 4) and p.gsd_m == 0.5 and p.meta["crs"] == "EPSG:32631"
    assert not p.valid[:, :8].any() and p.valid[:, 8:].all()
    scene = p.to_scene()
    assert scene.change_mask is not None and scene.change_mask[:, :8].all() and scene.frame.gsd_m == (0.5, 0.5)
    with pytest.raises(ConfigError, match="only 'train' pairs SAR with optical"):
        open_dataset("spacenet6", root, split="test")


def test_listing_is_lazy_and_reading_errors_name_the_file(tmp_path):
    root = write_sen12ms(tmp_path / "SEN12MS", merged_season=False)
    src = open_dataset("sen12ms", root)
    bad = src.paths(1)[1]
    bad.write_bytes(b"not a tiff")  # after listing: nothing was read
    assert len(open_dataset("sen12ms", root)) == 3  # listing reads no pixels
    with pytest.raises(SceneError, match=rf"SEN12MS optical: {bad} could not be decoded"):
        src.read(1)
    few = tmp_path / "few" / "ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p1.tif"
    write_geotiff(few, np.zeros((PX, PX, 2), np.float32), 10.0)
    write_geotiff(
        few.parents[2] / "ROIs1158_spring_s2/s2_1/ROIs1158_spring_s2_1_p1.tif", np.zeros((PX, PX, 3), np.uint16), 10.0
    )
    with pytest.raises(SceneError, match=r"has 3 bands, expected at least 4"):
        open_dataset("sen12ms", tmp_path / "few").read(0)


def test_unpaired_files_are_skipped_with_one_warning(tmp_path, caplog):
    root = write_sen12(tmp_path / "SEN1-2")
    write_png(root / "ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p99.png", np.zeros((PX, PX, 1)))
    write_png(root / "ROIs1868_summer/s2_3/ROIs1868_summer_s2_3_p98.png", np.zeros((PX, PX, 3)))
    write_png(root / "ROIs1868_summer/s1_5/ROIs1868_summer_s1_5_p1.png", np.zeros((PX, PX, 1)))  # no s2_5/
    with caplog.at_level(logging.WARNING, logger="sarloc"):
        src = open_dataset("sen1-2", root)
    assert len(src) == 5 and src.unpaired == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 file(s) without a partner" in warnings[0].getMessage()


def test_errors_are_one_line_and_name_what_is_missing(tmp_path):
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        detect_dataset(other)
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and "matches no known dataset layout (it holds images)" in msg
    for name in LAYOUTS:
        assert f"{name} [" in msg
    assert "no trainA/ + trainB/" in msg and "no SAR-Intensity/ + PS-RGB/ folders" in msg
    with pytest.raises(ConfigError, match=r"dataset folder .*missing not found"):
        open_dataset("sen12ms", tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"unknown dataset 'sen3'; known: sen1-2, sen12ms, qxs-saropt"):
        open_dataset("sen3", other)
    s2o = write_sar2opt(tmp_path / "s2o")
    with pytest.raises(ConfigError, match=r"is not a SpaceNet 6 .* folder: expected .*SAR-Intensity.*it holds testA"):
        open_dataset("spacenet6", s2o)
    sen = write_sen12(tmp_path / "sen", n_summer=0)
    with pytest.raises(ConfigError, match=r"no season 'winter'; present: spring"):
        open_dataset("sen1-2", sen, split="winter")
    (sen / "ROIs2017_winter/s1_9").mkdir(parents=True)
    write_png(sen / "ROIs2017_winter/s1_9/ROIs2017_winter_s1_9_p1.png", np.zeros((PX, PX, 1)))
    with pytest.raises(ConfigError, match=r"split 'winter' holds no SAR-optical pairs \(1 unpaired files, e.g. "):
        open_dataset("sen1-2", sen, split="winter")
    two = write_sar2opt(tmp_path / "two")
    write_qxs(two)
    with pytest.raises(ConfigError, match=r"matches several dataset layouts \(qxs-saropt, sar2opt\); name one"):
        detect_dataset(two)


def test_dataset_specs():
    assert parse_dataset_spec("sen12ms:/data/SEN12MS") == DatasetSpec("sen12ms", None, Path("/data/SEN12MS"))
    assert parse_dataset_spec("SAR2Opt@test:/d/s") == DatasetSpec("sar2opt", "test", Path("/d/s"))
    assert parse_dataset_spec("SN6:rel/dir") == DatasetSpec("spacenet6", None, Path("rel/dir"))
    assert parse_dataset_spec("auto@train:/x") == DatasetSpec(None, "train", Path("/x"))
    assert parse_dataset_spec("/data/x") == DatasetSpec(None, None, Path("/data/x"))
    assert parse_dataset_spec("C:/data/x") == DatasetSpec(None, None, Path("C:/data/x"))  # a drive, not a name
    with pytest.raises(ConfigError, match="unknown dataset 'sen3'"):
        parse_dataset_spec("sen3@x:/data")


def test_shards_are_disjoint_and_streams_deterministic(tmp_path):
    src = open_dataset("qxs-saropt", write_qxs(tmp_path / "q", n=9))
    a, b = src.shard(0, 2, seed=5), src.shard(1, 2, seed=5)
    assert not set(a) & set(b) and sorted([*a, *b]) == list(range(9))
    assert np.array_equal(a, src.shard(0, 2, seed=5)) and not np.array_equal(a, src.shard(0, 2, seed=6))
    keys0 = [p.key for p in src.stream(seed=5, rank=0, world=2, epochs=2)]
    keys1 = [p.key for p in src.stream(seed=5, rank=1, world=2, epochs=1)]
    assert len(keys0) == 2 * len(a) and sorted(keys0[: len(a)]) == sorted(keys0[len(a) :])
    assert not set(keys0) & set(keys1)
    assert keys0 == [p.key for p in src.stream(seed=5, rank=0, world=2, epochs=2)]
    assert keys0[: len(a)] != keys0[len(a) :] or len(a) < 3  # a new order each epoch
    with pytest.raises(ConfigError, match="9 pairs cannot be shared by 10 processes"):
        src.shard(0, 10)
