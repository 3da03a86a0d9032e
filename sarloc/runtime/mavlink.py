"""MAVLink side of the onboard daemon: report sarloc's position to the autopilot, read its heading and position.

Outbound (MAVLink2, optionally signed), from component ``MAV_COMP_ID_ONBOARD_COMPUTER`` (191) of the vehicle's system:

* ``HEARTBEAT`` at ``heartbeat_hz``: ``MAV_TYPE_ONBOARD_CONTROLLER``, ``MAV_AUTOPILOT_INVALID``, ``MAV_STATE_ACTIVE``.
* the position at ``gps_rate_hz``: ``GPS_INPUT`` for ArduPilot (``GPS1_TYPE=14``), ``HIL_GPS`` for PX4
  (``MAV_USEHILGPS=1``). What each field carries and why is in ``docs/mavlink.md``; in short: honest one-sigma
  accuracies from the filter, altitude and vertical fields flagged unknown unless given, and an explicit no-fix
  (``fix_type=1``, position zeroed) whenever the state is invalid, stale or the state function fails, and once more
  when the sender stops.
* ``COMMAND_LONG`` ``MAV_CMD_SET_MESSAGE_INTERVAL`` for the streams read back (``request_streams``): on open, after
  an autopilot reboot, and again while one of them does not arrive (ArduPilot's SERIAL1/2 stream rates default to 0).

Inbound (:meth:`MavlinkLink.poll`, non-blocking): the latest ``ATTITUDE``, ``VFR_HUD``, ``GLOBAL_POSITION_INT``,
``SYSTEM_TIME`` and the GPS echo (``GPS_RAW_INT`` / ``GPS2_RAW``) of the autopilot (``autopilot_system`` /
``autopilot_component`` only), with per-type rate limiting, signature checks when signing is on, and counters for
everything dropped. Malformed bytes are counted, never raised. The link checks that the autopilot echoes the
positions sent (:meth:`MavlinkLink.echo_status`), warns once when the autopilot signs and sarloc does not, and with
``require_autopilot_s`` reports a link that hears nothing as fatal (:meth:`MavlinkLink.fatal_reason`).

pymavlink is imported lazily (inside constructors and functions), so importing this module is cheap, and pymavlink's
module-level dialect state is left alone: the link builds its own MAVLink2 codec from
``pymavlink.dialects.v20.<dialect>`` and uses ``mavutil.mavlink_connection`` only to open the transport.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import importlib
import logging
import math
import os
import socket
import stat
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sarloc.core.config import finite_number
from sarloc.core.errors import ConfigError, SarlocError, brief
from sarloc.runtime.types import NavState

logger = logging.getLogger(__name__)

#: UNIX time of the GPS epoch, 1980-01-06T00:00:00Z.
GPS_EPOCH_UNIX_S = 315_964_800
#: GPS - UTC, seconds (constant since 2017-01-01; update here if a leap second is ever announced).
GPS_LEAP_S = 18
SECONDS_PER_WEEK = 604_800
#: A ``NavState.t_s`` at or above this (2001-09-09) is taken as UNIX time; below it, as a flight/boot clock.
UNIX_TIME_MIN_S = 1.0e9

# GPS_INPUT_IGNORE_FLAGS (common.xml). Protocol constants, duplicated so that encoding needs no pymavlink import;
# tests check them against the dialect.
IGNORE_ALT = 1
IGNORE_HDOP = 2
IGNORE_VDOP = 4
IGNORE_VEL_HORIZ = 8
IGNORE_VEL_VERT = 16
IGNORE_SPEED_ACCURACY = 32
IGNORE_HORIZONTAL_ACCURACY = 64
IGNORE_VERTICAL_ACCURACY = 128

GPS_FIX_TYPE_NO_FIX = 1  # a receiver is connected but has no position
GPS_FIX_TYPE_3D_FIX = 3  # ArduPilot's EKF3 and PX4's EKF2 use nothing below a 3D fix
MAV_TYPE_ONBOARD_CONTROLLER = 18
MAV_AUTOPILOT_INVALID = 8
MAV_STATE_ACTIVE = 4
UINT16_UNKNOWN = 65535
HDOP_UNKNOWN = 99.99  # ArduPilot stores hdop * 100 = 9999 = its GPS_UNKNOWN_DOP

MAV_CMD_SET_MESSAGE_INTERVAL = 511
#: MAVLink2 signing timestamps count 10 us units since this UNIX time (2015-01-01T00:00:00Z).
SIGNING_EPOCH_UNIX_S = 1_420_070_400

FLAVOURS = ("ardupilot", "px4")
NAV_MESSAGE = {"ardupilot": "GPS_INPUT", "px4": "HIL_GPS"}
#: What the link reads from the autopilot; each is requested with MAV_CMD_SET_MESSAGE_INTERVAL.
INBOUND_TYPES = ("ATTITUDE", "VFR_HUD", "GLOBAL_POSITION_INT", "SYSTEM_TIME", "GPS_RAW_INT", "GPS2_RAW", "WIND")
#: SYSTEM_TIME is requested at this rate (the clock offset needs no more); the rest at ``stream_rate_hz``.
SYSTEM_TIME_RATE_HZ = 2.0
#: A requested stream not heard for this long is requested again (first retry after STREAM_RETRY_MIN_S, doubling
#: to STREAM_RETRY_MAX_S while it stays away: a GPS2_RAW that never comes, without a second GPS, costs little).
STREAM_MISSING_S = 3.0
STREAM_RETRY_MIN_S = 2.0
STREAM_RETRY_MAX_S = 30.0
#: An echo (GPS_RAW_INT / GPS2_RAW with a 3D fix) matches a position sent at most ECHO_WINDOW_S ago within ECHO_TOL_M.
ECHO_WINDOW_S = 2.0
ECHO_TOL_M = 5.0
#: SYSTEM_TIME samples kept for :meth:`MavlinkLink.clock_offset_s` (median).
CLOCK_SAMPLES = 20
#: A SYSTEM_TIME boot time this far (plus 0.1 % of the gap) behind the one expected from the last sample is a reboot.
REBOOT_SLACK_S = 2.0

_STAT_KEYS = (
    "sent_HEARTBEAT",
    "sent_GPS_INPUT",
    "sent_HIL_GPS",
    "received",
    "dropped_unsigned",
    "dropped_bad_signature",
    "dropped_foreign_sysid",
    "dropped_other_component",
    "dropped_rate_limited",
    "dropped_no_peer",
    "dropped_link_down",
    "parse_errors",
    "send_errors",
    "reconnects",
    "nofix_sent",
    "received_signed_while_unsigned",
    "echo_ok",
    "echo_missing",
    "autopilot_reboots",
)


@dataclass(frozen=True)
class MavlinkConfig:
    """MAVLink link settings (defaults suit a companion computer beside an ArduPilot autopilot).

    Attributes:
        url: pymavlink connection string: ``udpout:HOST:PORT`` (send to the autopilot / a router; replies come back
            to our source port), ``udpin:HOST:PORT`` (listen; reply to whoever sent last), ``tcp:HOST:PORT``, or a
            serial device such as ``/dev/ttyTHS1`` (with ``baud``).
        baud: serial baud rate (serial devices only).
        source_system: our system id = the vehicle's (``SYSID_THISMAV`` / ``MAV_SYS_ID``); PX4 accepts ``HIL_GPS``
            only from its own system id.
        source_component: our component id, 191 = ``MAV_COMP_ID_ONBOARD_COMPUTER``.
        autopilot_system, autopilot_component: whose ATTITUDE / VFR_HUD / GLOBAL_POSITION_INT we accept.
        dialect: pymavlink MAVLink2 dialect module (``ardupilotmega`` includes ``common``).
        flavour: ``ardupilot`` (send ``GPS_INPUT``) or ``px4`` (send ``HIL_GPS``).
        gps_rate_hz: position messages per second. ArduPilot's GPS health check needs an average gap under 215 ms
            between fixes, so 5 Hz is at the edge; 10 Hz leaves margin for a late or lost message.
        heartbeat_hz: heartbeats per second.
        gps_id: GPS instance the position is for (0 = GPS1).
        signing_key_file: MAVLink2 signing key: 32 raw bytes, or 64 hex characters (one optional trailing newline);
            must not be readable by group/others. None = no signing.
        signing_link_id: link id put into our signatures (0..255).
        stale_after_s: a NavState older than this is sent as no-fix; also the default ``max_age_s`` of the inbound
            getters.
        inbound_max_rate_hz: accepted messages per second per message type (excess dropped and counted).
        hdop_uere_m: user-equivalent range error used to turn the one-sigma horizontal accuracy into an HDOP
            (``hdop = horiz_accuracy_m / hdop_uere_m``, from ``sigma_h = HDOP * UERE``); ArduCopter refuses to
            arm with HDOP > ``GPS_HDOP_GOOD`` (1.4) and EKF3's GPS checks need HDOP <= 2.5.
        reconnect_min_s, reconnect_max_s: back-off between reopen attempts after a link error (doubles each failure).
        echo_timeout_s: after this many seconds of valid positions sent without the autopilot echoing one in
            GPS_RAW_INT / GPS2_RAW, warn once and count ``echo_missing`` (see :meth:`MavlinkLink.echo_status`).
        request_streams: request ATTITUDE, VFR_HUD, GLOBAL_POSITION_INT, GPS_RAW_INT, GPS2_RAW (at
            ``stream_rate_hz``) and SYSTEM_TIME (2 Hz) with MAV_CMD_SET_MESSAGE_INTERVAL; off when the autopilot's
            ``SRn_*`` parameters or a router already provide them.
        stream_rate_hz: rate requested for the streams above.
        require_autopilot_s: None = tolerate a silent autopilot (keep sending, retry opening). A number = the link is
            unusable when nothing authentic came from the autopilot for this many seconds (from the start or later):
            :meth:`MavlinkLink.fatal_reason` then says why, and a link that cannot be opened at all (a UDP port in
            use, a missing serial device) raises ConfigError from the constructor; a refused or unreachable TCP
            peer (not up yet) is retried and reported by ``fatal_reason`` after the deadline.
    """

    url: str = "udpout:127.0.0.1:14550"
    baud: int = 57600
    source_system: int = 1
    source_component: int = 191
    autopilot_system: int = 1
    autopilot_component: int = 1
    dialect: str = "ardupilotmega"
    flavour: str = "ardupilot"
    gps_rate_hz: float = 10.0
    heartbeat_hz: float = 1.0
    gps_id: int = 0
    signing_key_file: str | None = None
    signing_link_id: int = 0
    stale_after_s: float = 2.0
    inbound_max_rate_hz: float = 50.0
    hdop_uere_m: float = 5.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 5.0
    echo_timeout_s: float = 10.0
    request_streams: bool = True
    stream_rate_hz: float = 10.0
    require_autopilot_s: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ConfigError:
            return ConfigError(f"mavlink config: {name}={getattr(self, name)!r:.60} is invalid; {fix}")

        if not isinstance(self.url, str) or not self.url.strip():
            raise bad("url", "give a pymavlink connection string such as udpout:127.0.0.1:14550")
        for name in ("source_system", "autopilot_system", "source_component", "autopilot_component"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 255:
                raise bad(name, "use an id in 1..255")
        for name in ("gps_id", "signing_link_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
                raise bad(name, "use an integer in 0..255")
        if self.flavour not in FLAVOURS:
            raise bad("flavour", f"use one of {', '.join(FLAVOURS)}")
        if not isinstance(self.dialect, str) or not self.dialect.isidentifier():
            raise bad("dialect", "name a pymavlink v20 dialect, e.g. ardupilotmega or common")
        for name, hi in (
            ("gps_rate_hz", 50.0),
            ("heartbeat_hz", 10.0),
            ("stale_after_s", 3600.0),
            ("inbound_max_rate_hz", 10000.0),
            ("hdop_uere_m", 1000.0),
            ("reconnect_min_s", 600.0),
            ("reconnect_max_s", 3600.0),
            ("echo_timeout_s", 3600.0),
            ("stream_rate_hz", 100.0),
        ):
            v = getattr(self, name)
            f = finite_number(v)
            if f is None or not 0 < f <= hi:
                raise bad(name, f"use a number in (0, {hi:g}]")
        if self.require_autopilot_s is not None:
            f = finite_number(self.require_autopilot_s)
            if f is None or not 0 < f <= 3600.0:
                raise bad("require_autopilot_s", "use None (tolerate silence) or seconds in (0, 3600]")
        if not isinstance(self.request_streams, bool):
            raise bad("request_streams", "use true or false")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise bad("reconnect_max_s", "make it >= reconnect_min_s")
        if not isinstance(self.baud, int) or self.baud <= 0:
            raise bad("baud", "use a positive integer baud rate")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AutopilotPosition:
    """The autopilot's own estimate, from GLOBAL_POSITION_INT (a prior only: without GNSS it dead-reckons).

    Attributes:
        rx_mono_s: ``time.monotonic()`` when it was received.
        time_boot_ms: autopilot boot time stamp of the message.
        lat_deg, lon_deg: WGS84 position.
        alt_m: altitude AMSL; relative_alt_m: above home.
        vel_ned_mps: (north, east, down) velocity.
        heading_deg: 0..360, None when the autopilot reports it unknown.
    """

    rx_mono_s: float
    time_boot_ms: int
    lat_deg: float
    lon_deg: float
    alt_m: float
    relative_alt_m: float
    vel_ned_mps: tuple[float, float, float]
    heading_deg: float | None


class SpeedSample(NamedTuple):
    """A speed from VFR_HUD: ``(mps, rx_mono_s)``; ``rx_mono_s`` is ``time.monotonic()`` at receipt."""

    mps: float
    rx_mono_s: float


class WindSample(NamedTuple):
    """The autopilot's wind estimate (ArduPilot WIND) as the air's velocity: ``(rx_mono_s, east_mps, north_mps)``,
    true north. While the GNSS works it comes from GNSS and airspeed; without GNSS, partly from sarloc's positions."""

    rx_mono_s: float
    east_mps: float
    north_mps: float


