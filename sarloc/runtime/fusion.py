"""Along-track fusion (torch-free): window fixes -> one strip fix (consensus) -> track filter -> navigation state.

1. **Strip consensus** (:func:`strip_consensus`). The windows of one strip are rigidly related: within a strip the
   vehicle flies straight at the speed implied by the strip's geometry (``gsd_m * row_rate_hz`` along the heading),
   so every window fix implies the vehicle position at the strip's reference time ``t_ref``. A RANSAC-style vote
   over those implied positions (every candidate fix is a hypothesis; inliers lie within ``gate_m``) keeps the
   largest consistent set; one bad window cannot move the result. The fix is the confidence-weighted mean of the
   inliers; it is trusted when enough windows agree (or one very confident window stands alone and nothing
   contradicts it).
2. **Track filter** (:class:`TrackFilter`): a constant-velocity Kalman filter on (east, north, v_east, v_north)
   with white-acceleration process noise; strip fixes are gated by their Mahalanobis distance (chi-square, 2 dof);
   repeated consistent rejections re-initialise the track (recovery from a wrong first fix).
3. **Navigation state** (:meth:`TrackFilter.nav_state`): the state propagated to "now" with its covariance;
   stale (no accepted fix for ``stale_after_s``) or uninitialised -> ``valid=False``, so the MAVLink sender
   reports no fix instead of an old position.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from sarloc.runtime.types import Fix, NavState, WindowFix


@dataclass(frozen=True)
class FusionConfig:
    """Fusion settings.

    Attributes:
        gate_m: window fixes within this distance of a hypothesis are its inliers.
        min_inliers: windows that must agree for a trusted strip fix.
        single_confidence: a lone window (no other trusted window in the strip) is trusted above this confidence.
        min_window_confidence: windows below this confidence take no part in the vote.
        accel_sigma_mps2: process noise of the constant-velocity model.
        gate_chi2: Mahalanobis gate on strip fixes (9.21 = 99% for 2 dof).
        reinit_after: consecutive gated-out but mutually consistent fixes that re-initialise the track.
        stale_after_s: no accepted fix for this long -> the navigation state is invalid.
        max_sigma_m: a state with a larger one-sigma horizontal error is reported invalid.
        speed_sigma_mps: one-sigma of the velocity taken from the strip geometry.
    """

    gate_m: float = 30.0
    min_inliers: int = 2
    single_confidence: float = 0.9
    min_window_confidence: float = 0.2
    accel_sigma_mps2: float = 1.0
    gate_chi2: float = 9.21
    reinit_after: int = 3
    stale_after_s: float = 10.0
    max_sigma_m: float = 100.0
    speed_sigma_mps: float = 2.0


def _independent(windows: list[WindowFix], members: np.ndarray, conf: np.ndarray, min_sep_m: float) -> int:
    """How many of the agreeing windows do not overlap one another on the ground (greedy, most confident first).

    Overlapping windows share pixels, so their matches are not independent evidence: two half-overlapping windows
    of a strip that matches nothing can agree on the same wrong place (seen on generated scenes).
    """
    if min_sep_m <= 0:
        return len(members)
    kept: list[np.ndarray] = []
    for i in members[np.argsort(-conf[members], kind="stable")]:
        c = np.asarray(windows[i].xy_m if windows[i].xy_m is not None else windows[i].vehicle_xy_m, float)
        if all(np.max(np.abs(c - k)) >= min_sep_m for k in kept):
            kept.append(c)
    return len(kept)


def strip_consensus(
    windows: list[WindowFix],
    t_ref_s: float,
    velocity_mps: np.ndarray | None,
    cfg: FusionConfig = FusionConfig(),
    strip_id: str = "",
    min_separation_m: float = 0.0,
) -> Fix:
    """One vehicle fix at ``t_ref_s`` from the window fixes of a strip.

    Args:
        windows: window fixes (``vehicle_xy_m`` = vehicle position at the window's time ``t_s``).
        t_ref_s: the strip's reference time (e.g. its middle row).
        velocity_mps: (v_east, v_north) within the strip (from heading and speed), or None (no motion model).
        min_separation_m: windows whose centres are closer than this (Chebyshev, on the map; use the window's
            ground size) overlap; only non-overlapping agreeing windows count towards ``min_inliers``.
    """
    v = np.zeros(2) if velocity_mps is None else np.asarray(velocity_mps, float)
    use = [w for w in windows if w.vehicle_xy_m is not None and w.confidence >= cfg.min_window_confidence]
    nan = (float("nan"), float("nan"))
    if not use:
        return Fix(
            t_ref_s,
            nan,
            None,
            tuple(v),
            ((1e9, 0.0), (0.0, 1e9)),
            float("inf"),
            cfg.speed_sigma_mps,
            0.0,
            False,
            len(windows),
            0,
            strip_id,
            "no window above the confidence floor",
        )
    p = np.array([np.asarray(w.vehicle_xy_m) - v * (w.t_s - t_ref_s) for w in use])  # implied position at t_ref
    conf = np.array([w.confidence for w in use])
    sig = np.array([max(w.sigma_m, 1e-3) for w in use])
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    inl = d <= cfg.gate_m
    support = (inl * conf[None]).sum(1)  # confidence-weighted votes of each hypothesis
    best = int(np.argmax(support))
    members = np.flatnonzero(inl[best])
    wts = conf[members] / sig[members] ** 2
    xy = (p[members] * wts[:, None]).sum(0) / wts.sum()
    # covariance: the inliers' spread or their stated sigma, whichever is larger (errors of windows of one strip
    # are correlated, so n is not allowed to shrink it below one window's sigma / sqrt(2))
    spread = p[members] - xy
    var = max(
        float(np.mean((spread**2).sum(1)) / 2.0) if len(members) > 1 else 0.0, float(np.min(sig[members]) ** 2 / 2.0)
    )
    trusted_windows = [i for i, w in enumerate(use) if w.trusted]
    n_trusted_in = int(sum(1 for i in members if use[i].trusted))
    n_trusted_out = len(trusted_windows) - n_trusted_in
    n_indep = _independent(use, members, conf, min_separation_m)
    if n_indep >= cfg.min_inliers and n_trusted_in >= 1 and n_trusted_in > n_trusted_out:
        trusted, reason = True, f"{len(members)} windows agree ({n_indep} not overlapping)"
    elif n_indep == 1 and conf[members].max() >= cfg.single_confidence and n_trusted_out == 0:
        trusted, reason = True, "one very confident window, none against"
    else:
        trusted, reason = (
            False,
            f"{len(members)} agreeing of {len(use)} ({n_indep} not overlapping, {n_trusted_in} trusted, "
            f"{n_trusted_out} against)",
        )
    confidence = float(1.0 - np.prod(1.0 - np.clip(conf[members], 0, 0.999)) ** (1.0 / max(1, len(members)) ** 0.5))
    return Fix(
        t_ref_s,
        (float(xy[0]), float(xy[1])),
        None,
        (float(v[0]), float(v[1])),
        ((var, 0.0), (0.0, var)),
        math.sqrt(var),
        cfg.speed_sigma_mps,
        confidence,
        trusted,
        len(windows),
        len(members),
        strip_id,
        reason,
    )


class TrackFilter:
    """Constant-velocity Kalman filter with gating and re-initialisation (see the module docstring)."""

    def __init__(self, cfg: FusionConfig = FusionConfig()) -> None:
        self.cfg = cfg
        self.x: np.ndarray | None = None  # (4,) east, north, v_east, v_north
        self.P: np.ndarray | None = None
        self.t_s: float | None = None
        self.last_update_s: float | None = None
        self._rejected: list[Fix] = []
        self.stats = {"accepted": 0, "gated": 0, "reinit": 0, "untrusted": 0}

    def _predict_to(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        assert self.x is not None and self.P is not None and self.t_s is not None
        dt = t_s - self.t_s
        f = np.eye(4)
        f[0, 2] = f[1, 3] = dt
        q = self.cfg.accel_sigma_mps2**2
        g = np.array([[dt**2 / 2, 0], [0, dt**2 / 2], [dt, 0], [0, dt]])
        return f @ self.x, f @ self.P @ f.T + q * (g @ g.T)

    def _init(self, fix: Fix) -> None:
        sv = self.cfg.speed_sigma_mps
        self.x = np.array([*fix.xy_m, *fix.vel_mps], float)
        self.P = np.diag([fix.cov_xy_m2[0][0], fix.cov_xy_m2[1][1], sv**2, sv**2]).astype(float)
        self.t_s = self.last_update_s = fix.t_s
        self._rejected.clear()

    def update(self, fix: Fix) -> tuple[bool, str]:
        """Feed a strip fix. Returns (accepted, reason)."""
        if not fix.trusted or not np.all(np.isfinite(fix.xy_m)):
            self.stats["untrusted"] += 1
            return False, "untrusted strip fix"
        if self.x is None:
            self._init(fix)
            self.stats["accepted"] += 1
            return True, "track initialised"
        x, p = self._predict_to(fix.t_s)
        h = np.zeros((4, 4))
        h[:, :] = np.eye(4)
        r = np.diag(
            [fix.cov_xy_m2[0][0], fix.cov_xy_m2[1][1], self.cfg.speed_sigma_mps**2, self.cfg.speed_sigma_mps**2]
        )
        y = np.array([*fix.xy_m, *fix.vel_mps]) - x
        s = p + r
        d2 = float(y[:2] @ np.linalg.solve(s[:2, :2], y[:2]))
        if d2 > self.cfg.gate_chi2:
            self.stats["gated"] += 1
            self._rejected.append(fix)
            rej = self._rejected[-self.cfg.reinit_after :]
            if len(rej) >= self.cfg.reinit_after and self._consistent(rej):
                self.stats["reinit"] += 1
                self._init(rej[-1])
                return True, f"track re-initialised after {len(rej)} consistent rejected fixes"
            return False, f"gated out (Mahalanobis^2 {d2:.1f} > {self.cfg.gate_chi2})"
        k = p @ np.linalg.inv(s)
        self.x = x + k @ y
        self.P = (np.eye(4) - k) @ p
        self.t_s = self.last_update_s = fix.t_s
        self._rejected.clear()
        self.stats["accepted"] += 1
        return True, "accepted"

    def _consistent(self, fixes: list[Fix]) -> bool:
        """Do these fixes describe one straight track (each predicted from the previous within the gate)?"""
        for a, b in itertools.pairwise(fixes):
            pred = np.asarray(a.xy_m) + np.asarray(a.vel_mps) * (b.t_s - a.t_s)
            if np.linalg.norm(pred - np.asarray(b.xy_m)) > 3 * self.cfg.gate_m + self.cfg.speed_sigma_mps * abs(
                b.t_s - a.t_s
            ):
                return False
        return True

    def state(self, t_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(x, P) propagated to ``t_s``, or None before the first fix."""
        if self.x is None:
            return None
        return self._predict_to(t_s)

    def nav_state(self, t_s: float, to_lonlat=None) -> NavState:
        """The state at ``t_s`` as a :class:`NavState` (invalid when uninitialised, stale or too uncertain).

        Args:
            to_lonlat: callable (east, north) -> (lon_deg, lat_deg); None when the map has no geo-reference (then
                the state is always invalid for MAVLink: a GPS message needs lat/lon).
        """
        st = self.state(t_s)
        if st is None or self.last_update_s is None:
            return NavState(t_s, False)
        x, p = st
        sigma_h = math.sqrt(max(np.linalg.eigvalsh(p[:2, :2]).max(), 0.0))
        sigma_v = math.sqrt(max(np.linalg.eigvalsh(p[2:, 2:]).max(), 0.0))
        stale = t_s - self.last_update_s > self.cfg.stale_after_s
        if stale or sigma_h > self.cfg.max_sigma_m or to_lonlat is None:
            return NavState(t_s, False, horiz_accuracy_m=sigma_h, speed_accuracy_mps=sigma_v)
        lon, lat = to_lonlat(float(x[0]), float(x[1]))
        yaw = math.degrees(math.atan2(x[2], x[3])) % 360.0 if np.hypot(x[2], x[3]) > 1.0 else None
        return NavState(t_s, True, float(lat), float(lon), None, (float(x[3]), float(x[2]), 0.0), sigma_h, sigma_v, yaw)


__all__ = ["FusionConfig", "TrackFilter", "strip_consensus"]
