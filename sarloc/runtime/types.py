"""Data types shared by the onboard runtime (torch-free): strips, window fixes, fused fixes, navigation state.

Strip geometry (the one convention every runtime module uses)
-------------------------------------------------------------
A strip is a SAR image acquired along track. Its pixel ``(col, row)`` (continuous coordinates, pixel ``i``
spans ``[i, i + 1)``) has:

* ``row`` increasing **along track** (row 0 is acquired first, at ``t0_s``; row ``r`` at
  ``t0_s + r / row_rate_hz``),
* ``col`` increasing **to the right of the flight direction** (starboard),
* square ground pixels of ``gsd_m`` metres.

The map's metric frame is (easting ``x``, northing ``y``) in metres. With the heading ``psi`` (degrees clockwise
from grid north of that frame) the unit vectors are ``forward = (sin psi, cos psi)`` and
``right = (cos psi, -sin psi)`` in (east, north). The ground point of strip pixel ``(c, r)`` is::

    ground(c, r) = vehicle(t(r)) + ((c - c_mid) * gsd_m + across_offset_m) * right

where ``c_mid = width_px / 2`` is the strip's centre line and ``vehicle(t)`` the vehicle's ground position at the
time row ``r`` was acquired (so ``vehicle`` advances ``gsd_m`` metres along ``forward`` per row when the ground
speed is ``gsd_m * row_rate_hz``). ``across_offset_m`` is where the strip's centre line lies relative to the
vehicle track (positive = right; a side-looking SAR images a swath beside its track).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sarloc.core.config import finite_number
from sarloc.core.errors import SarlocError


@dataclass(frozen=True)
class StripMeta:
    """Metadata of one SAR strip (see the module docstring for the geometry).

    Attributes:
        strip_id: unique name of the strip within a flight.
        gsd_m: ground sample distance, metres per pixel (square pixels).
        heading_deg: flight direction at row 0 (the rows are laid out across it), degrees clockwise from grid north
            of the map frame; None = unknown (taken from the autopilot's ATTITUDE / VFR_HUD when connected).
        t0_s: time of row 0, seconds (UNIX time or any monotonic flight clock; one clock per flight).
        row_rate_hz: rows acquired per second.
        across_offset_m: offset of the strip's centre line from the vehicle track, metres, positive to the right.
        scale: how pixel values are encoded, as in scene.json (``display8``, ``linear_0_1``, ``db``, ...).
        prior_xy_m: optional INS prior of the vehicle position at row 0, map metric frame (easting, northing).
        prior_lonlat_deg: optional INS prior as (lon, lat) degrees (converted with the pack's CRS).
        prior_sigma_m: one-sigma uncertainty of the prior, metres.
    """

    strip_id: str
    gsd_m: float
    heading_deg: float | None
    t0_s: float
    row_rate_hz: float
    across_offset_m: float = 0.0
    scale: str = "linear_0_1"
    prior_xy_m: tuple[float, float] | None = None
    prior_lonlat_deg: tuple[float, float] | None = None
    prior_sigma_m: float | None = None

    def __post_init__(self) -> None:
        def positive(v: Any) -> bool:
            f = finite_number(v)
            return f is not None and f > 0

        bad = []
        if not positive(self.gsd_m):
            bad.append(f"gsd_m={self.gsd_m!r:.40} (must be > 0)")
        if not positive(self.row_rate_hz):
            bad.append(f"row_rate_hz={self.row_rate_hz!r:.40} (must be > 0)")
        if finite_number(self.t0_s) is None:
            bad.append(f"t0_s={self.t0_s!r:.40} (must be finite)")
        if self.heading_deg is not None and finite_number(self.heading_deg) is None:
            bad.append(f"heading_deg={self.heading_deg!r:.40} (must be finite or null)")
        if finite_number(self.across_offset_m) is None:
            bad.append(f"across_offset_m={self.across_offset_m!r:.40}")
        if self.prior_sigma_m is not None and not positive(self.prior_sigma_m):
            bad.append(f"prior_sigma_m={self.prior_sigma_m!r:.40} (must be > 0)")
        if bad:
            raise SarlocError(f"strip {self.strip_id!r}: bad metadata: {', '.join(bad)}")

    def row_time_s(self, row: float | np.ndarray) -> float | np.ndarray:
        """Acquisition time of (continuous) row ``row``."""
        return self.t0_s + np.asarray(row) / self.row_rate_hz

    @property
    def speed_mps(self) -> float:
        """Ground speed implied by square pixels: ``gsd_m * row_rate_hz``."""
        return self.gsd_m * self.row_rate_hz

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heading_vectors(heading_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """``(forward, right)`` unit vectors in (east, north) for a heading in degrees clockwise from north."""
    p = math.radians(heading_deg)
    return np.array([math.sin(p), math.cos(p)]), np.array([math.cos(p), -math.sin(p)])


@dataclass
class Strip:
    """A strip (or a block of rows of one, when streamed): metadata plus ``(H, W)`` float32 pixels.

    ``row0`` is the index of this block's first row within the whole strip (0 for a whole strip).
    """

    meta: StripMeta
    pixels: np.ndarray
    row0: int = 0
    final: bool = True  # the last block of its strip

    def __post_init__(self) -> None:
        a = self.pixels
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.size == 0:
            shape = getattr(a, "shape", None)
            raise SarlocError(f"strip {self.meta.strip_id!r}: pixels must be a non-empty (H, W) array, got {shape}")


@dataclass
class WindowFix:
    """Result of one SAR window.

    Attributes:
        strip_id, index: which window of which strip.
        centre_px: (col, row) of the window centre in strip pixels.
        t_s: acquisition time of the window's centre row.
        xy_m: (easting, northing) of the window centre on the map (None when abstained before search).
        vehicle_xy_m: the vehicle position at ``t_s`` implied by ``xy_m`` and the strip geometry.
        score: final match score of the chosen candidate; confidence: calibrated probability it is right.
        sigma_m: one-sigma position uncertainty of this window fix.
        trusted: confidence above the abstain threshold.
        stage_ms: per-stage latency of this window (window, preprocess, encode, search, refine).
    """

    strip_id: str
    index: int
    centre_px: tuple[float, float]
    t_s: float
    xy_m: tuple[float, float] | None
    vehicle_xy_m: tuple[float, float] | None
    score: float
    confidence: float
    sigma_m: float
    trusted: bool
    stage_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Fix:
    """A fused position of the vehicle (one per strip, after consensus and the track filter).

    Attributes:
        t_s: time of the estimate.
        xy_m: (easting, northing), map metric frame. lonlat_deg: (lon, lat) when the map is geo-referenced.
        vel_mps: (v_east, v_north).
        cov_xy_m2: 2x2 position covariance; sigma_h_m: sqrt of its largest eigenvalue.
        sigma_v_mps: one-sigma speed uncertainty.
        confidence: probability the fix is right; trusted: above threshold and gated by the filter.
        n_windows, n_inliers: windows of the strip and how many agreed.
    """

    t_s: float
    xy_m: tuple[float, float]
    lonlat_deg: tuple[float, float] | None
    vel_mps: tuple[float, float]
    cov_xy_m2: tuple[tuple[float, float], tuple[float, float]]
    sigma_h_m: float
    sigma_v_mps: float
    confidence: float
    trusted: bool
    n_windows: int
    n_inliers: int
    strip_id: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NavState:
    """What the MAVLink sender reports at time ``t_s`` (the filter's state propagated to now).

    Attributes:
        valid: False = send no-fix (stale, untrusted or not initialised); the position fields are then ignored.
        lat_deg, lon_deg: WGS84 position.
        alt_m: altitude AMSL, or None when unknown (then the alt field is flagged ignored).
        vel_ned_mps: (north, east, down) velocity, or None when unknown.
        horiz_accuracy_m, speed_accuracy_mps: one-sigma accuracies (honest: from the filter covariance).
        yaw_deg: an independent heading (degrees from north), or None; never echo the autopilot's own heading.
        satellites: reported satellites-visible (a GNSS-free fix has none; ArduPilot wants a plausible count).
        vert_accuracy_m: one-sigma accuracy of ``alt_m``, or None when unknown (sent only with ``alt_m``).
    """

    t_s: float
    valid: bool
    lat_deg: float = 0.0
    lon_deg: float = 0.0
    alt_m: float | None = None
    vel_ned_mps: tuple[float, float, float] | None = None
    horiz_accuracy_m: float = 9999.0
    speed_accuracy_mps: float = 99.0
    yaw_deg: float | None = None
    satellites: int = 10
    vert_accuracy_m: float | None = None


__all__ = ["Fix", "NavState", "Strip", "StripMeta", "WindowFix", "heading_vectors"]
