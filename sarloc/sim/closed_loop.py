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
   texts; ``daemon/records.jsonl``; ``events.json``) and :func:`~sarloc.sim.closed_loop_analysis.analyse` (re-exported
   here) turns it into numbers and plots.

Time: the simulator runs at ``speedup`` 1 (real time) and every component stamps with this computer's UNIX clock,
which the daemon uses as ``clock = unix`` (the autopilot's clock is SITL's, started from the same UNIX time).
"""

from __future__ import annotations

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
from typing import IO, Any

from sarloc.core.artifacts import atomic_write_json
from sarloc.core.errors import SarlocError
from sarloc.sim.closed_loop_analysis import analyse

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
#: An optical-flow camera and a downward rangefinder (SITL's own sensors) as EKF3's horizontal velocity source, so
#: that the autopilot's velocity does not come from sarloc's positions (a vehicle without airspeed, docs/autopilot.md),
#: and more weight on its compass
FLOW_PARAMS: dict[str, float] = {
    "FLOW_TYPE": 10,  # the SITL optical-flow sensor (a real one: its driver's type)
    "SIM_FLOW_ENABLE": 1,
    "RNGFND1_TYPE": 100,  # the SITL rangefinder, pointing down (RNGFND1_ORIENT 25, the default)
    "RNGFND1_MAX": 60,  # metres: flow fusion needs the height above ground, so fly below this
    "EK3_FLOW_USE": 1,  # flow for navigation
    "EK3_FLOW_M_NSE": 0.05,  # rad/s: the simulated sensor's noise (SIM_FLOW_RND); the default 0.25 is for low flight
    "EK3_SRC1_VELXY": 5,  # horizontal velocity from optical flow only: neither sarloc's nor the GNSS's is fused
    "EK3_SRC1_VELZ": 0,  # vertical velocity from the barometer and IMU
    "EK3_SRC_OPTIONS": 0,  # source set 1 alone
    # without GNSS the yaw rests on the compass; at the default 0.05 gauss the position steps of SAR fixes turned
    # EKF3's yaw by up to 9 degrees, and its flow velocity with it (docs/research/closed_loop.md)
    "EK3_MAG_M_NSE": 0.02,
}
#: The daemon's ``[nav]`` settings that go with FLOW_PARAMS (``motion = "velocity"``): with EKF3 trusting its compass
#: its yaw moved by 0.5 degrees (median; 2.3 at most) in the 30 s after a 90 degree turn without GNSS, no more than
#: on straight legs; at the filter's default 3 % per turn the heading's uncertainty after the turn home took the
#: speed accuracy sent past EKF3's 1.5 m/s glitch threshold (docs/research/closed_loop.md)
FLOW_NAV: dict[str, float] = {"heading_turn_fraction": 0.015}
#: What the test flights set beyond that (mission speed, not sarloc's business)
FLIGHT_PARAMS: dict[str, dict[str, float]] = {"plane": {}, "copter": {"WPNAV_SPEED": 1500}}

#: SERIAL ports: 0 = the test's ground station, 1 = sarloc (GPS_INPUT), 2 = the telemetry recorder
#: Ground speeds on the mission legs, measured in SITL (the copter holds 10 m/s although WPNAV_SPEED is 15)
VEHICLE_SPEED_MPS = {"plane": 22.0, "copter": 10.0}
#: Course deviation that ends a strip: a copter's course on a straight leg wanders by +-5 degrees (measured in SITL
#: at 10 m/s), which a SAR's motion compensation absorbs; a plane's stays within 1 degree
MAX_TURN_DEG = {"plane": 5.0, "copter": 12.0}


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
        motion: the daemon's motion input (default: ``airspeed`` for the plane; for the copter, which has no
            airspeed sensor, ``velocity`` with ``flow`` and ``strip`` without: without an independent velocity source
            the autopilot's velocity is built from sarloc's own positions once the GNSS is gone).
        nav: the daemon's ``[nav]`` settings beyond its defaults (e.g. ``{"course_sigma_deg": 0.0}``).
        fusion: the daemon's ``[fusion]`` settings beyond its defaults (e.g. ``{"window_sigma_scale": 1.0}``).
        gnss_aiding: the daemon's ``gnss_aiding`` (the autopilot's GNSS reaches its filter until the denial).
        max_turn_deg: a strip ends where the course leaves its heading by more than this (default per vehicle:
            :data:`MAX_TURN_DEG`).
        flow: give the vehicle SITL's optical-flow camera and rangefinder (:data:`FLOW_PARAMS`); fly below
            ``RNGFND1_MAX``.
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
    flow: bool = False
    max_turn_deg: float | None = None
    nav: dict[str, float] = field(default_factory=dict)
    fusion: dict[str, float] = field(default_factory=dict)
    gnss_aiding: bool = False


def _prepare(cfg: ClosedLoopConfig, out: Path):
    """The (placed) scene, its map pack and the home position."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
    from sarloc.core.scene import load_scene
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.sim.placement import geo_place_scene

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
    motion = cfg.motion or ("airspeed" if cfg.vehicle == "plane" else "velocity" if cfg.flow else "strip")
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
gnss_aiding = {str(cfg.gnss_aiding).lower()}

