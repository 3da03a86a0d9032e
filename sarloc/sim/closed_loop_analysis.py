"""Numbers and plots of a recorded closed-loop flight (:mod:`sarloc.sim.closed_loop`): :func:`analyse`.

Reads the flight folder (``events.json``, ``telemetry.jsonl``, ``daemon/records.jsonl`` and the map pack's
``pack.json``) and compares the autopilot's own estimate, sarloc's windows and the positions it sent with the
simulator's truth.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import SarlocError

logger = logging.getLogger(__name__)

EKF_GPS_GLITCHING = 0x8000  # EKF_STATUS_FLAGS (ArduPilot's ardupilotmega.xml)

__all__ = ["analyse"]


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_bytes().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


def _track_at(track: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N, 2) positions of a ``(t, x, y)`` track, linearly interpolated at times ``t``."""
    return np.stack([np.interp(t, track[:, 0], track[:, 1]), np.interp(t, track[:, 0], track[:, 2])], axis=1)


def _error_stats(err: np.ndarray, gsd: float) -> dict[str, float | None]:
    """Median, 99th percentile and maximum of position errors, metres and map pixels."""
    return {
        "median": _pct(err, 50),
        "p99": _pct(err, 99),
        "max": float(err.max()) if len(err) else None,
        "median_px": _pct(err / gsd, 50),
        "p99_px": _pct(err / gsd, 99),
    }


def _truth_and_estimate(
    out: Path, tel: list[dict[str, Any]], to_m
) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """The simulator's truth and the autopilot's own estimate as ``(t, x, y)`` tracks in the pack's metric frame,
    and the GLOBAL_POSITION_INT records the estimate comes from.

    Raises:
        SarlocError: no truth was recorded.
    """
    truth = np.array(
        [
            (r["wall_s"], *to_m.transform(r["lon_deg"], r["lat_deg"]))
            for r in tel
            if r["type"] == "truth" and (r["lat_deg"] or r["lon_deg"])
        ]
    )
    if len(truth) < 2:
        raise SarlocError(f"{out}: no simulator truth recorded")
    gpi = [r for r in tel if r["type"] == "GLOBAL_POSITION_INT" and r["lat"] and r["lon"]]
    est = np.array([(r["wall_s"], *to_m.transform(r["lon"] * 1e-7, r["lat"] * 1e-7)) for r in gpi])
    est = est[np.hypot(*(est[:, 1:] - _track_at(truth, est[:, 0])).T) < 50_000.0]  # before the EKF's origin
    return truth, gpi, est


def _position_steps(gpi: list[dict[str, Any]], est: np.ndarray, t_deny: float) -> dict[str, Any]:
    """Silent position resets: steps of the autopilot's position beyond what its own velocity explains."""
    vel = {r["wall_s"]: (r["vx"] * 0.01, r["vy"] * 0.01) for r in gpi}
    steps = []
    for (t0, x0, y0), (t1, x1, y1) in itertools.pairwise(est):
        vn, ve = vel.get(t0, (0.0, 0.0))
        steps.append((t1, float(np.hypot(x1 - x0 - ve * (t1 - t0), y1 - y0 - vn * (t1 - t0)))))
    st_after = [d for t, d in steps if t >= t_deny + 2.0]
    st_switch = [d for t, d in steps if t_deny <= t < t_deny + 2.0]
    return {
        "at_switch_max": max(st_switch) if st_switch else None,
        "after_switch_max": max(st_after) if st_after else None,
        "after_switch_over_5m": sum(d > 5.0 for d in st_after),
    }


