"""A small harness around ArduPilot SITL for tests and benchmarks (pymavlink only, torch-free).

Three pieces, each usable alone::

    cfg = SitlConfig(vehicle="copter", instance=7, speedup=5, params={"GPS2_TYPE": 14})
    with Sitl(cfg) as sitl, Vehicle(sitl.gcs_url) as vehicle:
        rec = TelemetryRecorder(sitl.serial2_url, tmp_path / "telemetry.jsonl").start()
        vehicle.wait_ekf_ready(60)
        vehicle.upload_mission([(lat_deg, lon_deg, 30.0)], takeoff_alt_m=30)
        vehicle.set_mode("GUIDED"); vehicle.arm(); vehicle.start_mission()
        ...
        rec.stop()

- :class:`Sitl` runs one simulator process (its own process group, its own temp dir, ports moved by
  ``10 * instance``) and kills the whole group on exit.
- :class:`Vehicle` is a ground station on SERIAL0 (sysid 255): parameters, reboot, mission, mode, arming.
- :class:`TelemetryRecorder` (:mod:`sarloc.sim.telemetry`, re-exported here with the MAVLink link helpers) reads
  *its own* connection (give it SERIAL2, which nobody else reads) in a thread, writes one JSON line per message and
  calls subscribers with each simulator truth sample. A pymavlink connection must have a single reader: never hand
  the recorder the Vehicle's connection.

``params`` of :class:`SitlConfig` are written to an extra defaults file loaded at boot, so parameters that
need a reboot (``GPS2_TYPE``, ``SIM_*``) are live from the start. Message intervals are per link: a rate
requested on SERIAL0 does not make SERIAL2 send anything, which is why the recorder requests its own.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pymavlink import mavutil

from sarloc.core.errors import SarlocError
from sarloc.sim.telemetry import (
    DEFAULT_RATES_HZ,
    DIALECT,
    RECORDED_TYPES,
    TelemetryRecorder,
    TruthSample,
    mavlink,
    request_message_intervals,
    send_command,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RATES_HZ",
    "DIALECT",
    "EKF_NAV_OK",
    "RECORDED_TYPES",
    "SITL_DIR_ENV",
    "MissionItem",
    "Sitl",
    "SitlConfig",
    "TelemetryRecorder",
    "TruthSample",
    "Vehicle",
    "find_sitl",
    "mavlink",
    "request_message_intervals",
    "send_command",
]

#: environment variable that overrides the SITL folder
SITL_DIR_ENV = "SARLOC_SITL_DIR"
#: binary, ``--model`` and defaults file of each vehicle
_VEHICLES = {"plane": ("arduplane", "plane", "plane.parm"), "copter": ("arducopter", "quad", "copter.parm")}
#: EKF_STATUS_REPORT flags that together mean "attitude, velocity and absolute position are usable"
EKF_NAV_OK = 0x01 | 0x02 | 0x04 | 0x10 | 0x20  # ATTITUDE, VELOCITY_HORIZ, VELOCITY_VERT, POS_HORIZ_ABS, POS_VERT_ABS


def find_sitl(dir: Path | str | None = None) -> Path | None:
    """The folder holding the SITL binaries and defaults files, or None when they are absent.

    Args:
        dir: folder to check; default ``$SARLOC_SITL_DIR`` or else ``<repo>/../shared/sitl``.
    """
    if dir is None:
        dir = os.environ.get(SITL_DIR_ENV) or Path(__file__).resolve().parents[2].parent / "shared" / "sitl"
    d = Path(dir)
    for binary, _, parm in _VEHICLES.values():
        if not (os.access(d / binary, os.X_OK) and (d / parm).is_file()):
            return None
    return d


@dataclass(frozen=True)
class SitlConfig:
    """One SITL instance.

    Attributes:
        vehicle: ``"plane"`` (ArduPlane, model ``plane``) or ``"copter"`` (ArduCopter, model ``quad``).
        instance: ``-I`` number; TCP ports are 5760/5762/5763 + 10 * instance.
        home: (lat_deg, lon_deg, alt_m AMSL, heading_deg) of the start point.
        speedup: simulated seconds per wall second (2 cores: 5-10 is reliable for one instance).
        params: extra parameters, loaded at boot after the vehicle's defaults file.
        sitl_dir: folder of the binaries; default :func:`find_sitl`.
    """

    vehicle: str = "copter"
    instance: int = 0
    home: tuple[float, float, float, float] = (-35.363261, 149.165230, 584.0, 353.0)
    speedup: float = 1.0
    params: Mapping[str, float] = field(default_factory=dict)
    sitl_dir: Path | None = None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sitl:
    """A running SITL process (a context manager); :meth:`stop` kills its whole process group."""

    def __init__(self, config: SitlConfig, workdir: Path | None = None) -> None:
        """Prepare (not start) an instance; ``workdir`` default: a temp dir removed by :meth:`stop`."""
        if config.vehicle not in _VEHICLES:
            raise SarlocError(f"unknown SITL vehicle {config.vehicle!r}; use one of {sorted(_VEHICLES)}")
        self.config = config
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="sarloc-sitl-")) if workdir is None else Path(workdir)
        self.log_path = self.workdir / "sitl.log"
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def port(self, serial: int) -> int:
        """TCP port of SERIAL0 (5760), SERIAL1 (5762) or SERIAL2 (5763), moved by 10 * instance."""
        return {0: 5760, 1: 5762, 2: 5763}[serial] + 10 * self.config.instance

    @property
    def gcs_url(self) -> str:
        """pymavlink URL of SERIAL0 (the ground station port)."""
        return f"tcp:127.0.0.1:{self.port(0)}"

    @property
    def serial1_url(self) -> str:
        """pymavlink URL of SERIAL1 (the companion port: GPS_INPUT goes here)."""
        return f"tcp:127.0.0.1:{self.port(1)}"

    @property
    def serial2_url(self) -> str:
        """pymavlink URL of SERIAL2 (a spare port: the telemetry recorder reads here)."""
        return f"tcp:127.0.0.1:{self.port(2)}"

    def start(self, timeout_s: float = 30.0) -> Sitl:
        """Start the binary and wait until its SERIAL0 port accepts connections."""
        cfg = self.config
        sitl_dir = cfg.sitl_dir or find_sitl()
        if sitl_dir is None:
            raise SarlocError(f"ArduPilot SITL not found; set {SITL_DIR_ENV} or install it at ../shared/sitl")
        binary, model, parm = _VEHICLES[cfg.vehicle]
        if _port_open(self.port(0)):
            raise SarlocError(f"TCP port {self.port(0)} is already in use; choose another SitlConfig.instance")
        self.workdir.mkdir(parents=True, exist_ok=True)
        defaults = [str(Path(sitl_dir) / parm)]
        if cfg.params:
            extra = self.workdir / "extra.parm"
            extra.write_text("".join(f"{k} {float(v):.9g}\n" for k, v in cfg.params.items()))
            defaults.append(str(extra))
        home = ",".join(f"{v:.9g}" for v in cfg.home)
        argv = [str(Path(sitl_dir) / binary), "--model", model, "--speedup", f"{cfg.speedup:g}"]
        argv += ["--defaults", ",".join(defaults), f"-I{cfg.instance}", "-w", "--home", home]
        logger.info("starting SITL %s in %s", " ".join(argv), self.workdir)
        self._log = open(self.log_path, "wb")  # closed in stop()
        self._proc = subprocess.Popen(
            argv, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port(0)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-300:]
                self.stop()
                raise SarlocError(f"SITL did not open TCP port {self.port(0)}: {' '.join(tail.split())}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Kill the process group (TERM, then KILL after 3 s) and remove an owned temp dir."""
        if self._proc is not None:
            for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                try:
                    os.killpg(self._proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self._proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Sitl:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class MissionItem:
    """One mission item as uploaded or read back (``alt_m`` in ``frame``: relative to home for waypoints)."""

    seq: int
    command: int
    lat_deg: float
    lon_deg: float
    alt_m: float
    frame: int = mavlink.MAV_FRAME_GLOBAL_RELATIVE_ALT_INT
    params: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


class Vehicle:
    """A ground station on one link (sysid 255): the only reader of its connection."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        """Connect to ``url`` (e.g. :attr:`Sitl.gcs_url`) and wait for the autopilot's heartbeat."""
        self.url = url
        #: (wall_s, severity, text) of every STATUSTEXT seen
        self.statustexts: list[tuple[float, int, str]] = []
        self.last_heartbeat: Any = None
        self.conn = self._connect(timeout_s)

    def _connect(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = mavutil.mavlink_connection(
                    self.url, source_system=255, source_component=190, retries=1, dialect=DIALECT
                )
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise SarlocError(f"cannot connect to {self.url}: {e}") from e
                time.sleep(0.5)
        self.conn = conn
        self.wait_heartbeat(max(1.0, deadline - time.monotonic()))
        return conn

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> Vehicle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv(self, types: Sequence[str] | None, timeout_s: float, cond: Callable[[Any], bool] | None = None) -> Any:
        """The next message of one of ``types`` (any when None) that passes ``cond``, or None at timeout.

        Every message read goes through here, so STATUSTEXTs and heartbeats are never lost.
        """
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self.conn.recv_match(blocking=True, timeout=min(left, 0.5))
            if msg is None:
                continue
            t = msg.get_type()
            if t == "STATUSTEXT":
                self.statustexts.append((time.time(), msg.severity, msg.text))
                logger.debug("statustext: %s", msg.text)
            elif t == "HEARTBEAT" and msg.get_srcComponent() == 1:
                self.last_heartbeat = msg
            if (types is None or t in types) and (cond is None or cond(msg)):
                return msg
        return None

    def wait_heartbeat(self, timeout_s: float = 30.0) -> Any:
        """Wait for a heartbeat of the autopilot (component 1) and target it."""
        msg = self.recv(["HEARTBEAT"], timeout_s, lambda m: m.get_srcComponent() == 1)
        if msg is None:
            raise SarlocError(f"no heartbeat from the autopilot on {self.url} within {timeout_s:g} s")
        self.conn.target_system, self.conn.target_component = msg.get_srcSystem(), 1
        self.conn.mav.srcSystem = 255
        self.conn.flightmode = mavutil.mode_string_v10(msg)
        self.conn.mav_type = msg.type
        return msg

    def command(self, cmd: int, *params: float, timeout_s: float = 5.0) -> int:
        """Send COMMAND_LONG (up to 7 params) and return the MAV_RESULT of its COMMAND_ACK."""
        send_command(self.conn, cmd, *params)
        ack = self.recv(["COMMAND_ACK"], timeout_s, lambda m: m.command == cmd)
        if ack is None:
            raise SarlocError(f"no COMMAND_ACK for command {cmd} within {timeout_s:g} s")
        return ack.result

    def get_param(self, name: str, timeout_s: float = 3.0) -> float | None:
        """A parameter's value (PARAM_REQUEST_READ), or None when the autopilot has no such parameter."""
        for _ in range(3):
            self.conn.mav.param_request_read_send(self.conn.target_system, 1, name.encode(), -1)
            msg = self.recv(["PARAM_VALUE"], timeout_s / 3, lambda m: m.param_id == name)
            if msg is not None:
                return float(msg.param_value)
        return None

    def fetch_params(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Every parameter (PARAM_REQUEST_LIST), e.g. to check which ``SIM_GPS*`` names a build has."""
        self.conn.mav.param_request_list_send(self.conn.target_system, 1)
        out: dict[str, float] = {}
        total = None
        while total is None or len(out) < total:
            msg = self.recv(["PARAM_VALUE"], 2.0 if out else timeout_s)
            if msg is None:
                break
            total = msg.param_count
            out[msg.param_id] = float(msg.param_value)
        return out

    def set_params(self, params: Mapping[str, float], timeout_s: float = 3.0) -> None:
        """Set parameters (PARAM_SET) and verify each read-back value (float32 compare)."""
        for name, value in params.items():
            want = float(value)
            got = None
            for _ in range(3):
                self.conn.mav.param_set_send(
                    self.conn.target_system, 1, name.encode(), want, mavlink.MAV_PARAM_TYPE_REAL32
                )
                msg = self.recv(["PARAM_VALUE"], timeout_s / 3, lambda m, n=name: m.param_id == n)
                got = None if msg is None else float(msg.param_value)
                if got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
                    break
            else:
                raise SarlocError(f"parameter {name} not set to {want:g} (read back {got})")

    def reboot(self, timeout_s: float = 60.0) -> None:
        """Reboot the autopilot (MAV_CMD_PREFLIGHT_REBOOT_SHUTDOWN), reconnect and wait for its heartbeat."""
        send_command(self.conn, mavlink.MAV_CMD_PREFLIGHT_REBOOT_SHUTDOWN, 1)
        time.sleep(1.0)
        self.conn.close()
        self._connect(timeout_s)

    def request_message_intervals(self, rates_hz: Mapping[str, float]) -> None:
        """Set message rates (Hz, simulated time) on this link, e.g. ``{"SIMSTATE": 20}``."""
        request_message_intervals(self.conn, rates_hz)

    def wait_ekf_ready(self, timeout_s: float = 60.0) -> Any:
        """Wait until EKF3 has an origin (GPS_GLOBAL_ORIGIN) and usable absolute position; return the report."""
        deadline = time.monotonic() + timeout_s
        origin = report = None
        asked = -math.inf
        while time.monotonic() < deadline:
            if report is None and time.monotonic() - asked > 2.0:  # a request sent while it boots can be lost
                self.request_message_intervals({"EKF_STATUS_REPORT": 2})
                asked = time.monotonic()
            if origin is None:
                send_command(self.conn, mavlink.MAV_CMD_REQUEST_MESSAGE, mavlink.MAVLINK_MSG_ID_GPS_GLOBAL_ORIGIN)
            msg = self.recv(["GPS_GLOBAL_ORIGIN", "EKF_STATUS_REPORT"], 1.0)
            if msg is None:
                continue
            if msg.get_type() == "GPS_GLOBAL_ORIGIN":
                origin = msg
            else:
                report = msg
            if origin is not None and report is not None:
                flags = report.flags
                if flags & EKF_NAV_OK == EKF_NAV_OK and not flags & mavlink.EKF_CONST_POS_MODE:
                    return report
        flags = None if report is None else f"0x{report.flags:x}"
        raise SarlocError(f"EKF not ready within {timeout_s:g} s (origin {origin is not None}, flags {flags})")

    def upload_mission(
        self,
        waypoints: Sequence[tuple[float, float, float]],
        takeoff_alt_m: float,
        takeoff_pitch_deg: float = 15.0,
        rtl: bool = True,
        timeout_s: float = 10.0,
    ) -> list[MissionItem]:
        """Upload home, NAV_TAKEOFF, one NAV_WAYPOINT per (lat_deg, lon_deg, alt_m above home), then RTL.

        MISSION_ITEM_INT protocol. Plane uses ``takeoff_pitch_deg``; after RTL a plane loiters at home and
        a copter lands. Returns the items sent (item 0 is ArduPilot's home slot, overwritten on arming).
        """
        if not waypoints:
            raise SarlocError("a mission needs at least one waypoint")
        lat0, lon0, _ = waypoints[0]
        items = [
            MissionItem(0, mavlink.MAV_CMD_NAV_WAYPOINT, lat0, lon0, 0.0, mavlink.MAV_FRAME_GLOBAL_INT),
            MissionItem(1, mavlink.MAV_CMD_NAV_TAKEOFF, lat0, lon0, takeoff_alt_m, params=(takeoff_pitch_deg, 0, 0, 0)),
        ]
        items += [MissionItem(i + 2, mavlink.MAV_CMD_NAV_WAYPOINT, *wp) for i, wp in enumerate(waypoints)]
        if rtl:
            items.append(MissionItem(len(items), mavlink.MAV_CMD_NAV_RETURN_TO_LAUNCH, 0.0, 0.0, 0.0))
        self.conn.mav.mission_count_send(self.conn.target_system, 1, len(items), mavlink.MAV_MISSION_TYPE_MISSION)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.recv(["MISSION_REQUEST_INT", "MISSION_REQUEST", "MISSION_ACK"], deadline - time.monotonic())
            if msg is None:
                break
            if msg.get_type() == "MISSION_ACK":
                if msg.type != mavlink.MAV_MISSION_ACCEPTED:
                    raise SarlocError(f"mission upload rejected: MAV_MISSION_RESULT {msg.type}")
                return items
            it = items[msg.seq]
            self.conn.mav.mission_item_int_send(
                self.conn.target_system, 1, it.seq, it.frame, it.command, 0, 1, *it.params,
                round(it.lat_deg * 1e7), round(it.lon_deg * 1e7), it.alt_m, mavlink.MAV_MISSION_TYPE_MISSION,
            )  # fmt: skip
        raise SarlocError(f"mission upload of {len(items)} items timed out after {timeout_s:g} s")

    def download_mission(self, timeout_s: float = 10.0) -> list[MissionItem]:
        """Read the mission back (MISSION_REQUEST_LIST / MISSION_REQUEST_INT)."""
        self.conn.mav.mission_request_list_send(self.conn.target_system, 1, mavlink.MAV_MISSION_TYPE_MISSION)
        count = self.recv(["MISSION_COUNT"], timeout_s)
        if count is None:
            raise SarlocError(f"no MISSION_COUNT within {timeout_s:g} s")
        out = []
        for seq in range(count.count):
            self.conn.mav.mission_request_int_send(self.conn.target_system, 1, seq, mavlink.MAV_MISSION_TYPE_MISSION)
            m = self.recv(["MISSION_ITEM_INT"], timeout_s, lambda m, s=seq: m.seq == s)
            if m is None:
                raise SarlocError(f"mission item {seq} not received within {timeout_s:g} s")
            params = (m.param1, m.param2, m.param3, m.param4)
            out.append(MissionItem(seq, m.command, m.x * 1e-7, m.y * 1e-7, m.z, m.frame, params))
        self.conn.mav.mission_ack_send(self.conn.target_system, 1, mavlink.MAV_MISSION_ACCEPTED)
        return out

    def _wait_heartbeat_state(self, cond: Callable[[Any], bool], timeout_s: float) -> bool:
        return self.recv(["HEARTBEAT"], timeout_s, lambda m: m.get_srcComponent() == 1 and cond(m)) is not None

    def arm(self, force: bool = False, timeout_s: float = 60.0) -> None:
        """Arm (retrying while pre-arm checks fail) and wait for the armed heartbeat; ``force`` skips checks."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            send_command(self.conn, mavlink.MAV_CMD_COMPONENT_ARM_DISARM, 1, 21196 if force else 0)
            if self._wait_heartbeat_state(lambda m: m.base_mode & mavlink.MAV_MODE_FLAG_SAFETY_ARMED, 2.0):
                return
        last = [t for _, _, t in self.statustexts if "Arm" in t][-1:]
        raise SarlocError(f"vehicle did not arm within {timeout_s:g} s (last message: {last})")

    def set_mode(self, name: str, timeout_s: float = 10.0) -> None:
        """Switch to a flight mode by name (``AUTO``, ``GUIDED``, ``RTL``...) and wait for the heartbeat."""
        mapping = self.conn.mode_mapping() or {}
        if name not in mapping:
            raise SarlocError(f"unknown flight mode {name!r}; known: {sorted(mapping)}")
        mode_id = mapping[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            send_command(self.conn, mavlink.MAV_CMD_DO_SET_MODE, mavlink.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED, mode_id)
            if self._wait_heartbeat_state(lambda m: m.custom_mode == mode_id, 2.0):
                return
        raise SarlocError(f"vehicle did not enter mode {name} within {timeout_s:g} s")

    def start_mission(self) -> None:
        """Enter AUTO and send MAV_CMD_MISSION_START (a copter needs it to take off from the ground)."""
        self.set_mode("AUTO")
        self.command(mavlink.MAV_CMD_MISSION_START, 0, 0)

    def deny_gnss(self) -> None:
        """Take the simulated GPS1's fix away in flight (``SIM_GPS1_ENABLE=0``: the receiver reports no lock)."""
        self.set_params({"SIM_GPS1_ENABLE": 0})

    def restore_gnss(self) -> None:
        """Give the simulated GPS1 its fix back (``SIM_GPS1_ENABLE=1``)."""
        self.set_params({"SIM_GPS1_ENABLE": 1})
