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
``OPTICAL_FLOW``, ``SYSTEM_TIME`` and the GPS echo (``GPS_RAW_INT`` / ``GPS2_RAW``) of the autopilot
(``autopilot_system`` / ``autopilot_component`` only), with per-type rate limiting, signature checks when signing
is on, and counters for everything dropped. Malformed bytes are counted, never raised. The link checks that the
autopilot echoes the positions sent (:meth:`MavlinkLink.echo_status`), warns once when the autopilot signs and
sarloc does not, and with ``require_autopilot_s`` reports a link that hears nothing as fatal
(:meth:`MavlinkLink.fatal_reason`).

pymavlink is imported lazily (inside constructors and functions), so importing this package is cheap, and pymavlink's
module-level dialect state is left alone: the link builds its own MAVLink2 codec from
``pymavlink.dialects.v20.<dialect>`` and uses ``mavutil.mavlink_connection`` only to open the transport.

The package, by concern (each module imports only those above it):

* :mod:`~sarloc.runtime.mavlink.config`: :class:`MavlinkConfig`, the settings, validated.
* :mod:`~sarloc.runtime.mavlink.fields`: a NavState as GPS_INPUT / HIL_GPS fields, the protocol constants.
* :mod:`~sarloc.runtime.mavlink.signing`: the signing key file, signing timestamps and checks.
* :mod:`~sarloc.runtime.mavlink.logs`: rate-limited warnings (every module logs as ``sarloc.runtime.mavlink``).
* :mod:`~sarloc.runtime.mavlink.autopilot`: the autopilot's state read back, with fresh-only getters.
* :mod:`~sarloc.runtime.mavlink.echo`: does the autopilot echo the positions sent?
* :mod:`~sarloc.runtime.mavlink.streams`: when to request each inbound stream.
* :mod:`~sarloc.runtime.mavlink.transport`: opening, writing, reading and reopening the connection.
* :mod:`~sarloc.runtime.mavlink.link`: :class:`MavlinkLink`, which puts those together.
* :mod:`~sarloc.runtime.mavlink.sender`: :class:`MavlinkSender`, the thread that keeps the link talking.
"""

import logging

from sarloc.runtime.mavlink.autopilot import (
    CLOCK_SAMPLES,
    REBOOT_SLACK_S,
    AttitudeSample,
    AutopilotPosition,
    AutopilotState,
    ClockSample,
    FlowSample,
    GnssSample,
    SpeedSample,
    WindSample,
)
from sarloc.runtime.mavlink.config import FLAVOURS, NAV_MESSAGE, MavlinkConfig
from sarloc.runtime.mavlink.echo import ECHO_TOL_M, ECHO_WINDOW_S
from sarloc.runtime.mavlink.fields import (
    GPS_EPOCH_UNIX_S,
    GPS_FIX_TYPE_3D_FIX,
    GPS_FIX_TYPE_NO_FIX,
    GPS_LEAP_S,
    HDOP_UNKNOWN,
    IGNORE_ALT,
    IGNORE_HDOP,
    IGNORE_HORIZONTAL_ACCURACY,
    IGNORE_SPEED_ACCURACY,
    IGNORE_VDOP,
    IGNORE_VEL_HORIZ,
    IGNORE_VEL_VERT,
    IGNORE_VERTICAL_ACCURACY,
    MAV_AUTOPILOT_INVALID,
    MAV_STATE_ACTIVE,
    MAV_TYPE_ONBOARD_CONTROLLER,
    SECONDS_PER_WEEK,
    UINT16_UNKNOWN,
    UNIX_TIME_MIN_S,
    gps_input_fields,
    gps_week_time,
    hil_gps_fields,
    nofix_reason,
)
from sarloc.runtime.mavlink.link import MavlinkLink
from sarloc.runtime.mavlink.sender import MavlinkSender
from sarloc.runtime.mavlink.signing import SIGNING_EPOCH_UNIX_S, load_signing_key
from sarloc.runtime.mavlink.streams import (
    INBOUND_TYPES,
    MAV_CMD_SET_MESSAGE_INTERVAL,
    STREAM_MISSING_S,
    STREAM_RETRY_MAX_S,
    STREAM_RETRY_MIN_S,
    SYSTEM_TIME_RATE_HZ,
)

logger = logging.getLogger(__name__)  # the name every module of the package logs under

__all__ = [
    "CLOCK_SAMPLES",
    "ECHO_TOL_M",
    "ECHO_WINDOW_S",
    "FLAVOURS",
    "GPS_EPOCH_UNIX_S",
    "GPS_FIX_TYPE_3D_FIX",
    "GPS_FIX_TYPE_NO_FIX",
    "GPS_LEAP_S",
    "HDOP_UNKNOWN",
    "IGNORE_ALT",
    "IGNORE_HDOP",
    "IGNORE_HORIZONTAL_ACCURACY",
    "IGNORE_SPEED_ACCURACY",
    "IGNORE_VDOP",
    "IGNORE_VEL_HORIZ",
    "IGNORE_VEL_VERT",
    "IGNORE_VERTICAL_ACCURACY",
    "INBOUND_TYPES",
    "MAV_AUTOPILOT_INVALID",
    "MAV_CMD_SET_MESSAGE_INTERVAL",
    "MAV_STATE_ACTIVE",
    "MAV_TYPE_ONBOARD_CONTROLLER",
    "NAV_MESSAGE",
    "REBOOT_SLACK_S",
    "SECONDS_PER_WEEK",
    "SIGNING_EPOCH_UNIX_S",
    "STREAM_MISSING_S",
    "STREAM_RETRY_MAX_S",
    "STREAM_RETRY_MIN_S",
    "SYSTEM_TIME_RATE_HZ",
    "UINT16_UNKNOWN",
    "UNIX_TIME_MIN_S",
    "AttitudeSample",
    "AutopilotPosition",
    "AutopilotState",
    "ClockSample",
    "FlowSample",
    "GnssSample",
    "MavlinkConfig",
    "MavlinkLink",
    "MavlinkSender",
    "SpeedSample",
    "WindSample",
    "gps_input_fields",
    "gps_week_time",
    "hil_gps_fields",
    "load_signing_key",
    "nofix_reason",
]
