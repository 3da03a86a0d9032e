"""What the daemon exchanges with the autopilot: :class:`AutopilotIO`.

In, from the MAVLink link: the motion input between fixes (``motion`` in :mod:`sarloc.runtime.config`: ATTITUDE yaw,
led in turns by the plane's slip (:class:`TurnSlip`, learnt while the autopilot's GNSS works, or ``[nav]
turn_slip_s``), with VFR_HUD airspeed turned into true airspeed; OPTICAL_FLOW with the ATTITUDE; or
GLOBAL_POSITION_INT ground velocity), with ``[nav] gnss_velocity_sigma_mps`` the autopilot's ground velocity as a
measurement while its own GNSS has a fix, SYSTEM_TIME clock samples
for the :class:`~sarloc.runtime.clockmap.ClockMap`, the heading for strips without one, and the autopilot's wind
estimate to start the filter's wind; with ``gnss_aiding``, the fixes of the autopilot's own GNSS receiver while
it has them (the filter then learns the motion input's errors from them and starts a GNSS-denied flight from the
GNSS position; a GNSS that keeps disagreeing with the track is no longer used). Out: the filter's state predicted to
*now* as a :class:`~sarloc.runtime.types.NavState` for the :class:`~sarloc.runtime.mavlink.MavlinkSender`, with
accuracies from the filter covariance; no-fix while the filter has no position or its one-sigma error is beyond
``[nav] max_sigma_m``. Headings and velocities are turned between true north and the pack's grid north (meridian
convergence, :func:`pack_frame`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from sarloc.core.errors import brief
from sarloc.runtime.clockmap import ClockMap
from sarloc.runtime.config import RunConfig
from sarloc.runtime.navfilter import NavFilter
from sarloc.runtime.records import Recorder, est_record
from sarloc.runtime.types import NavState

logger = logging.getLogger("sarloc.runtime.daemon")

#: one-sigma of the autopilot's wind estimate when it starts the filter's wind (from GNSS and airspeed until the
#: denial; partly from sarloc's own positions after it)
WIND_PRIOR_SIGMA_MPS = 1.5

#: GNSS aiding: at most one fix per this many seconds; one-sigma floor (a receiver's h_acc leaves out its latency and
#: the errors that persist for minutes); fixes older than GNSS_MAX_AGE_S at receipt are not used; after
#: GNSS_GATED_LIMIT gated-out fixes in a row the GNSS is not used again in this run (it disagrees with the track)
GNSS_AIDING_INTERVAL_S = 1.0
GNSS_MIN_SIGMA_M = 2.0
GNSS_MAX_AGE_S = 1.0
GNSS_GATED_LIMIT = 5

#: the autopilot's velocity teaches the input's errors in level flight under way only: below this ground speed a
#: plane is on the ground, where its airspeed means nothing (or a copter hovers, where it tells no heading), and
#: beyond this climb or sink rate the airspeed's horizontal part rests on the flight-path angle. (The seconds before
#: a take-off, kept to start the filter, once taught it a 3 m/s wind along the runway, the airspeed read standing
#: still, and the climb-out after them a 13 % scale to match.)
VELOCITY_MIN_SPEED_MPS = 5.0
VELOCITY_MAX_CLIMB_MPS = 2.0

#: the optical-flow velocity handed to the filter is the mean over this long (a flow sensor's samples are noisy: 0.05
#: rad/s at 30 m above ground is 1.5 m/s each), stamped at the mean receipt time
FLOW_AVERAGE_S = 1.0
#: below this height above ground (m) an optical flow's scale means little; no flow input
FLOW_MIN_HEIGHT_M = 0.5
#: ``flow_correction_s``: the flow's correction of the autopilot's velocity is applied while its last flow sample is
#: at most this old (s); a flow that comes back after more than ``flow_correction_s`` starts it again from zero
FLOW_CORRECTION_STALE_S = 2.0

#: the turn slip learnt (``[nav] learn_turn_slip``): from this heading rate on (rad/s; 5.7 deg/s) a sample counts as
#: a turn and the whole slip leads the heading (below it, in proportion to the rate); it is used from
#: SLIP_MIN_SAMPLES turning samples on (10 s at 10 Hz), the mean of the last SLIP_WINDOW; a sample beyond
#: SLIP_MAX_DEG (a turn's entry, a gust) is not used
SLIP_TURN_RATE = 0.1
SLIP_MIN_SAMPLES = 100
SLIP_WINDOW = 600
SLIP_MAX_DEG = 10.0
#: the slip is learnt only from this airspeed on (m/s): below, the course through the air means little
SLIP_MIN_AIRSPEED = 8.0

ToLonLat = Callable[[float, float], tuple[float, float]]
FromLonLat = Callable[[float, float], tuple[float, float]]


def eas_to_tas(alt_amsl_m: float) -> float:
    """True / equivalent airspeed ratio at an altitude in the ISA troposphere, ``sqrt(rho0 / rho)``.

    ArduPilot's VFR_HUD airspeed is the equivalent airspeed; the air moves the vehicle at the true airspeed (5 %
    more at 1,000 m). Altitudes outside -500..11,000 m are clamped.
    """
    h = min(max(float(alt_amsl_m), -500.0), 11_000.0) if math.isfinite(alt_amsl_m) else 0.0
    return (1.0 - 2.25577e-5 * h) ** (-4.25588 / 2.0)


def _grid_convergence_deg(crs: str, pack) -> float:
    """Grid heading minus true heading at the pack's centre (0 with a warning when the CRS cannot tell)."""
    from sarloc.core.geo import grid_convergence_deg

    try:
        x0, y0 = (float(v) for v in pack.centres_m().mean(axis=0))
        return grid_convergence_deg(crs, x0, y0)
    except Exception as e:  # a projection that fails here only loses a sub-degree correction
        logger.warning("meridian convergence unknown (%s); headings used as grid headings", brief(e))
        return 0.0