[mavlink]
enabled = true
url = "{mav_url}"
gps_id = 1
gps_rate_hz = 10.0
require_autopilot_s = 60.0
"""
    nav = {**(FLOW_NAV if cfg.flow and motion == "velocity" else {}), **cfg.nav}
    if nav:
        text += "\n[nav]\n" + "".join(f"{k} = {float(v)!r}\n" for k, v in nav.items())
    if cfg.fusion:
        text += "\n[fusion]\n" + "".join(f"{k} = {float(v)!r}\n" for k, v in cfg.fusion.items())
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
                max_turn_deg=cfg.max_turn_deg or MAX_TURN_DEG[cfg.vehicle],
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


def _autopilot_params(cfg: ClosedLoopConfig) -> dict[str, float]:
    """The autopilot parameters of a flight: the closed loop's, the vehicle's, the test flight's, then extras."""
    return {
        **AUTOPILOT_PARAMS["common"],
        **AUTOPILOT_PARAMS[cfg.vehicle],
        **FLIGHT_PARAMS[cfg.vehicle],
        **(FLOW_PARAMS if cfg.flow else {}),
        **cfg.extra_params,
    }


def _start_daemon(toml: Path, out: Path) -> tuple[subprocess.Popen, IO[bytes]]:
    """Start ``sarloc run --config toml`` in a child process logging to ``out/daemon.log``; returns it and the log."""
    log = open(out / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "sarloc.cli", "run", "--config", str(toml)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return daemon, log


def _shut_down(daemon: subprocess.Popen, log: IO[bytes], rec, feeder: _Feeder, vehicle, events: dict[str, Any]) -> None:
    """Stop the daemon (TERM, KILL after 20 s), the recorder and the strip feeder; record what they report."""
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
    params = _autopilot_params(cfg)
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
    t_start = time.time()
    with Sitl(sitl_cfg) as sitl:
        events["sitl_log"] = str(sitl.log_path)
        vehicle = Vehicle(sitl.gcs_url)
        feeder = _Feeder(scene, cfg, f"udp://127.0.0.1:{(port := _free_udp_port())}")
        rec = TelemetryRecorder(sitl.serial2_url, out / "telemetry.jsonl")
        rec.on_truth(feeder)
        rec.start()
        toml = _daemon_config(cfg, export, pack, out, port, sitl.serial1_url)
        daemon, log = _start_daemon(toml, out)
        try:
            vehicle.wait_ekf_ready(120)
            vehicle.upload_mission(wps, takeoff_alt_m=cfg.alt_m)
            vehicle.arm(timeout_s=90)
            events["armed_wall_s"] = time.time()
            vehicle.start_mission()
            events["mission_start_wall_s"] = time.time()
            _fly(cfg, vehicle, rec, daemon, events, len(wps) + 2, t_start)
        finally:
            _shut_down(daemon, log, rec, feeder, vehicle, events)
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
        # (a copter that lands at the end of its mission disarms in AUTO, and its mission restarts at item 0)
        if state["seq"] >= rtl_seq or state["mode"] in ("RTL", "LAND", "QRTL") or "rtl_wall_s" in events:
            events.setdefault("rtl_wall_s", now)
            if cfg.vehicle == "copter" and not state["armed"]:
                events["landed_wall_s"] = now
                return
            if now - events["rtl_wall_s"] > cfg.rtl_hold_s:
                return  # a plane loiters over home after RTL; a copter that has not landed yet is reported so
    events["timed_out"] = True
