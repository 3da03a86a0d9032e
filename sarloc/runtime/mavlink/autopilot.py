"""The autopilot's state as the link reads it: the latest ``ATTITUDE``, ``VFR_HUD``, ``WIND``, ``OPTICAL_FLOW``,
``GLOBAL_POSITION_INT`` and ``SYSTEM_TIME`` of the autopilot, and the latest fix of its own GNSS receiver (the
``GPS_RAW_INT`` / ``GPS2_RAW`` instance that is not sarloc's), kept by :class:`AutopilotState` with the time each
arrived, and handed out only while fresh (``max_age_s``, default ``stale_after_s``).

A ``SYSTEM_TIME`` boot time well behind the one expected from the previous sample is an autopilot reboot: the clock
samples taken before it are dropped, and ``on_reboot`` tells the link, which requests the autopilot's streams
again.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from sarloc.runtime.mavlink.config import MavlinkConfig
from sarloc.runtime.mavlink.fields import GPS_FIX_TYPE_3D_FIX, UINT16_UNKNOWN

logger = logging.getLogger("sarloc.runtime.mavlink")

#: SYSTEM_TIME samples kept for :meth:`AutopilotState.clock_offset_s` (median).
CLOCK_SAMPLES = 20
#: A SYSTEM_TIME boot time this far (plus 0.1 % of the gap) behind the one expected from the last sample is a reboot.
REBOOT_SLACK_S = 2.0


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


class GnssSample(NamedTuple):
    """A 3-D fix of the autopilot's own GNSS receiver (the raw instance sarloc does not feed).

    ``rx_mono_s``: ``time.monotonic()`` at receipt; ``age_s``: how old the fix was then (its ``time_usec`` against
    the autopilot's boot clock, mapped to this computer's by the least delayed of the recent SYSTEM_TIMEs; 0 when
    that is unknown); ``h_acc_m``: its horizontal accuracy (``h_acc``,
    else ``eph`` as an HDOP times 5 m)."""

    rx_mono_s: float
    age_s: float
    lat_deg: float
    lon_deg: float
    h_acc_m: float
    name: str


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
    """ATTITUDE: ``(rx_mono_s, yaw_deg, roll_deg, pitch_deg)``, yaw in [0, 360) clockwise from north."""

    rx_mono_s: float
    yaw_deg: float
    roll_deg: float = 0.0
    pitch_deg: float = 0.0


class FlowSample(NamedTuple):
    """OPTICAL_FLOW as ArduPilot sends it: the flow's angular rates less the body's (``flow_comp_m_x/_y``, rad/s
    despite the field names), about the sensor's (body's) x and y axes, and the height above ground its EKF holds
    (``ground_distance``, m); ``rx_mono_s`` is ``time.monotonic()`` at receipt."""

    rx_mono_s: float
    comp_x_rad_s: float
    comp_y_rad_s: float
    ground_distance_m: float
    quality: int


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


def _wrap_deg(deg: float) -> float:
    """``deg`` wrapped into [0, 360) (``-1e-20 % 360.0`` rounds to 360.0 in floating point)."""
    h = deg % 360.0
    return 0.0 if h >= 360.0 else h


class AutopilotState:
    """The latest state of the autopilot, from its messages (:meth:`apply`), with fresh-only getters.

    Thread-safe: the getters take ``lock`` (the link's); :meth:`apply` is called by the link under it.

    Args:
        cfg: link settings (``stale_after_s``, the autopilot's ids for log lines).
        lock: the link's lock.
        stats: the link's counters (``autopilot_reboots``).
        clock_mono: monotonic clock for ages.
        clock_wall: wall clock (UNIX time) for SYSTEM_TIME offsets.
        on_reboot: called with the receipt time of the SYSTEM_TIME that showed an autopilot reboot.
    """

    def __init__(
        self,
        cfg: MavlinkConfig,
        lock: threading.RLock,
        stats: dict[str, int],
        clock_mono: Callable[[], float],
        clock_wall: Callable[[], float],
        on_reboot: Callable[[float], None] = lambda _now: None,
    ) -> None:
        self.cfg = cfg
        self._lock = lock
        self._stats = stats
        self._mono = clock_mono
        self._wall = clock_wall
        self._on_reboot = on_reboot
        self._attitude: AttitudeSample | None = None
        self._vfr_hud: tuple[float, float] | None = None  # (rx_mono_s, heading_deg)
        self._airspeed: SpeedSample | None = None
        self._groundspeed: SpeedSample | None = None
        self._wind: WindSample | None = None
        self._flow: FlowSample | None = None
        self._position: AutopilotPosition | None = None
        self._clock: ClockSample | None = None
        self._clock_offsets: deque[float] = deque(maxlen=CLOCK_SAMPLES)  # autopilot UNIX time - local wall time
        self._gnss: GnssSample | None = None  # None again after a report without a fix
        self._boot_offsets: deque[float] = deque(maxlen=CLOCK_SAMPLES)  # receipt (monotonic) - autopilot boot time

    def apply(self, name: str, m: Any, now: float) -> None:
        """Keep what message ``m`` (type ``name``, received at ``now``) says (other types are ignored).

        Raises:
            AttributeError, TypeError, ValueError: a malformed message (the link counts it as a parse error).
        """
        if name == "ATTITUDE":
            if math.isfinite(m.yaw):
                roll, pitch = (float(a) if math.isfinite(a) else 0.0 for a in (m.roll, m.pitch))
                self._attitude = AttitudeSample(
                    now, _wrap_deg(math.degrees(m.yaw)), math.degrees(roll), math.degrees(pitch)
                )
        elif name == "OPTICAL_FLOW":
            cx, cy, h = float(m.flow_comp_m_x), float(m.flow_comp_m_y), float(m.ground_distance)
            if all(map(math.isfinite, (cx, cy, h))):
                self._flow = FlowSample(now, cx, cy, h, int(m.quality))
        elif name == "VFR_HUD":
            self._vfr_hud = (now, _wrap_deg(float(m.heading)))
            if math.isfinite(m.airspeed):
                self._airspeed = SpeedSample(float(m.airspeed), now)
            if math.isfinite(m.groundspeed):
                self._groundspeed = SpeedSample(float(m.groundspeed), now)
        elif name == "WIND":  # ardupilotmega: where the wind comes from, degrees; speed m/s
            d, v = float(m.direction), float(m.speed)
            if math.isfinite(d) and math.isfinite(v) and v >= 0:
                r = math.radians(d)
                self._wind = WindSample(now, -v * math.sin(r), -v * math.cos(r))
        elif name == "SYSTEM_TIME":
            self._on_system_time(m, now)
        elif name == "GLOBAL_POSITION_INT":
            if m.lat == 0 and m.lon == 0:
                return  # no position yet (ArduPilot sends zeros before its EKF has an origin)
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

    @property
    def gnss_message(self) -> str:
        """The raw GNSS message of the autopilot's own receiver: the instance sarloc does not feed (ArduPilot
        reports instance 1 in GPS_RAW_INT, instance 2 in GPS2_RAW)."""
        return "GPS2_RAW" if self.cfg.gps_id == 0 else "GPS_RAW_INT"

    def apply_gnss(self, name: str, m: Any, now: float) -> None:
        """Keep a GPS_RAW_INT / GPS2_RAW of the autopilot's own GNSS (:attr:`gnss_message`: told apart from sarloc's
        instance by its number, not by its position, which agrees with sarloc's while sarloc is GNSS-aided) with a
        3-D fix; a report without a 3-D fix marks the GNSS as lost.

        Raises:
            AttributeError, TypeError, ValueError: a malformed message (the link counts it as a parse error).
        """
        if name != self.gnss_message:
            return
        if int(m.fix_type) < GPS_FIX_TYPE_3D_FIX or (m.lat == 0 and m.lon == 0):
            self._gnss = None
            return
        h_acc = int(getattr(m, "h_acc", 0) or 0) * 1e-3  # mm; 0 = unknown
        if h_acc <= 0:
            eph = int(m.eph)
            h_acc = eph * 0.01 * 5.0 if 0 < eph < UINT16_UNKNOWN else math.inf
        age = 0.0
        t_us = int(m.time_usec)
        if self._boot_offsets and 0 < t_us < 1e15:  # boot time stamp (ArduPilot): its age against the boot clock
            # the least delayed SYSTEM_TIME of the last few maps boot time to receipt time: a stall of this process
            # delays every receipt alike, and this age then includes it
            age = now - (t_us * 1e-6 + min(self._boot_offsets))
        self._gnss = GnssSample(now, age, m.lat * 1e-7, m.lon * 1e-7, h_acc, name)

    def gnss(self, max_age_s: float | None = None) -> GnssSample | None:
        """The latest 3-D fix of the autopilot's own GNSS, or None when older than ``max_age_s`` (default
        ``stale_after_s``), never received, or followed by a report without a fix."""
        with self._lock:
            g = self._gnss
        return None if g is None else self._fresh(g, g.rx_mono_s, max_age_s)

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
                self._boot_offsets.clear()
                self._on_reboot(now)
        wall = float(self._wall())
        unix_s = unix_us * 1e-6 if unix_us > 0 else None
        self._clock = ClockSample(time_unix_s=unix_s, time_boot_s=boot_s, rx_wall_s=wall, rx_mono_s=now)
        self._boot_offsets.append(now - boot_s)
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

    def optical_flow(self, max_age_s: float | None = None) -> FlowSample | None:
        """The latest OPTICAL_FLOW, or None when older than ``max_age_s`` (default ``stale_after_s``) or never
        received (ArduPilot sends it only with a healthy flow sensor)."""
        with self._lock:
            f = self._flow
        return None if f is None else self._fresh(f, f.rx_mono_s, max_age_s)

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