def pack_from_lonlat(pack) -> FromLonLat | None:
    """The (lon, lat) -> pack metric grid transform (None without a CRS)."""
    crs = pack.metric_crs
    if crs is None:
        return None
    import pyproj

    tr = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)

    def from_lonlat(lon: float, lat: float) -> tuple[float, float]:
        x, y = tr.transform(lon, lat)
        return float(x), float(y)

    return from_lonlat


def pack_frame(pack) -> tuple[ToLonLat | None, float]:
    """The pack's metric grid -> (lon, lat) transform (None without a CRS) and the grid heading minus the true
    heading at its centre (meridian convergence, degrees; 0 without a CRS)."""
    crs = pack.metric_crs
    if crs is None:
        return None, 0.0
    import pyproj

    tr = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)

    def to_lonlat(x: float, y: float) -> tuple[float, float]:
        lon, lat = tr.transform(x, y)
        return float(lon), float(lat)

    return to_lonlat, _grid_convergence_deg(crs, pack)


def flow_velocity_ne(
    comp_x_rad_s: float,
    comp_y_rad_s: float,
    height_m: float,
    roll_deg: float,
    pitch_deg: float,
    yaw_deg: float,
    vd_mps: float = 0.0,
) -> tuple[float, float]:
    """The ground velocity (north, east), m/s, that an optical flow sensor looking down sees, as ArduPilot's
    OPTICAL_FLOW reports it (the flow's angular rates less the body's, about the body's x and y axes, and the height
    above ground): EKF3 predicts those rates as ``(-v_y, v_x) / range`` in the body frame, ``range`` the distance
    along the sensor's axis (``height / (cos roll cos pitch)``). The body-frame velocity's vertical part, which the
    flow does not see, is the one that gives the vertical velocity ``vd_mps`` (down)."""
    phi, theta, psi = (math.radians(a) for a in (roll_deg, pitch_deg, yaw_deg))
    cphi, sphi, cth, sth, cpsi, spsi = (math.cos(phi), math.sin(phi), math.cos(theta), math.sin(theta),
                                        math.cos(psi), math.sin(psi))  # fmt: skip
    rng = height_m / max(cphi * cth, 0.2)
    vx, vy = comp_y_rad_s * rng, -comp_x_rad_s * rng
    vz = (vd_mps + sth * vx - sphi * cth * vy) / max(cphi * cth, 0.2)  # body z: what makes the NED down vd_mps
    north = cth * cpsi * vx + (sphi * sth * cpsi - cphi * spsi) * vy + (cphi * sth * cpsi + sphi * spsi) * vz
    east = cth * spsi * vx + (sphi * sth * spsi + cphi * cpsi) * vy + (cphi * sth * spsi - sphi * cpsi) * vz
    return north, east


