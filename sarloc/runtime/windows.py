"""North-up map windows cut from SAR strips (torch-free), whole or streamed by blocks of rows.

Geometry (strip convention of :mod:`sarloc.runtime.types`; ``psi`` = heading, ``g`` = strip ``gsd_m``,
``G`` = ``map_gsd_m``, ``s = G / g`` strip pixels per window pixel, ``P`` = ``window_px``, ``h = P / 2``):

* A window is a ``P x P`` image at ``G`` metres per pixel with **map pixel axes** (columns east, rows south): what
  a north-up optical basemap shows around the window's centre ground point ``ground(cc, rc)``.
* Window pixel ``(u, v)`` (continuous) samples strip pixel::

      c = cc + s * ((u - h) * cos psi + (v - h) * sin psi)
      r = rc + s * ((u - h) * sin psi - (v - h) * cos psi)

  (one ``cv2.warpAffine`` per window, bilinear; when ``s > 1`` the strip crop is first blurred with a Gaussian
  of sigma ``(s - 1) / 2`` strip pixels against aliasing).
* The rotated square covers ``2 e`` strip pixels both across and along track, ``e = h * s * (|cos psi| + |sin
  psi|)``: a window needs a strip at least ``2 e`` pixels wide (``P * G * sqrt(2) / g`` at 45 degrees). Windows
  whose square is not fully inside the strip are never produced.
* Centres: across, ``n = floor((W - 2 e) / stride) + 1`` columns spaced ``stride`` around the centre line
  ``W / 2``; along, rows ``rc_k = e + k * stride`` while ``rc_k + e <= H``. ``stride = stride_px * G / g`` strip
  pixels, i.e. **stride_px is in map pixels on the ground**. Window ``index = k * n + j`` (row-major).
* Vehicle: ``vehicle(t(rc)) = ground(cc, rc) - across_m * right``, ``across_m = (cc - W / 2) * g +
  across_offset_m`` (:func:`vehicle_from_window`, inverse :func:`window_ground_xy`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from sarloc.core.errors import SarlocError
from sarloc.runtime.types import Strip, StripMeta, heading_vectors

logger = logging.getLogger(__name__)

__all__ = [
    "WindowBatch",
    "WindowStream",
    "extract_windows",
    "vehicle_from_window",
    "window_grid",
    "window_ground_xy",
]


@dataclass
class WindowBatch:
    """Windows of one strip (possibly none).

    Attributes:
        windows: (N, P, P) float32 north-up windows at ``map_gsd_m`` (columns east, rows south).
        centres_px: (N, 2) float64 (col, row) of each window centre in whole-strip pixels (row includes row0).
        t_s: (N,) acquisition time of each centre row.
        across_m: (N,) across-track offset of each centre from the vehicle track, metres (positive right).
        along_row: (N,) the strip row whose time gives the vehicle position (the centre row).
        index: (N,) int64 index of each window in its strip's window grid (row-major), stable under streaming.
        strip_id: the strip; heading_deg: heading used; width_px: strip width; map_gsd_m: window metres/pixel.
        meta: the strip's metadata.
    """

    windows: np.ndarray
    centres_px: np.ndarray
    t_s: np.ndarray
    across_m: np.ndarray
    along_row: np.ndarray
    index: np.ndarray
    strip_id: str
    heading_deg: float
    width_px: int
    map_gsd_m: float
    meta: StripMeta | None = None

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    @classmethod
    def empty(
        cls, window_px: int, strip_id: str = "", heading_deg: float = 0.0, width_px: int = 0, map_gsd_m: float = 1.0
    ) -> WindowBatch:
        """A batch of zero windows."""
        z = np.zeros(0)
        return cls(
            windows=np.zeros((0, window_px, window_px), np.float32),
            centres_px=np.zeros((0, 2)),
            t_s=z,
            across_m=z.copy(),
            along_row=z.copy(),
            index=np.zeros(0, np.int64),
            strip_id=strip_id,
            heading_deg=float(heading_deg),
            width_px=int(width_px),
            map_gsd_m=float(map_gsd_m),
        )

    @classmethod
    def concat(cls, batches: list[WindowBatch], window_px: int) -> WindowBatch:
        """Concatenate batches (of one strip; the first batch's strip fields are kept)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty(window_px)
        if len(batches) == 1:
            return batches[0]
        b0 = batches[0]
        return cls(
            windows=np.concatenate([b.windows for b in batches]),
            centres_px=np.concatenate([b.centres_px for b in batches]),
            t_s=np.concatenate([b.t_s for b in batches]),
            across_m=np.concatenate([b.across_m for b in batches]),
            along_row=np.concatenate([b.along_row for b in batches]),
            index=np.concatenate([b.index for b in batches]),
            strip_id=b0.strip_id,
            heading_deg=b0.heading_deg,
            width_px=b0.width_px,
            map_gsd_m=b0.map_gsd_m,
            meta=b0.meta,
        )

    def vehicle_xy_m(self, xy_m: np.ndarray) -> np.ndarray:
        """(N, 2) vehicle positions at ``t_s`` implied by window-centre map positions ``xy_m`` (N, 2)."""
        _, right = heading_vectors(self.heading_deg)
        return np.asarray(xy_m, np.float64) - self.across_m[:, None] * right


def _heading(meta: StripMeta, heading_deg: float | None) -> float:
    h = heading_deg if heading_deg is not None else meta.heading_deg
    if h is None:
        raise SarlocError(
            f"strip {meta.strip_id!r}: heading is unknown; put heading_deg in the strip metadata or connect MAVLink "
            "(ATTITUDE/VFR_HUD) so the heading can be supplied"
        )
    h = float(h)
    if not math.isfinite(h):
        raise SarlocError(f"strip {meta.strip_id!r}: heading_deg={h} is not finite")
    return h


def _across_m(centre_px: np.ndarray, meta: StripMeta, width_px: int) -> np.ndarray:
    c = np.asarray(centre_px, np.float64)
    return (c[..., 0] - width_px / 2.0) * meta.gsd_m + meta.across_offset_m


def vehicle_from_window(
    xy_m: np.ndarray, centre_px: np.ndarray, meta: StripMeta, heading_deg: float | None = None, *, width_px: int
) -> np.ndarray:
    """Vehicle (easting, northing) at ``t(row)`` from the map position of a window centre.

    Args:
        xy_m: (2,) or (N, 2) map position of the window centre(s), metres.
        centre_px: (2,) or (N, 2) (col, row) of the centre(s) in whole-strip pixels.
        meta: strip metadata (``gsd_m``, ``across_offset_m``, ``heading_deg``).
        heading_deg: overrides ``meta.heading_deg``.
        width_px: strip width, pixels.

    Returns:
        Same shape as ``xy_m``: ``xy_m - across_m * right``.
    """
    _, right = heading_vectors(_heading(meta, heading_deg))
    return np.asarray(xy_m, np.float64) - _across_m(centre_px, meta, width_px)[..., None] * right


def window_ground_xy(
    vehicle_xy_m: np.ndarray,
    centre_px: np.ndarray,
    meta: StripMeta,
    heading_deg: float | None = None,
    *,
    width_px: int,
) -> np.ndarray:
    """Inverse of :func:`vehicle_from_window`: window-centre ground position from the vehicle at ``t(row)``."""
    _, right = heading_vectors(_heading(meta, heading_deg))
    return np.asarray(vehicle_xy_m, np.float64) + _across_m(centre_px, meta, width_px)[..., None] * right


@dataclass(frozen=True)
class _Grid:
    """Window layout of one strip, in strip pixels."""

    scale: float  # strip pixels per window pixel
    half_ext: float  # e: half extent of the rotated square across and along
    stride: float
    cols: np.ndarray  # centre columns
    sigma: float  # antialias blur, strip pixels
    margin: int  # extra rows/cols read around the square

    def row(self, k: int) -> float:
        return self.half_ext + k * self.stride

    def need(self, k: int, height: int | None) -> tuple[int, int]:
        """Rows [lo, hi) window row ``k`` reads (``height`` clips the end when known)."""
        r = self.row(k)
        lo = max(0, math.floor(r - self.half_ext) - self.margin - 1)
        hi = math.ceil(r + self.half_ext) + self.margin + 1
        return lo, hi if height is None else min(hi, height)


def window_grid(
    width_px: int, gsd_m: float, map_gsd_m: float, window_px: int, stride_px: float, heading_deg: float, antialias=True
) -> _Grid:
    """Window layout of a strip: centre columns, row spacing and extent (see the module docstring)."""
    s = float(map_gsd_m) / float(gsd_m)
    p = math.radians(heading_deg)
    e = 0.5 * window_px * s * (abs(math.cos(p)) + abs(math.sin(p)))
    stride = float(stride_px) * s
    cols: np.ndarray
    if width_px + 1e-9 < 2 * e:
        cols = np.zeros(0)
    else:
        n = math.floor((width_px - 2 * e) / stride + 1e-9) + 1
        cols = width_px / 2.0 + (np.arange(n) - (n - 1) / 2.0) * stride
    sigma = 0.5 * (s - 1.0) if antialias and s > 1.0 else 0.0
    return _Grid(s, e, stride, cols, sigma, math.ceil(3 * sigma) if sigma > 0 else 0)


def _check_params(map_gsd_m: float, window_px: int, stride_px: float) -> None:
    if not (isinstance(map_gsd_m, (int, float)) and math.isfinite(map_gsd_m) and map_gsd_m > 0):
        raise SarlocError(f"map_gsd_m={map_gsd_m!r} must be a positive number of metres per pixel")
    if isinstance(window_px, bool) or not isinstance(window_px, (int, np.integer)) or window_px < 2:
        raise SarlocError(f"window_px={window_px!r} must be an integer >= 2")
    if not (isinstance(stride_px, (int, float)) and math.isfinite(stride_px) and stride_px > 0):
        raise SarlocError(f"stride_px={stride_px!r} must be a positive number of map pixels")


@dataclass
class _StripState:
    meta: StripMeta
    width: int
    heading: float
    grid: _Grid
    buf: np.ndarray  # rows [r0, r0 + len(buf))
    r0: int
    next_k: int = 0
    height: int | None = None


@dataclass
class WindowStream:
    """Cuts windows from strips arriving as blocks of rows; keeps only the rows the next windows need.

    ``push`` a block, get the windows whose rows have all arrived (the same windows, bit for bit, as
    :func:`extract_windows` on the whole strip). A block with ``row0 == 0`` or another ``strip_id`` starts a new
    strip; a block that does not continue its strip (missing rows) restarts the buffer there and skips the
    windows that needed the missing rows (``stats['windows_skipped']``).

    Args:
        map_gsd_m: metres per window pixel (the basemap's).
        window_px: window side, pixels.
        stride_px: spacing of window centres, map pixels on the ground.
        heading_deg: overrides every strip's ``meta.heading_deg`` (e.g. from MAVLink); None = use the metadata.
        antialias: blur the strip before downsampling when it is finer than the map.
    """

    map_gsd_m: float
    window_px: int
    stride_px: float
    heading_deg: float | None = None
    antialias: bool = True
    stats: dict[str, int] = field(default_factory=lambda: {"windows": 0, "windows_skipped": 0, "row_gaps": 0})
    _st: _StripState | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_params(self.map_gsd_m, self.window_px, self.stride_px)

    @property
    def buffered_rows(self) -> int:
        """Rows held now."""
        return 0 if self._st is None else int(self._st.buf.shape[0])

    def reset(self) -> None:
        """Forget the current strip."""
        self._st = None

    def _start(self, block: Strip, heading_deg: float | None) -> _StripState:
        meta = block.meta
        head = _heading(meta, heading_deg if heading_deg is not None else self.heading_deg)
        w = int(block.pixels.shape[1])
        grid = window_grid(w, meta.gsd_m, self.map_gsd_m, self.window_px, self.stride_px, head, self.antialias)
        if len(grid.cols) == 0:
            logger.warning(
                "strip %r: %d px wide, too narrow for %d px windows at %.3g m at heading %.1f deg (needs %.0f px)",
                meta.strip_id,
                w,
                self.window_px,
                self.map_gsd_m,
                head,
                2 * grid.half_ext,
            )
        st = _StripState(meta, w, head, grid, np.zeros((0, w), np.float32), int(block.row0))
        k = max(0, math.floor((block.row0 - grid.half_ext) / grid.stride))
        while grid.need(k, None)[0] < block.row0:
            k += 1
        st.next_k = k
        return st

    def push(self, block: Strip, heading_deg: float | None = None) -> WindowBatch:
        """Add a block of rows; return the windows completed by it.

        Args:
            block: rows ``block.row0 ..`` of a strip (float pixels on the scene's SAR scale).
            heading_deg: heading for a strip that starts with this block (overrides the stream's and the meta's).

        Raises:
            SarlocError: the heading is unknown (neither given nor in the metadata).
        """
        st = self._st
        pix = np.asarray(block.pixels, np.float32)
        new = st is None or block.row0 == 0 or block.meta.strip_id != st.meta.strip_id
        if not new and st is not None and (pix.shape[1] != st.width or block.row0 != st.r0 + st.buf.shape[0]):
            self.stats["row_gaps"] += 1
            logger.warning(
                "strip %r: block at row %d (%d px wide) does not continue row %d (%d px); restarting the buffer",
                block.meta.strip_id,
                block.row0,
                pix.shape[1],
                st.r0 + st.buf.shape[0],
                st.width,
            )
            new = True
        if new:
            if st is not None and st.height is None:
                logger.debug("strip %r ended without its final block", st.meta.strip_id)
            prev = st
            st = self._st = self._start(block, heading_deg)
            if prev is not None and prev.meta.strip_id == block.meta.strip_id and block.row0 > 0:
                lost = max(0, st.next_k - prev.next_k)  # window rows that needed the missing rows
            else:
                lost = st.next_k  # joined the strip after its first rows
            self.stats["windows_skipped"] += lost * len(st.grid.cols)
            st.buf = pix
        else:
            assert st is not None  # not new: the block continues the current strip
            st.buf = np.concatenate([st.buf, pix]) if st.buf.size else pix
        if block.final:
            st.height = int(block.row0 + pix.shape[0])
        out = self._emit(st)
        if block.final:
            self._st = None
        return out

    def _emit(self, st: _StripState) -> WindowBatch:
        g = st.grid
        buf_end = st.r0 + st.buf.shape[0]
        parts: list[tuple[int, float, np.ndarray]] = []
        while len(g.cols):
            rc = g.row(st.next_k)
            lo, hi = g.need(st.next_k, st.height)
            if st.height is not None and rc + g.half_ext > st.height + 1e-9:
                break  # the strip ends before this window row
            if lo < st.r0:
                self.stats["windows_skipped"] += len(g.cols)
                st.next_k += 1
                continue
            if hi > buf_end:
                break
            crop = st.buf[lo - st.r0 : hi - st.r0]
            parts.append((st.next_k, rc, self._cut(crop, lo, rc, g, st.heading)))
            st.next_k += 1
        if len(g.cols):  # drop rows no later window needs
            keep_from = min(g.need(st.next_k, None)[0], buf_end)
            if keep_from > st.r0:
                st.buf = st.buf[keep_from - st.r0 :]
                st.r0 = keep_from
        else:
            st.r0, st.buf = buf_end, st.buf[:0]
        if not parts:
            out = WindowBatch.empty(self.window_px, st.meta.strip_id, st.heading, st.width, self.map_gsd_m)
            out.meta = st.meta
            return out
        n = len(g.cols)
        ks = np.repeat([p[0] for p in parts], n)
        rows = np.repeat([p[1] for p in parts], n)
        cols = np.tile(g.cols, len(parts))
        centres = np.stack([cols, rows], axis=1)
        self.stats["windows"] += len(ks)
        return WindowBatch(
            windows=np.concatenate([p[2] for p in parts]),
            centres_px=centres,
            t_s=np.asarray(st.meta.row_time_s(rows), np.float64),
            across_m=_across_m(centres, st.meta, st.width),
            along_row=rows.astype(np.float64),
            index=(ks * n + np.tile(np.arange(n), len(parts))).astype(np.int64),
            strip_id=st.meta.strip_id,
            heading_deg=st.heading,
            width_px=st.width,
            map_gsd_m=float(self.map_gsd_m),
            meta=st.meta,
        )

    def _cut(self, rows_buf: np.ndarray, lo: int, rc: float, g: _Grid, heading: float) -> np.ndarray:
        """Windows of one window row from strip rows ``[lo, lo + len(rows_buf))``: (n, P, P) float32."""
        P = self.window_px
        p = math.radians(heading)
        cs, sn = g.scale * math.cos(p), g.scale * math.sin(p)
        h = P / 2.0
        w = rows_buf.shape[1]
        out = np.empty((len(g.cols), P, P), np.float32)
        for j, cc in enumerate(g.cols):
            c_lo = max(0, math.floor(cc - g.half_ext) - g.margin - 1)
            c_hi = min(w, math.ceil(cc + g.half_ext) + g.margin + 1)
            crop = rows_buf[:, c_lo:c_hi]
            if g.sigma > 0:
                crop = cv2.GaussianBlur(crop, (0, 0), g.sigma, borderType=cv2.BORDER_REFLECT)
            # window array (i, j) is continuous (i + .5, j + .5); strip continuous c is array c - .5
            m = np.array(
                [
                    [cs, sn, cc - 0.5 - c_lo + (cs + sn) * (0.5 - h)],
                    [sn, -cs, rc - 0.5 - lo + (sn - cs) * (0.5 - h)],
                ]
            )
            out[j] = cv2.warpAffine(
                np.ascontiguousarray(crop),
                m,
                (P, P),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )
        return out


def extract_windows(
    pixels: np.ndarray,
    meta: StripMeta,
    map_gsd_m: float,
    window_px: int,
    stride_px: float,
    heading_deg: float | None = None,
    row0: int = 0,
    antialias: bool = True,
) -> WindowBatch:
    """Cut north-up windows from a strip (or from rows ``row0..`` of one, treated as ending there).

    Args:
        pixels: (H, W) float strip pixels (the scene's SAR scale).
        meta: strip metadata.
        map_gsd_m: metres per window pixel (the basemap's).
        window_px: window side, pixels.
        stride_px: spacing of window centres, map pixels on the ground.
        heading_deg: overrides ``meta.heading_deg``.
        row0: index of ``pixels``' first row in the whole strip (centres and times are whole-strip).
        antialias: blur before downsampling when the strip is finer than the map.

    Returns:
        The windows (none when the strip is too narrow or short; logged).

    Raises:
        SarlocError: bad shapes or parameters, or no heading.
    """
    _check_params(map_gsd_m, window_px, stride_px)
    a = np.asarray(pixels)
    if a.ndim != 2 or a.size == 0:
        raise SarlocError(f"strip {meta.strip_id!r}: pixels must be a non-empty (H, W) array, got {a.shape}")
    stream = WindowStream(map_gsd_m, int(window_px), float(stride_px), heading_deg, antialias)
    return stream.push(Strip(meta, a.astype(np.float32, copy=False), int(row0), True))
