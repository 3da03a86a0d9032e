"""The link: :class:`MavlinkLink`, one MAVLink2 connection that sends HEARTBEAT, the position and stream requests,
and filters what comes back.

It puts together the pieces of the package: the transport (:mod:`~sarloc.runtime.mavlink.transport`), signing
(:mod:`~sarloc.runtime.mavlink.signing`), the position messages (:mod:`~sarloc.runtime.mavlink.fields`), the stream
requests (:mod:`~sarloc.runtime.mavlink.streams`), the autopilot's state (:mod:`~sarloc.runtime.mavlink.autopilot`)
and the echo check (:mod:`~sarloc.runtime.mavlink.echo`). Inbound filtering happens here: only the autopilot's
``autopilot_system`` / ``autopilot_component``, signed when signing is on, at most ``inbound_max_rate_hz`` per message
type; everything dropped is counted, malformed bytes too, never raised.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sarloc.core.errors import ConfigError
from sarloc.runtime.mavlink.autopilot import (
    AttitudeSample,
    AutopilotPosition,
    AutopilotState,
    ClockSample,
    FlowSample,
    GnssSample,
    SpeedSample,
    WindSample,
)
from sarloc.runtime.mavlink.config import MavlinkConfig
from sarloc.runtime.mavlink.echo import EchoCheck
from sarloc.runtime.mavlink.fields import (
    MAV_AUTOPILOT_INVALID,
    MAV_STATE_ACTIVE,
    MAV_TYPE_ONBOARD_CONTROLLER,
    gps_input_fields,
    hil_gps_fields,
    nofix_reason,
)
from sarloc.runtime.mavlink.logs import RateLimitedLog, fmt_s
from sarloc.runtime.mavlink.signing import Signing, load_signing_key
from sarloc.runtime.mavlink.streams import StreamRequests
from sarloc.runtime.mavlink.transport import LinkDownError, NoPeerError, Transport
from sarloc.runtime.types import NavState

logger = logging.getLogger("sarloc.runtime.mavlink")

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


class MavlinkLink:
    """One MAVLink2 connection: sends HEARTBEAT and the position, keeps the autopilot's latest state.

    Thread-safe: sends and :meth:`poll` hold one lock, so a :class:`~sarloc.runtime.mavlink.MavlinkSender` thread and
    the daemon may share it. A transport error closes the connection; the next send or poll past the back-off reopens
    it. The autopilot's state is also reachable as ``link.autopilot`` (:class:`AutopilotState`).

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
        try:
            self._d = importlib.import_module(f"pymavlink.dialects.v20.{self.cfg.dialect}")
        except ImportError as e:
            raise ConfigError(
                f"mavlink config: dialect {self.cfg.dialect!r} not found in pymavlink.dialects.v20 ({e}); "
                "use ardupilotmega or common"
            ) from None
        self._lock = threading.RLock()
        self._stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self._log = RateLimitedLog()
        self._streams = StreamRequests(self.cfg, self._d, clock_mono)
        self._transport = Transport(
            self.cfg, self._d, self._stats, self._log, clock_mono, on_open=lambda: self._streams.due(reset_seen=True)
        )
        self._mav = self._transport.mav
        key_file = self.cfg.signing_key_file
        self.signing = key_file is not None
        self._signer: Signing | None = None
        if key_file is not None:
            key = load_signing_key(key_file)
            self._signer = Signing(self._mav, key, self.cfg.signing_link_id, clock_wall)
        self._buckets: dict[str, _TokenBucket] = {}
        self.autopilot = AutopilotState(
            self.cfg, self._lock, self._stats, clock_mono, clock_wall, on_reboot=self._streams.rebooted
        )
        self._echo = EchoCheck(self.cfg, self._lock, self._stats, clock_mono)
        self._start_mono = self._mono()
        self._last_heard: float | None = None  # last authentic message of the autopilot
        self._signed_warned = False
        self._transport.open(first=True)

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        """Whether the transport is open (for UDP: the socket; says nothing about a peer listening)."""
        return self._transport.conn is not None

    def close(self) -> None:
        """Close the transport; later sends are counted as ``dropped_link_down``."""
        with self._lock:
            self._transport.close()

    def __enter__(self) -> MavlinkLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending

    def _send(self, msg: Any) -> bool:
        name = msg.get_type()
        mav = self._mav
        with self._lock:
            if not self._transport.ensure_open():
                self._stats["dropped_link_down"] += 1
                return False
            if self._signer is not None:
                self._signer.advance()  # the signing timestamp follows the wall clock
            buf = msg.pack(mav)  # encoding errors are bugs: they raise, they do not take the link down
            try:
                self._transport.write(buf)
            except NoPeerError:
                self._stats["dropped_no_peer"] += 1
                return False
            except (LinkDownError, OSError) as e:
                self._stats["send_errors"] += 1
                self._transport.down(f"{name}: {e}")
                return False
            except Exception as e:  # e.g. serial.SerialException
                self._stats["send_errors"] += 1
                self._transport.down(f"{name}: {type(e).__name__}: {e}")
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

        Staleness is the caller's business (:class:`~sarloc.runtime.mavlink.MavlinkSender` checks it); this sends
        what it is given.
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
                self._echo.note_sent(int(msg.lat), int(msg.lon), heard=self._last_heard is not None)
        return msg

    def send_request_streams(self) -> int:
        """Request every inbound stream now (MAV_CMD_SET_MESSAGE_INTERVAL); :meth:`poll` does this by itself.

        Returns how many requests were handed to the transport.
        """
        with self._lock:
            return sum(self._request_stream(name) for name in self._streams.ids)

    def _request_stream(self, name: str) -> bool:
        return self._send(self._streams.command(self._mav, name))

    # ------------------------------------------------------------------ liveness

    def echo_status(self) -> dict[str, Any]:
        """Whether the autopilot takes sarloc's positions, judged by its GPS_RAW_INT / GPS2_RAW echo.

        Returns:
            ``ok``: True when an echo matched within the last ``echo_timeout_s``, False when valid positions have
            gone unechoed that long, None when there is nothing to judge yet; ``echo_ok`` / ``echo_missing``: the
            counters; ``last_echo_age_s`` and ``last_echo_message`` (None before the first echo); ``unechoed_s``:
            how long the current streak of valid positions has gone without an echo (None when none is being sent);
            ``echo_timeout_s``.
        """
        return self._echo.status()

    def fatal_reason(self) -> str | None:
        """With ``require_autopilot_s``: one line saying why the link is unusable, else None.

        Unusable = nothing authentic (right ids, signed when signing is on) heard from the autopilot for
        ``require_autopilot_s`` since the link was made or since it was last heard. Needs :meth:`poll` to run (a
        :class:`~sarloc.runtime.mavlink.MavlinkSender` polls); always None without ``require_autopilot_s`` or after
        :meth:`close`.
        """
        limit = self.cfg.require_autopilot_s
        if limit is None or self._transport.closed:
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
                f"{fmt_s(silent)} s{'' if self._last_heard is None else ' (it was heard before)'}: check the url, "
                "the autopilot's SERIALn_PROTOCOL=2 and signing"
            )
            s = self._stats
            if self._transport.conn is None and self._transport.last_open_error:
                text += f"; the link is down: {self._transport.last_open_error}"
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
        return self._transport.read_chunks()

    def poll(self) -> int:
        """Read and handle everything waiting on the link, without blocking. Returns how many messages were accepted.

        Never raises on bad input: malformed bytes count as ``parse_errors``, and a transport failure takes the link
        down for a reconnect. On a ``udpin`` link, a sender becomes a destination of our messages only once it has
        sent an authentic message of the autopilot (right system/component id, signed when signing is on).
        Also sends the stream requests that are due (``request_streams``).
        """
        accepted = 0
        tr = self._transport
        with self._lock:
            if not tr.ensure_open():
                return 0
            try:
                chunks = self._read_chunks()
            except (LinkDownError, OSError) as e:
                tr.down(f"receive: {e}")
                return 0
            except Exception as e:  # serial exceptions and the like
                tr.down(f"receive: {type(e).__name__}: {e}")
                return 0
            conn = tr.conn
            per_datagram = isinstance(conn, tr.mavutil.mavudp)
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
                    tr.reset_parser()
                    if authentic and addr is not None and conn.udp_server:
                        if addr not in conn.clients:
                            self._streams.due(reset_seen=False)  # requests may have gone nowhere so far
                        conn.clients.add(addr)
                        conn.clients_last_alive[addr] = time.time()
            if tr.conn is not None:
                self._streams.request_missing(self._request_stream, lambda: tr.conn is not None)
        return accepted

    def _handle(self, m: Any) -> str:
        """Filter and apply one decoded message: returns "accepted", "rate_limited" or "dropped"."""
        name = m.get_type()
        if not self._admit(name, m):
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
        self._streams.heard(name, now)
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
            if name in ("GPS_RAW_INT", "GPS2_RAW"):
                if self.cfg.flavour != "ardupilot" or name != self.autopilot.gnss_message:
                    self._echo.check(name, m, now)  # ArduPilot: the receiver's own instance echoes nothing of ours
                self.autopilot.apply_gnss(name, m, now)
            else:
                self.autopilot.apply(name, m, now)
        except (AttributeError, TypeError, ValueError) as e:
            self._stats["parse_errors"] += 1
            self._log.warning("decode", "MAVLink %s ignored (%s)", name, e)
        return "accepted"

    def _admit(self, name: str, m: Any) -> bool:
        """Whether ``m`` is an authentic message of the autopilot; counts why when it is not."""
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
            return False
        if self.signing and not getattr(m, "_signed", False):
            self._stats["dropped_unsigned"] += 1
            return False
        if m.get_srcSystem() != self.cfg.autopilot_system:
            self._stats["dropped_foreign_sysid"] += 1
            return False
        if m.get_srcComponent() != self.cfg.autopilot_component:
            self._stats["dropped_other_component"] += 1
            return False
        return True

    def _signed_on_wire(self, m: Any) -> bool:
        header = getattr(m, "_header", None)
        return bool(getattr(header, "incompat_flags", 0) & self._d.MAVLINK_IFLAG_SIGNED)

    # ------------------------------------------------------------------ the autopilot's state (see AutopilotState)

    def heading_deg(self, max_age_s: float | None = None) -> float | None:
        """The autopilot's heading in [0, 360) (ATTITUDE, else VFR_HUD, else GLOBAL_POSITION_INT), None when stale:
        :meth:`AutopilotState.heading_deg`."""
        return self.autopilot.heading_deg(max_age_s)

    def position_prior(self, max_age_s: float | None = None) -> AutopilotPosition | None:
        """The autopilot's latest GLOBAL_POSITION_INT (a prior, never ground truth), None when stale:
        :meth:`AutopilotState.position_prior`."""
        return self.autopilot.position_prior(max_age_s)

    def attitude(self, max_age_s: float | None = None) -> AttitudeSample | None:
        """The latest ATTITUDE yaw, None when stale: :meth:`AutopilotState.attitude`."""
        return self.autopilot.attitude(max_age_s)

    def optical_flow(self, max_age_s: float | None = None) -> FlowSample | None:
        """The latest OPTICAL_FLOW, None when stale: :meth:`AutopilotState.optical_flow`."""
        return self.autopilot.optical_flow(max_age_s)

    def wind(self, max_age_s: float | None = None) -> WindSample | None:
        """The autopilot's latest WIND estimate, None when stale: :meth:`AutopilotState.wind`."""
        return self.autopilot.wind(max_age_s)

    def airspeed_mps(self, max_age_s: float | None = None) -> SpeedSample | None:
        """VFR_HUD airspeed, None when stale: :meth:`AutopilotState.airspeed_mps`."""
        return self.autopilot.airspeed_mps(max_age_s)

    def groundspeed_mps(self, max_age_s: float | None = None) -> SpeedSample | None:
        """VFR_HUD ground speed, None when stale: :meth:`AutopilotState.groundspeed_mps`."""
        return self.autopilot.groundspeed_mps(max_age_s)

    def gnss(self, max_age_s: float | None = None) -> GnssSample | None:
        """The latest 3-D fix of the autopilot's own GNSS receiver, None when stale or lost:
        :meth:`AutopilotState.gnss`."""
        return self.autopilot.gnss(max_age_s)

    def autopilot_clock(self) -> ClockSample | None:
        """The latest SYSTEM_TIME of the autopilot: :meth:`AutopilotState.autopilot_clock`."""
        return self.autopilot.autopilot_clock()

    def clock_offset_s(self, max_age_s: float | None = None) -> float | None:
        """Autopilot UNIX time minus local wall time (median of recent SYSTEM_TIMEs), None when unknown or stale:
        :meth:`AutopilotState.clock_offset_s`."""
        return self.autopilot.clock_offset_s(max_age_s)

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a snapshot copy): ``sent_<TYPE>``, ``received`` / ``received_<TYPE>``, ``dropped_*``,
        ``parse_errors``, ``send_errors``, ``reconnects``, ``nofix_sent``, ``received_signed_while_unsigned``,
        ``echo_ok``, ``echo_missing``, ``autopilot_reboots``."""
        with self._lock:
            return dict(self._stats)
