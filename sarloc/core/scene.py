"""Scene folders (torch-free): loading, band/scale normalisation, change masks and query windows.

A scene folder holds ``scene.json``, ``optical.<ext>``, ``sar.<ext>`` (same pixel grid) and optionally
``change_mask.<ext>``; see ``docs/scenes.md``. Images are read with tifffile (``.tif``) or OpenCV
(``.png``, ``.jpg``, ``.bmp``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.config import finite_number
from sarloc.core.errors import SceneError, brief
from sarloc.core.geo import GeoFrame, TileGrid

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
OPTICAL_SCALES = ("display8", "reflectance_1e4", "linear_0_1")
SAR_SCALES = ("display8", "linear_0_1", "db")
MAX_PIXELS = 200_000_000


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """Read an image as (H, W) or (H, W, C) in its stored dtype (RGB order for colour PNG/JPG/BMP).

    Raises:
        SceneError: one line naming the file when it is missing, truncated, corrupt or empty.
    """
    path = Path(path)
    shown = str(path) if str(path).isprintable() else repr(str(path))  # messages stay on one line
    try:
        found = path.is_file()
    except OSError as e:  # e.g. a name too long for the file system
        raise SceneError(f"{what}: {shown[:200]} cannot be opened ({e.strerror})") from None
    if not found:
        raise SceneError(f"{what}: {shown} not found")
    if path.stat().st_size == 0:
        raise SceneError(f"{what}: {shown} is empty (0 bytes); re-copy the file")
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTS:
        raise SceneError(f"{what}: {shown} has unsupported extension {ext!r}; use one of {', '.join(IMAGE_EXTS)}")
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                if int(np.prod(page.shape)) > MAX_PIXELS * 4:
                    raise SceneError(f"{what}: {shown} is too large to load ({page.shape}); tile it first")
                arr = tf.asarray()
            if arr.ndim == 3 and arr.shape[0] <= 4 < arr.shape[2]:  # planar (C, H, W)
                arr = np.moveaxis(arr, 0, -1)
        else:
            import cv2

            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise SceneError(f"{what}: {shown} could not be decoded (corrupt or truncated); re-copy the file")
            arr = img
            if arr.ndim == 3 and arr.shape[2] >= 3:
                arr = arr[..., [2, 1, 0]] if arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]]
    except SceneError:
        raise
    except Exception as e:  # decoder errors of every kind -> one line
        detail = brief(e)  # decoder messages may span lines
        raise SceneError(
            f"{what}: {shown} could not be decoded ({type(e).__name__}: {detail}); re-copy the file"
        ) from None
    if arr.ndim not in (2, 3) or arr.size == 0 or min(arr.shape[:2]) == 0:
        raise SceneError(f"{what}: {shown} has unusable shape {arr.shape}; expected H x W or H x W x C")
    if arr.dtype.kind not in "uif":
        raise SceneError(f"{what}: {shown} has unsupported dtype {arr.dtype}; expected uint8, uint16 or float32")
    return np.ascontiguousarray(arr)


def _to_float32(arr: np.ndarray) -> np.ndarray:
    """``arr`` as float32; values beyond the float32 range become inf (and are then replaced by ``_finite``)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(np.float32)


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    bad = ~np.isfinite(arr)
    if bad.all():
        raise SceneError(f"{what}: no finite pixels; the image is unusable")
    if bad.any():
        arr = arr.copy()
        arr[bad] = float(np.mean(arr[~bad], dtype=np.float64))  # a float32 sum of large pixels would overflow
    return arr


def normalise_optical(arr: np.ndarray, scale: str, what: str = "optical") -> np.ndarray:
    """Stored optical pixels -> float32 (H, W, C) reflectance-like values in about [0, 1]."""
    a = _finite(_to_float32(arr), what)
    if scale == "display8":
        a = a / (255.0 if arr.dtype != np.uint16 else 65535.0)
    elif scale == "reflectance_1e4":
        a = a / 1e4
    elif scale == "linear_0_1":
        pass
    else:
        raise SceneError(f"{what}: unknown scale {scale!r}; expected one of {', '.join(OPTICAL_SCALES)}")
    a = np.clip(a, 0.0, 1.5)
    return a if a.ndim == 3 else a[..., None]