class AttitudeSample(NamedTuple):
    """ATTITUDE yaw: ``(rx_mono_s, yaw_deg)``, yaw in [0, 360) clockwise from north."""

    rx_mono_s: float
    yaw_deg: float


@dataclass(frozen=True)
class ClockSample:
    """The autopilot's clock from one SYSTEM_TIME, with the local clocks at receipt.

    Attributes:
        time_unix_s: the autopilot's UNIX time, None when it has none (``time_unix_usec == 0``: no GPS time yet).
        time_boot_s: seconds since the autopilot booted.
        rx_wall_s: local wall clock (``time.time()``) at receipt.
        rx_mono_s: local ``time.monotonic()`` at receipt.
    """

    time_unix_s: float | None
    time_boot_s: float
    rx_wall_s: float
    rx_mono_s: float


# --------------------------------------------------------------------------------------------------- pure helpers


def gps_week_time(unix_s: float) -> tuple[int, int]:
    """GPS week number and milliseconds into the week for a UNIX time (GPS epoch 1980-01-06, ``GPS_LEAP_S``)."""
    total_ms = round((unix_s - GPS_EPOCH_UNIX_S + GPS_LEAP_S) * 1000.0)
    week, week_ms = divmod(total_ms, SECONDS_PER_WEEK * 1000)
    return int(week), int(week_ms)


def nofix_reason(state: NavState) -> str | None:
    """Why ``state`` must be reported as no-fix, or None when its position may be sent."""
    if not isinstance(state, NavState):
        return f"state is a {type(state).__name__}, not a NavState"
    if not state.valid:
        return "state not valid"
    if not math.isfinite(state.t_s):
        return f"t_s={state.t_s!r} not finite"
    if not (math.isfinite(state.lat_deg) and -90.0 <= state.lat_deg <= 90.0):
        return f"lat_deg={state.lat_deg!r} out of range"
    if not (math.isfinite(state.lon_deg) and -180.0 <= state.lon_deg <= 180.0):
        return f"lon_deg={state.lon_deg!r} out of range"
    if not (math.isfinite(state.horiz_accuracy_m) and state.horiz_accuracy_m > 0):
        return f"horiz_accuracy_m={state.horiz_accuracy_m!r} (must be finite and > 0)"
    return None


def _vel(state: NavState) -> tuple[float, float, float] | None:
    v = state.vel_ned_mps
    if v is None or len(v) != 3 or not all(math.isfinite(float(x)) for x in v):
        return None
    return float(v[0]), float(v[1]), float(v[2])


def _alt(state: NavState) -> float | None:
    a = state.alt_m
    return float(a) if a is not None and math.isfinite(float(a)) else None


def _vacc(state: NavState) -> float | None:
    v = getattr(state, "vert_accuracy_m", None)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) and v > 0 else None


def _yaw_cdeg(state: NavState) -> int:
    """GPS_INPUT / HIL_GPS yaw: centidegrees 1..36000 (36000 = north), 0 = not available."""
    y = state.yaw_deg
    if y is None or not math.isfinite(float(y)):
        return 0
    c = round((float(y) % 360.0) * 100.0) % 36000
    return 36000 if c == 0 else c


