"""Geo-referencing (torch-free): pixel <-> metric frame <-> lon/lat, and tile grids.

Every scene has a *metric frame*: metres, x east, y north, in which positions and errors are measured.

* Projected CRS (e.g. UTM): the metric frame is the CRS itself (easting, northing).
* Geographic CRS (EPSG:4326): pixels are not square on the ground; the metric frame is the UTM zone of the
  scene centre, reached through pyproj.
* No CRS: pixel (col, row) times ``gsd_m_estimate``, origin at the top-left corner, x east, y south
  (stored here as y north = -row * gsd so that every frame is right-handed, east/north).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sarloc.core.errors import SarlocError, SceneError


def _pyproj():
    try:
        import pyproj
    except ImportError:  # pragma: no cover - pyproj is a base dependency
        raise SceneError("pyproj is needed for geo-referenced scenes; pip install pyproj") from None
    return pyproj


def utm_epsg_for(lon_deg: float, lat_deg: float) -> int:
    """EPSG code of the UTM zone containing (lon, lat)."""
    zone = int((lon_deg + 180.0) // 6.0) % 60 + 1
    return (32600 if lat_deg >= 0 else 32700) + zone


def grid_convergence_deg(metric_crs: str, x_m: float, y_m: float) -> float:
    """Grid bearing of true north at ``(x_m, y_m)`` of a projected CRS, degrees (the meridian convergence).

    A true heading (from an autopilot or a compass) becomes a heading from grid north by *adding* this; a grid
    heading becomes a true one by subtracting it. Computed by moving 1 km true north on the WGS84 ellipsoid.
    """
    pyproj = _pyproj()
    to_ll = pyproj.Transformer.from_crs(metric_crs, "EPSG:4326", always_xy=True)
    to_m = pyproj.Transformer.from_crs("EPSG:4326", metric_crs, always_xy=True)
    lon, lat = to_ll.transform(x_m, y_m)
    lon2, lat2, _ = pyproj.Geod(ellps="WGS84").fwd(lon, lat, 0.0, 1000.0)
    x1, y1 = to_m.transform(lon2, lat2)
    return math.degrees(math.atan2(x1 - x_m, y1 - y_m))


@dataclass
class GeoFrame:
    """Maps pixel coordinates of an image to a metric frame and (when geo-referenced) to lon/lat.

    Pixel coordinates are continuous: pixel (i, j) spans [i, i+1) x [j, j+1); its centre is (i+0.5, j+0.5).

    Attributes:
        width_px, height_px: image size.
        crs: CRS string (e.g. "EPSG:32631") or None.
        geotransform: GDAL order [x0, dx, rx, y0, ry, dy] or None.
        gsd_m: (x, y) metres per pixel (estimated when no geo-reference).
    """

    width_px: int
    height_px: int
    crs: str | None = None
    geotransform: tuple[float, ...] | None = None
    gsd_m: tuple[float, float] = (1.0, 1.0)
    metric_crs: str | None = field(default=None, init=False)
    _is_geographic: bool = field(default=False, init=False, repr=False)
    _to_metric: object = field(default=None, init=False, repr=False)
    _to_lonlat: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.crs is None or self.geotransform is None:
            self.crs, self.geotransform = None, None
            return
        if len(self.geotransform) != 6 or not all(math.isfinite(float(v)) for v in self.geotransform):
            raise SceneError(f"geotransform must be 6 finite numbers, got {self.geotransform}")
        pyproj = _pyproj()
        try:
            crs = pyproj.CRS.from_user_input(self.crs)
        except pyproj.exceptions.CRSError as e:
            raise SceneError(f"unknown crs {self.crs!r} ({e}); use an EPSG code such as EPSG:32631") from None
        try:
            self._init_transforms(pyproj, crs)
        except pyproj.exceptions.ProjError as e:
            msg = " ".join(str(e).split())
            raise SceneError(f"crs {self.crs!r} cannot be transformed to lon/lat ({msg}); use an Earth CRS") from None

    def _init_transforms(self, pyproj, crs) -> None:
        self._is_geographic = crs.is_geographic
        if crs.is_geographic:
            lon, lat = self._apply_gt(self.width_px / 2.0, self.height_px / 2.0)
            metric = pyproj.CRS.from_epsg(utm_epsg_for(float(lon), float(lat)))
            self.metric_crs = metric.to_string()
            self._to_metric = pyproj.Transformer.from_crs(crs, metric, always_xy=True)
            self._to_lonlat = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
            # ground sample distance from the metric frame, at the centre
            cx, cy = self.width_px / 2.0, self.height_px / 2.0
            x0, y0 = self.pixel_to_metric(np.array([cx, cx + 1, cx]), np.array([cy, cy, cy + 1]))
            self.gsd_m = (
                float(math.hypot(x0[1] - x0[0], y0[1] - y0[0])),
                float(math.hypot(x0[2] - x0[0], y0[2] - y0[0])),
            )
        else:
            self.metric_crs = crs.to_string()
            unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
            gt = self.geotransform
            assert gt is not None  # a CRS comes with a geotransform (checked above)
            self.gsd_m = (float(math.hypot(gt[1], gt[4]) * unit), float(math.hypot(gt[2], gt[5]) * unit))
            self._to_lonlat = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
            self._unit = unit

    @property
    def georeferenced(self) -> bool:
        """True when the frame carries a CRS (lon/lat available)."""
        return self.crs is not None

    @property
    def mean_gsd_m(self) -> float:
        """Mean of the x and y ground sample distances, metres per pixel."""
        return 0.5 * (self.gsd_m[0] + self.gsd_m[1])

    def _apply_gt(self, col: np.ndarray | float, row: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        x0, dx, rx, y0, ry, dy = (float(v) for v in self.geotransform)  # type: ignore[union-attr]
        col = np.asarray(col, dtype=np.float64)
        row = np.asarray(row, dtype=np.float64)
        return x0 + col * dx + row * rx, y0 + col * ry + row * dy

    def pixel_to_metric(self, col: np.ndarray | float, row: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Continuous pixel coordinates -> metric frame (x east, y north), metres."""
        col = np.asarray(col, dtype=np.float64)
        row = np.asarray(row, dtype=np.float64)
        if self.crs is None:
            return col * self.gsd_m[0], -row * self.gsd_m[1]
        x, y = self._apply_gt(col, row)
        if self._is_geographic:
            x, y = self._to_metric.transform(x, y)  # type: ignore[attr-defined]
            return np.asarray(x), np.asarray(y)
        return x * self._unit, y * self._unit

    def pixel_to_lonlat(self, col: np.ndarray | float, row: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Continuous pixel coordinates -> (lon_deg, lat_deg). Raises SceneError without a CRS."""
        if self.crs is None:
            raise SceneError("scene has no geo-reference (crs/geotransform null): lon/lat unavailable")
        x, y = self._apply_gt(col, row)
        lon, lat = self._to_lonlat.transform(x, y)  # type: ignore[attr-defined]
        return np.asarray(lon), np.asarray(lat)

    def metric_distance(self, col_a, row_a, col_b, row_b) -> np.ndarray:
        """Ground distance in metres between pixel positions a and b (arrays broadcast)."""
        xa, ya = self.pixel_to_metric(col_a, row_a)
        xb, yb = self.pixel_to_metric(col_b, row_b)
        return np.hypot(xa - xb, ya - yb)


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of square tiles over an image.

    Attributes:
        width_px, height_px: image size.
        tile_px: tile side in pixels.
        stride_px: step between tiles in pixels (``stride < tile`` gives overlapping tiles).
    """

    width_px: int
    height_px: int
    tile_px: int
    stride_px: int

    def __post_init__(self) -> None:
        if self.tile_px <= 0 or self.stride_px <= 0:
            raise SceneError(f"tile size and stride must be positive (tile {self.tile_px}, stride {self.stride_px})")
        if self.tile_px > min(self.width_px, self.height_px):
            raise SceneError(
                f"tile/window of {self.tile_px} px is larger than the scene ({self.width_px}x{self.height_px} px); "
                "use a smaller --window-px"
            )

    @property
    def n_cols(self) -> int:
        """Tiles across."""
        return (self.width_px - self.tile_px) // self.stride_px + 1

    @property
    def n_rows(self) -> int:
        """Tiles down."""
        return (self.height_px - self.tile_px) // self.stride_px + 1

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def origins(self) -> np.ndarray:
        """(N, 2) int top-left (x0, y0) of every tile, row-major."""
        ys, xs = np.meshgrid(
            np.arange(self.n_rows) * self.stride_px, np.arange(self.n_cols) * self.stride_px, indexing="ij"
        )
        return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)

    def centres(self) -> np.ndarray:
        """(N, 2) float continuous pixel centre (x, y) of every tile."""
        return self.origins().astype(np.float64) + self.tile_px / 2.0

    def containing(self, x: float, y: float) -> np.ndarray:
        """Indices of the tiles whose extent [x0, x0+tile) x [y0, y0+tile) contains the point (x, y)."""
        o = self.origins()
        inside = (o[:, 0] <= x) & (x < o[:, 0] + self.tile_px) & (o[:, 1] <= y) & (y < o[:, 1] + self.tile_px)
        return np.flatnonzero(inside)

    def containing_mask(self, xy: np.ndarray) -> np.ndarray:
        """(Q, N) bool: tile n contains point q. ``xy`` is (Q, 2) continuous pixel coordinates."""
        o = self.origins()[None].astype(np.float64)
        p = np.asarray(xy, dtype=np.float64)[:, None]
        return (
            (o[..., 0] <= p[..., 0])
            & (p[..., 0] < o[..., 0] + self.tile_px)
            & (o[..., 1] <= p[..., 1])
            & (p[..., 1] < o[..., 1] + self.tile_px)
        )


