"""Scoring position fixes against a simulated flight's truth (torch-free; plotting needs matplotlib).

* :func:`load_truth` / :func:`truth_at`: the vehicle's true (easting, northing) at any time of the flight.
* :func:`score_fixes`: error statistics of a JSONL of fix records (see ``docs/runtime_io.md`` for the metrics).
* :func:`check_same_flight`: refuse a truth file that does not belong to the records.
* :func:`fix_rows`, :func:`write_fixes_csv`, :func:`fixes_geojson`, :func:`write_fixes_geojson`: the fixes (and the
  true track) for a GIS: CSV in the metric frame (plus lon/lat when geo-referenced), GeoJSON in lon/lat.
* :func:`plot_track`: track map (metres from the start, scale bar, north arrow) with error-over-time and error-CDF
  panels; :func:`format_report`: a printable table.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import atomic_save, atomic_write_bytes, sha256_file
from sarloc.core.config import finite_number
from sarloc.core.errors import SarlocError, brief

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------ GIS outputs

CSV_COLUMNS = (
    "strip_id",
    "t_s",
    "time_utc",
    "trusted",
    "accepted",
    "confidence",
    "sigma_h_m",
    "error_m",
    "x_m",
    "y_m",
    "lon_deg",
    "lat_deg",
    "metric_crs",
)
_UNIX_MIN_S = 1e9  # t_s at or above this (2001-09-09) is taken as a UNIX time for ``time_utc``


def _metric_crs(truth: dict[str, Any]) -> str | None:
    fr = truth.get("frame")
    crs = fr.get("metric_crs") if isinstance(fr, dict) else None
    return crs if isinstance(crs, str) and crs else None


def _lonlat_fn(crs: str | None) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    if crs is None:
        return None
    import pyproj

    try:
        tr = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    except pyproj.exceptions.CRSError as e:
        raise SarlocError(f"truth metric CRS {crs!r} is not usable ({brief(e)}); re-run the simulation") from None

    def fn(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = tr.transform(np.asarray(x, np.float64), np.asarray(y, np.float64))
        return np.asarray(lon, np.float64), np.asarray(lat, np.float64)

    return fn


def _record_lonlat(r: dict[str, Any]) -> tuple[float, float] | None:
    v = r.get("lonlat_deg")
    if isinstance(v, (list, tuple)) and len(v) == 2:
        lon, lat = finite_number(v[0]), finite_number(v[1])
        if lon is not None and lat is not None and -180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0:
            return float(lon), float(lat)
    return None


def _time_utc(t: float) -> str | None:
    if not _UNIX_MIN_S <= t < 1e11:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fix_rows(fixes: str | Path | Iterable[dict[str, Any]], truth: str | Path | dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fix record, with the columns of :data:`CSV_COLUMNS` (None where unknown).

    ``trusted`` follows :func:`score_fixes` (the record's flag and a position); ``error_m`` is the distance to the
    truth at ``t_s`` for every fix with a position (trusted or not) inside the flight. ``lon_deg, lat_deg``: the
    record's own ``lonlat_deg`` (the daemon's, for trusted fixes of a geo-referenced pack), else ``xy_m`` converted
    from the truth's metric CRS; None without geo-reference.
    """
    tr = truth if isinstance(truth, dict) else load_truth(truth)
    recs = load_fixes(fixes)[0] if isinstance(fixes, (str, Path)) else [r for r in fixes if isinstance(r, dict)]
    crs = _metric_crs(tr)
    to_ll = _lonlat_fn(crs)
    rows, worst = [], 0.0
    for r in recs:
        t = float(r["t_s"])
        xy = _xy(r)
        err, ll = None, _record_lonlat(r) if xy is not None else None
        if xy is not None:
            true = truth_at(tr, t)
            if np.all(np.isfinite(true)):
                err = float(np.hypot(xy[0] - true[0], xy[1] - true[1]))
            if to_ll is not None:
                lon, lat = to_ll(np.array([xy[0]]), np.array([xy[1]]))
                if ll is not None:  # the daemon's conversion (pack CRS) against the truth's CRS
                    worst = max(
                        worst, abs(ll[0] - lon[0]) * 111e3 * math.cos(math.radians(ll[1])), abs(ll[1] - lat[0]) * 111e3
                    )
                else:
                    ll = (float(lon[0]), float(lat[0]))
        conf = finite_number(r.get("confidence"))
        sig = finite_number(r.get("sigma_h_m"))
        sid = r.get("strip_id")
        rows.append(
            {
                "strip_id": sid if isinstance(sid, str) else None,
                "t_s": t,
                "time_utc": _time_utc(t),
                "trusted": _is_trusted(r, None),
                "accepted": r.get("accepted") if isinstance(r.get("accepted"), bool) else None,
                "confidence": None if conf is None else float(conf),
                "sigma_h_m": None if sig is None else float(sig),
                "error_m": err,
                "x_m": None if xy is None else xy[0],
                "y_m": None if xy is None else xy[1],
                "lon_deg": None if ll is None else ll[0],
                "lat_deg": None if ll is None else ll[1],
                "metric_crs": crs,
            }
        )
    if worst > 1.0:
        logger.warning(
            "fixes: the records' lon/lat differ by up to %.0f m from their xy_m in the truth's CRS %s: the map pack's "
            "metric frame is not the scene's, so the errors are not meaningful",
            worst,
            crs,
        )
    return rows


