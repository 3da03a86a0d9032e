"""The track plot of ``sarloc report --plot`` (matplotlib, imported when drawing; torch-free).

:func:`plot_track`: the track map (metres from the start, basemap, scale bar, north arrow, the true track and the
fixes) with error-over-time and error-CDF panels. Each panel, and each layer of the map, is drawn by its own
function, in the order :func:`plot_track` calls them (the drawing order decides what lies on top).

Re-exported by :mod:`sarloc.eval.report` (``sarloc report``), the module to import from.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import atomic_save
from sarloc.core.errors import SarlocError, brief
from sarloc.eval.gis import _lonlat_fn, _metric_crs, fix_rows
from sarloc.eval.scoring import _knots, load_fixes, load_truth, truth_at

logger = logging.getLogger("sarloc.eval.report")  # the name these messages always had (log lines unchanged)

__all__ = ["plot_track"]

_TRUTH_C = "tab:blue"  # the true track, its arrows and its end
_MATPLOTLIB = (
    "matplotlib.backends.backend_agg",
    "matplotlib.figure",
    "matplotlib.lines",
    "mpl_toolkits.axes_grid1.anchored_artists",
)

# ------------------------------------------------------------------------------------------ basemap, scale, north


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


def _scale_bar(ax: Any, view: tuple, span: float) -> None:
    """A 1-2-5 scale bar in the lower right of the map."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

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


def _draw_north(ax: Any, crs: str | None, origin: np.ndarray) -> None:
    """The north arrow: true north at the start when geo-referenced (grid north when pyproj cannot say), else the
    frame's north."""
    north, north_label = 0.0, "N (grid)"
    if crs is not None:
        from sarloc.core.geo import grid_convergence_deg

        try:
            north, north_label = grid_convergence_deg(crs, float(origin[0]), float(origin[1])), "N"
        except Exception as e:  # a CRS pyproj cannot invert here: grid north, labelled so
            logger.warning("plot: no true north (%s); drawing grid north", brief(e))
    _north_arrow(ax, north, north_label)


# ------------------------------------------------------------------------------------------ the flight


@dataclass
class _Flight:
    """What the panels draw: the truth, the fix records and their rows (:func:`fix_rows`) with a position."""

    tr: dict[str, Any]
    recs: list[dict[str, Any]]
    strips: list[dict[str, Any]]  # in time order
    knots: np.ndarray  # (easting, northing) of each strip's start and end, in time order
    origin: np.ndarray  # the start of the true track: the map's (0, 0)
    t_first: float  # the start of the first strip: the error panel's time 0
    good: list[dict[str, Any]]  # rows of trusted fixes with a position
    bad: list[dict[str, Any]]  # rows of untrusted fixes with a position
    n_none: int  # fix records without a position


def _flight(fixes: str | Path | Iterable[dict[str, Any]], truth: str | Path | dict[str, Any]) -> _Flight:
    tr = truth if isinstance(truth, dict) else load_truth(truth)
    recs = load_fixes(fixes)[0] if isinstance(fixes, (str, Path)) else [r for r in fixes if isinstance(r, dict)]
    t_knots, knots = _knots(tr)
    rows = fix_rows(recs, tr)
    pos = [row for row in rows if row["x_m"] is not None]  # one row per record
    return _Flight(
        tr=tr,
        recs=recs,
        strips=sorted(tr["strips"], key=lambda s: float(s["t0_s"])),
        knots=knots,
        origin=knots[0].copy(),
        t_first=float(t_knots[0]),
        good=[row for row in pos if row["trusted"]],
        bad=[row for row in pos if not row["trusted"]],
        n_none=len(recs) - len(pos),
    )


def _rel(rows: list[dict[str, Any]], origin: np.ndarray) -> np.ndarray:
    """(N, 2) positions of fix rows, metres from the start."""
    return np.array([[r["x_m"], r["y_m"]] for r in rows], np.float64).reshape(-1, 2) - origin


def _view_box(fl: _Flight) -> tuple[float, float, float, float]:
    """The map's (x0, x1, y0, y1): the track and every fix, with a margin, square, at least 500 m a side."""
    pts = np.vstack([fl.knots - fl.origin, _rel(fl.good, fl.origin), _rel(fl.bad, fl.origin)])
    lo, hi = pts.min(0), pts.max(0)
    half = np.full(2, max(float((hi - lo).max()) / 2 * 1.12, 250.0))  # square: the map panel is about square
    mid = (hi + lo) / 2
    return (mid[0] - half[0], mid[0] + half[0], mid[1] - half[1], mid[1] + half[1])


