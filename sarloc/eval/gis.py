"""The fixes (and the true track) for a GIS (torch-free): CSV in the metric frame (plus lon/lat when
geo-referenced), GeoJSON in lon/lat.

* :func:`fix_rows`: one row per fix record, the columns of :data:`CSV_COLUMNS`.
* :func:`write_fixes_csv`; :func:`fixes_geojson`, :func:`write_fixes_geojson`.

Re-exported by :mod:`sarloc.eval.report` (``sarloc report``), the module to import from.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import atomic_write_bytes
from sarloc.core.config import finite_number
from sarloc.core.errors import SarlocError, brief
from sarloc.eval.scoring import _is_trusted, _knots, _xy, load_fixes, load_truth, truth_at

logger = logging.getLogger("sarloc.eval.report")  # the name these messages always had (log lines unchanged)

__all__ = ["CSV_COLUMNS", "fix_rows", "fixes_geojson", "write_fixes_csv", "write_fixes_geojson"]

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
