"""Basemap sources for map packs (torch-free): a luminance band on a square metric grid, read in blocks.

Two sources share one interface (:class:`Basemap`):

* :class:`RasterBasemap`: any GeoTIFF rasterio opens, in any CRS. It is warped on the fly (``WarpedVRT``) to a
  local metric grid: the file's own CRS when it is projected in metres, else the UTM zone of its centre; pixels
  are square on the ground at the requested metres per pixel. Blocks are read as windows of the virtual raster,
  so a basemap larger than memory is never loaded whole.
* :class:`ArrayBasemap`: an in-memory luminance image with a north-up metric geotransform (a scene folder with
  a projected CRS or none; see :func:`open_basemap`).

A grid pixel (col, row) spans [x0 + col*gsd, x0 + (col+1)*gsd) east and [y0 - (row+1)*gsd, y0 - row*gsd)
north; ``x0, y0`` is the top-left corner.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sarloc.core.errors import SarlocError, brief
from sarloc.core.geo import utm_epsg_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricGrid:
    """A north-up square-pixel grid in a metric CRS.

    Attributes:
        crs: metric CRS string (e.g. "EPSG:32631"), or None for a scene without geo-reference (local metres).
        x0_m, y0_m: easting, northing of the top-left corner of pixel (0, 0).
        gsd_m: metres per pixel (both axes).
        width_px, height_px: grid size.
    """

    crs: str | None
    x0_m: float
    y0_m: float
    gsd_m: float
    width_px: int
    height_px: int

    def pixel_to_metric(self, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous pixel coordinates -> (easting, northing) metres."""
        x = self.x0_m + np.asarray(col, np.float64) * self.gsd_m
        return x, self.y0_m - np.asarray(row, np.float64) * self.gsd_m

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "metric_crs": self.crs,
            "x0_m": self.x0_m,
            "y0_m": self.y0_m,
            "gsd_m": self.gsd_m,
            "width_px": self.width_px,
            "height_px": self.height_px,
        }