class TurnSlip:
    """The angle by which a plane's course through the air leads its nose in a turn, learnt while the autopilot's own
    GNSS holds its velocity (``[nav] learn_turn_slip``).

    Each sample is the autopilot's ground velocity less its wind estimate, as a course, minus its yaw, taken in a
    turn (heading rate at least SLIP_TURN_RATE) and counted in the turn's direction; the slip is their running mean.
    ArduPlane SITL's was 3 degrees in every turn from 0.2 to 1.0 rad/s: a lead proportional to the rate cannot fit
    both a mission's turns and a loiter, a saturating one can.
    """

    def __init__(self) -> None:
        self.n = 0
        self.slip_rad = 0.0

    @property
    def learnt(self) -> bool:
        return self.n >= SLIP_MIN_SAMPLES

    def observe(self, rate_rad_s: float, course_minus_yaw_rad: float) -> None:
        """One sample: the heading rate and the air course minus the yaw at one time (radians, clockwise)."""
        if abs(rate_rad_s) < SLIP_TURN_RATE or not math.isfinite(course_minus_yaw_rad):
            return
        x = math.copysign(1.0, rate_rad_s) * ((course_minus_yaw_rad + math.pi) % (2 * math.pi) - math.pi)
        if abs(x) > math.radians(SLIP_MAX_DEG):
            return
        self.n += 1
        self.slip_rad += (x - self.slip_rad) / min(self.n, SLIP_WINDOW)

    def lead_rad(self, rate_rad_s: float) -> float:
        """The course's lead over the nose at this heading rate (0 until learnt)."""
        if not self.learnt:
            return 0.0
        return self.slip_rad * max(-1.0, min(1.0, rate_rad_s / SLIP_TURN_RATE))