def _time_fields(t_s: float) -> tuple[int, int, int]:
    """(time_usec, time_week, time_week_ms); the GPS week fields are 0 unless ``t_s`` is UNIX time."""
    t_s = float(t_s) if math.isfinite(t_s) and t_s > 0 else 0.0
    time_usec = round(t_s * 1e6)
    if t_s >= UNIX_TIME_MIN_S:
        week, week_ms = gps_week_time(t_s)
        return time_usec, week, week_ms
    return time_usec, 0, 0


def _clamp_int(x: float, lo: int, hi: int) -> int:
    x = float(x)
    return int(min(max(round(x), lo), hi)) if math.isfinite(x) else lo


def gps_input_fields(state: NavState, cfg: MavlinkConfig) -> dict[str, Any]:
    """GPS_INPUT fields (the keyword arguments of pymavlink's ``gps_input_encode``) for ``state``.

    Valid state: ``fix_type=3`` (ArduPilot's EKF3 ignores anything below a 3D fix), lat/lon in 1e7 degrees,
    ``horiz_accuracy`` = the filter's one-sigma, ``hdop = horiz_accuracy / hdop_uere_m``; altitude and vertical
    velocity flagged ignored unless ``alt_m`` (and for vertical velocity also ``vel_ned_mps``) is given;
    ``vert_accuracy = vert_accuracy_m`` and ``vdop = vert_accuracy_m / hdop_uere_m`` only with both ``alt_m`` and
    ``vert_accuracy_m``, else flagged ignored; horizontal velocity and speed accuracy flagged ignored when
    ``vel_ned_mps`` is None; ``yaw`` 0 (none) unless ``yaw_deg`` is given.
    Invalid state: ``fix_type=1``, position and velocity zeroed, 0 satellites, every field flagged ignored except
    HDOP, sent as 99.99 (unknown).
    """
    time_usec, week, week_ms = _time_fields(state.t_s if isinstance(state, NavState) else 0.0)
    common = {"time_usec": time_usec, "gps_id": cfg.gps_id, "time_week_ms": week_ms, "time_week": week}
    if nofix_reason(state) is not None:
        every = (
            IGNORE_ALT
            | IGNORE_VDOP
            | IGNORE_VEL_HORIZ
            | IGNORE_VEL_VERT
            | IGNORE_SPEED_ACCURACY
            | IGNORE_HORIZONTAL_ACCURACY
            | IGNORE_VERTICAL_ACCURACY
        )
        return {
            **common,
            "ignore_flags": every,
            "fix_type": GPS_FIX_TYPE_NO_FIX,
            "lat": 0,
            "lon": 0,
            "alt": 0.0,
            "hdop": HDOP_UNKNOWN,
            "vdop": HDOP_UNKNOWN,
            "vn": 0.0,
            "ve": 0.0,
            "vd": 0.0,
            "speed_accuracy": 0.0,
            "horiz_accuracy": 0.0,
            "vert_accuracy": 0.0,
            "satellites_visible": 0,
            "yaw": 0,
        }
    flags = 0
    alt = _alt(state)
    vel = _vel(state)
    vacc = _vacc(state) if alt is not None else None
    if alt is None:
        flags |= IGNORE_ALT
    if vacc is None:
        flags |= IGNORE_VDOP | IGNORE_VERTICAL_ACCURACY
    if vel is None:
        flags |= IGNORE_VEL_HORIZ | IGNORE_VEL_VERT | IGNORE_SPEED_ACCURACY
    elif alt is None:
        flags |= IGNORE_VEL_VERT
    sacc = float(state.speed_accuracy_mps)
    if vel is not None and not (math.isfinite(sacc) and sacc > 0):
        flags |= IGNORE_SPEED_ACCURACY
    hacc = float(state.horiz_accuracy_m)
    return {
        **common,
        "ignore_flags": flags,
        "fix_type": GPS_FIX_TYPE_3D_FIX,
        "lat": _clamp_int(state.lat_deg * 1e7, -900_000_000, 900_000_000),
        "lon": _clamp_int(state.lon_deg * 1e7, -1_800_000_000, 1_800_000_000),
        "alt": alt if alt is not None else 0.0,
        "hdop": min(hacc / cfg.hdop_uere_m, HDOP_UNKNOWN),
        "vdop": min(vacc / cfg.hdop_uere_m, HDOP_UNKNOWN) if vacc is not None else 0.0,
        "vn": vel[0] if vel else 0.0,
        "ve": vel[1] if vel else 0.0,
        "vd": vel[2] if vel else 0.0,
        "speed_accuracy": sacc if (vel is not None and flags & IGNORE_SPEED_ACCURACY == 0) else 0.0,
        "horiz_accuracy": hacc,
        "vert_accuracy": vacc if vacc is not None else 0.0,
        "satellites_visible": _clamp_int(state.satellites, 0, 255),
        "yaw": _yaw_cdeg(state),
    }


def hil_gps_fields(state: NavState, cfg: MavlinkConfig) -> dict[str, Any]:
    """HIL_GPS fields (keyword arguments of pymavlink's ``hil_gps_encode``) for PX4.

    PX4's receiver reads ``eph``/``epv`` as centimetres (not HDOP * 100), takes the velocity as valid whatever is
    sent and has no ignore flags: unknown altitude is sent as 0 with ``epv`` unknown (65535), unknown velocity as 0
    with ``vel``/``cog`` unknown (65535); ``epv`` carries ``vert_accuracy_m`` when it and ``alt_m`` are given.
    The PX4 parameters that keep EKF2 from fusing those are in docs/mavlink.md (``EKF2_GPS_CTRL=1`` without velocity
    and altitude).
    """
    time_usec, _, _ = _time_fields(state.t_s if isinstance(state, NavState) else 0.0)
    if nofix_reason(state) is not None:
        return {
            "time_usec": time_usec,
            "fix_type": GPS_FIX_TYPE_NO_FIX,
            "lat": 0,
            "lon": 0,
            "alt": 0,
            "eph": UINT16_UNKNOWN,
            "epv": UINT16_UNKNOWN,
            "vel": UINT16_UNKNOWN,
            "vn": 0,
            "ve": 0,
            "vd": 0,
            "cog": UINT16_UNKNOWN,
            "satellites_visible": 0,
            "id": cfg.gps_id,
            "yaw": 0,
        }
    alt = _alt(state)
    vel = _vel(state)
    vacc = _vacc(state) if alt is not None else None
    if vel is not None:
        speed_cmps = _clamp_int(math.hypot(vel[0], vel[1]) * 100.0, 0, 65534)
        cog = _clamp_int((math.degrees(math.atan2(vel[1], vel[0])) % 360.0) * 100.0, 0, 35999)
    else:
        speed_cmps, cog = UINT16_UNKNOWN, UINT16_UNKNOWN
    return {
        "time_usec": time_usec,
        "fix_type": GPS_FIX_TYPE_3D_FIX,
        "lat": _clamp_int(state.lat_deg * 1e7, -900_000_000, 900_000_000),
        "lon": _clamp_int(state.lon_deg * 1e7, -1_800_000_000, 1_800_000_000),
        "alt": _clamp_int(alt * 1000.0, -(2**31), 2**31 - 1) if alt is not None else 0,
        "eph": _clamp_int(state.horiz_accuracy_m * 100.0, 1, 65534),
        "epv": _clamp_int(vacc * 100.0, 1, 65534) if vacc is not None else UINT16_UNKNOWN,
        "vel": speed_cmps,
        "vn": _clamp_int(vel[0] * 100.0, -32767, 32767) if vel else 0,
        "ve": _clamp_int(vel[1] * 100.0, -32767, 32767) if vel else 0,
        "vd": _clamp_int(vel[2] * 100.0, -32767, 32767) if (vel and alt is not None) else 0,
        "cog": cog,
        "satellites_visible": _clamp_int(state.satellites, 0, 254),
        "id": cfg.gps_id,
        "yaw": _yaw_cdeg(state),
    }