def _csv_cell(key: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if key in ("lon_deg", "lat_deg"):
            return f"{v:.8f}"
        if key == "t_s":
            return f"{v:.3f}"
        if key == "confidence":
            return f"{v:.6g}"
        return f"{v:.3f}"
    return str(v)


def write_fixes_csv(
    fixes: str | Path | Iterable[dict[str, Any]], truth: str | Path | dict[str, Any], out_csv: str | Path
) -> Path:
    """The fixes as CSV (header :data:`CSV_COLUMNS`, one row per fix record), written atomically.

    ``x_m, y_m`` are in ``metric_crs`` (empty: the local metres of a scene without geo-reference); ``lon_deg,
    lat_deg`` (WGS 84) are empty without geo-reference or without a position. Booleans are ``true``/``false``.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in fix_rows(fixes, truth):
        w.writerow([_csv_cell(k, row[k]) for k in CSV_COLUMNS])
    return atomic_write_bytes(out_csv, buf.getvalue().encode("utf-8"))


def _geo_props(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("strip_id", "t_s", "time_utc", "trusted", "accepted", "confidence", "sigma_h_m", "error_m")
    p: dict[str, Any] = {"kind": "fix", **{k: row[k] for k in keep}}
    for k in ("error_m", "sigma_h_m"):
        p[k] = None if p[k] is None else round(p[k], 3)
    p["x_m"] = None if row["x_m"] is None else round(row["x_m"], 3)
    p["y_m"] = None if row["y_m"] is None else round(row["y_m"], 3)
    p["metric_crs"] = row["metric_crs"]
    return p


def fixes_geojson(fixes: str | Path | Iterable[dict[str, Any]], truth: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection (RFC 7946: WGS 84, [lon, lat]) of the true track and the fixes.

    The first feature is the true track, a LineString through each strip's start and end in time order
    (``properties.kind = "truth"``); then one Point per fix record (``kind = "fix"``, the properties of
    :func:`fix_rows`), a fix without a position having a null geometry.

    Raises:
        SarlocError: the truth has no geo-reference (local metres cannot be written as lon/lat).
    """
    tr = truth if isinstance(truth, dict) else load_truth(truth)
    crs = _metric_crs(tr)
    to_ll = _lonlat_fn(crs)
    if to_ll is None:
        raise SarlocError(
            f"GeoJSON needs a geo-referenced flight: truth {tr.get('_path', '')} has no CRS (its scene has no "
            "geo-reference, positions are local metres, and RFC 7946 GeoJSON holds only WGS 84 lon/lat); "
            "write --csv instead"
        )
    t, xy = _knots(tr)
    lon, lat = to_ll(xy[:, 0], xy[:, 1])
    line: list[list[float]] = []
    for a, b in zip(lon, lat, strict=True):
        pt = [round(float(a), 8), round(float(b), 8)]
        if not line or pt != line[-1]:
            line.append(pt)
    if len(line) == 1:
        line.append(list(line[0]))
    feats: list[dict[str, Any]] = [
        {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": line},
            "properties": {
                "kind": "truth",
                "scene": tr.get("scene"),
                "track": tr.get("track"),
                "strips": len(tr["strips"]),
                "t_start_s": float(t[0]),
                "t_end_s": float(t[-1]),
                "metric_crs": crs,
            },
        }
    ]
    for row in fix_rows(fixes, tr):
        geom = None
        if row["lon_deg"] is not None:
            geom = {"type": "Point", "coordinates": [round(row["lon_deg"], 8), round(row["lat_deg"], 8)]}
        feats.append({"type": "Feature", "geometry": geom, "properties": _geo_props(row)})
    return {"type": "FeatureCollection", "features": feats}


def write_fixes_geojson(
    fixes: str | Path | Iterable[dict[str, Any]], truth: str | Path | dict[str, Any], out_geojson: str | Path
) -> Path:
    """Write :func:`fixes_geojson` atomically, one feature per line.

    Raises:
        SarlocError: the truth has no geo-reference.
    """
    fc = fixes_geojson(fixes, truth)
    body = ",\n".join(json.dumps(f, allow_nan=False) for f in fc["features"])
    text = '{"type": "FeatureCollection", "features": [\n' + body + "\n]}\n"
    return atomic_write_bytes(out_geojson, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ plot


def _stretch(img: np.ndarray, lo_pct: float = 2.0, hi_pct: float = 98.0) -> np.ndarray:
    """Percentile contrast stretch to [0, 1] (per band for colour images); NaN stays NaN (drawn transparent)."""
    a = np.asarray(img, np.float32)
    bands = a[..., None] if a.ndim == 2 else a
    out = np.empty(bands.shape, np.float32)
    for k in range(bands.shape[-1]):
        b = bands[..., k]
        ok = b[np.isfinite(b)]
        lo, hi = np.percentile(ok, [lo_pct, hi_pct]) if ok.size else (0.0, 1.0)
        out[..., k] = np.clip((b - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    return out[..., 0] if a.ndim == 2 else out


def _nice_length(span_m: float) -> float:
    """A 1-2-5 length near a fifth of ``span_m``."""
    target = max(span_m / 5.0, 1e-3)
    e = 10.0 ** math.floor(math.log10(target))
    return max((m * e for m in (1.0, 2.0, 5.0, 10.0) if m * e <= target), default=e)


def _fmt_m(v: float) -> str:
    return f"{v / 1000:g} km" if v >= 1000 else f"{v:g} m"


def _pixel_affine(basemap_frame: Any, tr: dict[str, Any]) -> np.ndarray:
    if basemap_frame is not None:
        from sarloc.core.geo import pixel_metric_affine

        return pixel_metric_affine(basemap_frame)[0]
    return np.asarray(tr["frame"]["pixel_to_metric"], np.float64)


def _draw_basemap(ax: Any, img: np.ndarray, a: np.ndarray, origin: np.ndarray, view: tuple) -> None:
    """Draw the crop of ``img`` under the view box, stretched, placed by the pixel -> metric affine ``a``."""
    from matplotlib.transforms import Affine2D

    x0, x1, y0, y1 = view
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) + origin
    cr = (corners - a[:, 2]) @ np.linalg.inv(a[:, :2]).T
    h, w = img.shape[:2]
    c0 = int(np.clip(np.floor(cr[:, 0].min()) - 1, 0, w))
    c1 = int(np.clip(np.ceil(cr[:, 0].max()) + 1, 0, w))
    r0 = int(np.clip(np.floor(cr[:, 1].min()) - 1, 0, h))
    r1 = int(np.clip(np.ceil(cr[:, 1].max()) + 1, 0, h))
    if c1 - c0 < 2 or r1 - r0 < 2:
        return
    crop = _stretch(np.asarray(img[r0:r1, c0:c1]))
    if crop.ndim == 3:  # colour: RGB (first 3 bands), no-data (NaN) transparent
        rgb = np.nan_to_num(crop[..., :3] if crop.shape[2] >= 3 else np.repeat(crop[..., :1], 3, axis=2))
        crop = np.concatenate([rgb, np.all(np.isfinite(crop), axis=2, keepdims=True).astype(np.float32)], axis=2)
    m = np.array([[a[0, 0], a[0, 1], a[0, 2] - origin[0]], [a[1, 0], a[1, 1], a[1, 2] - origin[1]], [0, 0, 1.0]])
    im = ax.imshow(
        crop,
        cmap="gray" if crop.ndim == 2 else None,
        vmin=0.0,
        vmax=1.0,
        extent=(c0, c1, r1, r0),
        interpolation="nearest" if (c1 - c0) < 400 else "antialiased",
        zorder=0,
    )
    im.set_transform(Affine2D(m) + ax.transData)


def _north_arrow(ax: Any, bearing_deg: float, label: str) -> None:
    """A north arrow in the upper left: ``bearing_deg`` is north's direction, clockwise from the plot's up."""
    from matplotlib import patheffects

    b = math.radians(bearing_deg)
    length = 28.0
    dx, dy = length * math.sin(b), length * math.cos(b)
    base = (0.07, 0.80)
    kw = {"xycoords": "axes fraction", "textcoords": "offset points", "zorder": 6}
    ax.annotate(
        "",
        xy=base,
        xytext=(-dx, -dy),
        arrowprops={
            "arrowstyle": "-|>,head_width=0.5,head_length=0.9",
            "color": "black",
            "lw": 2.0,
            "path_effects": [patheffects.withStroke(linewidth=4.5, foreground="white")],
        },
        **kw,
    )
    ax.annotate(
        label,
        xy=base,
        xytext=(0.45 * dx, 0.45 * dy + 4),
        ha="center",
        va="bottom",
        fontsize=10,
        fontweight="bold",
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        **kw,
    )


def plot_track(
    fixes: str | Path | Iterable[dict[str, Any]],
    truth: str | Path | dict[str, Any],
    basemap: np.ndarray | None,
    frame: Any,
    out_png: str | Path,
    false_radius_m: float = 200.0,
) -> Path:
    """Draw the flight and the fixes with their errors, and write a PNG.

    Left, the track map in metres from the start of the true track (x east, y grid north of the metric frame,
    equal aspect): the true track (imaged strips solid, the transits between strips dashed) with arrows in the
    direction of flight, its start, trusted fixes (filled) and untrusted ones (hollow), each trusted fix joined
    to the true position at its time, a scale bar, a north arrow (true north when geo-referenced, else the
    frame's north) and, when given, the basemap underneath with a 2-98 % contrast stretch. Right, the error of
    every fix with a position against time (strip starts dotted, the time between strips shaded,
    ``false_radius_m`` dashed) and the error CDF of
    the trusted and the untrusted fixes.

    Args:
        fixes: JSONL path or fix records.
        truth: ``truth.json`` path or the loaded truth.
        basemap: (H, W) or (H, W, 3) image in the scene's pixels drawn underneath, or None.
        frame: the basemap's :class:`sarloc.core.geo.GeoFrame` (pixel -> metric), or None to use the truth's
            ``pixel_to_metric`` affine.
        out_png: output file (written atomically).
        false_radius_m: the false-fix radius drawn on the error panels.

    Raises:
        SarlocError: matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    except ImportError:
        raise SarlocError("plot_track needs matplotlib; install it with pip install 'sarloc[train]'") from None
    tr = truth if isinstance(truth, dict) else load_truth(truth)
    recs = load_fixes(fixes)[0] if isinstance(fixes, (str, Path)) else [r for r in fixes if isinstance(r, dict)]
    strips = sorted(tr["strips"], key=lambda s: float(s["t0_s"]))
    t_knots, knots = _knots(tr)
    origin = knots[0].copy()
    t_first = float(t_knots[0])
    rows = fix_rows(recs, tr)
    pos = [(r, row) for r, row in zip(recs, rows, strict=True) if row["x_m"] is not None]
    good = [row for _, row in pos if row["trusted"]]
    bad = [row for _, row in pos if not row["trusted"]]

    def rel(rs: list[dict[str, Any]]) -> np.ndarray:
        return np.array([[r["x_m"], r["y_m"]] for r in rs], np.float64).reshape(-1, 2) - origin

    # view box: the track and every fix, with a margin, at least 500 m a side
    pts = np.vstack([knots - origin, rel(good), rel(bad)])
    lo, hi = pts.min(0), pts.max(0)
    half = np.full(2, max(float((hi - lo).max()) / 2 * 1.12, 250.0))  # square: the map panel is about square
    mid = (hi + lo) / 2
    view = (mid[0] - half[0], mid[0] + half[0], mid[1] - half[1], mid[1] + half[1])

    fig = Figure(figsize=(15, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, width_ratios=(1.45, 1.0))
    ax = fig.add_subplot(gs[:, 0])
    ax_t = fig.add_subplot(gs[0, 1])
    ax_c = fig.add_subplot(gs[1, 1])

    # --- track map
    if basemap is not None:
        _draw_basemap(ax, np.asarray(basemap), _pixel_affine(frame, tr), origin, view)
        ax.set_facecolor("0.85")
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=3.5, foreground="white", alpha=0.8)]
    truth_c = "tab:blue"
    for k, s in enumerate(strips):
        a_, b_ = np.asarray(s["vehicle_start_xy_m"]) - origin, np.asarray(s["vehicle_end_xy_m"]) - origin
        ax.plot([a_[0], b_[0]], [a_[1], b_[1]], "-", color=truth_c, lw=2.2, zorder=3, path_effects=halo)
        if k + 1 < len(strips):
            n_ = np.asarray(strips[k + 1]["vehicle_start_xy_m"]) - origin
            if np.hypot(*(n_ - b_)) > 1e-6:
                ax.plot([b_[0], n_[0]], [b_[1], n_[1]], "--", color=truth_c, lw=1.2, zorder=3, path_effects=halo)
    span = max(view[1] - view[0], view[3] - view[2])
    step = max(1, math.ceil(len(strips) / 12))
    for s in strips[::step]:  # direction of flight: an arrow at the middle of (at most 12) strips
        a_, b_ = np.asarray(s["vehicle_start_xy_m"]) - origin, np.asarray(s["vehicle_end_xy_m"]) - origin
        d = b_ - a_
        n = float(np.hypot(*d))
        if n <= 0:
            continue
        c, u = (a_ + b_) / 2, d / n * min(0.035 * span, 0.4 * n)
        ax.annotate(
            "",
            xy=c + u,
            xytext=c - u,
            arrowprops={"arrowstyle": "-|>,head_width=0.45,head_length=0.9", "color": truth_c, "lw": 2.2},
            zorder=4,
        )
    ax.plot(0.0, 0.0, marker="*", ms=16, color="gold", mec="black", ls="none", zorder=7)
    end = knots[-1] - origin
    ax.plot(end[0], end[1], marker="s", ms=8, color=truth_c, mec="white", ls="none", zorder=7)
    g, u = rel(good), rel(bad)
    if len(g):
        true = truth_at(tr, np.array([r["t_s"] for r in good])).reshape(-1, 2) - origin
        for p_, q_ in zip(g, true, strict=True):
            if np.all(np.isfinite(q_)):
                ax.plot([p_[0], q_[0]], [p_[1], q_[1]], "-", color="red", lw=0.9, zorder=4)
        ax.plot(g[:, 0], g[:, 1], "o", ms=7, mfc="limegreen", mec="black", mew=0.8, ls="none", zorder=5)
    if len(u):
        ax.plot(u[:, 0], u[:, 1], "o", ms=7, mfc="none", mec="darkorange", mew=1.8, ls="none", zorder=5)
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[2], view[3])
    ax.set_aspect("equal", adjustable="box")
    crs = _metric_crs(tr)
    ax.set_xlabel("east of the start (m)")
    ax.set_ylabel("north of the start (m, grid)" if crs else "north of the start (m, local frame)")
    bar = _nice_length(view[1] - view[0])
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            bar,
            _fmt_m(bar),
            loc="lower right",
            pad=0.5,
            borderpad=0.8,
            sep=4,
            size_vertical=span / 200,
            frameon=True,
            color="black",
        )
    )
    north, north_label = 0.0, "N (grid)"
    if crs is not None:
        from sarloc.core.geo import grid_convergence_deg

        try:
            north, north_label = grid_convergence_deg(crs, float(origin[0]), float(origin[1])), "N"
        except Exception as e:  # a CRS pyproj cannot invert here: grid north, labelled so
            logger.warning("plot: no true north (%s); drawing grid north", brief(e))
    _north_arrow(ax, north, north_label)
    n_none = len(recs) - len(pos)
    handles = [
        Line2D([], [], color=truth_c, lw=2.2, label="true track (strips)"),
        Line2D([], [], color=truth_c, lw=1.2, ls="--", label="true track (between strips)"),
        Line2D([], [], marker="*", ms=14, color="gold", mec="black", ls="none", label="start"),
        Line2D([], [], marker="s", ms=7, color=truth_c, mec="white", ls="none", label="end"),
        Line2D([], [], marker="o", ms=7, mfc="limegreen", mec="black", ls="none", label=f"trusted fix ({len(g)})"),
        Line2D(
            [],
            [],
            marker="o",
            ms=7,
            mfc="none",
            mec="darkorange",
            mew=1.8,
            ls="none",
            label=f"untrusted fix ({len(u)})",
        ),
        Line2D([], [], color="red", lw=0.9, label="error of a trusted fix"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4, fontsize=8, frameon=False)
    to_ll = _lonlat_fn(crs)
    if crs is not None and to_ll is not None:
        lon, lat = to_ll(origin[:1], origin[1:])
        where = f"start E {origin[0]:.0f} N {origin[1]:.0f} {crs} ({lat[0]:.5f}°, {lon[0]:.5f}°)"
    else:
        where = f"start x {origin[0]:.0f} y {origin[1]:.0f} (local metres, no geo-reference)"
    ax.set_title(f"{tr.get('scene', '')} {tr.get('track', '')} flight; {where}".strip(), fontsize=10)

    # --- error over time
    strip_spans = [(float(s["t0_s"]) - t_first, float(s["t_end_s"]) - t_first) for s in strips]
    for k, (a_, _) in enumerate(strip_spans):
        ax_t.axvline(a_, color="0.6", lw=0.8, ls=":", zorder=0, label="start of a strip" if k == 0 else None)
    gaps = [(b_, c_) for (_, b_), (c_, _) in itertools.pairwise(strip_spans) if c_ - b_ > 1e-6]
    for k, (b_, c_) in enumerate(gaps):
        ax_t.axvspan(b_, c_, color="0.9", zorder=0, label="between strips (no imaging)" if k == 0 else None)
    eg = [(r["t_s"] - t_first, r["error_m"]) for r in good if r["error_m"] is not None]
    eu = [(r["t_s"] - t_first, r["error_m"]) for r in bad if r["error_m"] is not None]
    all_e = [e for _, e in eg + eu]
    if eg:
        a_ = np.array(eg)
        ax_t.plot(a_[:, 0], a_[:, 1], "o", ms=6, mfc="limegreen", mec="black", mew=0.8, ls="none", label="trusted")
    if eu:
        a_ = np.array(eu)
        ax_t.plot(a_[:, 0], a_[:, 1], "o", ms=6, mfc="none", mec="darkorange", mew=1.6, ls="none", label="untrusted")
    ax_t.axhline(false_radius_m, color="red", ls="--", lw=1.0, label=f"false-fix radius {false_radius_m:g} m")
    log_y = bool(all_e) and min(all_e) > 0 and max(max(all_e), false_radius_m) / min(all_e) > 50
    if log_y:
        ax_t.set_yscale("log")
    else:
        ax_t.set_ylim(0, 1.1 * max([*all_e, false_radius_m]))
    ax_t.set_xlim(strip_spans[0][0] - 0.02 * (strip_spans[-1][1] or 1), strip_spans[-1][1] * 1.02 + 1e-9)
    ax_t.set_xlabel("time since the first strip (s)")
    ax_t.set_ylabel("error (m)")
    ax_t.set_title("error of each fix over time", fontsize=10)
    ax_t.grid(True, alpha=0.3)
    if not all_e:
        ax_t.text(0.5, 0.5, "no fix with a position inside the flight", ha="center", transform=ax_t.transAxes)
    ax_t.legend(loc="upper left", fontsize=8, framealpha=0.85)

    # --- error CDF
    cdfs: tuple[tuple[list[float], dict[str, Any], str], ...] = (
        ([e for _, e in eg], {"color": "green", "lw": 2.0}, "trusted"),
        ([e for _, e in eu], {"color": "darkorange", "lw": 1.5, "ls": "--"}, "untrusted"),
    )
    for vals, style, label in cdfs:
        if not vals:
            continue
        v = np.sort(np.asarray(vals))
        y = 100.0 * np.arange(1, len(v) + 1) / len(v)
        ax_c.step(
            np.concatenate([[v[0]], v]), np.concatenate([[0.0], y]), where="post", label=f"{label} ({len(v)})", **style
        )
    if eg:
        eg_m = np.array([x for _, x in eg])
        med, p90 = float(np.median(eg_m)), float(np.percentile(eg_m, 90))
        ax_c.axvline(med, color="green", ls=":", lw=1.0)
        ax_c.text(
            0.98,
            0.04,
            f"trusted: median {med:.1f} m, p90 {p90:.1f} m",
            ha="right",
            transform=ax_c.transAxes,
            fontsize=9,
            bbox={"fc": "white", "ec": "0.7", "alpha": 0.9},
        )
    ax_c.axvline(false_radius_m, color="red", ls="--", lw=1.0, label=f"{false_radius_m:g} m")
    if log_y:
        ax_c.set_xscale("log")
    else:
        ax_c.set_xlim(0, 1.1 * max([*all_e, false_radius_m]))
    ax_c.set_ylim(0, 102)
    ax_c.set_xlabel("error (m)")
    ax_c.set_ylabel("fixes within the error (%)")
    ax_c.set_title("error CDF", fontsize=10)
    ax_c.grid(True, alpha=0.3)
    ax_c.legend(loc="center right", fontsize=8, framealpha=0.85)
    counts = f"{len(recs)} fixes: {len(g)} trusted, {len(u)} untrusted"
    fig.suptitle(counts + (f", {n_none} without a position" if n_none else ""), fontsize=11)
    out = Path(out_png)
    atomic_save(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out