def px_from_m(length_m: float, gsd_m: float) -> int:
    """Convert a length in metres to whole pixels at ``gsd_m`` (at least 1)."""
    if gsd_m <= 0:
        raise SceneError(f"gsd must be positive, got {gsd_m}")
    return max(1, round(length_m / gsd_m))


# =============================================================================================================
# pixel <-> metric


def pixel_metric_affine(frame: GeoFrame) -> tuple[np.ndarray, bool]:
    """Affine ``metric = A @ (col, row, 1)`` of a frame and whether it is exact.

    Exact for frames without CRS and for projected CRSs (any affine geotransform); for geographic CRSs it is a
    least-squares fit over the image (use :func:`metric_to_pixel` for exact inverse mapping).

    Returns:
        ``(A, exact)`` with ``A`` (2, 3) float64.
    """
    c = np.array([0.0, 1.0, 0.0])
    r = np.array([0.0, 0.0, 1.0])
    x, y = frame.pixel_to_metric(c, r)
    a = np.array([[x[1] - x[0], x[2] - x[0], x[0]], [y[1] - y[0], y[2] - y[0], y[0]]], np.float64)
    gc, gr = np.meshgrid(np.linspace(0, frame.width_px, 9), np.linspace(0, frame.height_px, 9))
    gx, gy = frame.pixel_to_metric(gc.ravel(), gr.ravel())
    design = np.stack([gc.ravel(), gr.ravel(), np.ones(gc.size)], axis=1)
    resid = np.hypot(design @ a[0] - gx, design @ a[1] - gy)
    tol = 1e-6 * max(frame.mean_gsd_m, 1e-9)
    if float(resid.max()) <= tol:
        return a, True
    sol, *_ = np.linalg.lstsq(design, np.stack([gx, gy], axis=1), rcond=None)
    return sol.T.copy(), False


