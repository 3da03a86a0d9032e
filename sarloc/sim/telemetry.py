"""MAVLink link helpers and the telemetry recorder of the SITL harness (pymavlink only, torch-free).

- :data:`DIALECT` / ``mavlink``: ArduPilot's dialect, whatever dialect the process last set in ``mavutil``.
- :func:`send_command`, :func:`request_message_intervals`: COMMAND_LONGs on one link.
- :class:`TelemetryRecorder` reads *its own* connection (give it SERIAL2 of a :class:`~sarloc.sim.sitl.Sitl`, which
  nobody else reads) in a thread, writes one JSON line per message and calls subscribers with each simulator truth
  sample (:class:`TruthSample`). A pymavlink connection must have a single reader: never hand the recorder the
  :class:`~sarloc.sim.sitl.Vehicle`'s connection.

Message intervals are per link: a rate requested on SERIAL0 does not make SERIAL2 send anything, which is why the
recorder requests its own. :mod:`sarloc.sim.sitl` re-exports everything public here.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymavlink import mavutil

from sarloc.core.errors import SarlocError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RATES_HZ",
    "DIALECT",
    "RECORDED_TYPES",
    "TelemetryRecorder",
    "TruthSample",
    "mavlink",
    "request_message_intervals",
    "send_command",
]

#: ArduPilot's dialect, always: ``mavutil.mavlink`` is whatever dialect the process set last (``dialect="common"``
#: anywhere in the process switches it), and EKF_STATUS_REPORT or SIMSTATE do not decode without ardupilotmega
DIALECT = "ardupilotmega"
mavlink = importlib.import_module(f"pymavlink.dialects.v20.{DIALECT}")

#: messages the recorder asks for on its link, in Hz of simulated time
DEFAULT_RATES_HZ: dict[str, float] = {
    "SIMSTATE": 10,
    "SIM_STATE": 10,
    "GLOBAL_POSITION_INT": 10,
    "ATTITUDE": 10,
    "OPTICAL_FLOW": 10,  # a vehicle with a flow sensor only
    "EKF_STATUS_REPORT": 5,
    "GPS_RAW_INT": 5,
    "GPS2_RAW": 5,
    "MISSION_CURRENT": 1,
    "SYSTEM_TIME": 1,
}
#: messages the recorder writes (everything else is read and dropped)
RECORDED_TYPES = frozenset({*DEFAULT_RATES_HZ, "STATUSTEXT", "HEARTBEAT", "GPS_GLOBAL_ORIGIN", "HOME_POSITION"})


def send_command(conn: Any, cmd: int, *params: float) -> None:
    """COMMAND_LONG ``cmd`` with up to 7 params (missing ones 0) to the connection's target autopilot."""
    p = [*params, 0, 0, 0, 0, 0, 0, 0][:7]
    conn.mav.command_long_send(conn.target_system or 1, conn.target_component or 1, cmd, 0, *p)


def request_message_intervals(conn: Any, rates_hz: Mapping[str, float]) -> None:
    """Ask the autopilot to send each message at a rate (Hz, simulated time; 0 stops it) on this link.

    Only sends MAV_CMD_SET_MESSAGE_INTERVAL; the link's reader sees the COMMAND_ACKs.
    """
    for name, hz in rates_hz.items():
        msg_id = getattr(mavlink, f"MAVLINK_MSG_ID_{name}", None)
        if msg_id is None:
            raise SarlocError(f"unknown MAVLink message {name!r} in message intervals")
        interval_us = -1 if hz <= 0 else 1e6 / hz
        send_command(conn, mavlink.MAV_CMD_SET_MESSAGE_INTERVAL, msg_id, interval_us)


@dataclass(frozen=True)
class TruthSample:
    """The simulator's true state at a receive time (``wall_s``: local UNIX time of reception)."""

    wall_s: float
    lat_deg: float
    lon_deg: float
    alt_m: float  # AMSL
    yaw_deg: float
    vn_mps: float
    ve_mps: float
    vd_mps: float