def normalise_sar(arr: np.ndarray, scale: str, what: str = "sar") -> np.ndarray:
    """Stored SAR pixels -> float32 (H, W, C) on a log (dB-like) scale.

    ``linear_0_1`` (power) and ``db`` become decibels; ``display8`` (already display-scaled, usually log-like
    amplitude) becomes its 8-bit value / 255 * 40 - 30, a pseudo-dB range so every scale has similar spread.
    """
    a = _to_float32(arr)
    if scale == "linear_0_1":
        a = 10.0 * np.log10(np.maximum(_finite(a, what), 1e-6))
    elif scale == "db":
        a = _finite(a, what)
    elif scale == "display8":
        a = _finite(a, what) / (255.0 if arr.dtype != np.uint16 else 65535.0) * 40.0 - 30.0
    else:
        raise SceneError(f"{what}: unknown scale {scale!r}; expected one of {', '.join(SAR_SCALES)}")
    return a if a.ndim == 3 else a[..., None]


def to_single_band(img: np.ndarray, modality: str) -> np.ndarray:
    """(H, W, C) -> (H, W) float32: optical luminance (Rec. 601 on RGB) or SAR band mean in the log domain."""
    if img.ndim == 2:
        return img.astype(np.float32)
    c = img.shape[2]
    if modality == "optical" and c >= 3:
        return (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]).astype(np.float32)
    return img[..., : min(c, 3)].mean(axis=2).astype(np.float32)


@dataclass
class Scene:
    """A loaded, normalised scene.

    Attributes:
        name: scene name.
        path: scene folder.
        optical: (H, W, C) float32, about [0, 1].
        sar: (H, W, C) float32, log scale (dB or pseudo-dB).
        optical_gray: (H, W) float32 luminance.
        sar_gray: (H, W) float32 log-intensity band mean.
        change_mask: (H, W) bool, True where land cover changed, or None.
        frame: pixel -> metric/lon-lat mapping.
        meta: the parsed scene.json.
    """

    name: str
    path: Path
    optical: np.ndarray
    sar: np.ndarray
    optical_gray: np.ndarray
    sar_gray: np.ndarray
    change_mask: np.ndarray | None
    frame: GeoFrame
    meta: dict[str, Any]

    @property
    def height_px(self) -> int:
        """Image height in pixels."""
        return int(self.optical.shape[0])

    @property
    def width_px(self) -> int:
        """Image width in pixels."""
        return int(self.optical.shape[1])

    @property
    def gsd_m(self) -> float:
        """Mean metres per pixel."""
        return self.frame.mean_gsd_m


def _field(meta: dict[str, Any], key: str, typ: type | tuple[type, ...], path: Path, optional: bool = False):
    if key not in meta or meta[key] is None:
        if optional:
            return None
        raise SceneError(f"{path}: field {key!r} is missing; see the scene format in docs/scenes.md")
    val = meta[key]
    if not isinstance(val, typ):
        raise SceneError(f"{path}: field {key!r} must be {typ}, got {type(val).__name__}")
    return val


def _load_band_image(folder: Path, meta_json: Path, entry: dict[str, Any], what: str) -> tuple[np.ndarray, list]:
    file = _field(entry, "file", str, meta_json)
    bands = entry.get("bands") or []
    if not isinstance(bands, list):
        raise SceneError(f"{meta_json}: field '{what}.bands' must be a list of band names")
    arr = read_image(folder / file, what=f"{what} image")
    n = 1 if arr.ndim == 2 else arr.shape[2]
    if bands and len(bands) != n:
        # a grey image stored as RGB (identical channels) is accepted for a 1-band entry
        if len(bands) == 1 and n in (3, 4):
            arr = arr[..., :3].astype(np.float32).mean(axis=2).astype(arr.dtype)
        else:
            raise SceneError(
                f"{folder / file}: has {n} bands but scene.json '{what}.bands' lists {len(bands)} ({bands}); "
                "fix the bands field"
            )
    return arr, bands


