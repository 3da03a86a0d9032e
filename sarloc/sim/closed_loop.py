"""A closed loop with a real autopilot: ArduPilot SITL flies on sarloc's positions after GNSS is denied.

Pieces (each a process or a thread, talking MAVLink and UDP on the loopback interface only)::

    ArduPilot SITL --SIM_STATE (truth)--> StripCutter --SAR strips (SLS1/UDP)--> sarloc run (the daemon)
         ^                                                                           |
         +---------------------- GPS_INPUT at 10 Hz on SERIAL1 (GPS2) ----------------+

1. The scene's optical image becomes a map pack (the daemon's map); the scene's SAR image is what the simulated
   sensor sees. A scene without a geo-reference is placed at ``place_lat_lon`` first (a synthetic, documented
   placement). The vehicle's home is the scene centre.
2. SITL starts with its simulated GNSS as GPS1 and sarloc as GPS2 (``GPS2_TYPE=14``, MAVLink), with the parameters
   of :data:`AUTOPILOT_PARAMS`. The vehicle takes off on GNSS and flies a mission of laps of a rectangle around
   home, then RTL.
3. :class:`~sarloc.sim.live_strips.StripCutter` follows the true trajectory (SIM_STATE, read on SERIAL2) and cuts
   SAR strips from the scene as the vehicle flies; the daemon localises them against the pack and sends GPS_INPUT.
4. Once sarloc's position reaches the autopilot (its GPS2 echo has a 3-D fix) and ``deny_after_s`` of flight have
   passed, the simulated GNSS is switched off (``SIM_GPS1_ENABLE=0``): from then on the autopilot navigates on
   sarloc alone, to the end of the mission and home.
5. Everything is recorded (``telemetry.jsonl``: truth, the autopilot's own estimate, EKF flags, GPS echoes, status
   texts; ``daemon/records.jsonl``; ``events.json``) and :func:`analyse` turns it into numbers and plots.

Time: the simulator runs at ``speedup`` 1 (real time) and every component stamps with this computer's UNIX clock,
which the daemon uses as ``clock = unix`` (the autopilot's clock is SITL's, started from the same UNIX time).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import atomic_write_json
from sarloc.core.errors import SarlocError

logger = logging.getLogger(__name__)

__all__ = ["AUTOPILOT_PARAMS", "ClosedLoopConfig", "analyse", "run_closed_loop"]

#: Autopilot parameters of the closed loop, beyond each vehicle's SITL defaults (docs/autopilot.md says why).
AUTOPILOT_PARAMS: dict[str, dict[str, float]] = {
    "common": {
        "GPS2_TYPE": 14,  # GPS2 = MAVLink GPS_INPUT (sarloc)
        "GPS_AUTO_SWITCH": 1,  # use the best GPS: the GNSS while it has a fix, sarloc when it loses it (default)
        "GPS2_DELAY_MS": 1,  # sarloc sends its position predicted to the sending time: no lag to compensate
        # sarloc has no fix on the ground, and the pre-arm check wants one from every configured GPS: skip the
        # "GPS lock" check (bit 3) and keep the others; the harness waits for GPS1's fix and EKF3 before arming
        "ARMING_CHECK": 1048566,
    },
    "plane": {},
    "copter": {},
}
#: What the test flights set beyond that (mission speed, not sarloc's business)
FLIGHT_PARAMS: dict[str, dict[str, float]] = {"plane": {}, "copter": {"WPNAV_SPEED": 1500}}

#: SERIAL ports: 0 = the test's ground station, 1 = sarloc (GPS_INPUT), 2 = the telemetry recorder
VEHICLE_SPEED_MPS = {"plane": 22.0, "copter": 15.0}


@dataclass(frozen=True)
class ClosedLoopConfig:
    """One closed-loop flight.

    Attributes:
        scene: scene folder (its optical image is the map, its SAR image what the sensor sees).
        out: output folder.
        vehicle: ``plane`` (ArduPlane) or ``copter`` (ArduCopter quad).
        export: model export folder (default: the shipped demo model).
        place_lat_lon: where to place a scene without geo-reference (its centre); ignored for geo-referenced scenes.
        home_alt_m: home altitude above mean sea level (also the daemon's ``field_elevation_m``).
        alt_m: mission altitude above home.
        half_size_m: half the side of the mission rectangle (default: 30 % of the scene's smaller side).
        denied_s: GNSS-denied flight to plan for (the number of laps follows from it).
        deny_after_s: flight on GNSS (after take-off) before the denial, at least.
        instance: SITL ``-I`` (ports 5760 + 10 * instance ...).
        stride_px: the daemon's window spacing, map pixels.
        prior_radius_m: the daemon's search radius around its track.
        strip_width_px, strip_rows, block_rows: the simulated SAR strips.
        heading_noise_deg: noise on the strip metadata's heading.
        timeout_s: the whole flight may take at most this long (wall clock).
        rtl_hold_s: after RTL, watch the vehicle this long (a plane loiters over home; a copter lands).
        extra_params: more autopilot parameters.
        pack: an existing map pack of this scene and export to reuse (default: build one in ``out``).
        motion: the daemon's motion input (default: ``airspeed`` for the plane, ``strip`` for the copter, which has
            no airspeed sensor; ``velocity`` would feed the autopilot's velocity, built from sarloc's own positions
            once the GNSS is gone, back to it).
    """

    scene: str
    out: str
    vehicle: str = "plane"
    export: str | None = None
    place_lat_lon: tuple[float, float] = (47.3769, 8.5417)
    home_alt_m: float = 400.0
    alt_m: float = 150.0
    half_size_m: float | None = None
    denied_s: float = 600.0
    deny_after_s: float = 30.0
    instance: int = 3
    stride_px: float = 16.0
    prior_radius_m: float = 1500.0
    strip_width_px: int = 160
    strip_rows: int = 256
    block_rows: int = 16
    heading_noise_deg: float = 0.5
    timeout_s: float = 3600.0
    rtl_hold_s: float = 180.0
    extra_params: dict[str, float] = field(default_factory=dict)
    pack: str | None = None
    motion: str | None = None


def _prepare(cfg: ClosedLoopConfig, out: Path):
    """The (placed) scene, its map pack and the home position."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
    from sarloc.core.scene import load_scene
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.sim.live_strips import geo_place_scene

    scene = load_scene(cfg.scene)
    if not scene.frame.georeferenced:
        lat, lon = cfg.place_lat_lon
        placed = out / "scene"
        geo_place_scene(scene.path, placed, lat_deg=lat, lon_deg=lon, force=True)
        scene = load_scene(placed)
    export = Path(cfg.export) if cfg.export else MODEL_DIR
    pack = Path(cfg.pack) if cfg.pack else out / "pack"
    if not (pack / "pack.json").is_file():
        build_map_pack(scene.path, export / "optical_encoder.onnx", pack, MapPackConfig(), progress=True)
    f = scene.frame
    lon, lat = f.pixel_to_lonlat(f.width_px / 2.0, f.height_px / 2.0)
    return scene, export, pack, (float(lat), float(lon))


def _mission(scene, home: tuple[float, float], cfg: ClosedLoopConfig) -> tuple[list[tuple[float, float, float]], int]:
    """Laps of a rectangle centred on home (lat, lon, alt above home), enough for ``denied_s`` plus the rest."""
    import pyproj

    f = scene.frame
    crs = f.metric_crs
    to_m = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    to_ll = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    x0, y0 = to_m.transform(home[1], home[0])
    side = min(f.width_px * f.gsd_m[0], f.height_px * f.gsd_m[1])
    h = cfg.half_size_m if cfg.half_size_m else 0.3 * side
    corners = [(x0 - h, y0 + h), (x0 + h, y0 + h), (x0 + h, y0 - h), (x0 - h, y0 - h)]
    lap_s = 8 * h / VEHICLE_SPEED_MPS[cfg.vehicle]
    laps = max(1, math.ceil((cfg.denied_s + cfg.deny_after_s + 240.0) / lap_s))  # + take-off, first fixes
    wps = []
    for _ in range(laps):
        for x, y in corners:
            lon, lat = to_ll.transform(x, y)
            wps.append((float(lat), float(lon), cfg.alt_m))
    return wps, laps


def _daemon_config(cfg: ClosedLoopConfig, export: Path, pack: Path, out: Path, udp_port: int, mav_url: str) -> Path:
    motion = cfg.motion or ("airspeed" if cfg.vehicle == "plane" else "strip")
    text = f"""# sarloc run --config this file: the daemon of the closed loop
source = "udp://127.0.0.1:{udp_port}"
export = "{export}"
pack = "{pack}"
out = "{out / "daemon"}"
stride_px = {cfg.stride_px}
prior_radius_m = {cfg.prior_radius_m}
clock = "unix"
motion = "{motion}"
field_elevation_m = {cfg.home_alt_m}
verify_pack = false

[mavlink]
enabled = true
url = "{mav_url}"
gps_id = 1
gps_rate_hz = 10.0
require_autopilot_s = 60.0
"""
    p = out / "onboard.toml"
    p.write_text(text)
    return p


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Feeder:
    """Truth samples (SITL, lat/lon, true north) -> scene metric frame -> StripCutter -> UDP to the daemon."""

    def __init__(self, scene, cfg: ClosedLoopConfig, url: str) -> None:
        import pyproj

        from sarloc.core.geo import grid_convergence_deg
        from sarloc.sim.live_strips import StripCutter, StripCutterConfig, UdpStripFeeder

        crs = scene.frame.metric_crs
        self.to_m = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        c = scene.frame
        cx, cy = c.pixel_to_metric(c.width_px / 2.0, c.height_px / 2.0)
        self.conv_deg = grid_convergence_deg(crs, float(cx), float(cy))
        self.cutter = StripCutter(
            scene,
            StripCutterConfig(
                width_px=cfg.strip_width_px,
                max_rows=cfg.strip_rows,
                block_rows=cfg.block_rows,
                heading_noise_deg=cfg.heading_noise_deg,
                min_speed_mps=3.0,
            ),
        )
        self.udp = UdpStripFeeder(url)
        self.lock = threading.Lock()
        self.errors = 0

    def __call__(self, s) -> None:
        if s.lat_deg == 0.0 and s.lon_deg == 0.0:
            return  # the simulator has no state yet
        x, y = self.to_m.transform(s.lon_deg, s.lat_deg)
        speed = math.hypot(s.vn_mps, s.ve_mps)
        course = (math.degrees(math.atan2(s.ve_mps, s.vn_mps)) + self.conv_deg) % 360.0
        with self.lock:
            try:
                blocks = self.cutter.push(s.wall_s, float(x), float(y), course, speed)
                if blocks:
                    self.udp.send(blocks)
            except SarlocError as e:
                self.errors += 1
                if self.errors <= 3:
                    logger.warning("strip simulator: %s", e)


def run_closed_loop(cfg: ClosedLoopConfig) -> dict[str, Any]:
    """Fly one closed loop (module docstring) and return :func:`analyse`'s results (also in ``out/result.json``).

    Raises:
        SarlocError: SITL not found, or the vehicle did not get airborne / the daemon did not start.
    """
    from sarloc.sim.sitl import Sitl, SitlConfig, TelemetryRecorder, Vehicle, find_sitl

    if cfg.vehicle not in VEHICLE_SPEED_MPS:
        raise SarlocError(f"closed loop: vehicle must be plane or copter, got {cfg.vehicle!r}")
    if find_sitl() is None:
        raise SarlocError("ArduPilot SITL not found (../shared/sitl or SARLOC_SITL_DIR)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("telemetry.jsonl", "events.json", "result.json"):
        (out / name).unlink(missing_ok=True)
    scene, export, pack, home = _prepare(cfg, out)
    wps, laps = _mission(scene, home, cfg)
    params = {
        **AUTOPILOT_PARAMS["common"],
        **AUTOPILOT_PARAMS[cfg.vehicle],
        **FLIGHT_PARAMS[cfg.vehicle],
        **cfg.extra_params,
    }
    events: dict[str, Any] = {
        "config": asdict(cfg),
        "home": [home[0], home[1], cfg.home_alt_m],
        "params": params,
        "laps": laps,
        "waypoints": len(wps),
        "pack": str(pack),
        "scene": str(scene.path),
    }
    sitl_cfg = SitlConfig(
        vehicle=cfg.vehicle, instance=cfg.instance, home=(home[0], home[1], cfg.home_alt_m, 0.0), params=params
    )
    daemon = None
    t_start = time.time()
    with Sitl(sitl_cfg) as sitl:
        events["sitl_log"] = str(sitl.log_path)
        vehicle = Vehicle(sitl.gcs_url)
        feeder = _Feeder(scene, cfg, f"udp://127.0.0.1:{(port := _free_udp_port())}")
        rec = TelemetryRecorder(sitl.serial2_url, out / "telemetry.jsonl")
        rec.on_truth(feeder)
        rec.start()
        toml = _daemon_config(cfg, export, pack, out, port, sitl.serial1_url)
        log = open(out / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "sarloc.cli", "run", "--config", str(toml)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            vehicle.wait_ekf_ready(120)
            vehicle.upload_mission(wps, takeoff_alt_m=cfg.alt_m)
            vehicle.arm(timeout_s=90)
            events["armed_wall_s"] = time.time()
            vehicle.start_mission()
            events["mission_start_wall_s"] = time.time()
            _fly(cfg, vehicle, rec, daemon, events, len(wps) + 2, t_start)
        finally:
            events["statustexts"] = vehicle.statustexts
            t = time.time()
            daemon.send_signal(signal.SIGTERM)
            try:
                events["daemon_rc"] = daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                events["daemon_rc"] = "killed after 20 s"
            events["daemon_stop_s"] = time.time() - t
            log.close()
            rec.stop()
            feeder.udp.close()
            events["strips_truth"] = feeder.cutter.truth()
            events["feeder"] = {**feeder.udp.stats(), "errors": feeder.errors}
            vehicle.close()
            atomic_write_json(out / "events.json", events)
    res = analyse(out)
    atomic_write_json(out / "result.json", res)
    return res


def _fly(cfg, vehicle, rec, daemon, events: dict[str, Any], rtl_seq: int, t_start: float) -> None:
    """Wait for sarloc to reach the autopilot, deny GNSS, fly the mission home (the phases of the docstring)."""
    state = {"gps2_fix_since": None, "seq": 0, "mode": None, "armed": True}
    deadline = t_start + cfg.timeout_s
    denied = False
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise SarlocError(f"the daemon exited with {daemon.returncode}; see {cfg.out}/daemon.log")
        m = vehicle.recv(["GPS2_RAW", "MISSION_CURRENT", "HEARTBEAT"], 1.0)
        now = time.time()
        if m is None:
            continue
        t = m.get_type()
        if t == "GPS2_RAW":
            if m.fix_type >= 3:
                state["gps2_fix_since"] = state["gps2_fix_since"] or now
            else:
                state["gps2_fix_since"] = None
        elif t == "MISSION_CURRENT":
            state["seq"] = m.seq
        elif t == "HEARTBEAT" and m.get_srcComponent() == 1:
            import pymavlink.mavutil as mu

            state["mode"] = mu.mode_string_v10(m)
            state["armed"] = bool(m.base_mode & 128)
        if not denied:
            if now - events["mission_start_wall_s"] > 5 and now - (state.get("req") or 0) > 5:
                vehicle.request_message_intervals({"GPS2_RAW": 2, "MISSION_CURRENT": 1})
                state["req"] = now
            if state["seq"] >= rtl_seq:
                events["never_denied"] = "the mission ended before sarloc's position reached the autopilot"
                return
            g = state["gps2_fix_since"]
            flying = now - events["mission_start_wall_s"] >= cfg.deny_after_s and state["seq"] >= 2
            if g is not None and now - g >= 10.0 and flying:
                vehicle.deny_gnss()
                events["denied_wall_s"] = time.time()
                denied = True
                logger.info("GNSS denied at mission item %d", state["seq"])
            continue
        if state["seq"] >= rtl_seq or state["mode"] in ("RTL", "LAND", "QRTL"):
            events.setdefault("rtl_wall_s", now)
            if cfg.vehicle == "copter" and not state["armed"]:
                events["landed_wall_s"] = now
                return
            if now - events["rtl_wall_s"] > cfg.rtl_hold_s:
                return  # a plane loiters over home after RTL; a copter that has not landed yet is reported so
    events["timed_out"] = True


# ------------------------------------------------------------------------------------------------ analysis


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

    truth = np.array(
        [
            (r["wall_s"], *to_m.transform(r["lon_deg"], r["lat_deg"]))
            for r in tel
            if r["type"] == "truth" and (r["lat_deg"] or r["lon_deg"])
        ]
    )
    if len(truth) < 2:
        raise SarlocError(f"{out}: no simulator truth recorded")

    def truth_xy(t: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(t, truth[:, 0], truth[:, 1]), np.interp(t, truth[:, 0], truth[:, 2])], axis=1)

    gpi = [r for r in tel if r["type"] == "GLOBAL_POSITION_INT" and r["lat"] and r["lon"]]
    est = np.array([(r["wall_s"], *to_m.transform(r["lon"] * 1e-7, r["lat"] * 1e-7)) for r in gpi])
    est = est[np.hypot(*(est[:, 1:] - truth_xy(est[:, 0])).T) < 50_000.0]  # before the EKF's origin: no estimate
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
    e_all = np.hypot(*(est[:, 1:] - truth_xy(est[:, 0])).T)
    e = e_all[after & (est[:, 0] <= truth[-1, 0])]
    res["denied_s"] = float(truth[-1, 0] - t_deny)
    res["denied_until_rtl_s"] = float(t_end - t_deny) if t_end else None

    def stats(err: np.ndarray) -> dict[str, float | None]:
        return {
            "median": _pct(err, 50),
            "p99": _pct(err, 99),
            "max": float(err.max()) if len(err) else None,
            "median_px": _pct(err / gsd, 50),
            "p99_px": _pct(err / gsd, 99),
        }

    res["autopilot_error_m"] = {**stats(e), "before_denial_median": _pct(e_all[~after], 50)}
    if t_end:  # the mission itself, and the return home (a plane circles over home: no SAR strips then)
        in_mission = after & (est[:, 0] <= t_end)
        res["autopilot_error_mission_m"] = stats(e_all[in_mission])
        res["autopilot_error_rtl_m"] = stats(e_all[est[:, 0] > t_end])
    # silent position resets: a step of the autopilot's position beyond what its own velocity explains
    vel = {r["wall_s"]: (r["vx"] * 0.01, r["vy"] * 0.01) for r in gpi}
    steps = []
    for (t0, x0, y0), (t1, x1, y1) in itertools.pairwise(est):
        vn, ve = vel.get(t0, (0.0, 0.0))
        steps.append((t1, float(np.hypot(x1 - x0 - ve * (t1 - t0), y1 - y0 - vn * (t1 - t0)))))
    st_after = [d for t, d in steps if t >= t_deny + 2.0]
    st_switch = [d for t, d in steps if t_deny <= t < t_deny + 2.0]
    res["autopilot_position_steps_m"] = {
        "at_switch_max": max(st_switch) if st_switch else None,
        "after_switch_max": max(st_after) if st_after else None,
        "after_switch_over_5m": sum(d > 5.0 for d in st_after),
    }
    # EKF and GPS events after the denial
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
    # availability: the autopilot's echo of sarloc's GPS (GPS2_RAW) with a 3-D fix
    g2 = [r for r in tel if r["type"] == "GPS2_RAW" and r["wall_s"] >= t_deny and r["wall_s"] <= (t_end or 1e18)]
    res["availability"] = sum(r["fix_type"] >= 3 for r in g2) / len(g2) if g2 else None
    # the daemon: windows applied, false fixes (> 5 map pixels from the truth at their acquisition time)
    wins = [r for r in recs if r.get("type") == "window" and r.get("vehicle_xy_m")]
    applied = [w for w in wins if w.get("nav") == "applied" or str(w.get("nav", "")).startswith("consensus")]
    if applied:
        wt = np.array([w["t_s"] for w in applied])
        wxy = np.array([w["vehicle_xy_m"] for w in applied])
        werr = np.hypot(*(wxy - truth_xy(wt)).T)
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
        ne = np.hypot(*(nxy - truth_xy(nt)).T)
        m = nt >= t_deny
        res["sent_position_error_m"] = {"median": _pct(ne[m], 50), "p99": _pct(ne[m], 99)}
    stop = next((r for r in reversed(recs) if r.get("type") == "stop"), None)
    if stop:
        res["daemon"] = {k: stop["stats"].get(k) for k in ("windows", "windows_applied", "windows_gated", "output")}
        res["daemon"]["nav"] = stop["stats"].get("nav")
        res["daemon"]["mavlink"] = stop["stats"].get("mavlink")
    res["daemon_stop_s"] = ev.get("daemon_stop_s")
    # home: distance from home at the end
    home_xy = np.array(to_m.transform(ev["home"][1], ev["home"][0]))
    res["final_distance_from_home_m"] = float(np.hypot(*(truth[-1, 1:] - home_xy)))
    res["returned_home"] = bool(ev.get("rtl_wall_s")) and res["final_distance_from_home_m"] < 300.0
    res["timed_out"] = bool(ev.get("timed_out"))
    if plots:
        try:
            res["plots"] = _plots(out, truth, est, e_all, t_deny, t_end, g2, gsd, home_xy, ev)
        except ImportError:
            logger.warning("matplotlib missing: no closed-loop plots")
    return res


def _plots(out, truth, est, err, t_deny, t_end, g2, gsd, home_xy, ev) -> list[str]:
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
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
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
    a2.set_ylabel("GPS2 (sarloc) fix type")
    a2.set_xlabel("time since GNSS denial (s)")
    p = out / "error.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(p))
    return paths