def _new_figure() -> tuple[Any, Any, Any, Any]:
    """The figure and its three axes: the map (left), the error over time (upper right), the CDF (lower right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, width_ratios=(1.45, 1.0))
    return fig, fig.add_subplot(gs[:, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, 1])


# ------------------------------------------------------------------------------------------ the map panel


def _draw_true_track(ax: Any, strips: list[dict[str, Any]], origin: np.ndarray) -> None:
    """The true track: each strip solid, the transit to the next strip dashed, on a white halo."""
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=3.5, foreground="white", alpha=0.8)]
    for k, s in enumerate(strips):
        a_, b_ = np.asarray(s["vehicle_start_xy_m"]) - origin, np.asarray(s["vehicle_end_xy_m"]) - origin
        ax.plot([a_[0], b_[0]], [a_[1], b_[1]], "-", color=_TRUTH_C, lw=2.2, zorder=3, path_effects=halo)
        if k + 1 < len(strips):
            n_ = np.asarray(strips[k + 1]["vehicle_start_xy_m"]) - origin
            if np.hypot(*(n_ - b_)) > 1e-6:
                ax.plot([b_[0], n_[0]], [b_[1], n_[1]], "--", color=_TRUTH_C, lw=1.2, zorder=3, path_effects=halo)


def _draw_direction(ax: Any, strips: list[dict[str, Any]], origin: np.ndarray, span: float) -> None:
    """Direction of flight: an arrow at the middle of (at most 12) strips."""
    step = max(1, math.ceil(len(strips) / 12))
    for s in strips[::step]:
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
            arrowprops={"arrowstyle": "-|>,head_width=0.45,head_length=0.9", "color": _TRUTH_C, "lw": 2.2},
            zorder=4,
        )


def _draw_ends(ax: Any, fl: _Flight) -> None:
    """The start (a star at the origin) and the end (a square) of the true track."""
    ax.plot(0.0, 0.0, marker="*", ms=16, color="gold", mec="black", ls="none", zorder=7)
    end = fl.knots[-1] - fl.origin
    ax.plot(end[0], end[1], marker="s", ms=8, color=_TRUTH_C, mec="white", ls="none", zorder=7)


def _draw_fixes(ax: Any, fl: _Flight) -> None:
    """Trusted fixes (filled, each joined in red to the true position at its time) and untrusted ones (hollow)."""
    g, u = _rel(fl.good, fl.origin), _rel(fl.bad, fl.origin)
    if len(g):
        true = truth_at(fl.tr, np.array([r["t_s"] for r in fl.good])).reshape(-1, 2) - fl.origin
        for p_, q_ in zip(g, true, strict=True):
            if np.all(np.isfinite(q_)):
                ax.plot([p_[0], q_[0]], [p_[1], q_[1]], "-", color="red", lw=0.9, zorder=4)
        ax.plot(g[:, 0], g[:, 1], "o", ms=7, mfc="limegreen", mec="black", mew=0.8, ls="none", zorder=5)
    if len(u):
        ax.plot(u[:, 0], u[:, 1], "o", ms=7, mfc="none", mec="darkorange", mew=1.8, ls="none", zorder=5)


def _map_legend(ax: Any, n_good: int, n_bad: int) -> None:
    """The map's legend, below it."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_TRUTH_C, lw=2.2, label="true track (strips)"),
        Line2D([], [], color=_TRUTH_C, lw=1.2, ls="--", label="true track (between strips)"),
        Line2D([], [], marker="*", ms=14, color="gold", mec="black", ls="none", label="start"),
        Line2D([], [], marker="s", ms=7, color=_TRUTH_C, mec="white", ls="none", label="end"),
        Line2D([], [], marker="o", ms=7, mfc="limegreen", mec="black", ls="none", label=f"trusted fix ({n_good})"),
        Line2D(
            [],
            [],
            marker="o",
            ms=7,
            mfc="none",
            mec="darkorange",
            mew=1.8,
            ls="none",
            label=f"untrusted fix ({n_bad})",
        ),
        Line2D([], [], color="red", lw=0.9, label="error of a trusted fix"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4, fontsize=8, frameon=False)


def _map_title(ax: Any, tr: dict[str, Any], crs: str | None, origin: np.ndarray) -> None:
    """Scene, track and where the start is (CRS easting/northing and lon/lat, or local metres)."""
    to_ll = _lonlat_fn(crs)
    if crs is not None and to_ll is not None:
        lon, lat = to_ll(origin[:1], origin[1:])
        where = f"start E {origin[0]:.0f} N {origin[1]:.0f} {crs} ({lat[0]:.5f}°, {lon[0]:.5f}°)"
    else:
        where = f"start x {origin[0]:.0f} y {origin[1]:.0f} (local metres, no geo-reference)"
    ax.set_title(f"{tr.get('scene', '')} {tr.get('track', '')} flight; {where}".strip(), fontsize=10)