def _read_meta(folder: Path) -> tuple[Path, dict[str, Any]]:
    """``scene.json`` of a scene folder and its parsed object.

    Raises:
        SceneError: the folder or ``scene.json`` is missing, or it is not a JSON object.
    """
    meta_json = folder / "scene.json"
    if folder.is_file():
        raise SceneError(f"{folder} is a file: give the scene folder that holds scene.json (see docs/scenes.md)")
    if not folder.is_dir():
        raise SceneError(f"scene folder {folder} not found")
    if not meta_json.is_file():
        raise SceneError(f"{meta_json} not found: a scene folder needs scene.json (see docs/scenes.md)")
    try:
        meta = json.loads(meta_json.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int of > 4300 digits, too deeply nested
        raise SceneError(f"{meta_json}: malformed JSON ({str(e)[:200]}); fix or regenerate it") from None
    if not isinstance(meta, dict):
        raise SceneError(f"{meta_json}: must hold a JSON object")
    return meta_json, meta


def _image_entries(
    folder: Path, meta_json: Path, meta: dict[str, Any], verify_sha256: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``optical`` and ``sar`` entries of ``scene.json``, their scales checked (and their sha256 when asked).

    Raises:
        SceneError: an entry is missing, has an unknown scale, or its image's sha256 differs.
    """
    opt_entry = _field(meta, "optical", dict, meta_json)
    sar_entry = _field(meta, "sar", dict, meta_json)
    for what, entry, scales in (("optical", opt_entry, OPTICAL_SCALES), ("sar", sar_entry, SAR_SCALES)):
        scale = entry.get("scale")
        if scale not in scales:
            raise SceneError(f"{meta_json}: field '{what}.scale' is {scale!r}; expected one of {', '.join(scales)}")
        if verify_sha256 and entry.get("sha256"):
            from sarloc.core.artifacts import sha256_file

            f = folder / str(entry.get("file"))
            if f.is_file() and sha256_file(f) != entry["sha256"]:
                raise SceneError(f"{f}: sha256 differs from scene.json '{what}.sha256' (modified or truncated)")
    return opt_entry, sar_entry


def _load_change_mask(folder: Path, meta_json: Path, meta: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray | None:
    """The change mask (True where land cover changed), or None when the scene has none.

    Raises:
        SceneError: the entry is malformed, or the mask is unreadable or not of the images' size ``shape``.
    """
    cm_entry = meta.get("change_mask")
    if not cm_entry:
        return None
    if not isinstance(cm_entry, dict) or not isinstance(cm_entry.get("file"), str):
        raise SceneError(f"{meta_json}: field 'change_mask' must be an object with a 'file'")
    cm = read_image(folder / cm_entry["file"], what="change mask")
    if cm.ndim == 3:
        cm = cm.max(axis=2)
    if cm.shape[:2] != shape:
        raise SceneError(f"{folder / cm_entry['file']}: change mask size {cm.shape[:2]} differs from the images")
    return cm > (cm.max() / 2 if cm.max() > 0 else 0)


def _scene_frame(meta_json: Path, meta: dict[str, Any], w: int, h: int) -> GeoFrame:
    """The pixel -> metric/lon-lat mapping of a ``w`` x ``h`` scene from ``crs``, ``geotransform`` and ``gsd_m``
    (or ``gsd_m_estimate``).

    Raises:
        SceneError: a field is malformed, inconsistent or maps the image beyond finite coordinates.
    """
    crs = meta.get("crs")
    gt = meta.get("geotransform")
    if (crs is None) != (gt is None):
        raise SceneError(f"{meta_json}: 'crs' and 'geotransform' must both be set or both be null")
    gsd = meta.get("gsd_m")
    if gsd is None:
        est = meta.get("gsd_m_estimate")
        if est is None and crs is None:
            raise SceneError(f"{meta_json}: needs 'gsd_m' or 'gsd_m_estimate' when there is no geo-reference")
        gsd = [est, est] if est is not None else [1.0, 1.0]
    if isinstance(gsd, (int, float)):
        gsd = [gsd, gsd]
    if not (isinstance(gsd, list) and len(gsd) == 2 and all(finite_number(v) is not None and v > 0 for v in gsd)):
        raise SceneError(f"{meta_json}: field 'gsd_m' must be [x, y] positive metres per pixel, got {gsd!r:.80}")
    if crs is not None and not isinstance(crs, str):
        raise SceneError(f"{meta_json}: field 'crs' must be a string such as 'EPSG:32631'")
    if gt is not None and not (isinstance(gt, list) and len(gt) == 6 and all(finite_number(v) is not None for v in gt)):
        raise SceneError(f"{meta_json}: field 'geotransform' must be a list of 6 finite numbers (GDAL order)")
    if gt is not None:
        x0, dx, rx, y0, ry, dy = (float(v) for v in gt)
        if not (math.isfinite(x0 + dx * w + rx * h) and math.isfinite(y0 + ry * w + dy * h)):  # far corner
            raise SceneError(f"{meta_json}: field 'geotransform' maps the image beyond finite coordinates; fix it")
    frame = GeoFrame(w, h, crs=crs, geotransform=tuple(gt) if gt else None, gsd_m=(float(gsd[0]), float(gsd[1])))
    if not all(math.isfinite(g) and g > 0 for g in frame.gsd_m):
        raise SceneError(f"{meta_json}: the geotransform gives a pixel size of {frame.gsd_m} m; fix 'geotransform'")
    return frame


def load_scene(folder: str | Path, verify_sha256: bool = False) -> Scene:
    """Load a scene folder.

    Args:
        folder: path to the folder holding ``scene.json``.
        verify_sha256: also check each image's sha256 against ``scene.json``.

    Raises:
        SceneError: one line naming the file and field at fault.
    """
    folder = Path(folder)
    meta_json, meta = _read_meta(folder)
    opt_entry, sar_entry = _image_entries(folder, meta_json, meta, verify_sha256)

    opt_raw, _ = _load_band_image(folder, meta_json, opt_entry, "optical")
    sar_raw, _ = _load_band_image(folder, meta_json, sar_entry, "sar")
    if opt_raw.shape[:2] != sar_raw.shape[:2]:
        raise SceneError(
            f"{folder}: optical is {opt_raw.shape[1]}x{opt_raw.shape[0]} px but sar is "
            f"{sar_raw.shape[1]}x{sar_raw.shape[0]}; they must share one pixel grid"
        )
    optical = normalise_optical(opt_raw, opt_entry["scale"], what=str(folder / opt_entry["file"]))
    sar = normalise_sar(sar_raw, sar_entry["scale"], what=str(folder / sar_entry["file"]))
    change_mask = _load_change_mask(folder, meta_json, meta, opt_raw.shape[:2])

    h, w = optical.shape[:2]
    frame = _scene_frame(meta_json, meta, w, h)
    name = meta.get("name") or folder.name
    return Scene(
        name=str(name),
        path=folder,
        optical=optical,
        sar=sar,
        optical_gray=to_single_band(optical, "optical"),
        sar_gray=to_single_band(sar, "sar"),
        change_mask=change_mask,
        frame=frame,
        meta=meta,
    )


def find_scenes(roots: list[str | Path]) -> list[Path]:
    """Scene folders among ``roots``: each root is a scene folder or a folder of scene folders."""
    found: list[Path] = []
    for r in roots:
        r = Path(r)
        if (r / "scene.json").is_file():
            found.append(r)
        elif r.is_dir():
            found.extend(sorted(p.parent for p in r.glob("*/scene.json")))
        else:
            raise SceneError(f"scene path {r} not found")
    if not found:
        raise SceneError(f"no scene folders (with scene.json) under {', '.join(map(str, roots))}")
    return found


@dataclass(frozen=True)
class QuerySet:
    """SAR query windows with their true positions.

    Attributes:
        kind: "aligned" (on the tile grid) or "arbitrary" (random offset).
        origins: (Q, 2) int top-left (x0, y0) of each window, pixels.
        centres: (Q, 2) float continuous pixel centre (x, y).
        window_px: window side, pixels.
    """

    kind: str
    origins: np.ndarray
    centres: np.ndarray
    window_px: int


def change_fraction(scene: Scene, origins: np.ndarray, window_px: int) -> np.ndarray:
    """(Q,) fraction of changed pixels inside each window (zeros without a change mask)."""
    if scene.change_mask is None:
        return np.zeros(len(origins))
    integ = np.pad(scene.change_mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0, y0 = origins[:, 0], origins[:, 1]
    x1, y1 = x0 + window_px, y0 + window_px
    s = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
    return s / float(window_px * window_px)


def make_queries(
    scene: Scene, kind: str, window_px: int, n: int | None = None, seed: int = 0, max_change: float = 0.25
) -> QuerySet:
    """SAR query windows over ``scene``.

    Args:
        kind: "aligned": windows exactly on the non-overlapping tile grid; "arbitrary": uniformly random
            top-left positions (the window stays inside the image).
        window_px: window side in pixels.
        n: number of queries (aligned: a random subset when the grid holds more; None = all / grid size).
        seed: random seed.
        max_change: windows with a larger changed-area fraction are excluded (their truth is unreliable).
    """
    if window_px > min(scene.width_px, scene.height_px):
        raise SceneError(
            f"{scene.path}: window of {window_px} px is larger than the scene "
            f"({scene.width_px}x{scene.height_px} px); use a smaller --window-px"
        )
    rng = np.random.default_rng(seed)
    if kind == "aligned":
        origins = TileGrid(scene.width_px, scene.height_px, window_px, window_px).origins()
    elif kind == "arbitrary":
        m = n if n is not None else len(TileGrid(scene.width_px, scene.height_px, window_px, window_px))
        m = int(m * 1.5) + 8
        origins = np.stack(
            [rng.integers(0, scene.width_px - window_px + 1, m), rng.integers(0, scene.height_px - window_px + 1, m)],
            axis=1,
        )
    else:
        raise SceneError(f"unknown query kind {kind!r}; expected 'aligned' or 'arbitrary'")
    keep = change_fraction(scene, origins, window_px) <= max_change
    origins = origins[keep]
    if n is not None and len(origins) > n:
        origins = origins[np.sort(rng.choice(len(origins), n, replace=False))] if kind == "aligned" else origins[:n]
    centres = origins.astype(np.float64) + window_px / 2.0
    return QuerySet(kind=kind, origins=origins.astype(np.int64), centres=centres, window_px=window_px)