def _record(msg: Any, wall_s: float) -> dict[str, Any]:
    rec = msg.to_dict()
    rec["type"] = rec.pop("mavpackettype")
    rec["wall_s"] = wall_s
    return rec


class TelemetryRecorder:
    """Reads one connection in a thread; writes JSONL records and feeds truth subscribers.

    Each line is a message as a dict (``type`` plus its MAVLink fields) with ``wall_s`` added, or a
    ``{"type": "truth", ...}`` line per truth sample (the fields of :class:`TruthSample`). Truth comes
    from SIM_STATE: position from its ``lat_int``/``lon_int`` (1e-7 deg; its float ``lat``/``lon`` are only
    float32), altitude and NED velocity from its ``alt``/``vn``/``ve``/``vd``. ArduPilot's SIMSTATE (no
    altitude, no velocity) is recorded as well. Give the recorder a link nobody else reads (SERIAL2); it
    requests its own message rates there and repeats the request when the link goes quiet (a reboot).
    """

    def __init__(self, url: str, path: Path, rates_hz: Mapping[str, float] | None = None) -> None:
        """Record ``url`` (e.g. :attr:`Sitl.serial2_url`) into the JSONL file ``path``."""
        self.url = url
        self.path = Path(path)
        self.rates_hz = dict(DEFAULT_RATES_HZ if rates_hz is None else rates_hz)
        self.n_records = 0
        self.last_truth: TruthSample | None = None
        self._subscribers: list[Callable[[TruthSample], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def on_truth(self, fn: Callable[[TruthSample], None]) -> None:
        """Call ``fn(sample)`` from the reader thread for every truth sample (keep it quick)."""
        self._subscribers.append(fn)

    def start(self, timeout_s: float = 30.0) -> TelemetryRecorder:
        """Connect, wait for a heartbeat, request rates and start the reader thread."""
        self._conn = mavutil.mavlink_connection(
            self.url, source_system=255, source_component=191, autoreconnect=True, dialect=DIALECT
        )
        hb = self._conn.wait_heartbeat(timeout=timeout_s)
        if hb is None:
            raise SarlocError(f"no heartbeat on {self.url} within {timeout_s:g} s")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="telemetry-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> TelemetryRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        conn = self._conn
        last_request = last_wanted = 0.0  # monotonic times: rates requested, a requested message seen
        with open(self.path, "a", encoding="utf-8") as f:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_wanted > 2.0 and now - last_request > 2.0:
                    request_message_intervals(conn, self.rates_hz)
                    last_request = now
                try:
                    msg = conn.recv_match(blocking=True, timeout=0.2)
                except (OSError, ValueError) as e:
                    logger.debug("recorder read error on %s: %s", self.url, e)
                    time.sleep(0.2)
                    continue
                if msg is None:
                    continue
                wall_s = time.time()
                t = msg.get_type()
                if t in self.rates_hz:
                    last_wanted = time.monotonic()
                if t == "HEARTBEAT" and msg.get_srcComponent() != 1:
                    continue
                if t in RECORDED_TYPES:
                    f.write(json.dumps(_record(msg, wall_s), default=str) + "\n")
                    f.flush()
                    self.n_records += 1
                if t == "SIM_STATE":
                    s = TruthSample(
                        wall_s=wall_s,
                        lat_deg=(msg.lat_int * 1e-7) if msg.lat_int else msg.lat,
                        lon_deg=(msg.lon_int * 1e-7) if msg.lon_int else msg.lon,
                        alt_m=msg.alt,
                        yaw_deg=math.degrees(msg.yaw) % 360.0,
                        vn_mps=msg.vn,
                        ve_mps=msg.ve,
                        vd_mps=msg.vd,
                    )
                    self.last_truth = s
                    f.write(json.dumps({"type": "truth", **s.__dict__}) + "\n")
                    f.flush()
                    for fn in self._subscribers:
                        try:
                            fn(s)
                        except Exception:
                            logger.exception("truth subscriber %r failed", fn)