def _plot_map(ax: Any, fl: _Flight, basemap: np.ndarray | None, frame: Any) -> None:
    """The track map panel, layer by layer."""
    view = _view_box(fl)
    if basemap is not None:
        _draw_basemap(ax, np.asarray(basemap), _pixel_affine(frame, fl.tr), fl.origin, view)
        ax.set_facecolor("0.85")
    span = max(view[1] - view[0], view[3] - view[2])
    _draw_true_track(ax, fl.strips, fl.origin)
    _draw_direction(ax, fl.strips, fl.origin, span)
    _draw_ends(ax, fl)
    _draw_fixes(ax, fl)
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[2], view[3])
    ax.set_aspect("equal", adjustable="box")
    crs = _metric_crs(fl.tr)
    ax.set_xlabel("east of the start (m)")
    ax.set_ylabel("north of the start (m, grid)" if crs else "north of the start (m, local frame)")
    _scale_bar(ax, view, span)
    _draw_north(ax, crs, fl.origin)
    _map_legend(ax, len(fl.good), len(fl.bad))
    _map_title(ax, fl.tr, crs, fl.origin)


# ------------------------------------------------------------------------------------------ the error panels


def _errors(rows: list[dict[str, Any]], t_first: float) -> list[tuple[float, float]]:
    """(time since the first strip, error) of the rows whose error is known."""
    return [(r["t_s"] - t_first, r["error_m"]) for r in rows if r["error_m"] is not None]


def _shade_strips(ax_t: Any, strip_spans: list[tuple[float, float]]) -> None:
    """Strip starts dotted, the time between strips shaded."""
    for k, (a_, _) in enumerate(strip_spans):
        ax_t.axvline(a_, color="0.6", lw=0.8, ls=":", zorder=0, label="start of a strip" if k == 0 else None)
    gaps = [(b_, c_) for (_, b_), (c_, _) in itertools.pairwise(strip_spans) if c_ - b_ > 1e-6]
    for k, (b_, c_) in enumerate(gaps):
        ax_t.axvspan(b_, c_, color="0.9", zorder=0, label="between strips (no imaging)" if k == 0 else None)


def _plot_error_time(
    ax_t: Any,
    fl: _Flight,
    eg: list[tuple[float, float]],
    eu: list[tuple[float, float]],
    log_y: bool,
    false_radius_m: float,
) -> None:
    """The error of every fix with a position against time."""
    strip_spans = [(float(s["t0_s"]) - fl.t_first, float(s["t_end_s"]) - fl.t_first) for s in fl.strips]
    _shade_strips(ax_t, strip_spans)
    all_e = [e for _, e in eg + eu]
    if eg:
        a_ = np.array(eg)
        ax_t.plot(a_[:, 0], a_[:, 1], "o", ms=6, mfc="limegreen", mec="black", mew=0.8, ls="none", label="trusted")
    if eu:
        a_ = np.array(eu)
        ax_t.plot(a_[:, 0], a_[:, 1], "o", ms=6, mfc="none", mec="darkorange", mew=1.6, ls="none", label="untrusted")
    ax_t.axhline(false_radius_m, color="red", ls="--", lw=1.0, label=f"false-fix radius {false_radius_m:g} m")
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


def _cdf_curves(ax_c: Any, eg: list[tuple[float, float]], eu: list[tuple[float, float]]) -> None:
    """The CDF step curves of the trusted and the untrusted fixes' errors."""
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


def _plot_cdf(
    ax_c: Any, eg: list[tuple[float, float]], eu: list[tuple[float, float]], log_y: bool, false_radius_m: float
) -> None:
    """The error CDF panel, with the trusted fixes' median (dotted) and their median and p90 written."""
    all_e = [e for _, e in eg + eu]
    _cdf_curves(ax_c, eg, eu)
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


# ------------------------------------------------------------------------------------------ the plot


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
        for name in _MATPLOTLIB:
            importlib.import_module(name)
    except ImportError:
        raise SarlocError("plot_track needs matplotlib; install it with pip install 'sarloc[train]'") from None
    fl = _flight(fixes, truth)
    fig, ax, ax_t, ax_c = _new_figure()
    _plot_map(ax, fl, basemap, frame)
    eg, eu = _errors(fl.good, fl.t_first), _errors(fl.bad, fl.t_first)
    all_e = [e for _, e in eg + eu]
    log_y = bool(all_e) and min(all_e) > 0 and max(max(all_e), false_radius_m) / min(all_e) > 50
    _plot_error_time(ax_t, fl, eg, eu, log_y, false_radius_m)
    _plot_cdf(ax_c, eg, eu, log_y, false_radius_m)
    counts = f"{len(fl.recs)} fixes: {len(fl.good)} trusted, {len(fl.bad)} untrusted"
    fig.suptitle(counts + (f", {fl.n_none} without a position" if fl.n_none else ""), fontsize=11)
    out = Path(out_png)
    atomic_save(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out
