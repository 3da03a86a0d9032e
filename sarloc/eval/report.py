"""``sarloc report``: scoring position fixes against a simulated flight's truth (torch-free; plotting needs
matplotlib).

* :func:`load_truth` / :func:`truth_at`: the vehicle's true (easting, northing) at any time of the flight.
* :func:`score_fixes`: error statistics of a JSONL of fix records (see ``docs/runtime_io.md`` for the metrics).
* :func:`check_same_flight`: refuse a truth file that does not belong to the records.
* :func:`fix_rows`, :func:`write_fixes_csv`, :func:`fixes_geojson`, :func:`write_fixes_geojson`: the fixes (and the
  true track) for a GIS: CSV in the metric frame (plus lon/lat when geo-referenced), GeoJSON in lon/lat.
* :func:`plot_track`: track map (metres from the start, scale bar, north arrow) with error-over-time and error-CDF
  panels; :func:`format_report`: a printable table.

This module is the one to import from. It holds the same-flight check; the rest lives in
:mod:`~sarloc.eval.scoring` (truth, fixes, statistics, table), :mod:`~sarloc.eval.gis` (CSV, GeoJSON) and
:mod:`~sarloc.eval.track_plot` (the plot), and is re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sarloc.core.artifacts import sha256_file
from sarloc.core.errors import SarlocError
from sarloc.eval.gis import CSV_COLUMNS, fix_rows, fixes_geojson, write_fixes_csv, write_fixes_geojson
from sarloc.eval.scoring import format_report, load_fixes, load_truth, score_fixes, truth_at
from sarloc.eval.track_plot import plot_track

__all__ = [
    "CSV_COLUMNS",
    "check_same_flight",
    "fix_rows",
    "fixes_geojson",
    "format_report",
    "load_fixes",
    "load_truth",
    "plot_track",
    "score_fixes",
    "truth_at",
    "write_fixes_csv",
    "write_fixes_geojson",
]

# ------------------------------------------------------------------------------------------ same flight

_STRIP_T_TOL_S = 1.0  # a fix's time is the mean of its windows' times: inside its strip


def _start_sources(records: Path) -> list[str]:
    """The strip sources named by the ``start`` records of a records file (one per session, resumes append)."""
    out = []
    try:
        with open(records, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"start"' not in line:
                    continue
                try:
                    r = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                cfg = r.get("config") if isinstance(r, dict) and r.get("type") == "start" else None
                src = cfg.get("source") if isinstance(cfg, dict) else None
                if isinstance(src, str) and src:
                    out.append(src)
    except OSError:
        pass
    return out


def _source_truth(source: str) -> Path | None:
    """The ``truth.json`` of a simulated flight beside a ``dir://`` or file source, when there is one."""
    scheme, sep, rest = source.partition("://")
    if not sep:
        scheme, rest = "file", source
    if scheme.lower() == "dir":
        p = Path(rest) / "truth.json"
    elif scheme.lower() == "file":
        p = Path(rest).parent / "truth.json"
    else:
        return None
    try:
        return p if p.is_file() else None
    except OSError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b) or sha256_file(a) == sha256_file(b)
    except OSError:
        return False


def _ids(ids: Iterable[str], n: int = 3) -> str:
    ids = sorted(set(ids))
    return ", ".join(ids[:n]) + (f" ... ({len(ids)} strips)" if len(ids) > n else "")


def check_same_flight(records: str | Path, truth: dict[str, Any], fixes: list[dict[str, Any]] | None = None) -> None:
    """Refuse a ``truth.json`` that belongs to another flight than the records.

    Two ties are checked: (1) at least one fix matches a strip of the truth: same ``strip_id`` and its ``t_s``
    within that strip's time span (a fix without ``strip_id``: within the flight's span); (2) when the records'
    ``start`` record names a ``dir://`` (or file) source that still holds a ``truth.json``, that file is the given
    truth (same file or same sha256). Simulated flights reuse strip ids and, with the default start time, times,
    so (2) is what tells two flights of the same geometry apart; it is skipped when the source folder is gone.

    Args:
        records: the records file (its ``start`` records are read).
        truth: from :func:`load_truth` (``_path`` names the file).
        fixes: the fix records when already loaded.

    Raises:
        SarlocError: one line naming both files and the reason.
    """
    records = Path(records)
    if fixes is None:
        fixes = load_fixes(records)[0]
    tpath = truth.get("_path")
    names = f"records {records} and truth {tpath or '(given)'}"
    spans = {
        s["strip_id"]: (float(s["t0_s"]), float(s["t_end_s"]))
        for s in truth["strips"]
        if isinstance(s.get("strip_id"), str)
    }
    t_lo = min(float(s["t0_s"]) for s in truth["strips"]) - _STRIP_T_TOL_S
    t_hi = max(float(s["t_end_s"]) for s in truth["strips"]) + _STRIP_T_TOL_S
    if fixes:
        matched, ids = 0, []
        for r in fixes:
            t, sid = float(r["t_s"]), r.get("strip_id")
            if isinstance(sid, str) and sid:
                ids.append(sid)
                span = spans.get(sid)
                matched += span is not None and span[0] - _STRIP_T_TOL_S <= t <= span[1] + _STRIP_T_TOL_S
            else:
                matched += t_lo <= t <= t_hi
        if not matched:
            if ids and not set(ids) & set(spans):
                why = f"their strips ({_ids(ids)}) are not in the truth ({_ids(spans)})"
            else:
                why = f"none of their {len(fixes)} fixes lies in time within a strip of the truth"
            raise SarlocError(f"{names} are different flights: {why}; give the truth.json of the simulated flight")
    if tpath is None:
        return
    theirs = [(src, p) for src in _start_sources(records) if (p := _source_truth(src)) is not None]
    if theirs and not any(_same_file(p, Path(tpath)) for _, p in theirs):
        src, p = theirs[-1]
        raise SarlocError(
            f"{names} are different flights: the records were made from {src}, whose truth is {p}; give that truth.json"
        )