def metric_to_pixel(
    frame: GeoFrame, x_m: np.ndarray, y_m: np.ndarray, affine: tuple[np.ndarray, bool] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Metric (x east, y north) -> continuous pixel (col, row); the inverse of ``frame.pixel_to_metric``.

    Args:
        affine: the result of :func:`pixel_metric_affine` (computed when None).

    Raises:
        SarlocError: the frame's pixel -> metric mapping is degenerate or the iteration does not converge.
    """
    a, exact = affine if affine is not None else pixel_metric_affine(frame)
    m = a[:, :2]
    if abs(np.linalg.det(m)) < 1e-12 * max(float(np.abs(m).max()) ** 2, 1e-300):
        raise SarlocError(
            "scene frame: degenerate geotransform (pixel axes are parallel); fix the scene's geotransform"
        )
    minv = np.linalg.inv(m)
    x = np.asarray(x_m, np.float64)
    y = np.asarray(y_m, np.float64)
    d = np.stack([x - a[0, 2], y - a[1, 2]], axis=-1)
    cr = d @ minv.T
    if exact:
        return cr[..., 0], cr[..., 1]
    for _ in range(8):  # Newton steps with the (constant) fitted Jacobian: converges fast for smooth projections
        fx, fy = frame.pixel_to_metric(cr[..., 0], cr[..., 1])
        step = np.stack([x - fx, y - fy], axis=-1) @ minv.T
        cr = cr + step
        if float(np.abs(step).max(initial=0.0)) < 1e-7:
            return cr[..., 0], cr[..., 1]
    raise SarlocError("scene frame: metric -> pixel mapping did not converge; re-project the scene to a metric CRS")


def _bilinear(img: np.ndarray, ax: np.ndarray, ay: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``img`` (H, W) at array coordinates (pixel centres at integers), float64 weights."""
    h, w = img.shape
    x0 = np.clip(np.floor(ax), 0, w - 2).astype(np.int64)
    y0 = np.clip(np.floor(ay), 0, h - 2).astype(np.int64)
    fx = ax - x0
    fy = ay - y0
    im = img.astype(np.float64, copy=False)
    v = (
        im[y0, x0] * (1 - fx) * (1 - fy)
        + im[y0, x0 + 1] * fx * (1 - fy)
        + im[y0 + 1, x0] * (1 - fx) * fy
        + im[y0 + 1, x0 + 1] * fx * fy
    )
    return v


def sample_metric(
    image: np.ndarray, frame: GeoFrame, x_m: np.ndarray, y_m: np.ndarray, affine: tuple[np.ndarray, bool] | None = None
) -> np.ndarray:
    """Bilinear samples of a scene image (H, W) at metric points (float64, same shape as ``x_m``)."""
    col, row = metric_to_pixel(frame, x_m, y_m, affine)
    return _bilinear(np.asarray(image), col - 0.5, row - 0.5)
