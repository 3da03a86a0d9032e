"""Reading one patch of a public dataset: (H, W, C) pixels in their stored dtype plus the GeoTIFF geo-reference.

GeoTIFFs are read with tifffile (the project's TIFF reader, :func:`sarloc.core.scene.read_image` uses it too), the
band axis found from the page's axes (contiguous ``YXS`` or planar ``SYX``, any band count), the geo-reference
from the GeoTIFF tags (ModelPixelScale, ModelTiepoint, the GeoKey directory's EPSG code). PNG / JPG go through
:func:`sarloc.core.scene.read_image` (OpenCV, RGB order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import SceneError, brief
from sarloc.core.scene import read_image

_PIXEL_SCALE, _TIEPOINT, _GEOKEYS = 33550, 33922, 34735
_MODEL_TYPE, _GEOGRAPHIC_CS, _PROJECTED_CS = 1024, 2048, 3072


def _geokeys(raw: Any) -> dict[int, int]:
    """Short-valued keys of a GeoKeyDirectoryTag (header of 4 shorts, then entries of 4: id, location, count,
    value); keys stored in other tags (doubles, ASCII) are left out."""
    v = [int(x) for x in raw]
    keys: dict[int, int] = {}
    for k in range(4, min(len(v), 4 + 4 * v[3]) - 3, 4):
        if v[k + 1] == 0:
            keys[v[k]] = v[k + 3]
    return keys


def geo_of_tiff(tags: Any) -> dict[str, Any]:
    """``{"crs": "EPSG:n", "geotransform": [...], "pixel_m": (x, y)}`` from a TIFF page's tags; ``pixel_m`` only for
    a projected CRS (metres), nothing for a plain TIFF."""
    geo: dict[str, Any] = {}
    scale = tags.get(_PIXEL_SCALE)
    tie = tags.get(_TIEPOINT)
    keys = _geokeys(tags[_GEOKEYS].value) if _GEOKEYS in tags else {}
    code = keys.get(_PROJECTED_CS) or keys.get(_GEOGRAPHIC_CS)
    if code and 1024 <= code < 32767:  # 32767 = user-defined
        geo["crs"] = f"EPSG:{code}"
    if scale is not None and tie is not None and len(scale.value) >= 2 and len(tie.value) >= 6:
        sx, sy = float(scale.value[0]), float(scale.value[1])
        i, j, x, y = (float(tie.value[n]) for n in (0, 1, 3, 4))
        geo["geotransform"] = [x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy]
        if keys.get(_MODEL_TYPE) == 1 or _PROJECTED_CS in keys:
            geo["pixel_m"] = (sx, sy)
    return geo


def read_tiff(path: Path, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A (Geo)TIFF as (H, W, C) in its stored dtype, and its geo-reference (:func:`geo_of_tiff`).

    Raises:
        SceneError: one line naming the file when it is missing, empty or cannot be decoded.
    """
    import tifffile

    if not path.is_file():
        raise SceneError(f"{what}: {path} not found")
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            arr = series.asarray()
            axes = series.axes
            geo = geo_of_tiff(getattr(tf.pages[0], "tags", {}))  # the first page is a TiffPage
    except Exception as e:  # decoder errors of every kind -> one line
        raise SceneError(f"{what}: {path} could not be decoded ({type(e).__name__}: {brief(e)})") from None
    if arr.ndim == 3 and axes and axes[0] not in "YX":  # planar (bands, H, W), or one band per page
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or min(arr.shape) == 0 or arr.dtype.kind not in "uif":
        raise SceneError(f"{what}: {path} has unusable shape {arr.shape} / dtype {arr.dtype}")
    return np.ascontiguousarray(arr), geo


def read_raster(path: Path, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Any patch file as (H, W, C) in its stored dtype plus its geo-reference (empty for PNG / JPG)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_tiff(path, what)
    arr = read_image(path, what=what)
    return (arr if arr.ndim == 3 else arr[..., None]), {}


def grey(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, 1): a grey image stored as RGB(A) (SAR PNG / JPG) becomes its channel mean."""
    if arr.shape[2] == 1:
        return arr
    return arr[..., :3].astype(np.float32).mean(axis=2, keepdims=True).astype(arr.dtype)


def take_bands(arr: np.ndarray, bands: tuple[int, ...], path: Path, what: str) -> np.ndarray:
    """The 1-based ``bands`` of an (H, W, C) image, in that order.

    Raises:
        SceneError: the file has fewer bands.
    """
    if arr.shape[2] < max(bands):
        raise SceneError(f"{what}: {path} has {arr.shape[2]} bands, expected at least {max(bands)}")
    return arr[..., [b - 1 for b in bands]]