def load_signing_key(path: str | os.PathLike[str]) -> bytes:
    """Read a MAVLink2 signing key file: 32 raw bytes, or 64 hex characters (one trailing newline allowed).

    Refuses a file readable or writable by group/others (``mode & 0o077``). Logs the key's sha256 prefix, never the
    key.

    Raises:
        ConfigError: missing file, loose permissions or wrong format.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"signing key file {p}: cannot read it ({e.strerror}); check signing_key_file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"signing key file {p} is not a regular file; point signing_key_file at the key file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"signing key file {p} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); run chmod 600 {p}"
        )
    raw = p.read_bytes()
    if len(raw) == 32:
        key = raw
    else:
        text = raw[:-1] if raw.endswith(b"\n") else raw
        text = text[:-1] if text.endswith(b"\r") else text
        key = b""
        if len(text) == 64:
            try:
                key = bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                key = b""
        if len(key) != 32:
            raise ConfigError(
                f"signing key file {p} holds {len(raw)} bytes; it must be 32 raw bytes or 64 hex characters "
                "(make one with: python -c \"import os;open('key','wb').write(os.urandom(32))\")"
            )
    if key == bytes(32):
        raise ConfigError(f"signing key file {p} is all zeros (that disables signing); generate a random key")
    logger.info("MAVLink2 signing key loaded from %s (sha256 %s...)", p, hashlib.sha256(key).hexdigest()[:8])
    return key


# ------------------------------------------------------------------------------------------------------ internals


def _fmt_s(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _distance_m(lat1_e7: int, lon1_e7: int, lat2_e7: int, lon2_e7: int) -> float:
    """Ground distance between two 1e7-degree positions (equirectangular: fine for metres)."""
    m_per_e7 = 111_319.49e-7
    dn = (lat2_e7 - lat1_e7) * m_per_e7
    de = (lon2_e7 - lon1_e7) * m_per_e7 * math.cos(math.radians(lat1_e7 * 1e-7))
    return math.hypot(dn, de)


def _probe_udp_bind(url: str) -> None:
    """Raise OSError when the port of a ``udpin:``/``udp:`` URL is already bound.

    pymavlink binds a listening UDP socket with SO_REUSEADDR, which on Linux lets it share a port with another
    SO_REUSEADDR socket (a second sarloc, a router): both bind, and the autopilot's packets go to one of them. A bind
    without SO_REUSEADDR fails with EADDRINUSE whenever anything holds the port.
    """
    for prefix in ("udpin:", "udp:"):
        if url.startswith(prefix):
            host, _, port = url[len(prefix) :].rpartition(":")
            break
    else:
        return
    try:
        port_n = int(port)
    except ValueError:
        return  # mavutil reports the malformed URL
    if not host:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, port_n))


#: Open failures that only say the peer is not up yet (a TCP autopilot or router still booting): retried even with
#: ``require_autopilot_s``, whose deadline then reports them through ``fatal_reason``.
_PEER_NOT_UP = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


def _open_failure(url: str, e: BaseException) -> str:
    """One line: the URL, the cause and, for the usual causes, what to check."""
    hint = {
        errno.EADDRINUSE: "; another program (a MAVLink router, a ground station, a second sarloc) holds the port",
        errno.EACCES: "; no permission (for a serial device: add the user to the dialout group)",
        errno.ENOENT: "; no such device",
        errno.ECONNREFUSED: "; nothing listens there: is the autopilot (or its router) up?",
    }.get(getattr(e, "errno", None), "")
    return f"mavlink url {url!r} cannot be opened ({brief(e)}){hint}"


def _wrap_deg(deg: float) -> float:
    """``deg`` wrapped into [0, 360) (``-1e-20 % 360.0`` rounds to 360.0 in floating point)."""
    h = deg % 360.0
    return 0.0 if h >= 360.0 else h


class _RateLimitedLog:
    """Logs a warning per key at most every ``interval_s``; counts what it held back."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        if held:
            logger.warning(msg + " (%d similar in the last %.0f s not logged)", *args, held, self.interval_s)
        else:
            logger.warning(msg, *args)


class _TokenBucket:
    """``rate_hz`` tokens per second, bursts up to one second's worth."""

    __slots__ = ("capacity", "rate_hz", "t_s", "tokens")

    def __init__(self, rate_hz: float, t_s: float) -> None:
        self.rate_hz = rate_hz
        self.capacity = max(1.0, rate_hz)
        self.tokens = self.capacity
        self.t_s = t_s

    def take(self, t_s: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (t_s - self.t_s) * self.rate_hz)
        self.t_s = t_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _LinkDownError(Exception):
    """The transport failed; the link closes it and reopens with back-off."""


class _NoPeerError(Exception):
    """udpin link with no peer heard yet: nowhere to send."""