def _autopilot_events(
    ev: dict[str, Any], tel: list[dict[str, Any]], t_deny: float, t_end: float | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """EKF and GPS events after the denial, and the availability of sarloc's GPS; also returns the GPS2_RAW
    records it is computed from."""
    res: dict[str, Any] = {}
    texts = [(t, s) for t, _, s in ev.get("statustexts", []) if t >= t_deny]
    bad_words = ("glitch", "reset", "lane switch", "stopped aiding", "gps yaw", "failsafe", "dcm active", "variance")
    res["statustexts_after_denial"] = [s for _, s in texts]
    res["ekf_warnings_after_denial"] = [s for _, s in texts if any(w in s.lower() for w in bad_words)]
    raw = [r for r in tel if r["type"] == "GPS_RAW_INT" and r["wall_s"] >= t_deny]
    first_ok = next((r["wall_s"] for r in raw if r["fix_type"] >= 3), None)
    res["primary_gps_fix_after_denial_s"] = None if first_ok is None else first_ok - t_deny
    ekf = [r for r in tel if r["type"] == "EKF_STATUS_REPORT" and r["wall_s"] >= t_deny]
    pos_abs = [r for r in ekf if r["flags"] & 0x10 and not r["flags"] & 0x80]  # POS_HORIZ_ABS, not CONST_POS
    res["ekf_abs_position_fraction"] = len(pos_abs) / len(ekf) if ekf else None
    res["ekf_const_pos_mode_reports"] = sum(1 for r in ekf if r["flags"] & 0x80)

    # EKF_GPS_GLITCHING: EKF3's GPS quality check failed (its filtered speed accuracy above 1.5 m/s until it is
    # back under 1.0, or its innovations too large); ArduCopter says "GPS Glitch or Compass error" when it is set
    def glitching(sel: list[dict[str, Any]]) -> dict[str, Any]:
        g = np.array([bool(r["flags"] & EKF_GPS_GLITCHING) for r in sel])
        return {
            "fraction": float(g.mean()) if len(g) else None,
            "onsets": int(g[0] + np.sum(g[1:] & ~g[:-1])) if len(g) else 0,
        }

    # the mission (to the RTL), and the return home with the loiter over it
    res["ekf_gps_glitching"] = glitching([r for r in ekf if r["wall_s"] <= (t_end or 1e18)])
    if t_end is not None:
        res["ekf_gps_glitching_rtl"] = glitching([r for r in ekf if r["wall_s"] > t_end])
    # availability: the autopilot's echo of sarloc's GPS (GPS2_RAW) with a 3-D fix
    g2 = [r for r in tel if r["type"] == "GPS2_RAW" and r["wall_s"] >= t_deny and r["wall_s"] <= (t_end or 1e18)]
    res["availability"] = sum(r["fix_type"] >= 3 for r in g2) / len(g2) if g2 else None
    return res, g2


def _velocity_track(g2: list[dict[str, Any]], tel: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(t, speed accuracy)`` and the (north, east) velocity errors against the truth of what the autopilot took
    from sarloc (its GPS2_RAW echo with a 3-D fix and a speed accuracy), or None."""
    tr = np.array([(r["wall_s"], r["vn_mps"], r["ve_mps"]) for r in tel if r["type"] == "truth"])
    g = [r for r in g2 if r["fix_type"] >= 3 and r.get("vel_acc")]
    if len(tr) < 2 or not g:
        return None
    t = np.array([r["wall_s"] for r in g])
    cog = np.radians([r["cog"] * 0.01 for r in g])
    spd = np.array([r["vel"] * 0.01 for r in g])
    acc = np.array([r["vel_acc"] * 0.001 for r in g])
    vn, ve = np.interp(t, tr[:, 0], tr[:, 1]), np.interp(t, tr[:, 0], tr[:, 2])
    return np.stack([t, acc], axis=1), np.stack([spd * np.cos(cog) - vn, spd * np.sin(cog) - ve], axis=1)


def _sent_velocity(g2: list[dict[str, Any]], tel: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The velocity and speed accuracy the autopilot took from sarloc against the simulator's truth: error per
    axis (north, east) and how often it falls within the stated accuracy (a one-sigma per axis: 68 % if honest)."""
    v = _velocity_track(g2, tel)
    if v is None:
        return None
    (_, acc), err = v[0].T, v[1]
    a = np.abs(err)
    return {
        "error_per_axis_rms_mps": float(np.sqrt(np.mean(err**2))),
        "error_per_axis_p95_mps": _pct(a.ravel(), 95),
        "speed_accuracy_median_mps": _pct(acc, 50),
        "speed_accuracy_p95_mps": _pct(acc, 95),
        "within_speed_accuracy": float(np.mean(a <= acc[:, None])),
    }


def _daemon_results(recs: list[dict[str, Any]], truth: np.ndarray, t_deny: float, gsd: float) -> dict[str, Any]:
    """The daemon: windows applied, false fixes (> 5 map pixels from the truth at their acquisition time), the
    error of the positions it sent, its final counters."""
    res: dict[str, Any] = {}
    wins = [r for r in recs if r.get("type") == "window" and r.get("vehicle_xy_m")]
    applied = [w for w in wins if w.get("nav") == "applied" or str(w.get("nav", "")).startswith("consensus")]
    # held until another window agreed with it, then applied (its application time is the later record's)
    applied += [r for r in recs if r.get("type") == "window_late" and r.get("nav") == "applied"]
    if applied:
        wt = np.array([w["t_s"] for w in applied])
        wxy = np.array([w["vehicle_xy_m"] for w in applied])
        werr = np.hypot(*(wxy - _track_at(truth, wt)).T)
        lat = np.array([w["wall_s"] - w["t_s"] for w in applied])
        res["windows"] = {
            "total": len(wins),
            "applied": len(applied),
            "applied_error_median_m": _pct(werr, 50),
            "false_applied_gt5px": int((werr > 5 * gsd).sum()),
            "latency_acquisition_to_applied_s": {"median": _pct(lat, 50), "p95": _pct(lat, 95)},
        }
    navr = [r for r in recs if r.get("type") == "nav" and "event" not in r and r.get("valid")]
    if navr:
        nt = np.array([r["wall_s"] for r in navr])
        nxy = np.array([r["xy_m"] for r in navr])
        ne = np.hypot(*(nxy - _track_at(truth, nt)).T)
        m = nt >= t_deny
        res["sent_position_error_m"] = {"median": _pct(ne[m], 50), "p99": _pct(ne[m], 99)}
        sig = np.array([r.get("sigma_h_m") or np.nan for r in navr])[m]
        ok = np.isfinite(sig) & (sig > 0)
        if ok.any():  # is the stated one-sigma honest? (an isotropic 2-D Gaussian: 39 / 86 / 98.9 % within 1 / 2 / 3)
            z = ne[m][ok] / sig[ok]
            res["sent_sigma_consistency"] = {f"within_{k}_sigma": float(np.mean(z <= k)) for k in (1, 2, 3)} | {
                "error_over_sigma_median": _pct(z, 50),
                "error_over_sigma_p99": _pct(z, 99),
                "sigma_median_m": _pct(sig[ok], 50),
                "sigma_p99_m": _pct(sig[ok], 99),
            }
    stop = next((r for r in reversed(recs) if r.get("type") == "stop"), None)
    if stop:
        keys = (
            "windows",
            "windows_applied",
            "windows_gated",
            "windows_corroborated",
            "windows_expired",
            "output",
            "gnss_aiding",
        )
        res["daemon"] = {k: stop["stats"].get(k) for k in keys}
        res["daemon"]["nav"] = stop["stats"].get("nav")
        res["daemon"]["mavlink"] = stop["stats"].get("mavlink")
    return res


def analyse(out_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Numbers (and plots) of a recorded closed loop: the autopilot's own position error against the truth, EKF
    events after the denial, fix availability, false fixes, latency, whether it came home."""
    import pyproj

    out = Path(out_dir)
    ev = json.loads((out / "events.json").read_text())
    tel = _load_jsonl(out / "telemetry.jsonl")
    recs = _load_jsonl(out / "daemon" / "records.jsonl")
    pack_json = json.loads((Path(ev["pack"]) / "pack.json").read_text())
    grid = pack_json["grid"]
    crs, gsd = grid["metric_crs"], float(grid["gsd_m"])
    to_m = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    truth, gpi, est = _truth_and_estimate(out, tel, to_m)
    t_deny = ev.get("denied_wall_s")
    t_end = ev.get("rtl_wall_s") or (truth[-1, 0] if t_deny else None)
    res: dict[str, Any] = {
        "vehicle": ev["config"]["vehicle"],
        "scene": Path(ev["config"]["scene"]).name,
        "map_gsd_m": gsd,
        "denied": t_deny is not None,
        "params": ev["params"],
    }
    if t_deny is None:
        res["note"] = "GNSS was never denied (sarloc's position never reached the autopilot)"
        return res
    after = est[:, 0] >= t_deny
    e_all = np.hypot(*(est[:, 1:] - _track_at(truth, est[:, 0])).T)
    e = e_all[after & (est[:, 0] <= truth[-1, 0])]
    res["denied_s"] = float(truth[-1, 0] - t_deny)
    res["denied_until_rtl_s"] = float(t_end - t_deny) if t_end else None
    res["autopilot_error_m"] = {**_error_stats(e, gsd), "before_denial_median": _pct(e_all[~after], 50)}
    if t_end:  # the mission itself, and the return home (a plane circles over home: no SAR strips then)
        in_mission = after & (est[:, 0] <= t_end)
        res["autopilot_error_mission_m"] = _error_stats(e_all[in_mission], gsd)
        res["autopilot_error_rtl_m"] = _error_stats(e_all[est[:, 0] > t_end], gsd)
    res["autopilot_position_steps_m"] = _position_steps(gpi, est, t_deny)
    events, g2 = _autopilot_events(ev, tel, t_deny, t_end)
    res.update(events)
    res["sent_velocity"] = _sent_velocity(g2, tel)
    if t_end is not None:  # the return home and the loiter over it (no strips while circling)
        g2_rtl = [r for r in tel if r["type"] == "GPS2_RAW" and r["wall_s"] > t_end]
        res["sent_velocity_rtl"] = _sent_velocity(g2_rtl, tel)
    res.update(_daemon_results(recs, truth, t_deny, gsd))
    res["daemon_stop_s"] = ev.get("daemon_stop_s")
    # home: distance from home at the end
    home_xy = np.array(to_m.transform(ev["home"][1], ev["home"][0]))
    res["final_distance_from_home_m"] = float(np.hypot(*(truth[-1, 1:] - home_xy)))
    res["returned_home"] = bool(ev.get("rtl_wall_s")) and res["final_distance_from_home_m"] < 300.0
    res["timed_out"] = bool(ev.get("timed_out"))
    if plots:
        try:
            res["plots"] = _plots(out, truth, est, e_all, t_deny, t_end, g2, gsd, home_xy, ev, tel)
        except ImportError:
            logger.warning("matplotlib missing: no closed-loop plots")
    return res


def _plots(out, truth, est, err, t_deny, t_end, g2, gsd, home_xy, ev, tel) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarloc.core.scene import load_scene

    paths = []
    scene = load_scene(ev["scene"])
    f = scene.frame
    hx, hy = float(home_xy[0]), float(home_xy[1])
    (x0, x1), (y0, y1) = (np.asarray(v, float) for v in f.pixel_to_metric([0.0, f.width_px], [0.0, f.height_px]))
    x0, x1, y0, y1 = x0 - hx, x1 - hx, y0 - hy, y1 - hy
    fig, ax = plt.subplots(figsize=(7, 7))
    source = str((scene.meta.get("placement") or {}).get("source_scene", scene.path))
    if "shared/data" not in source:  # research-only scenes are never drawn: their results are numbers only
        img = np.asarray(scene.optical_gray, float)
        lo, hi = np.percentile(img, (2, 98))
        ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1), cmap="gray", extent=(x0, x1, y1, y0))
    ax.plot(truth[:, 1] - hx, truth[:, 2] - hy, "-", color="#2ca02c", lw=1.2, label="truth (simulator)")
    m = est[:, 0] >= t_deny
    ax.plot(est[~m, 1] - hx, est[~m, 2] - hy, ".", color="#1f77b4", ms=1.5, label="autopilot estimate, GNSS")
    ax.plot(est[m, 1] - hx, est[m, 2] - hy, ".", color="#d62728", ms=1.5, label="autopilot estimate, sarloc only")
    ax.plot(0.0, 0.0, "k*", ms=12, label="home")
    i = min(int(np.searchsorted(truth[:, 0], t_deny)), len(truth) - 1)
    ax.plot(truth[i, 1] - hx, truth[i, 2] - hy, "kx", ms=10, label="GNSS denied")
    ax.annotate("N", xy=(0.95, 0.95), xytext=(0.95, 0.86), xycoords="axes fraction", ha="center",
                arrowprops={"arrowstyle": "-|>", "color": "w"}, color="w")  # fmt: skip
    span = np.concatenate([truth[:, 1:] - (hx, hy), est[:, 1:] - (hx, hy)])
    lo_xy, hi_xy = span.min(axis=0) - 800.0, span.max(axis=0) + 800.0
    ax.set_xlim(lo_xy[0], hi_xy[0])
    ax.set_ylim(lo_xy[1], hi_xy[1])
    ax.set_xlabel("east of home (m)")
    ax.set_ylabel("north of home (m)")
    ax.set_aspect("equal")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"{ev['config']['vehicle']} over {Path(ev['scene']).name}: closed loop with ArduPilot SITL")
    p = out / "track.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(p))
    fig, (a1, a3, a2) = plt.subplots(3, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2, 1))
    t = est[:, 0] - t_deny
    a1.plot(t, err, lw=0.8)
    a1.axvline(0, color="k", ls="--", lw=0.8)
    a1.axhline(2 * gsd, color="g", ls=":", lw=0.8, label="2 map px")
    a1.axhline(5 * gsd, color="r", ls=":", lw=0.8, label="5 map px")
    a1.set_ylabel("autopilot error (m)")
    a1.legend(fontsize=8)
    if g2:
        tg = np.array([r["wall_s"] for r in g2]) - t_deny
        a2.plot(tg, [r["fix_type"] for r in g2], drawstyle="steps-post")
    a2.set_ylabel("GPS2 (sarloc)\nfix type")
    v = _velocity_track(g2, tel)
    if v is not None:
        (tv, acc), verr = v[0].T, v[1]
        a3.plot(
            tv - t_deny,
            np.hypot(*verr.T) / np.sqrt(2),
            lw=0.6,
            color="#7f7f7f",
            label="sent velocity error (rms per axis)",
        )
        a3.plot(tv - t_deny, acc, lw=0.9, color="#ff7f0e", label="sent speed accuracy")
    ekf = [
        (r["wall_s"] - t_deny, bool(r["flags"] & EKF_GPS_GLITCHING))
        for r in tel
        if r["type"] == "EKF_STATUS_REPORT" and r["wall_s"] >= t_deny
    ]
    if ekf:
        te, ge = np.array(ekf).T
        a3.fill_between(
            te,
            0,
            1,
            where=ge > 0,
            transform=a3.get_xaxis_transform(),
            color="r",
            alpha=0.12,
            lw=0,
            label="EKF3: GPS glitching",
        )
    for y in (1.0, 1.5):
        a3.axhline(y, color="k", ls=":", lw=0.7)
    a3.set_ylabel("m/s")
    a3.set_ylim(0, 3)
    a3.legend(fontsize=7, loc="upper right")
    a2.set_xlabel("time since GNSS denial (s)")
    p = out / "error.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(p))
    if t_end is not None and (p := _return_plot(plt, out, tel, t_end)) is not None:
        paths.append(p)
    return paths


def _yaw_error_deg(tel: list[dict[str, Any]], t0: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``(t, degrees)``: the autopilot's yaw (ATTITUDE, else GLOBAL_POSITION_INT hdg) minus the simulator's from
    ``t0`` on, or None without either."""
    tr = np.array([(r["wall_s"], r["yaw_deg"]) for r in tel if r["type"] == "truth" and "yaw_deg" in r])
    yaw = [(r["wall_s"], math.degrees(r["yaw"])) for r in tel if r["type"] == "ATTITUDE" and r["wall_s"] >= t0]
    if not yaw:
        yaw = [
            (r["wall_s"], r["hdg"] * 0.01)
            for r in tel
            if r["type"] == "GLOBAL_POSITION_INT" and r["wall_s"] >= t0 and r["hdg"] != 65535
        ]
    if len(tr) < 2 or not yaw:
        return None
    y = np.array(yaw)
    truth = np.interp(y[:, 0], tr[:, 0], np.degrees(np.unwrap(np.radians(tr[:, 1]))))
    return y[:, 0], (y[:, 1] - truth + 180.0) % 360.0 - 180.0


def _return_plot(plt: Any, out: Path, tel: list[dict[str, Any]], t_end: float) -> str | None:
    """``return.png``: from the RTL on (a plane circles over home at the end), the velocity sent against its speed
    accuracy and the autopilot's yaw error, which EKF3 draws after the velocity sent while turning."""
    g2 = [r for r in tel if r["type"] == "GPS2_RAW" and r["wall_s"] > t_end]
    v = _velocity_track(g2, tel)
    yaw = _yaw_error_deg(tel, t_end)
    if v is None or yaw is None:
        return None
    (tv, acc), verr = v[0].T, v[1]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a1.plot(
        tv - t_end, np.hypot(*verr.T) / np.sqrt(2), lw=0.6, color="#7f7f7f", label="sent velocity error (rms per axis)"
    )
    a1.plot(tv - t_end, acc, lw=0.9, color="#ff7f0e", label="sent speed accuracy")
    a1.axhline(1.5, color="k", ls=":", lw=0.7)
    a1.set_ylabel("m/s")
    a1.legend(fontsize=7, loc="upper left")
    a2.plot(yaw[0] - t_end, yaw[1], lw=0.8, color="#1f77b4")
    a2.axhline(0.0, color="k", lw=0.6)
    a2.set_ylabel("autopilot yaw error (deg)")
    a2.set_xlabel("time since RTL (s)")
    a1.set_title("return home: the velocity sent and the autopilot's yaw")
    p = out / "return.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(p)