class AutopilotIO:
    """The daemon's side of the MAVLink link (module docstring). ``link`` and ``sender`` are None without MAVLink.

    Args:
        cfg: daemon settings (``motion``, ``max_clock_offset_s``, ``field_elevation_m``, ``[mavlink]``).
        nav: the navigation filter (motion inputs in, estimates out).
        clock: the daemon's clock map (autopilot clock samples in).
        rec: the records (a ``nav`` record about once a second).
        lock: the daemon's lock, which guards ``nav`` and ``clock`` use together.
        to_lonlat, grid_from_true_deg: the pack's frame (:func:`pack_frame`).
        from_lonlat: the inverse of ``to_lonlat`` (:func:`pack_from_lonlat`), for GNSS aiding.
    """

    def __init__(
        self,
        cfg: RunConfig,
        nav: NavFilter,
        clock: ClockMap,
        rec: Recorder,
        lock: threading.Lock,
        to_lonlat: ToLonLat | None,
        grid_from_true_deg: float,
        from_lonlat: FromLonLat | None = None,
    ) -> None:
        self.cfg = cfg
        self.nav = nav
        self.clock = clock
        self.rec = rec
        self._lock = lock
        self.to_lonlat = to_lonlat
        self.grid_from_true_deg = grid_from_true_deg  # grid heading = true heading + this (meridian convergence)
        self.link: Any = None
        self.sender: Any = None
        self.out_stats = {"ticks": 0, "valid_ticks": 0, "ticks_since_first_valid": 0}
        self._last_motion_rx: float | None = None
        self._prev_att: Any = None  # the last ATTITUDE seen (heading rate for the slip)
        self._rate = 0.0  # heading rate from the last two ATTITUDEs, rad/s clockwise
        self.turn_slip = TurnSlip()
        self._slip_pos_rx: float | None = None  # the GLOBAL_POSITION_INT last used to learn the slip
        self._vel_rx: float | None = None  # the GLOBAL_POSITION_INT last handed to the filter as a velocity
        self.velocity_stats = {"used": 0, "refused": 0, "not_level": 0}
        self._flow: deque[tuple[float, float, float]] = deque()  # (rx_mono_s, north, east): the flow's last second
        self._flow_corr = np.zeros(2)  # motion = "velocity": the flow's low-passed difference from it (grid, m/s)
        self._flow_corr_rx: float | None = None  # receipt of the last flow sample in it
        self.flow_stats = {"corrected": 0, "plain": 0}
        self._last_nav_record = -math.inf
        self._last_ap_clock: float | None = None
        self.from_lonlat = from_lonlat
        self.gnss_stats = {"used": 0, "gated": 0, "skipped": 0}
        self._gnss_rx: float | None = None  # receipt of the last GNSS fix handed to the filter
        self._gnss_gated_run = 0
        self._gnss_state = "none"  # none -> aiding <-> lost; "off" once it disagreed with the track
        if cfg.gnss_aiding and from_lonlat is None:
            logger.warning("gnss_aiding needs a map pack with a CRS: the autopilot's GNSS is not used")

    def start(self) -> None:
        """Open the link and start the sender thread (with ``cfg.mavlink`` only)."""
        if not self.cfg.mavlink:
            return
        from sarloc.runtime.mavlink import MavlinkConfig, MavlinkLink, MavlinkSender

        self.link = MavlinkLink(MavlinkConfig(**self.cfg.mavlink_opts))
        self.sender = MavlinkSender(self.link, self.nav_state)
        self.sender.start()

    def stop(self) -> dict[str, int] | None:
        """Stop the sender (it sends a last no-fix) and close the link. Returns the link's counters (None without)."""
        if self.sender is not None:
            self.sender.stop()  # sends a last no-fix
        if self.link is None:
            return None
        stats = dict(self.link.stats)
        self.link.close()
        return stats

    def feed(self, wall_s: float) -> None:
        """Motion input and clock samples from the autopilot (called on every output tick, under the lock)."""
        link = self.link
        if link is None:
            return
        ck = link.autopilot_clock()
        if ck is not None and ck.time_unix_s is not None and ck.rx_wall_s != self._last_ap_clock:
            self._last_ap_clock = ck.rx_wall_s
            self.clock.observe_autopilot(ck.rx_wall_s, ck.time_unix_s)
            off = ck.time_unix_s - ck.rx_wall_s
            if self.clock.mode == "unix" and abs(off) > self.cfg.max_clock_offset_s and not self.clock.warned:
                self.clock.warned = True
                logger.warning(
                    "the autopilot's clock differs from this computer's by %.2f s (> max_clock_offset_s %.2f): "
                    "synchronise the clocks (e.g. chrony) or set clock = autopilot",
                    off,
                    self.cfg.max_clock_offset_s,
                )
        mono_now = time.monotonic()
        if self.cfg.gnss_aiding:
            self._feed_gnss(link, wall_s, mono_now)
        motion = self.cfg.motion
        if motion not in ("auto", "airspeed", "velocity", "flow"):
            return
        sample = None
        if motion in ("auto", "airspeed"):
            att, asp = link.attitude(max_age_s=1.0), link.airspeed_mps(max_age_s=1.0)
            if att is not None:
                self._heading_rate(att)
            if att is not None and asp is not None and asp.mps >= SLIP_MIN_AIRSPEED and self.nav.cfg.learn_turn_slip:
                self._learn_slip(link, att)
            if att is not None and asp is not None and asp.mps >= 3.0:
                rx = max(att.rx_mono_s, asp.rx_mono_s)
                psi = math.radians(att.yaw_deg + self.grid_from_true_deg) + self._slip_rad()
                pos = link.position_prior(max_age_s=5.0)
                tas = asp.mps * eas_to_tas(pos.alt_m if pos is not None else 0.0)
                # the airspeed is along the flight path: in a climb or descent only part of it is horizontal (a
                # plane climbing out at 10 m/s on 28 m/s true airspeed moves 7 % slower over the ground)
                vd = pos.vel_ned_mps[2] if pos is not None else 0.0
                h = math.sqrt(tas * tas - vd * vd) if math.isfinite(vd) and abs(vd) < tas else tas
                sample = (rx, "air", (h * math.sin(psi), h * math.cos(psi)))
        if motion == "velocity":
            pos = link.position_prior(max_age_s=1.0)
            if pos is not None:
                v = self._to_grid(pos.vel_ned_mps[1], pos.vel_ned_mps[0])
                sample = (pos.rx_mono_s, "ground", self._flow_corrected(link, v, pos.vel_ned_mps[2], mono_now))
        if motion == "flow":
            sample = self._flow_sample(link)
        if sample is not None and sample[0] != self._last_motion_rx:
            self._last_motion_rx = sample[0]
            t = self.clock.now(wall_s - (mono_now - sample[0]))
            if t is not None:
                self.nav.add_motion(t, sample[1], sample[2])
        if motion != "velocity" and self.nav.cfg.gnss_velocity_sigma_mps > 0:
            self._feed_gnss_velocity(link, wall_s, mono_now)

    def _feed_gnss_velocity(self, link: Any, wall_s: float, mono_now: float) -> None:
        """The autopilot's ground velocity as a measurement (``[nav] gnss_velocity_sigma_mps``), about once a
        second, while its own GNSS has a fix (then its velocity is the GNSS's, not built from the positions sent), in
        level flight under way (VELOCITY_MIN_SPEED_MPS, VELOCITY_MAX_CLIMB_MPS); before the filter's first position
        too (it keeps them for its start)."""
        pos = link.position_prior(max_age_s=0.5)
        if pos is None or link.gnss(max_age_s=1.0) is None:
            return
        if self._vel_rx is not None and pos.rx_mono_s - self._vel_rx < GNSS_AIDING_INTERVAL_S:
            return
        self._vel_rx = pos.rx_mono_s
        t, now = self.clock.now(wall_s - (mono_now - pos.rx_mono_s)), self.clock.now(wall_s)
        if t is None or now is None:
            return
        vn, ve, vd = pos.vel_ned_mps
        if math.hypot(vn, ve) < VELOCITY_MIN_SPEED_MPS or not abs(vd) <= VELOCITY_MAX_CLIMB_MPS:
            self.velocity_stats["not_level"] += 1
            return
        v = self._to_grid(ve, vn)
        ok, _ = self.nav.add_velocity(t, v, self.nav.cfg.gnss_velocity_sigma_mps, now)
        self.velocity_stats["used" if ok else "refused"] += 1

    def _heading_rate(self, att: Any) -> None:
        """The heading rate from the last two ATTITUDE yaws (0 when they are more than a second apart)."""
        prev = self._prev_att
        if prev is not None and att.rx_mono_s == prev.rx_mono_s:
            return
        self._prev_att = att
        dt = att.rx_mono_s - prev.rx_mono_s if prev is not None else 0.0
        d = (att.yaw_deg - prev.yaw_deg + 180.0) % 360.0 - 180.0 if prev is not None else 0.0
        self._rate = math.radians(d / dt) if 0.0 < dt <= 1.0 else 0.0

    def _slip_rad(self) -> float:
        """The angle by which a plane's course leads its nose in a turn, radians clockwise: the heading rate times
        ``[nav] turn_slip_s`` when set, else the slip learnt (:class:`TurnSlip`, with ``learn_turn_slip``), else 0."""
        lead_s = self.nav.cfg.turn_slip_s
        if lead_s > 0:
            return self._rate * lead_s
        return self.turn_slip.lead_rad(self._rate) if self.nav.cfg.learn_turn_slip else 0.0

    def _learn_slip(self, link: Any, att: Any) -> None:
        """One slip sample (:class:`TurnSlip`) from a new GLOBAL_POSITION_INT while the autopilot's own GNSS has a
        fix (its velocity is then the GNSS's, not built from the positions sent): the ground velocity less the
        wind, as a course, minus the yaw carried to the position's receipt at the heading rate."""
        pos, w = link.position_prior(max_age_s=0.5), link.wind(max_age_s=5.0)
        if pos is None or pos.rx_mono_s == self._slip_pos_rx or link.gnss(max_age_s=1.0) is None:
            return
        self._slip_pos_rx = pos.rx_mono_s
        if abs(pos.rx_mono_s - att.rx_mono_s) > 0.5:
            return
        vn, ve = pos.vel_ned_mps[0] - (w.north_mps if w else 0.0), pos.vel_ned_mps[1] - (w.east_mps if w else 0.0)
        if math.hypot(vn, ve) < SLIP_MIN_AIRSPEED:
            return
        was = self.turn_slip.learnt
        yaw = math.radians(att.yaw_deg) + self._rate * (pos.rx_mono_s - att.rx_mono_s)
        self.turn_slip.observe(self._rate, math.atan2(ve, vn) - yaw)
        if self.turn_slip.learnt and not was:
            slip = math.degrees(self.turn_slip.slip_rad)
            msg = f"turn slip learnt: the course leads the nose by {slip:.1f} deg in turns"
            logger.info(msg)
            self.rec.write({"type": "nav", "event": "turn slip", "wall_s": time.time(), "reason": msg})

    @staticmethod
    def _usable_flow(link: Any) -> tuple[Any, Any] | None:
        """The latest OPTICAL_FLOW and ATTITUDE (a second old at most) when the flow can give a velocity: quality
        above 0 and at least FLOW_MIN_HEIGHT_M above ground; else None."""
        f, att = link.optical_flow(max_age_s=1.0), link.attitude(max_age_s=1.0)
        if f is None or att is None or f.quality <= 0 or f.ground_distance_m < FLOW_MIN_HEIGHT_M:
            return None
        return f, att

    @staticmethod
    def _flow_ne(f: Any, att: Any, vd_mps: float) -> tuple[float, float]:
        """The flow sample's ground velocity (true north, east) with the vertical speed ``vd_mps`` (0 when unknown)."""
        vd = vd_mps if math.isfinite(vd_mps) else 0.0
        return flow_velocity_ne(
            f.comp_x_rad_s, f.comp_y_rad_s, f.ground_distance_m, att.roll_deg, att.pitch_deg, att.yaw_deg, vd
        )

    def _flow_corrected(self, link: Any, v: tuple[float, float], vd_mps: float, mono_now: float) -> tuple[float, float]:
        """``motion = "velocity"`` with ``flow_correction_s``: the autopilot's ground velocity ``v`` (grid east,
        north) plus the optical flow's mean difference from it over that time constant (an exponential mean of every
        new flow sample's difference). Without GNSS the autopilot's velocity is pulled by the positions sarloc sends
        (EKF3 fuses them with the flow): a position that drifts drags it after itself, for tens of seconds, and the
        filter, predicting with it, drifts the more. The flow is independent of the positions; alone it is noisy (a
        second's mean 0.3-0.6 m/s in ArduCopter SITL), so it corrects only the slow part. ``v`` unchanged without a
        flow sample of the last FLOW_CORRECTION_STALE_S (or none at all, or with the correction off)."""
        tau = self.cfg.flow_correction_s
        if tau <= 0:
            return v
        flow = self._usable_flow(link)
        last = self._flow_corr_rx
        if flow is not None and (last is None or flow[0].rx_mono_s > last):
            f = flow[0]
            n, e = self._flow_ne(*flow, vd_mps)
            diff = np.subtract(self._to_grid(e, n), v)
            if last is None or f.rx_mono_s - last > tau:  # first sample, or the flow comes back: start again
                self._flow_corr = np.zeros(2)
                last = f.rx_mono_s - 0.1  # the first sample weighs as one of a 10 Hz stream
            self._flow_corr = self._flow_corr + (1.0 - math.exp(-(f.rx_mono_s - last) / tau)) * (diff - self._flow_corr)
            self._flow_corr_rx = last = f.rx_mono_s
        if last is None or mono_now - last > FLOW_CORRECTION_STALE_S:
            self.flow_stats["plain"] += 1
            return v
        self.flow_stats["corrected"] += 1
        return float(v[0] + self._flow_corr[0]), float(v[1] + self._flow_corr[1])

    def _flow_sample(self, link: Any) -> tuple[float, str, tuple[float, float]] | None:
        """The optical flow's ground velocity, the mean of the last FLOW_AVERAGE_S, as a ``ground`` motion input
        ``(rx_mono_s, kind, (east, north))`` on the grid, or None (no fresh flow, no attitude, too low, or the same
        flow sample as last time)."""
        flow = self._usable_flow(link)
        if flow is None:
            return None
        f = flow[0]
        if not self._flow or f.rx_mono_s > self._flow[-1][0]:
            pos = link.position_prior(max_age_s=5.0)
            n, e = self._flow_ne(*flow, pos.vel_ned_mps[2] if pos is not None else 0.0)
            self._flow.append((f.rx_mono_s, n, e))
        while self._flow and self._flow[0][0] < self._flow[-1][0] - FLOW_AVERAGE_S:
            self._flow.popleft()
        k = len(self._flow)
        t, vn, ve = (sum(s[i] for s in self._flow) / k for i in range(3))
        return t, "ground", self._to_grid(ve, vn)

    def _to_grid(self, east: float, north: float) -> tuple[float, float]:
        """A (east, north) vector turned from true north to the pack's grid north."""
        g = math.radians(self.grid_from_true_deg)
        return east * math.cos(g) + north * math.sin(g), -east * math.sin(g) + north * math.cos(g)

    def _feed_gnss(self, link: Any, wall_s: float, mono_now: float) -> None:
        """GNSS aiding: hand the autopilot's own GNSS fix to the filter, at most every GNSS_AIDING_INTERVAL_S."""
        if self._gnss_state == "off" or self.from_lonlat is None:
            return
        g = link.gnss(max_age_s=2.0)
        if g is None:
            if self._gnss_state == "aiding" and self._gnss_rx is not None and mono_now - self._gnss_rx > 2.0:
                self._gnss_event("lost", "the autopilot's GNSS has no fix: navigating on the SAR fixes")
            return
        if self._gnss_rx is not None and g.rx_mono_s - self._gnss_rx < GNSS_AIDING_INTERVAL_S:
            return
        self._gnss_rx = g.rx_mono_s
        if not (-0.5 <= g.age_s <= GNSS_MAX_AGE_S and math.isfinite(g.h_acc_m)):
            self.gnss_stats["skipped"] += 1  # too old (a clock problem) or without an accuracy
            return
        now = self.clock.now(wall_s)
        t_rx = self.clock.now(wall_s - (mono_now - g.rx_mono_s))
        if now is None or t_rx is None:
            return
        xy = self.from_lonlat(g.lon_deg, g.lat_deg)
        sigma = max(g.h_acc_m, GNSS_MIN_SIGMA_M)
        ok, why = self.nav.add_gnss(t_rx - max(g.age_s, 0.0), xy, sigma, now, self.wind_prior())
        if ok:
            self.gnss_stats["used"] += 1
            self._gnss_gated_run = 0
            if self._gnss_state != "aiding":
                self._gnss_event("aiding", f"GNSS aiding: the autopilot's {g.name} fixes reach the filter")
        elif why.startswith("gated"):
            self.gnss_stats["gated"] += 1
            self._gnss_gated_run += 1
            if self._gnss_gated_run >= GNSS_GATED_LIMIT:
                self._gnss_event(
                    "off",
                    f"the autopilot's GNSS disagreed with the track {GNSS_GATED_LIMIT} times in a row ({why}): "
                    "not used again in this run",
                    warn=True,
                )

    def _gnss_event(self, state: str, msg: str, warn: bool = False) -> None:
        self._gnss_state = state
        (logger.warning if warn else logger.info)(msg)
        self.rec.write({"type": "nav", "event": f"gnss {state}", "wall_s": time.time(), "reason": msg})

    def wind_prior(self) -> tuple[tuple[float, float], float] | None:
        """The autopilot's wind estimate (grid frame) as the filter's starting wind, while it is fresh."""
        w = self.link.wind(max_age_s=5.0) if self.link is not None else None
        if w is None:
            return None
        return self._to_grid(w.east_mps, w.north_mps), WIND_PRIOR_SIGMA_MPS

    def nav_state(self, now_s: float) -> NavState:
        """The filter's state predicted to wall time ``now_s`` (UNIX) as a :class:`NavState` for the sender."""
        with self._lock:
            self.feed(now_s)
            t = self.clock.now(now_s)
            est = self.nav.estimate(t) if t is not None else None
            to_lonlat = self.to_lonlat
            self.out_stats["ticks"] += 1
            valid = est is not None and est.valid and to_lonlat is not None
            if valid:
                self.out_stats["valid_ticks"] += 1
            if self.out_stats["valid_ticks"]:
                self.out_stats["ticks_since_first_valid"] += 1
        if est is not None and now_s - self._last_nav_record >= 1.0:
            self._last_nav_record = now_s
            self.rec.write({"type": "nav", "wall_s": now_s, **est_record(est)})
        if est is None:
            return NavState(now_s, False)
        if not valid or to_lonlat is None:  # (to_lonlat is not None when valid: the check narrows it for mypy)
            return NavState(now_s, False, horiz_accuracy_m=est.sigma_h_m, speed_accuracy_mps=est.sigma_v_mps)
        lon, lat = to_lonlat(*est.xy_m)
        ve, vn = est.vel_mps
        g = math.radians(self.grid_from_true_deg)  # grid (east, north) -> true
        ve_t, vn_t = ve * math.cos(g) - vn * math.sin(g), ve * math.sin(g) + vn * math.cos(g)
        alt, vacc, vd = None, None, 0.0
        if self.cfg.field_elevation_m is not None and self.link is not None:
            pos = self.link.position_prior(max_age_s=1.0)
            if pos is not None:
                alt, vacc, vd = self.cfg.field_elevation_m + pos.relative_alt_m, 5.0, pos.vel_ned_mps[2]
        return NavState(
            now_s,
            True,
            float(lat),
            float(lon),
            alt,
            (vn_t, ve_t, vd),
            est.sigma_h_m,
            est.sigma_v_mps,
            None,  # no independent heading: yaw is not sent (course over ground is not a heading)
            vert_accuracy_m=vacc,
        )

    def heading(self, meta) -> float | None:
        """The autopilot's heading in grid degrees for a strip without one in its metadata, else None."""
        if meta.heading_deg is not None:
            return None  # the stream uses the metadata
        if self.link is not None:
            h = self.link.heading_deg(max_age_s=2.0)
            return None if h is None else (h + self.grid_from_true_deg) % 360.0
        return None

    def airspeed_known(self) -> bool:
        """Whether the autopilot reports an airspeed (``motion = auto`` then takes it instead of the strips')."""
        return self.link is not None and bool(self.link.airspeed_mps(max_age_s=2.0))

    def availability(self) -> dict[str, Any]:
        """Output ticks, valid ticks and the share of valid ones since the first (the ``stop`` record's ``output``)."""
        o: dict[str, Any] = dict(self.out_stats)
        n = o["ticks_since_first_valid"]
        o["availability_since_first_fix"] = round(o["valid_ticks"] / n, 4) if n else None
        return o
