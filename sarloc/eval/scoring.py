"""Scoring position fixes against a simulated flight's truth (torch-free).

* :func:`load_truth` / :func:`truth_at`: the vehicle's true (easting, northing) at any time of the flight.
* :func:`load_fixes`: the fix records of a JSONL file (a truncated last line tolerated).
* :func:`score_fixes`: error statistics of fix records (see ``docs/runtime_io.md`` for the metrics);
  :func:`format_report`: a printable table of them.

Re-exported by :mod:`sarloc.eval.report` (``sarloc report``), the module to import from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.config import finite_number
from sarloc.core.errors import SarlocError, brief

logger = logging.getLogger("sarloc.eval.report")  # the name these messages always had (log lines unchanged)

__all__ = ["format_report", "load_fixes", "load_truth", "score_fixes", "truth_at"]

_T_TOL_S = 1e-6


def load_truth(path: str | Path) -> dict[str, Any]:
    """Read and check a ``truth.json`` written by :func:`sarloc.sim.flight.simulate_flight`.

    Raises:
        SarlocError: missing, malformed or without strips.
    """
    path = Path(path)
    if not path.is_file():
        raise SarlocError(f"truth {path} not found; run the simulation first (simulate_flight writes truth.json)")
    try:
        truth = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = brief(e)
        raise SarlocError(f"truth {path}: malformed JSON ({detail}); re-run the simulation") from None
    strips = truth.get("strips") if isinstance(truth, dict) else None
    if not isinstance(strips, list) or not strips:
        raise SarlocError(f"truth {path}: no 'strips' list; it is not a sarloc flight truth file")
    for k, s in enumerate(strips):
        ok = isinstance(s, dict) and all(finite_number(s.get(f)) is not None for f in ("t0_s", "t_end_s"))
        ok = ok and all(
            isinstance(s.get(f), list) and len(s[f]) == 2 and all(finite_number(v) is not None for v in s[f])
            for f in ("vehicle_start_xy_m", "vehicle_end_xy_m")
        )
        if not ok:
            raise SarlocError(
                f"truth {path}: strip {k} lacks finite t0_s, t_end_s and vehicle_start/end_xy_m [x, y]; "
                "re-run the simulation"
            )
    truth["_path"] = str(path)
    return truth


def _knots(truth: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    strips = sorted(truth["strips"], key=lambda s: float(s["t0_s"]))
    t, xy = [], []
    for s in strips:
        t += [float(s["t0_s"]), float(s["t_end_s"])]
        xy += [s["vehicle_start_xy_m"], s["vehicle_end_xy_m"]]
    return np.asarray(t, np.float64), np.asarray(xy, np.float64)


def truth_at(truth: dict[str, Any], t_s: float | np.ndarray) -> np.ndarray:
    """True vehicle (easting, northing) at ``t_s``.

    Exact within a strip (straight, constant speed); between strips linear from one strip's end to the next
    one's start (an approximation of turns); NaN outside the flight.

    Args:
        truth: from :func:`load_truth`.
        t_s: a time or an array of times, seconds.

    Returns:
        (2,) for a scalar time, (N, 2) for N times.
    """
    t, xy = _knots(truth)
    q = np.asarray(t_s, np.float64)
    flat = np.atleast_1d(q).ravel()
    out = np.stack([np.interp(flat, t, xy[:, 0]), np.interp(flat, t, xy[:, 1])], axis=1)
    out[(flat < t[0] - _T_TOL_S) | (flat > t[-1] + _T_TOL_S) | ~np.isfinite(flat)] = np.nan
    return out[0] if q.ndim == 0 else out.reshape(*q.shape, 2)


def load_fixes(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Fix records of a JSONL file: ``(records, bad_lines)``.

    Lines with a ``type`` other than ``"fix"`` are ignored; a truncated last line is tolerated (counted in
    ``bad_lines``, like malformed lines elsewhere, which are logged); records need a finite ``t_s``.

    Raises:
        SarlocError: the file is missing or unreadable.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise SarlocError(f"fixes {path}: cannot read ({e}); check the path") from None
    recs, bad = [], 0
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, and integers of > 4300 digits
            bad += 1
            if n != len(lines):
                logger.warning("fixes %s: line %d is not valid JSON; skipped", path, n)
            continue
        if not isinstance(r, dict) or ("type" in r and r["type"] != "fix"):
            continue
        if finite_number(r.get("t_s")) is None:
            bad += 1
            logger.warning("fixes %s: line %d has no finite t_s; skipped", path, n)
            continue
        recs.append(r)
    return recs, bad


def _xy(r: dict[str, Any]) -> tuple[float, float] | None:
    v = r.get("xy_m")
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and finite_number(v[0]) is not None
        and finite_number(v[1]) is not None
    ):
        return float(v[0]), float(v[1])
    return None


def _is_trusted(r: dict[str, Any], threshold: float | None) -> bool:
    if _xy(r) is None:
        return False
    if threshold is None:
        return r.get("trusted") is True
    c = r.get("confidence")
    return isinstance(c, (int, float)) and not isinstance(c, bool) and c >= threshold


def score_fixes(
    fixes_jsonl: str | Path | Iterable[dict[str, Any]],
    truth_json: str | Path | dict[str, Any],
    threshold: float | None = None,
    false_radius_m: float = 200.0,
) -> dict[str, Any]:
    """Error statistics of fixes against the truth.

    A record is *trusted* when ``trusted`` is true and ``xy_m`` is a point (or, with ``threshold``, when
    ``confidence >= threshold`` and ``xy_m`` is a point); every other record is *abstained*. ``xy_m`` is the
    vehicle position at ``t_s``. Errors are taken over trusted fixes whose ``t_s`` lies in the flight.

    Args:
        fixes_jsonl: a JSONL file of records (``t_s``, ``xy_m`` or null, ``trusted``, ``confidence``) or records.
        truth_json: ``truth.json`` path or the loaded truth.
        threshold: re-threshold on ``confidence`` instead of the records' ``trusted`` flag.
        false_radius_m: a trusted fix farther than this from the truth is a false fix.

    Returns:
        ``n_records, n_trusted, n_abstained, abstain_pct, n_scored, n_no_truth, bad_lines, median_m, p90_m,
        max_m, mean_m, within_50_pct, within_100_pct, within_200_pct, false_fix_rate, false_radius_m,
        threshold`` (error values None when nothing was scored).
    """
    truth = truth_json if isinstance(truth_json, dict) else load_truth(truth_json)
    if isinstance(fixes_jsonl, (str, Path)):
        recs, bad = load_fixes(fixes_jsonl)
    else:
        recs, bad = [r for r in fixes_jsonl if isinstance(r, dict) and r.get("type", "fix") == "fix"], 0
    trusted = [r for r in recs if _is_trusted(r, threshold)]
    n, nt = len(recs), len(trusted)
    errs = np.zeros(0)
    if trusted:
        est = np.array([_xy(r) for r in trusted], np.float64)
        true = truth_at(truth, np.array([float(r["t_s"]) for r in trusted]))
        e = np.hypot(*(est - true).T)
        errs = e[np.isfinite(e)]
    no_truth = nt - len(errs)

    def pct(mask: np.ndarray) -> float | None:
        return float(100.0 * mask.mean()) if len(errs) else None

    return {
        "n_records": n,
        "n_trusted": nt,
        "n_abstained": n - nt,
        "abstain_pct": float(100.0 * (n - nt) / n) if n else None,
        "n_scored": len(errs),
        "n_no_truth": no_truth,
        "bad_lines": bad,
        "median_m": float(np.median(errs)) if len(errs) else None,
        "p90_m": float(np.percentile(errs, 90)) if len(errs) else None,
        "max_m": float(errs.max()) if len(errs) else None,
        "mean_m": float(errs.mean()) if len(errs) else None,
        "within_50_pct": pct(errs <= 50.0),
        "within_100_pct": pct(errs <= 100.0),
        "within_200_pct": pct(errs <= 200.0),
        "false_fix_rate": float((errs > false_radius_m).mean()) if len(errs) else None,
        "false_radius_m": float(false_radius_m),
        "threshold": threshold,
    }


_ROWS = (
    ("records", "n_records", "{:d}"),
    ("trusted", "n_trusted", "{:d}"),
    ("abstained", "abstain_pct", "{:.1f} %"),
    ("scored (truth known)", "n_scored", "{:d}"),
    ("median error", "median_m", "{:.1f} m"),
    ("p90 error", "p90_m", "{:.1f} m"),
    ("max error", "max_m", "{:.1f} m"),
    ("within 50 m", "within_50_pct", "{:.1f} %"),
    ("within 100 m", "within_100_pct", "{:.1f} %"),
    ("within 200 m", "within_200_pct", "{:.1f} %"),
    ("false-fix rate", "false_fix_rate", "{:.3f}"),
    ("bad lines", "bad_lines", "{:d}"),
)


def format_report(stats: dict[str, Any]) -> str:
    """A two-column text table of :func:`score_fixes` statistics."""
    lines = []
    for label, key, fmt in _ROWS:
        v = stats.get(key)
        if key == "false_fix_rate":
            label = f"false-fix rate (> {stats.get('false_radius_m', 200.0):.0f} m)"
        lines.append(f"{label:<28} {'-' if v is None else fmt.format(v):>12}")
    return "\n".join(lines)
