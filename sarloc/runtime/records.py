"""The daemon's records: ``records.jsonl``, one JSON object per line.

Record types: ``start`` (config, artifact hashes), ``window``, ``fix``, ``nav`` (the filter's state about once a
second and at every initialisation), ``error``, ``stop`` (counters, fix availability). :class:`Recorder` writes every
line with a single ``write`` call in append mode, flushed at once (fsync'd at every strip end by the daemon); a
reader (:func:`sarloc.eval.report.load_fixes`) tolerates a truncated last line after a crash. :func:`done_strips`
reads back which strips have a ``fix`` (for ``resume``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.runtime.types import Fix

logger = logging.getLogger("sarloc.runtime.daemon")


class Recorder:
    """Append-only JSONL records, one ``write`` per line, flushed; failures counted, never raised (disk full)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.errors = 0
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False, default=_json_default) + "\n").encode()
        try:
            os.write(self.fd, line)
            self.lines += 1
        except OSError as e:
            self.errors += 1
            if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                logger.error("cannot write %s (%s); %d records lost so far, still running", self.path, e, self.errors)

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            self.errors += 1

    def close(self) -> None:
        self.sync()
        os.close(self.fd)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def done_strips(path: Path) -> set[str]:
    """Strip ids that already have a ``fix`` record in a records file (for ``resume``)."""
    out: set[str] = set()
    if not path.is_file():
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                continue
            if isinstance(r, dict) and r.get("type") == "fix" and r.get("strip_id"):
                out.add(str(r["strip_id"]))
    return out


def est_record(est) -> dict[str, Any]:
    """The fields of a ``nav`` record (and of a ``fix`` record's ``filter``) for a navigation filter estimate."""
    return {
        "t_s": est.t_s,
        "xy_m": list(est.xy_m),
        "vel_mps": list(est.vel_mps),
        "bias_mps": list(est.bias_mps),
        "scale": est.scale,
        "heading_offset_deg": est.heading_offset_deg,
        "sigma_h_m": finite_or_none(est.sigma_h_m),
        "sigma_v_mps": finite_or_none(est.sigma_v_mps),
        "valid": est.valid,
    }


def fix_record(fix: Fix, accepted: bool, why: str, est) -> dict[str, Any]:
    """A ``fix`` record: the strip's consensus ``fix``, whether the navigation filter confirms it (``accepted``,
    ``why``) and the filter's estimate ``est`` at the fix time (None before it has one); non-finite values as null."""
    rec = {
        "type": "fix",
        **fix.to_dict(),
        "accepted": accepted,
        "filter_reason": why,
        "filter": None if est is None else est_record(est),
        "wall_s": time.time(),
    }
    rec["xy_m"] = None if not np.all(np.isfinite(fix.xy_m)) else list(fix.xy_m)
    rec["sigma_h_m"] = finite_or_none(fix.sigma_h_m)
    if not np.all(np.isfinite(np.asarray(fix.cov_xy_m2))):
        rec["cov_xy_m2"] = None
    return rec