class Basemap(Protocol):
    """A luminance band on a :class:`MetricGrid`, readable in blocks."""

    grid: MetricGrid
    description: dict[str, Any]

    def read(self, col0: int, row0: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Block of the grid -> ((height, width) float32 luminance, (height, width) bool valid-pixel mask)."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


def luminance(bands: np.ndarray) -> np.ndarray:
    """(C, H, W) bands -> (H, W) float32: Rec. 601 luminance for 3+ bands, else the band mean."""
    b = bands.astype(np.float32, copy=False)
    if b.shape[0] >= 3:
        return 0.299 * b[0] + 0.587 * b[1] + 0.114 * b[2]
    return b.mean(axis=0)


class ArrayBasemap:
    """An in-memory (H, W) luminance image on a metric grid (optionally with a validity mask)."""

    def __init__(
        self, lum: np.ndarray, grid: MetricGrid, valid: np.ndarray | None = None, description: dict | None = None
    ) -> None:
        if lum.ndim != 2 or lum.shape != (grid.height_px, grid.width_px):
            raise SarlocError(f"basemap image is {lum.shape}, its grid says {(grid.height_px, grid.width_px)}")
        self.lum = lum.astype(np.float32, copy=False)
        self.valid = np.isfinite(self.lum) if valid is None else (valid & np.isfinite(self.lum))
        self.grid = grid
        self.description = description or {"kind": "array"}

    def read(self, col0: int, row0: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """See :class:`Basemap`."""
        sl = (slice(row0, row0 + height), slice(col0, col0 + width))
        return self.lum[sl], self.valid[sl]

    def close(self) -> None:
        """Nothing to release."""


def _import_rasterio():
    try:
        import rasterio
        import rasterio.vrt
        import rasterio.warp
    except ImportError:
        raise SarlocError("reading GeoTIFF basemaps needs rasterio: pip install 'sarloc[geo]'") from None
    return rasterio


def metric_crs_for(src_crs: Any, lon_deg: float, lat_deg: float) -> str:
    """The local metric CRS of a basemap: its own CRS when projected in metres, else the UTM zone of its centre."""
    import pyproj

    crs = pyproj.CRS.from_user_input(src_crs.to_wkt() if hasattr(src_crs, "to_wkt") else src_crs)
    if crs.is_projected and crs.axis_info and all(abs(a.unit_conversion_factor - 1.0) < 1e-12 for a in crs.axis_info):
        epsg = crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else crs.to_wkt()
    return f"EPSG:{utm_epsg_for(lon_deg, lat_deg)}"


class RasterBasemap:
    """A GeoTIFF (any CRS) warped to a square metric grid, read in windows through a ``WarpedVRT``.

    Args:
        path: the GeoTIFF.
        gsd_m: metres per pixel of the metric grid (None: the file's native ground resolution at its centre).
        metric_crs: target CRS (None: :func:`metric_crs_for`).
        resampling: rasterio resampling name ("bilinear", "nearest", "cubic", ...).
    """

    def __init__(
        self, path: str | Path, gsd_m: float | None = None, metric_crs: str | None = None, resampling: str = "bilinear"
    ) -> None:
        rasterio = _import_rasterio()

        self._cleanup: Path | None = None  # a temporary folder removed on close (a scene warped to a GeoTIFF)
        self.path = Path(path)
        if not self.path.is_file():
            raise SarlocError(f"basemap {self.path} not found")
        try:
            self._src = rasterio.open(self.path)
        except Exception as e:  # rasterio raises RasterioIOError and friends
            raise SarlocError(f"basemap {self.path} could not be opened ({brief(e)}); is it a GeoTIFF?") from None
        try:
            self._place(gsd_m, metric_crs, resampling)
        except SarlocError:
            self._src.close()
            raise
        except Exception as e:  # GDAL / PROJ errors: a point outside the projection's domain, a singular transform
            self._src.close()
            raise SarlocError(
                f"basemap {self.path}: cannot be placed on a metric grid ({brief(e)}); check its CRS and "
                "geotransform, or pass --metric-crs"
            ) from None

    def _place(self, gsd_m: float | None, metric_crs: str | None, resampling: str) -> None:
        """The metric grid and the warped virtual raster (``__init__``'s geometry)."""
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT
        from rasterio.warp import calculate_default_transform
        from rasterio.warp import transform as warp_transform

        src = self._src
        if np.dtype(src.dtypes[0]).kind == "c":
            raise SarlocError(
                f"basemap {self.path} has complex pixels ({src.dtypes[0]}); the basemap is an optical image, give "
                "it as real-valued bands"
            )
        if src.crs is None or src.transform.is_identity:
            raise SarlocError(
                f"basemap {self.path} has no CRS/geotransform; geo-reference it (gdal_translate -a_srs/-a_ullr) "
                "or pass a scene folder"
            )
        t = src.transform
        cx = t.c + t.a * src.width / 2.0 + t.b * src.height / 2.0
        cy = t.f + t.d * src.width / 2.0 + t.e * src.height / 2.0
        lon, lat = warp_transform(src.crs, "EPSG:4326", [cx], [cy])
        dst_crs = metric_crs or metric_crs_for(src.crs, float(lon[0]), float(lat[0]))
        # native resolution on the ground, and the bounds in the metric CRS
        tr, w, h = calculate_default_transform(src.crs, dst_crs, src.width, src.height, *src.bounds)
        native = math.sqrt(abs(tr.a * tr.e))
        gsd = float(gsd_m or native)
        if not gsd > 0:
            raise SarlocError(f"basemap {self.path}: ground resolution must be positive, got {gsd}")
        x0, y0 = tr.c, tr.f
        x1, y1 = x0 + tr.a * w, y0 + tr.e * h
        same_crs = src.crs.to_epsg() is not None and dst_crs == f"EPSG:{src.crs.to_epsg()}"
        if same_crs and src.transform.b == 0 and src.transform.d == 0:
            x0, y0 = src.transform.c, src.transform.f  # same north-up CRS: keep the source's pixel corner
        width, height = math.floor((x1 - x0) / gsd), math.floor((y0 - y1) / gsd)
        if width < 1 or height < 1:
            raise SarlocError(f"basemap {self.path} is smaller than one {gsd:.2f} m pixel; lower --tile-m")
        from rasterio.transform import from_origin

        self.grid = MetricGrid(str(dst_crs), float(x0), float(y0), gsd, width, height)
        nodata = src.nodata
        self._vrt = WarpedVRT(
            src,
            crs=dst_crs,
            transform=from_origin(x0, y0, gsd, gsd),
            width=width,
            height=height,
            resampling=getattr(Resampling, resampling),
            src_nodata=nodata,
            nodata=nodata,
            add_alpha=nodata is None and src.count not in (2, 4),
        )
        self._bands = list(range(1, min(src.count, 3) + 1)) if src.count != 2 else [1]
        self.description = {
            "kind": "geotiff",
            "path": str(self.path),
            "crs": src.crs.to_string(),
            "size_px": [src.width, src.height],
            "bands": src.count,
            "dtype": str(src.dtypes[0]),
            "nodata": nodata,
            "native_gsd_m": native,
            "resampling": resampling,
        }

    def read(self, col0: int, row0: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """See :class:`Basemap`."""
        from rasterio.windows import Window

        win = Window(col0, row0, width, height)
        try:
            data = self._vrt.read(self._bands, window=win)
            valid = self._vrt.dataset_mask(window=win) > 0
        except Exception as e:  # a truncated or corrupt file fails only when its pixels are read
            raise SarlocError(
                f"basemap {self.path}: reading pixels failed ({brief(e)}); the file is truncated or corrupt, "
                "re-export it"
            ) from None
        lum = luminance(data)
        return lum, valid & np.isfinite(lum)  # NaN / Inf pixels are no data too

    def close(self) -> None:
        """Close the virtual raster and the file."""
        self._vrt.close()
        self._src.close()
        cleanup = self._cleanup
        if cleanup is not None:
            import shutil

            shutil.rmtree(cleanup, ignore_errors=True)


def open_basemap(source: str | Path, gsd_m: float | None = None, metric_crs: str | None = None) -> Basemap:
    """A scene folder or a GeoTIFF as a :class:`Basemap` on a metric grid.

    Args:
        source: a scene folder (``scene.json``; its optical luminance) or a GeoTIFF file.
        gsd_m: metres per pixel of the grid (None: native). A scene folder with a projected CRS (or none) is
            used on its own pixel grid and must be asked for its own GSD (or None); a geographic one is warped.
        metric_crs: target metric CRS for GeoTIFFs (None: own CRS if projected, else the UTM zone of the centre).

    Raises:
        SarlocError: missing/unreadable source, no geo-reference, or a resampling a scene folder cannot give.
    """
    source = Path(source)
    if source.is_dir():
        from sarloc.core.scene import load_scene

        scene = load_scene(source)
        fr = scene.frame
        desc = {"kind": "scene", "path": str(source), "name": scene.name, "crs": fr.crs}
        for key in ("optical",):
            if isinstance(scene.meta.get(key), dict) and scene.meta[key].get("sha256"):
                desc[f"{key}_sha256"] = scene.meta[key]["sha256"]
        gt = fr.geotransform
        square = gt is None or (gt[2] == 0 and gt[4] == 0 and abs(abs(gt[1]) - abs(gt[5])) < 1e-9 * abs(gt[1]))
        if fr.crs is None or (not fr._is_geographic and square):
            native = fr.mean_gsd_m
            if gsd_m is not None and abs(gsd_m - native) > 1e-3 * native:
                raise SarlocError(
                    f"scene {source} has {native:g} m pixels; a scene folder is tiled at its own resolution: "
                    f"use --tile-m {native:g} x the encoder window (or convert the scene to a GeoTIFF)"
                )
            if fr.crs is None:
                grid = MetricGrid(None, 0.0, 0.0, native, scene.width_px, scene.height_px)
            else:
                x0, y0 = fr.pixel_to_metric(0.0, 0.0)
                grid = MetricGrid(fr.metric_crs, float(x0), float(y0), native, scene.width_px, scene.height_px)
            return ArrayBasemap(scene.optical_gray, grid, description=desc)
        return _scene_via_raster(scene, gsd_m, metric_crs, desc)
    if not source.exists():
        raise SarlocError(f"basemap {source} not found (expected a GeoTIFF or a scene folder)")
    return RasterBasemap(source, gsd_m=gsd_m, metric_crs=metric_crs)


def _scene_via_raster(scene: Any, gsd_m: float | None, metric_crs: str | None, desc: dict) -> Basemap:
    """A geographic (or rotated) scene: warp its luminance through an in-memory GeoTIFF."""
    import tempfile

    rasterio = _import_rasterio()
    from affine import Affine

    tmp = Path(tempfile.mkdtemp(prefix="sarloc_basemap_")) / "luminance.tif"
    gt = scene.frame.geotransform
    with rasterio.open(
        tmp,
        "w",
        driver="GTiff",
        width=scene.width_px,
        height=scene.height_px,
        count=1,
        dtype="float32",
        crs=scene.frame.crs,
        transform=Affine(gt[1], gt[2], gt[0], gt[4], gt[5], gt[3]),
        nodata=float("nan"),
    ) as dst:
        dst.write(scene.optical_gray.astype(np.float32), 1)
    try:
        bm = RasterBasemap(tmp, gsd_m=gsd_m, metric_crs=metric_crs)
    except BaseException:
        import shutil

        shutil.rmtree(tmp.parent, ignore_errors=True)
        raise
    bm._cleanup = tmp.parent
    bm.description = {**desc, "warped_from": bm.description["crs"], "native_gsd_m": bm.description["native_gsd_m"]}
    return bm
