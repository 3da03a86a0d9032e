"""What sarloc sends: a :class:`~sarloc.runtime.types.NavState` as the fields of ``GPS_INPUT`` (ArduPilot,
``GPS1_TYPE=14``) or ``HIL_GPS`` (PX4, ``MAV_USEHILGPS=1``), and the protocol constants those need.

What each field carries and why is in ``docs/mavlink.md``; in short: honest one-sigma accuracies from the filter,
altitude and vertical fields flagged unknown unless given, and an explicit no-fix (``fix_type=1``, position zeroed)
whenever the state is invalid (:func:`nofix_reason`). Pure functions: no pymavlink import, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

from sarloc.runtime.mavlink.config import MavlinkConfig
from sarloc.runtime.types import NavState

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
