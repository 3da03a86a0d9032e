"""MAVLink link settings: :class:`MavlinkConfig`, validated when it is made (a bad value is a ConfigError at start,
not a surprise mid-flight), and the autopilot flavours with the position message each one takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sarloc.core.config import finite_number
from sarloc.core.errors import ConfigError

FLAVOURS = ("ardupilot", "px4")
NAV_MESSAGE = {"ardupilot": "GPS_INPUT", "px4": "HIL_GPS"}


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
