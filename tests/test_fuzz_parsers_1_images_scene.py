"""Property-based fuzzing of the parsers (part 1; shared machinery in ``fuzz_common.py``, rule in docs/reliability.md):
images (``read_image``) and ``scene.json`` (``load_scene``).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from fuzz_common import (
    SCENE_GEO,
    SCENE_LONLAT,
    SCENE_PLAIN,
    _encode,
    _write_scene_images,
    damaged_seed,
    fuzz,
    json_text_damage,
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
from hypothesis import example, given
from hypothesis import strategies as st

import sarloc.core.scene as scene_mod
from sarloc.core.scene import load_scene, read_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning", "ignore::UserWarning")


# ================================================================================================ 1. images

IMAGE_EXTS = [".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy"]
MAGIC_PREFIXES = [b"", b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM"]


def _seed_images() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    nan = rng.random((6, 5)).astype(np.float32)
    nan[1, 2], nan[3, 3] = np.nan, np.inf
    seeds = [
        (".png", _encode(".png", rng.integers(0, 255, (6, 5), dtype=np.uint8))),
        (".png", _encode(".png", rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))),
        (".png", _encode(".png", rng.integers(0, 255, (6, 5, 4), dtype=np.uint8))),
        (".png", _encode(".png", rng.integers(0, 65535, (6, 5), dtype=np.uint16))),
        (".jpg", _encode(".jpg", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))),
        (".bmp", _encode(".bmp", rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))),
        (".tif", _encode(".tif", nan)),
        (".tif", _encode(".tif", rng.integers(0, 65535, (6, 5), dtype=np.uint16))),
        (".tif", _encode(".tif", rng.integers(0, 255, (3, 6, 5), dtype=np.uint8), planarconfig="separate")),
        (".tif", _encode(".tif", rng.random((4, 4, 2)).astype(np.float32))),
    ]
    with contextlib.suppress(Exception):  # compressed TIFF when the codec is available
        seeds.append((".tif", _encode(".tif", rng.random((6, 5)).astype(np.float32), compression="zlib")))
    return seeds


SEED_IMAGES = _seed_images()


def check_image(r: Any) -> None:
    if isinstance(r, np.ndarray):
        assert r.ndim in (2, 3) and r.size > 0 and r.dtype.kind in "uif", (r.dtype, r.shape)


@fuzz(400)
@given(ext=st.sampled_from(IMAGE_EXTS), prefix=st.sampled_from(MAGIC_PREFIXES), body=st.binary(max_size=1500))
@example(ext=".tif", prefix=b"", body=b"")
@example(ext=".png", prefix=b"", body=b"")
def test_read_image_random_bytes(work, ext, prefix, body):
    p = write(work / f"img{ext}", prefix + body)
    check_image(outcome("images: scene.read_image", lambda: read_image(p, "fuzz")))


@fuzz(400)
@given(case=damaged_seed(SEED_IMAGES))
def test_read_image_truncated_or_corrupted(work, case):
    ext, data = case
    p = write(work / f"img{ext}", data)
    check_image(outcome("images: scene.read_image", lambda: read_image(p, "fuzz")))


@fuzz(300)
@given(arr=odd_arrays(), ext=st.sampled_from([".tif", ".png"]), planar=st.booleans())
def test_read_image_odd_dtypes_and_shapes(work, arr, ext, planar):
    p = work / f"odd{ext}"
    p.unlink(missing_ok=True)
    try:
        if ext == ".tif":
            tifffile.imwrite(p, arr, planarconfig="separate" if planar and arr.ndim == 3 else None)
        elif not cv2.imwrite(str(p), arr):
            return
    except Exception:  # the writer refuses this dtype/shape: nothing to read
        return
    check_image(outcome("images: scene.read_image", lambda: read_image(p, "fuzz")))


# ============================================================================================= 2. scene.json


@pytest.fixture(scope="module")
def scene_dir(work) -> Path:
    d = work / "scene"
    _write_scene_images(d)
    (d / "scene.json").write_text(json.dumps(SCENE_GEO))
    load_scene(d)  # the base is valid
    return d


def check_scene(sc: Any) -> None:
    if isinstance(sc, scene_mod.Scene):
        assert sc.optical.shape[:2] == sc.sar.shape[:2]
        assert all(math.isfinite(g) and g > 0 for g in sc.frame.gsd_m), sc.frame.gsd_m
        assert np.isfinite(sc.optical).all() and np.isfinite(sc.sar).all()


def _load_scene_case(scene_dir: Path, text: str | bytes) -> None:

    write(scene_dir / "scene.json", text)
    known = {}
    check_scene(outcome("scene.json: scene.load_scene", lambda: load_scene(scene_dir), **known))


@fuzz(250)
@given(doc=json_value_huge)
def test_load_scene_random_json(scene_dir, doc):
    _load_scene_case(scene_dir, to_json_text(doc))


scene_field_values = st.one_of(
    json_value_huge,
    st.sampled_from(
        ["small.png", "sar.tif", "optical.png", "missing.tif", "scene.json", "", ".", "a\nb.png", "a" * 300]
    ),
    st.lists(st.one_of(st.floats(), st.integers(-(2**64), 2**64), st.just("HUGE")), min_size=6, max_size=6),
)


CRS_STRINGS = [
    "EPSG:32631",
    "EPSG:4326",
    "EPSG:3857",
    "EPSG:4978",  # geocentric
    "EPSG:2056",
    "+proj=longlat +datum=WGS84",
    "+proj=utm +zone=31 +datum=WGS84",
    "urn:ogc:def:crs:EPSG::4326",
    "EPSG:",
    "EPSG:-1",
    "EPSG:999999",
    "IAU_2015:30100",  # the Moon: no transformation to EPSG:4326 (was a ProjError in geo.py, fixed)
    "+proj=nonsense",
]
gt_numbers = st.one_of(st.floats(), st.sampled_from([0.0, 1e-300, 1e-4, 10.0, -10.0, 1e300, -1e308, 1e308, 5e5, 48.0]))


@st.composite
def scene_docs(draw) -> Any:
    meta = draw(mutated(draw(st.sampled_from([SCENE_PLAIN, SCENE_GEO, SCENE_LONLAT]))))
    if draw(st.integers(0, 3)) == 0:  # a real-looking geo-reference
        meta["crs"] = draw(st.sampled_from(CRS_STRINGS))
        meta["geotransform"] = draw(st.lists(gt_numbers, min_size=6, max_size=6))
    if draw(st.booleans()):  # aim a random value at a known field
        keys = ["crs", "geotransform", "gsd_m", "gsd_m_estimate", "name", "optical", "sar", "change_mask"]
        meta[draw(st.sampled_from(keys))] = draw(scene_field_values)
    if draw(st.booleans()):
        entry = draw(st.sampled_from(["optical", "sar", "change_mask"]))
        if isinstance(meta.get(entry), dict):
            meta[entry][draw(st.sampled_from(["file", "bands", "scale", "sha256"]))] = draw(scene_field_values)
    return meta


@fuzz(650)
@given(meta=scene_docs())
def test_load_scene_mutated_fields(scene_dir, meta):
    _load_scene_case(scene_dir, to_json_text(meta))


@fuzz(200)
@given(data=json_text_damage(json.dumps(SCENE_GEO)))
def test_load_scene_damaged_text(scene_dir, data):
    _load_scene_case(scene_dir, data)