class _CodecFile:
    """What pymavlink's codec writes to (its ``file``): our raising transport write."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write


class MavlinkLink:
    """One MAVLink2 connection: sends HEARTBEAT and the position, keeps the autopilot's latest state.

    Thread-safe: sends and :meth:`poll` hold one lock, so a :class:`MavlinkSender` thread and the daemon may share it.
    A transport error closes the connection; the next send or poll past the back-off reopens it.

    Args:
        cfg: link settings.
        clock_mono: monotonic clock for ages, back-off and stream requests (injectable for tests).
        clock_wall: wall clock (UNIX time) for signing timestamps and SYSTEM_TIME offsets (injectable for tests).

    Raises:
        ConfigError: a malformed URL, an unknown dialect, a bad signing key file, or (with
            ``require_autopilot_s``) a transport that cannot be opened, e.g. a UDP port another program holds.
    """

    def __init__(
        self,
        cfg: MavlinkConfig | None = None,
        *,
        clock_mono: Callable[[], float] = time.monotonic,
        clock_wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg or MavlinkConfig()
        self._mono = clock_mono
        self._wall = clock_wall
        try:
            self._d = importlib.import_module(f"pymavlink.dialects.v20.{self.cfg.dialect}")
        except ImportError as e:
            raise ConfigError(
                f"mavlink config: dialect {self.cfg.dialect!r} not found in pymavlink.dialects.v20 ({e}); "
                "use ardupilotmega or common"
            ) from None
        from pymavlink import mavutil

        self._mavutil = mavutil
        self._lock = threading.RLock()
        self._stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self._log = _RateLimitedLog()
        # our own MAVLink2 codec: sequence numbers, parser buffer and signing state survive reconnects
        self._mav = self._d.MAVLink(
            _CodecFile(self._write), srcSystem=self.cfg.source_system, srcComponent=self.cfg.source_component
        )
        self._mav.robust_parsing = True  # bad bytes come back as BAD_DATA messages instead of exceptions
        self.signing = self.cfg.signing_key_file is not None
        if self.signing:
            self._setup_signing(load_signing_key(self.cfg.signing_key_file))
        self._buckets: dict[str, _TokenBucket] = {}
        self._attitude: AttitudeSample | None = None
        self._vfr_hud: tuple[float, float] | None = None  # (rx_mono_s, heading_deg)
        self._airspeed: SpeedSample | None = None
        self._groundspeed: SpeedSample | None = None
        self._wind: WindSample | None = None
        self._position: AutopilotPosition | None = None
        self._clock: ClockSample | None = None
        self._clock_offsets: deque[float] = deque(maxlen=CLOCK_SAMPLES)  # autopilot UNIX time - local wall time
        # streams requested with MAV_CMD_SET_MESSAGE_INTERVAL: id, last receipt, next request, retry interval
        self._stream_ids = {n: i for n in INBOUND_TYPES if (i := getattr(self._d, f"MAVLINK_MSG_ID_{n}", None))}
        self._stream_rx: dict[str, float] = {}
        self._stream_next: dict[str, float] = {}
        self._stream_retry: dict[str, float] = {}
        # echo check: valid positions sent recently (rx mono, lat_e7, lon_e7), current unechoed streak
        self._sent_positions: deque[tuple[float, int, int]] = deque(maxlen=512)
        self._last_valid_send: float | None = None
        self._unechoed_since: float | None = None
        self._echo_warned = False
        self._last_echo: tuple[float, str] | None = None  # (rx_mono_s, message type)
        self._start_mono = self._mono()
        self._last_heard: float | None = None  # last authentic message of the autopilot
        self._signed_warned = False
        self._last_open_error: str | None = None
        self._conn: Any = None
        self._dest: tuple[str, int] | None = None
        self._backoff_s = self.cfg.reconnect_min_s
        self._next_open_s = -math.inf
        self._closed = False
        self._open(first=True)

    # ------------------------------------------------------------------ connection management

    def _setup_signing(self, key: bytes) -> None:
        # the same fields pymavlink's mavfile.setup_signing(key, sign_outgoing=True, allow_unsigned_callback=...)
        # sets, applied to our codec (the mavfile object is recreated on reconnect; the signing state must not be)
        s = self._mav.signing
        s.secret_key = key
        s.sign_outgoing = True
        s.allow_unsigned_callback = self._allow_unsigned
        s.link_id = self.cfg.signing_link_id
        s.timestamp = self._signing_now()
        self._mav.check_signature = self._check_signature  # see _check_signature

    def _signing_now(self) -> int:
        """The wall clock as a signing timestamp: 10 us units since 2015-01-01 (0 for a clock before that)."""
        t = float(self._wall())
        return int((t - SIGNING_EPOCH_UNIX_S) * 100_000) if math.isfinite(t) and t > SIGNING_EPOCH_UNIX_S else 0

    @staticmethod
    def _allow_unsigned(_mav: Any, _msg_id: int) -> bool:
        return False  # with signing on, nothing unsigned (or wrongly signed) is accepted

    def _check_signature(self, msgbuf: bytearray, src_system: int, src_component: int) -> bool:
        """pymavlink's signature check with the order fixed: MAC first, then the per-stream timestamp.

        pymavlink records a stream's timestamp before comparing the MAC, so one forged packet with a future
        timestamp would make every genuine packet of that stream look like a replay. Here only a packet signed
        with our key can move a stream's timestamp. Replays (timestamp not increasing) and streams that start
        more than 60 s behind our clock are refused, as in pymavlink.
        """
        s = self._mav.signing
        mac = hashlib.sha256(s.secret_key + bytes(msgbuf[:-6])).digest()[:6]
        if not hmac.compare_digest(mac, bytes(msgbuf[-6:])):
            return False
        link_id = msgbuf[-13]
        timestamp = int.from_bytes(bytes(msgbuf[-12:-6]), "little")
        stream = (link_id, src_system, src_component)
        last = s.stream_timestamps.get(stream)
        if last is not None and timestamp <= last:
            return False  # replay
        if last is None and timestamp + 6_000_000 < s.timestamp:
            return False  # new stream more than 60 s old
        s.stream_timestamps[stream] = timestamp
        s.timestamp = max(s.timestamp, timestamp)
        return True

    def _open(self, first: bool = False) -> bool:
        """Open the transport; on failure stay down and schedule a retry. Returns whether it is open."""
        now = self._mono()
        url = self.cfg.url
        try:
            _probe_udp_bind(url)
            conn = self._mavutil.mavlink_connection(
                url,
                baud=self.cfg.baud,
                source_system=self.cfg.source_system,
                source_component=self.cfg.source_component,
                retries=0,  # one connect attempt; the back-off here does the retrying
                autoreconnect=False,
            )
        except ImportError as e:
            raise ConfigError(f"mavlink url {url!r} needs a missing package ({e}); pip install pyserial") from None
        except ValueError as e:
            raise ConfigError(
                f"mavlink url {url!r} is malformed ({e}); use e.g. udpout:HOST:PORT, udpin:HOST:PORT, tcp:HOST:PORT"
            ) from None
        except Exception as e:  # OSError, serial.SerialException, ...
            why = _open_failure(url, e)
            if first and self.cfg.require_autopilot_s is not None and getattr(e, "errno", None) not in _PEER_NOT_UP:
                raise ConfigError(f"{why}; the link is required (require_autopilot_s)") from None
            self._next_open_s = now + self._backoff_s
            if self._last_open_error is None:
                logger.error("%s; retrying every %.1f-%.1f s", why, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
            else:
                self._log.warning("open", "%s; retrying in %.1f s", why, self._backoff_s)
            self._last_open_error = why
            self._backoff_s = min(self._backoff_s * 2.0, self.cfg.reconnect_max_s)
            return False
        conn.mav = self._mav  # mavutil helpers (setup_signing, recv_match) see our codec
        conn.first_byte = False  # never let mavutil swap in its global-dialect codec
        self._conn = conn
        self._dest = None
        if isinstance(conn, self._mavutil.mavudp) and not conn.udp_server:
            host, port = conn.destination_addr
            try:
                self._dest = (socket.gethostbyname(host), int(port))
            except OSError:
                self._dest = (host, int(port))
        self._reset_parser()
        self._backoff_s = self.cfg.reconnect_min_s
        self._last_open_error = None
        self._streams_due(reset_seen=True)
        if not first:
            self._stats["reconnects"] += 1
            logger.info("MAVLink link %s reopened", url)
        else:
            logger.info(
                "MAVLink link %s open as %d/%d (%s, %s%s)",
                url,
                self.cfg.source_system,
                self.cfg.source_component,
                self.cfg.flavour,
                NAV_MESSAGE[self.cfg.flavour],
                ", signed" if self.signing else "",
            )
        return True

    def _link_down(self, why: str) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken transport may fail; it is gone either way
                pass
        self._next_open_s = self._mono() + self._backoff_s
        self._log.warning(
            "down", "MAVLink link %s lost (%s); reconnecting in %.1f s", self.cfg.url, why, self._backoff_s
        )
        self._backoff_s = min(self._backoff_s * 2.0, self.cfg.reconnect_max_s)

    def _ensure_open(self) -> bool:
        if self._closed:
            return False
        if self._conn is not None:
            return True
        if self._mono() < self._next_open_s:
            return False
        return self._open()

    def _reset_parser(self) -> None:
        """Drop a partial frame (a new datagram or a new connection never continues the old one)."""
        mav = self._mav
        if mav.buf_len() > 0:
            self._stats["parse_errors"] += 1
        mav.buf = bytearray()
        mav.buf_index = 0
        mav.expected_length = self._d.HEADER_LEN_V1 + 2

    @property
    def connected(self) -> bool:
        """Whether the transport is open (for UDP: the socket; says nothing about a peer listening)."""
        return self._conn is not None

    def close(self) -> None:
        """Close the transport; later sends are counted as ``dropped_link_down``."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # already broken
                    pass

    def __enter__(self) -> MavlinkLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending

    def _write(self, buf: bytes | bytearray) -> None:
        """Transport write (raises on transport errors, unlike pymavlink's own writers, which swallow them)."""
        conn = self._conn
        mu = self._mavutil
        if conn is None:
            raise _LinkDownError("not connected")
        if isinstance(conn, mu.mavudp):
            if conn.udp_server:
                if not conn.clients:
                    raise _NoPeerError
                for addr in list(conn.clients):
                    conn.port.sendto(buf, addr)
            else:
                conn.port.sendto(buf, self._dest or conn.destination_addr)
        elif isinstance(conn, mu.mavtcp):
            n = conn.port.send(buf)
            if n != len(buf):
                raise _LinkDownError(f"short TCP write ({n} of {len(buf)} bytes)")
        elif isinstance(conn, mu.mavserial):
            conn.port.write(bytes(buf))
        else:
            conn.write(buf)

    def _send(self, msg: Any) -> bool:
        name = msg.get_type()
        mav = self._mav
        with self._lock:
            if not self._ensure_open():
                self._stats["dropped_link_down"] += 1
                return False
            if self.signing:
                # MAVLink signing: the timestamp follows the wall clock and only increases (pymavlink adds 1 per
                # packet); frozen at start, it falls behind what an autopilot restores after a reboot
                mav.signing.timestamp = max(mav.signing.timestamp, self._signing_now())
            buf = msg.pack(mav)  # encoding errors are bugs: they raise, they do not take the link down
            try:
                self._write(buf)
            except _NoPeerError:
                self._stats["dropped_no_peer"] += 1
                return False
            except (_LinkDownError, OSError) as e:
                self._stats["send_errors"] += 1
                self._link_down(f"{name}: {e}")
                return False
            except Exception as e:  # e.g. serial.SerialException
                self._stats["send_errors"] += 1
                self._link_down(f"{name}: {type(e).__name__}: {e}")
                return False
            mav.seq = (mav.seq + 1) % 256  # what MAVLink.send does after a write
            mav.total_packets_sent += 1
            mav.total_bytes_sent += len(buf)
            key = f"sent_{name}"
            self._stats[key] = self._stats.get(key, 0) + 1
            return True

    def send_heartbeat(self) -> bool:
        """Send HEARTBEAT (onboard controller, no autopilot, active). Returns whether it was handed to the transport."""
        return self._send(
            self._mav.heartbeat_encode(MAV_TYPE_ONBOARD_CONTROLLER, MAV_AUTOPILOT_INVALID, 0, 0, MAV_STATE_ACTIVE)
        )

    def encode_nav(self, state: NavState) -> Any:
        """The pymavlink message :meth:`send_nav` sends for ``state`` (GPS_INPUT or HIL_GPS by flavour)."""
        if self.cfg.flavour == "px4":
            return self._mav.hil_gps_encode(**hil_gps_fields(state, self.cfg))
        return self._mav.gps_input_encode(**gps_input_fields(state, self.cfg))

    def send_nav(self, state: NavState) -> Any:
        """Encode and send the position for ``state`` (no-fix when it is invalid). Returns the message sent or None.

        Staleness is the caller's business (:class:`MavlinkSender` checks it); this sends what it is given.
        """
        reason = nofix_reason(state)
        if reason is not None and isinstance(state, NavState) and state.valid:
            self._log.warning("badstate", "NavState unusable, sending no-fix: %s", reason)
        msg = self.encode_nav(state)
        with self._lock:
            if reason is not None:
                self._stats["nofix_sent"] += 1
            if not self._send(msg):
                return None
            if reason is None:
                self._note_sent_position(int(msg.lat), int(msg.lon))
        return msg

    def send_request_streams(self) -> int:
        """Request every inbound stream now (MAV_CMD_SET_MESSAGE_INTERVAL); :meth:`poll` does this by itself.

        Returns how many requests were handed to the transport.
        """
        with self._lock:
            return sum(self._request_stream(name) for name in self._stream_ids)

    def _request_stream(self, name: str) -> bool:
        rate_hz = SYSTEM_TIME_RATE_HZ if name == "SYSTEM_TIME" else self.cfg.stream_rate_hz
        msg = self._mav.command_long_encode(
            self.cfg.autopilot_system,
            self.cfg.autopilot_component,
            MAV_CMD_SET_MESSAGE_INTERVAL,
            0,
            float(self._stream_ids[name]),  # param1: message id
            1e6 / rate_hz,  # param2: interval, us
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,  # param7: response target 0 = the requester
        )
        return self._send(msg)

    def _streams_due(self, reset_seen: bool) -> None:
        """Make every stream request due now (after an open or an autopilot reboot)."""
        self._stream_next.clear()
        self._stream_retry.clear()
        if reset_seen:
            self._stream_rx.clear()

    def _maybe_request_streams(self) -> None:
        """Request the streams not heard for STREAM_MISSING_S, each at most every retry interval (with back-off)."""
        if not self.cfg.request_streams:
            return
        now = self._mono()
        for name in self._stream_ids:
            if self._conn is None:
                return
            last = self._stream_rx.get(name)
            if (last is not None and now - last <= STREAM_MISSING_S) or now < self._stream_next.get(name, -math.inf):
                continue
            retry = self._stream_retry.get(name, STREAM_RETRY_MIN_S)
            if self._request_stream(name):
                self._stream_next[name] = now + retry
                self._stream_retry[name] = min(retry * 2.0, STREAM_RETRY_MAX_S)
            else:  # not delivered (no peer yet, link down): try again soon, without back-off
                self._stream_next[name] = now + STREAM_RETRY_MIN_S

    # ------------------------------------------------------------------ echo check

    def _note_sent_position(self, lat_e7: int, lon_e7: int) -> None:
        """Remember a valid position sent; warn once when valid positions go unechoed for ``echo_timeout_s``."""
        now = self._mono()
        q = self._sent_positions
        while q and now - q[0][0] > ECHO_WINDOW_S:
            q.popleft()
        q.append((now, lat_e7, lon_e7))
        last, self._last_valid_send = self._last_valid_send, now
        if self._unechoed_since is None or (last is not None and now - last > ECHO_WINDOW_S):
            self._unechoed_since = now  # a new streak of valid sends
        if not self._echo_warned and now - self._unechoed_since >= self.cfg.echo_timeout_s:
            self._echo_warned = True
            self._stats["echo_missing"] += 1
            if self._last_heard is None:  # nobody there at all (a demo, a wrong port): say that, not "check GPSn"
                logger.warning(
                    "nothing heard from autopilot %d/%d on %s for %s s: the positions sent are not acknowledged",
                    self.cfg.autopilot_system,
                    self.cfg.autopilot_component,
                    self.cfg.url,
                    _fmt_s(now - self._unechoed_since),
                )
                return
            n = self.cfg.gps_id + 1
            check = f"GPS{n}_TYPE=14" if self.cfg.flavour == "ardupilot" else "MAV_USEHILGPS=1"
            logger.warning(
                "the autopilot does not echo sarloc's %s: check %s, the port, and signing "
                "(no GPS_RAW_INT / GPS2_RAW within %.0f m of the positions sent for %s s)",
                NAV_MESSAGE[self.cfg.flavour],
                check,
                ECHO_TOL_M,
                _fmt_s(now - self._unechoed_since),
            )

    def _check_echo(self, name: str, m: Any, now: float) -> None:
        """GPS_RAW_INT / GPS2_RAW: does it carry a position sent in the last ECHO_WINDOW_S (either instance)?"""
        if int(m.fix_type) < GPS_FIX_TYPE_3D_FIX:
            return
        lat, lon = int(m.lat), int(m.lon)
        for t, lat_sent, lon_sent in reversed(self._sent_positions):
            if now - t > ECHO_WINDOW_S:
                break
            if _distance_m(lat_sent, lon_sent, lat, lon) <= ECHO_TOL_M:
                self._stats["echo_ok"] += 1
                self._last_echo = (now, name)
                if self._echo_warned:
                    logger.info("the autopilot now echoes sarloc's positions (%s)", name)
                self._echo_warned = False
                self._unechoed_since = None
                return

    def echo_status(self) -> dict[str, Any]:
        """Whether the autopilot takes sarloc's positions, judged by its GPS_RAW_INT / GPS2_RAW echo.

        Returns:
            ``ok``: True when an echo matched within the last ``echo_timeout_s``, False when valid positions have
            gone unechoed that long, None when there is nothing to judge yet; ``echo_ok`` / ``echo_missing``: the
            counters; ``last_echo_age_s`` and ``last_echo_message`` (None before the first echo); ``unechoed_s``:
            how long the current streak of valid positions has gone without an echo (None when none is being sent);
            ``echo_timeout_s``.
        """
        with self._lock:
            now = self._mono()
            last = self._last_echo
            age = None if last is None else now - last[0]
            sending = self._last_valid_send is not None and now - self._last_valid_send <= ECHO_WINDOW_S
            unechoed = now - self._unechoed_since if (sending and self._unechoed_since is not None) else None
            timeout = self.cfg.echo_timeout_s
            if age is not None and age <= timeout:
                ok: bool | None = True
            elif unechoed is not None and unechoed >= timeout:
                ok = False
            else:
                ok = None
            return {
                "ok": ok,
                "echo_ok": self._stats["echo_ok"],
                "echo_missing": self._stats["echo_missing"],
                "last_echo_age_s": age,
                "last_echo_message": None if last is None else last[1],
                "unechoed_s": unechoed,
                "echo_timeout_s": timeout,
            }

    # ------------------------------------------------------------------ liveness

    def fatal_reason(self) -> str | None:
        """With ``require_autopilot_s``: one line saying why the link is unusable, else None.

        Unusable = nothing authentic (right ids, signed when signing is on) heard from the autopilot for
        ``require_autopilot_s`` since the link was made or since it was last heard. Needs :meth:`poll` to run (a
        :class:`MavlinkSender` polls); always None without ``require_autopilot_s`` or after :meth:`close`.
        """
        limit = self.cfg.require_autopilot_s
        if limit is None or self._closed:
            return None
        with self._lock:
            now = self._mono()
            since = self._start_mono if self._last_heard is None else self._last_heard
            silent = now - since
            if silent < limit:
                return None
            c = self.cfg
            text = (
                f"no message from autopilot {c.autopilot_system}/{c.autopilot_component} on {c.url} for "
                f"{_fmt_s(silent)} s{'' if self._last_heard is None else ' (it was heard before)'}: check the url, "
                "the autopilot's SERIALn_PROTOCOL=2 and signing"
            )
            s = self._stats
            if self._conn is None and self._last_open_error:
                text += f"; the link is down: {self._last_open_error}"
            if s["dropped_unsigned"] or s["dropped_bad_signature"]:
                text += (
                    f"; {s['dropped_unsigned']} unsigned and {s['dropped_bad_signature']} badly signed messages "
                    "were dropped: is the key the autopilot's?"
                )
            if s["dropped_foreign_sysid"] or s["dropped_other_component"]:
                text += (
                    f"; {s['dropped_foreign_sysid'] + s['dropped_other_component']} messages from other system or "
                    "component ids were dropped: check autopilot_system / autopilot_component"
                )
            return text

    # ------------------------------------------------------------------ receiving

    def _read_chunks(self) -> list[tuple[bytes, Any]]:
        """Everything the transport has now, without blocking, as (bytes, UDP source address or None) chunks."""
        conn = self._conn
        mu = self._mavutil
        chunks: list[tuple[bytes, Any]] = []
        total = 0
        if isinstance(conn, (mu.mavudp, mu.mavtcp)) and isinstance(conn.port, socket.socket):
            dgram = isinstance(conn, mu.mavudp)
            while total < 1 << 20:
                addr = None
                try:
                    if dgram:
                        data, addr = conn.port.recvfrom(65535)
                    else:
                        data = conn.port.recv(65536)
                        if not data:
                            raise _LinkDownError("TCP peer closed the connection")
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:  # ICMP port unreachable on UDP: nobody listening yet
                    break
                chunks.append((data, addr))
                total += len(data)
            return chunks
        for _ in range(64):  # serial and other mavutil transports
            data = conn.recv(4096)
            if not data:
                break
            chunks.append((bytes(data) if not isinstance(data, str) else data.encode("latin-1"), None))
        return chunks

    def poll(self) -> int:
        """Read and handle everything waiting on the link, without blocking. Returns how many messages were accepted.

        Never raises on bad input: malformed bytes count as ``parse_errors``, and a transport failure takes the link
        down for a reconnect. On a ``udpin`` link, a sender becomes a destination of our messages only once it has
        sent an authentic message of the autopilot (right system/component id, signed when signing is on).
        Also sends the stream requests that are due (``request_streams``).
        """
        accepted = 0
        with self._lock:
            if not self._ensure_open():
                return 0
            try:
                chunks = self._read_chunks()
            except (_LinkDownError, OSError) as e:
                self._link_down(f"receive: {e}")
                return 0
            except Exception as e:  # serial exceptions and the like
                self._link_down(f"receive: {type(e).__name__}: {e}")
                return 0
            conn = self._conn
            per_datagram = isinstance(conn, self._mavutil.mavudp)
            for chunk, addr in chunks:
                try:
                    msgs = self._mav.parse_buffer(chunk) or []
                except Exception as e:  # robust parsing should not raise; never let bytes kill the caller
                    self._stats["parse_errors"] += 1
                    self._log.warning("parse", "MAVLink parser error (%s: %s); buffer dropped", type(e).__name__, e)
                    msgs = []
                    self._mav.buf_index = len(self._mav.buf)
                authentic = False
                for m in msgs:
                    verdict = self._handle(m)
                    accepted += verdict == "accepted"
                    authentic |= verdict in ("accepted", "rate_limited")
                if per_datagram:
                    self._reset_parser()
                    if authentic and addr is not None and conn.udp_server:
                        if addr not in conn.clients:
                            self._streams_due(reset_seen=False)  # requests may have gone nowhere so far
                        conn.clients.add(addr)
                        conn.clients_last_alive[addr] = time.time()
            if self._conn is not None:
                self._maybe_request_streams()
        return accepted

    def _handle(self, m: Any) -> str:
        """Filter and apply one decoded message: returns "accepted", "rate_limited" or "dropped"."""
        name = m.get_type()
        if name == "BAD_DATA":
            reason = str(getattr(m, "reason", ""))
            if "signature" in reason.lower():
                data = bytes(getattr(m, "data", b""))
                signed = (
                    len(data) > 2 and data[0] == self._d.PROTOCOL_MARKER_V2 and data[2] & self._d.MAVLINK_IFLAG_SIGNED
                )
                self._stats["dropped_bad_signature" if signed else "dropped_unsigned"] += 1
            else:
                self._stats["parse_errors"] += 1
            return "dropped"
        if self.signing and not getattr(m, "_signed", False):
            self._stats["dropped_unsigned"] += 1
            return "dropped"
        if m.get_srcSystem() != self.cfg.autopilot_system:
            self._stats["dropped_foreign_sysid"] += 1
            return "dropped"
        if m.get_srcComponent() != self.cfg.autopilot_component:
            self._stats["dropped_other_component"] += 1
            return "dropped"
        now = self._mono()
        self._last_heard = now
        if not self.signing and self._signed_on_wire(m):
            self._stats["received_signed_while_unsigned"] += 1
            if not self._signed_warned:
                self._signed_warned = True
                logger.warning(
                    "the autopilot signs its messages; sarloc is not signing: set signing_key_file, or opt this port "
                    "out with MAVn_OPTIONS bit 0 (a signing autopilot drops sarloc's unsigned messages silently)"
                )
        if name in self._stream_ids:
            self._stream_rx[name] = now
            self._stream_retry.pop(name, None)
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _TokenBucket(self.cfg.inbound_max_rate_hz, now)
        if not bucket.take(now):
            self._stats["dropped_rate_limited"] += 1
            return "rate_limited"
        self._stats["received"] += 1
        key = f"received_{name}"
        self._stats[key] = self._stats.get(key, 0) + 1
        try:
            if name == "ATTITUDE":
                if math.isfinite(m.yaw):
                    self._attitude = AttitudeSample(now, _wrap_deg(math.degrees(m.yaw)))
            elif name == "VFR_HUD":
                self._vfr_hud = (now, _wrap_deg(float(m.heading)))
                if math.isfinite(m.airspeed):
                    self._airspeed = SpeedSample(float(m.airspeed), now)
                if math.isfinite(m.groundspeed):
                    self._groundspeed = SpeedSample(float(m.groundspeed), now)
            elif name in ("GPS_RAW_INT", "GPS2_RAW"):
                self._check_echo(name, m, now)
            elif name == "WIND":  # ardupilotmega: where the wind comes from, degrees; speed m/s
                d, v = float(m.direction), float(m.speed)
                if math.isfinite(d) and math.isfinite(v) and v >= 0:
                    r = math.radians(d)
                    self._wind = WindSample(now, -v * math.sin(r), -v * math.cos(r))
            elif name == "SYSTEM_TIME":
                self._on_system_time(m, now)
            elif name == "GLOBAL_POSITION_INT":
                if m.lat == 0 and m.lon == 0:
                    return "accepted"  # no position yet (ArduPilot sends zeros before its EKF has an origin)
                self._position = AutopilotPosition(
                    rx_mono_s=now,
                    time_boot_ms=int(m.time_boot_ms),
                    lat_deg=m.lat * 1e-7,
                    lon_deg=m.lon * 1e-7,
                    alt_m=m.alt * 1e-3,
                    relative_alt_m=m.relative_alt * 1e-3,
                    vel_ned_mps=(m.vx * 0.01, m.vy * 0.01, m.vz * 0.01),
                    heading_deg=None if m.hdg == UINT16_UNKNOWN else _wrap_deg(m.hdg * 0.01),
                )
        except (AttributeError, TypeError, ValueError) as e:
            self._stats["parse_errors"] += 1
            self._log.warning("decode", "MAVLink %s ignored (%s)", name, e)
        return "accepted"

    def _signed_on_wire(self, m: Any) -> bool:
        header = getattr(m, "_header", None)
        return bool(getattr(header, "incompat_flags", 0) & self._d.MAVLINK_IFLAG_SIGNED)

    def _on_system_time(self, m: Any, now: float) -> None:
        """Keep the autopilot's clock; a boot time behind the one expected from the last sample is a reboot."""
        boot_s = int(m.time_boot_ms) * 1e-3
        unix_us = int(m.time_unix_usec)
        prev = self._clock
        if prev is not None:
            gap = now - prev.rx_mono_s
            expected = prev.time_boot_s + gap
            if boot_s < expected - REBOOT_SLACK_S - 1e-3 * gap:
                self._stats["autopilot_reboots"] += 1
                logger.warning(
                    "autopilot %d/%d rebooted (boot time %.1f s, %.1f s expected): requesting its streams again",
                    self.cfg.autopilot_system,
                    self.cfg.autopilot_component,
                    boot_s,
                    expected,
                )
                self._clock_offsets.clear()
                self._streams_due(reset_seen=True)
                self._stream_rx["SYSTEM_TIME"] = now
        wall = float(self._wall())
        unix_s = unix_us * 1e-6 if unix_us > 0 else None
        self._clock = ClockSample(time_unix_s=unix_s, time_boot_s=boot_s, rx_wall_s=wall, rx_mono_s=now)
        if unix_s is not None:
            self._clock_offsets.append(unix_s - wall)

    def heading_deg(self, max_age_s: float | None = None) -> float | None:
        """The autopilot's heading, degrees clockwise from north in [0, 360), or None when nothing is fresh.

        ATTITUDE yaw is preferred, then VFR_HUD heading, then GLOBAL_POSITION_INT hdg. ``max_age_s`` defaults to
        ``cfg.stale_after_s``.
        """
        max_age_s = self.cfg.stale_after_s if max_age_s is None else max_age_s
        now = self._mono()
        with self._lock:
            for src in (self._attitude, self._vfr_hud):
                if src is not None and now - src[0] <= max_age_s:
                    return src[1]
            p = self._position
        if p is not None and p.heading_deg is not None and now - p.rx_mono_s <= max_age_s:
            return p.heading_deg
        return None

    def position_prior(self, max_age_s: float | None = None) -> AutopilotPosition | None:
        """The autopilot's latest GLOBAL_POSITION_INT, or None when older than ``max_age_s`` (default stale_after_s).

        Without GNSS this is the autopilot's dead-reckoning (or sarloc's own fixes fed back): use it to bound a
        search, never as ground truth.
        """
        max_age_s = self.cfg.stale_after_s if max_age_s is None else max_age_s
        with self._lock:
            p = self._position
        if p is None or self._mono() - p.rx_mono_s > max_age_s:
            return None
        return p

    def _fresh(self, sample: Any, rx_mono_s: float, max_age_s: float | None) -> Any:
        max_age_s = self.cfg.stale_after_s if max_age_s is None else max_age_s
        return sample if sample is not None and self._mono() - rx_mono_s <= max_age_s else None

    def attitude(self, max_age_s: float | None = None) -> AttitudeSample | None:
        """The latest ATTITUDE yaw as ``(rx_mono_s, yaw_deg)``, or None when older than ``max_age_s``
        (default ``stale_after_s``)."""
        with self._lock:
            a = self._attitude
        return None if a is None else self._fresh(a, a.rx_mono_s, max_age_s)

    def wind(self, max_age_s: float | None = None) -> WindSample | None:
        """The autopilot's latest WIND estimate (ArduPilot only), or None when older than ``max_age_s`` (default
        ``stale_after_s``) or never received."""
        with self._lock:
            w = self._wind
        return None if w is None else self._fresh(w, w.rx_mono_s, max_age_s)

    def airspeed_mps(self, max_age_s: float | None = None) -> SpeedSample | None:
        """VFR_HUD airspeed as ``(mps, rx_mono_s)``, or None when older than ``max_age_s`` (default
        ``stale_after_s``). Without an airspeed sensor ArduPilot reports an estimate (a copter: ground speed)."""
        with self._lock:
            a = self._airspeed
        return None if a is None else self._fresh(a, a.rx_mono_s, max_age_s)

    def groundspeed_mps(self, max_age_s: float | None = None) -> SpeedSample | None:
        """VFR_HUD ground speed as ``(mps, rx_mono_s)``, or None when older than ``max_age_s`` (default
        ``stale_after_s``). Without GNSS it comes from the autopilot's own estimate (or sarloc's fixes fed back)."""
        with self._lock:
            g = self._groundspeed
        return None if g is None else self._fresh(g, g.rx_mono_s, max_age_s)

    def autopilot_clock(self) -> ClockSample | None:
        """The latest SYSTEM_TIME of the autopilot (whatever its age; see ``rx_mono_s``), or None before the first."""
        with self._lock:
            return self._clock

    def clock_offset_s(self, max_age_s: float | None = None) -> float | None:
        """Autopilot UNIX time minus local wall time, seconds: the median over the last SYSTEM_TIME samples.

        None when the autopilot has no UNIX time, when the latest SYSTEM_TIME is older than ``max_age_s`` (default
        ``stale_after_s``) or before the first. Includes the transport delay (milliseconds on a wire or a LAN).
        Samples from before an autopilot reboot are dropped.
        """
        with self._lock:
            c = self._clock
            offsets = list(self._clock_offsets)
        if c is None or c.time_unix_s is None or not offsets or self._fresh(c, c.rx_mono_s, max_age_s) is None:
            return None
        return float(statistics.median(offsets))

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a snapshot copy): ``sent_<TYPE>``, ``received`` / ``received_<TYPE>``, ``dropped_*``,
        ``parse_errors``, ``send_errors``, ``reconnects``, ``nofix_sent``, ``received_signed_while_unsigned``,
        ``echo_ok``, ``echo_missing``, ``autopilot_reboots``."""
        with self._lock:
            return dict(self._stats)


class MavlinkSender:
    """Background thread: HEARTBEAT at ``heartbeat_hz``, the position at ``gps_rate_hz``, inbound polling between.

    Each position tick calls ``state_fn(now_s)`` (``now_s`` from ``clock``, UNIX time by default, which must be the
    clock of ``NavState.t_s``) and sends no-fix when it raises, returns something that is not a valid NavState, or
    returns a state whose ``t_s`` is more than ``stale_after_s`` from ``now_s``. Ticks follow monotonic deadlines
    (``k * period`` from the start, no drift); a tick that falls more than a period behind is skipped, not bunched.
    Nothing a tick does can end the thread; :meth:`stop` does.

    Args:
        link: the link to send on (shared; thread-safe).
        state_fn: the filter's state propagated to ``now_s``.
        clock: the clock passed to ``state_fn`` and compared with ``NavState.t_s``.
        poll_inbound: also call ``link.poll()`` about every ``poll_period_s``.
        poll_period_s: inbound polling period.
    """

    def __init__(
        self,
        link: MavlinkLink,
        state_fn: Callable[[float], NavState],
        *,
        clock: Callable[[], float] = time.time,
        poll_inbound: bool = True,
        poll_period_s: float = 0.02,
    ) -> None:
        if not callable(state_fn):
            raise SarlocError("MavlinkSender: state_fn must be callable as state_fn(now_s) -> NavState")
        self.link = link
        self.state_fn = state_fn
        self.clock = clock
        self.poll_inbound = poll_inbound
        self.poll_period_s = float(poll_period_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = _RateLimitedLog()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "nav_ticks",
                "heartbeat_ticks",
                "state_fn_errors",
                "invalid_states",
                "stale_states",
                "skipped_ticks",
                "loop_errors",
            ),
            0,
        )

    @property
    def stats(self) -> dict[str, int]:
        """Sender counters (ticks, state_fn errors, stale/invalid states, skipped ticks)."""
        return dict(self._counts)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MavlinkSender:
        """Start the thread (daemon=True). Returns self."""
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sarloc-mavlink-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0, *, send_nofix: bool = True) -> None:
        """Stop the thread, join it and, when it was running and ``send_nofix``, send one last no-fix.

        The no-fix tells the autopilot the position source is gone at once, instead of after its GPS timeout with
        the last position frozen in place. The thread sleeps on an event, so this returns within milliseconds
        unless a tick is blocked in the transport (at most ``timeout_s``).
        """
        self._stop.set()
        t = self._thread
        if t is None:
            return
        t.join(timeout_s)
        if t.is_alive():
            logger.warning("MAVLink sender thread did not stop within %.1f s", timeout_s)
        self._thread = None
        if send_nofix:
            try:
                self.link.send_nav(NavState(t_s=self.clock(), valid=False))
            except Exception as e:  # shutting down: report, never raise from stop()
                logger.warning("MAVLink final no-fix not sent (%s: %s)", type(e).__name__, e)

    def __enter__(self) -> MavlinkSender:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _state_now(self) -> NavState:
        now_s = self.clock()
        try:
            state = self.state_fn(now_s)
        except Exception as e:
            self._counts["state_fn_errors"] += 1
            self._log.warning("state_fn", "state_fn raised %s: %s; sending no-fix", type(e).__name__, e)
            return NavState(t_s=now_s, valid=False)
        if not isinstance(state, NavState):
            self._counts["invalid_states"] += 1
            self._log.warning("type", "state_fn returned %s, not a NavState; sending no-fix", type(state).__name__)
            return NavState(t_s=now_s, valid=False)
        if state.valid and not (abs(now_s - state.t_s) <= self.link.cfg.stale_after_s):
            self._counts["stale_states"] += 1
            self._log.warning(
                "stale", "NavState t_s=%.3f is %.2f s from now; sending no-fix", state.t_s, now_s - state.t_s
            )
            return NavState(t_s=now_s, valid=False)
        return state

    @staticmethod
    def _advance(deadline: float, period: float, now: float) -> tuple[float, int]:
        """Next deadline on the ``deadline + k * period`` grid strictly after ``now``; how many ticks were skipped."""
        nxt = deadline + period
        if nxt > now:
            return nxt, 0
        k = math.floor((now - deadline) / period) + 1
        return deadline + k * period, k - 1

    def _run(self) -> None:
        cfg = self.link.cfg
        hb_period, nav_period = 1.0 / cfg.heartbeat_hz, 1.0 / cfg.gps_rate_hz
        t0 = time.monotonic()
        next_hb, next_nav, next_poll = t0, t0, t0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_hb:
                    self.link.send_heartbeat()
                    self._counts["heartbeat_ticks"] += 1
                    next_hb, _ = self._advance(next_hb, hb_period, now)
                if now >= next_nav:
                    self.link.send_nav(self._state_now())
                    self._counts["nav_ticks"] += 1
                    next_nav, skipped = self._advance(next_nav, nav_period, time.monotonic())
                    self._counts["skipped_ticks"] += skipped
                if self.poll_inbound and now >= next_poll:
                    self.link.poll()
                    next_poll, _ = self._advance(next_poll, self.poll_period_s, time.monotonic())
            except Exception as e:  # a bug in a tick must not silence the position stream
                self._counts["loop_errors"] += 1
                self._log.warning("loop", "MAVLink sender tick failed (%s: %s)", type(e).__name__, e)
            wake = min(next_hb, next_nav, next_poll if self.poll_inbound else math.inf)
            self._stop.wait(max(0.0, wake - time.monotonic()))


__all__ = [
    "GPS_EPOCH_UNIX_S",
    "GPS_LEAP_S",
    "AttitudeSample",
    "AutopilotPosition",
    "ClockSample",
    "MavlinkConfig",
    "MavlinkLink",
    "MavlinkSender",
    "SpeedSample",
    "gps_input_fields",
    "gps_week_time",
    "hil_gps_fields",
    "load_signing_key",
    "nofix_reason",
]
