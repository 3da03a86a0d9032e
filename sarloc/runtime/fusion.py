"""Window consensus (torch-free): which window fixes agree on one vehicle track.

Every window fix implies the vehicle position at the window's acquisition time. Moved to a common reference time
(by the strip geometry's velocity within a strip, or by the navigation filter's motion across strips), fixes of the
same track coincide; wrong ones scatter. :func:`strip_consensus` is a RANSAC-style vote over those implied
positions (every candidate fix is a hypothesis; inliers lie within ``gate_m``) that keeps the largest consistent
set, so one bad window cannot move the result. The consensus is the confidence-weighted mean of the inliers; it is
trusted when enough non-overlapping windows agree (or one very confident window stands alone and nothing
contradicts it). :class:`SlidingWindows` keeps the recent windows, across strip boundaries, that the daemon votes
over as rows arrive; :mod:`sarloc.runtime.navfilter` turns the trusted ones into a position at the current time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sarloc.runtime.types import Fix, WindowFix


@dataclass(frozen=True)
class FusionConfig:
    """Consensus settings (TOML table ``[fusion]``).

    Attributes:
        gate_m: window fixes within this distance of a hypothesis are its inliers.
        min_inliers: non-overlapping windows that must agree for a trusted consensus.
        single_confidence: a lone window (no other trusted window in the vote) is trusted above this confidence.
        min_window_confidence: windows below this confidence take no part in the vote.
        horizon_s: the sliding vote covers the windows acquired within this many seconds of the newest one.
        max_windows: and at most this many of them (the newest).
        window_sigma_scale: a window fix enters the navigation filter with its one-sigma times this factor
            (overlapping windows share pixels, so their errors are correlated; the filter treats fixes as
            independent).
        corroborate_px: a trusted window enters the navigation filter only once another trusted window acquired
            within ``corroborate_s`` of it agrees with it to this many map pixels (after the filter's displacement
            between their acquisition times); until then it is held. ``0`` applies every trusted window at once.
        corroborate_s: the largest acquisition-time difference between two windows that corroborate each other.
    """

    gate_m: float = 30.0
    min_inliers: int = 2
    single_confidence: float = 0.9
    min_window_confidence: float = 0.2
    horizon_s: float = 120.0
    max_windows: int = 48
    window_sigma_scale: float = 2.0
    corroborate_px: float = 2.5
    corroborate_s: float = 20.0


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


def _implied_positions(
    use: list[WindowFix],
    t_ref_s: float,
    v: np.ndarray,
    displacement: Callable[[float, float], np.ndarray] | None,
) -> np.ndarray:
    """(N, 2) vehicle positions at ``t_ref_s`` implied by each window fix (moved by ``displacement`` or ``v``)."""
    if displacement is not None:
        return np.array([np.asarray(w.vehicle_xy_m) + displacement(w.t_s, t_ref_s) for w in use])
    return np.array([np.asarray(w.vehicle_xy_m) - v * (w.t_s - t_ref_s) for w in use])  # implied position at t_ref


def _verdict(
    use: list[WindowFix], members: np.ndarray, conf: np.ndarray, cfg: FusionConfig, min_separation_m: float
) -> tuple[bool, str]:
    """Whether the consensus of ``members`` is trusted, and why: enough non-overlapping windows agree with more
    trusted windows for than against it, or one very confident window stands alone and nothing contradicts it."""
    trusted_windows = [i for i, w in enumerate(use) if w.trusted]
    n_trusted_in = int(sum(1 for i in members if use[i].trusted))
    n_trusted_out = len(trusted_windows) - n_trusted_in
    n_indep = _independent(use, members, conf, min_separation_m)
    if n_indep >= cfg.min_inliers and n_trusted_in >= 1 and n_trusted_in > n_trusted_out:
        return True, f"{len(members)} windows agree ({n_indep} not overlapping)"
    if n_indep == 1 and conf[members].max() >= cfg.single_confidence and n_trusted_out == 0:
        return True, "one very confident window, none against"
    return (
        False,
        f"{len(members)} agreeing of {len(use)} ({n_indep} not overlapping, {n_trusted_in} trusted, "
        f"{n_trusted_out} against)",
    )


def strip_consensus(
    windows: list[WindowFix],
    t_ref_s: float,
    velocity_mps: np.ndarray | None,
    cfg: FusionConfig = FusionConfig(),
    strip_id: str = "",
    min_separation_m: float = 0.0,
    displacement: Callable[[float, float], np.ndarray] | None = None,
    speed_sigma_mps: float = 2.0,
) -> Fix:
    """One vehicle fix at ``t_ref_s`` from the window fixes of a strip.

    Args:
        windows: window fixes (``vehicle_xy_m`` = vehicle position at the window's time ``t_s``).
        t_ref_s: the strip's reference time (e.g. its middle row).
        velocity_mps: (v_east, v_north) within the strip (from heading and speed), or None (no motion model).
        displacement: ``displacement(t_from, t_to) -> (east, north)``, how far the vehicle moved between two times
            (the navigation filter's :meth:`~sarloc.runtime.navfilter.NavFilter.displacement_m`); when given it
            replaces ``velocity_mps``, so windows of several strips (turns between them) can vote together.
        speed_sigma_mps: the one-sigma speed reported with the fix.
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
            speed_sigma_mps,
            0.0,
            False,
            len(windows),
            0,
            strip_id,
            "no window above the confidence floor",
        )
    p = _implied_positions(use, t_ref_s, v, displacement)
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
    trusted, reason = _verdict(use, members, conf, cfg, min_separation_m)
    confidence = float(1.0 - np.prod(1.0 - np.clip(conf[members], 0, 0.999)) ** (1.0 / max(1, len(members)) ** 0.5))
    return Fix(
        t_ref_s,
        (float(xy[0]), float(xy[1])),
        None,
        (float(v[0]), float(v[1])),
        ((var, 0.0), (0.0, var)),
        math.sqrt(var),
        speed_sigma_mps,
        confidence,
        trusted,
        len(windows),
        len(members),
        strip_id,
        reason,
    )


class SlidingWindows:
    """The recent window fixes that take part in the vote, across strip boundaries (newest ``max_windows`` within
    ``horizon_s`` of the newest acquisition time)."""

    def __init__(self, cfg: FusionConfig = FusionConfig()) -> None:
        self.cfg = cfg
        self.windows: list[WindowFix] = []

    def add(self, windows: list[WindowFix]) -> None:
        """Add window fixes (those without a position or below the confidence floor are ignored)."""
        self.windows += [
            w for w in windows if w.vehicle_xy_m is not None and w.confidence >= self.cfg.min_window_confidence
        ]
        if not self.windows:
            return
        self.windows.sort(key=lambda w: w.t_s)
        newest = self.windows[-1].t_s
        keep = [w for w in self.windows if newest - w.t_s <= self.cfg.horizon_s]
        self.windows = keep[-self.cfg.max_windows :]

    def clear(self) -> None:
        self.windows = []


class Corroboration:
    """Holds each trusted window until another one, acquired close in time, agrees with it.

    An isolated wrong match (a window a few pixels off whose neighbours are right) then never reaches the
    navigation filter, while windows that agree pass with no delay when a neighbour arrived before them (the
    windows of one strip arrive in batches, several per row position across the strip). Measured on closed-loop
    flights over a generated 10 m scene: consecutive correct windows agreed within 19 m at the 99th percentile
    (30 m at most); the few trusted windows 4-6 pixels off differed from their neighbours by 29-64 m.

    Args:
        agree_m: the largest distance between two agreeing windows, metres.
        window_s: the largest acquisition-time difference between them, seconds.
    """

    def __init__(self, agree_m: float, window_s: float) -> None:
        self.agree_m = float(agree_m)
        self.window_s = float(window_s)
        self._recent: list[list[Any]] = []  # [window, applied]
        self.stats = {"corroborated": 0, "expired": 0}

    def push(self, w: WindowFix, displacement: Callable[[float, float], Any]) -> list[WindowFix]:
        """Add a trusted window; return the windows to apply now (``w`` and earlier held ones it agrees with).

        Args:
            w: a trusted window with a vehicle position.
            displacement: ``(t0_s, t1_s) -> (dx, dy)`` metres, the vehicle's displacement between two times.
        """
        xy = np.asarray(w.vehicle_xy_m, float)
        partners = []
        for entry in self._recent:
            o = entry[0]
            if abs(o.t_s - w.t_s) > self.window_s:
                continue
            moved = np.asarray(o.vehicle_xy_m, float) + np.asarray(displacement(o.t_s, w.t_s), float)
            if float(np.hypot(*(xy - moved))) <= self.agree_m:
                partners.append(entry)
        out = [w] if partners else []
        for entry in partners:
            if not entry[1]:
                entry[1] = True
                out.append(entry[0])
        self.stats["corroborated"] += len(out)
        self._recent.append([w, bool(partners)])
        newest = max(e[0].t_s for e in self._recent)
        keep = []
        for e in self._recent:
            if newest - e[0].t_s <= self.window_s:
                keep.append(e)
            elif not e[1]:
                self.stats["expired"] += 1
        self._recent = keep
        return out

    def clear(self) -> None:
        self._recent = []


__all__ = ["Corroboration", "FusionConfig", "SlidingWindows", "strip_consensus"]
