"""Navigation filter between localisation and the autopilot (torch-free): positions at the current time.

A SAR window is localised seconds to tens of seconds after its rows were acquired (a window needs all its rows,
then it is matched). An autopilot wants where the vehicle is *now*. :class:`NavFilter` bridges the two:

* **State** ``x = (east, north, b_east, b_north, k, d)`` in the map's metric frame: the position, a slowly varying
  bias between the motion input and the ground velocity (the wind when the input is the air-velocity vector; a
  velocity bias otherwise), a scale error of the input's speed (an airspeed calibration error, a true-airspeed
  conversion left over) and a heading error ``d`` of the input (radians, clockwise: an autopilot's yaw without
  GNSS is off by a few degrees, most after turns). The ground velocity is ``(1 + k) R(d) u + b``, linearised as
  ``(1 + k) u + d (u_north, -u_east) + b``, ``u`` the motion input in force. The heading error's uncertainty grows
  with time and with every turn of the input (``heading_turn_fraction`` of the angle turned): the fixes that
  follow a turn tell a heading error (a drift across the track that turns with the vehicle) from a wind (a drift
  fixed on the ground). For an air-velocity input (``heading_transient_s`` > 0, the default; 0 turns it off) the
  heading error has two parts: ``d``, steady, and a transient ``e`` that every turn moves by ``g`` times the
  signed angle turned and that decays with that time constant (an autopilot's yaw without GNSS is pulled off in a
  turn and recovers over tens of seconds); the gain ``g`` is a state too, learnt from the fixes after earlier
  turns; a turn's uncertainty is then the gain's (its one-sigma times the angle turned, in ``e``, so it decays
  with it) instead of ``heading_turn_fraction``; one continuous turn moves it by half a circle at most (beyond, a
  loiter adds nothing and the transient decays).
* **Prediction from a motion input** (a time-stamped velocity; each one holds until the next): ``airspeed`` - the
  autopilot's heading and true airspeed (independent of the positions sarloc sends, so no feedback loop; ``b``
  is the wind); ``ground`` - a ground velocity (the strip metadata's heading and along-track speed, or the
  autopilot's own velocity estimate). The position moves by ``(u + b) dt``; its covariance grows with the input's
  noise, and faster the older the input (a vehicle may turn once its motion stream stops). Without any input the
  velocity is unknown (``init_velocity_sigma_mps``).
* **Fixes** (window positions) are applied **at their acquisition time**: the filter keeps a history of every
  event of the last ``history_s`` seconds with the state after it; a late or out-of-order fix rewinds to its time,
  is applied there, and the later events are re-applied (a delayed / out-of-sequence measurement update).
* **GNSS aiding** (:meth:`NavFilter.add_gnss`): while the autopilot's own GNSS works its fixes start the filter
  and teach it the input's errors on straight legs; the first one after a turn resets the position (the drift
  through a turn is not an error of a straight leg), and while they come the turns do not open the heading error
  (the autopilot's heading is GNSS-aided then).
* **The autopilot's velocity** (:meth:`NavFilter.add_velocity`, with ``gnss_velocity_sigma_mps``): while its GNSS
  works, a measurement of the ground velocity on straight legs; it teaches the same errors without touching the
  position, and the turns between them are GNSS-aided like those between GNSS fixes. Velocities that come before
  the filter's first position are kept: the first fix then starts the filter just before the oldest of them (its
  position unknown there, ``_DIFFUSE_M``), they are gated and applied, and the fix gives the position, so that the
  errors the whole history taught are known from the first position on.
* **Gating**: a fix whose Mahalanobis distance to the predicted state exceeds ``gate_chi2`` is not applied; a
  wrong fix cannot jerk the output. ``reinit_after`` consecutive gated-out fixes that agree with one another (each
  within the gate of the previous one moved by the filter's motion) re-initialise the position: recovery from a
  wrong first fix.

What is reported (:meth:`NavFilter.estimate`) is the state predicted to the requested time, never an old state
stamped as current; it is valid while the one-sigma horizontal error stays within ``max_sigma_m``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["NavConfig", "NavEstimate", "NavFilter", "chi2_2dof"]

# east, north, bias east, bias north, input scale error, input heading error (rad, clockwise), its transient part
# after turns (rad, clockwise), the transient per angle turned clockwise
_N = 8
_H_POS = np.hstack([np.eye(2), np.zeros((2, _N - 2))])
_MIN_TURN_SPEED_MPS = 3.0  # below this an input's direction means little: no turn is counted
_TURN_STEP_RAD = math.radians(10.0)  # a turn is counted once the input has turned this far from the reference
_GATE_1DOF = 10.83  # chi-square, 1 degree of freedom, 99.9 %
#: GNSS fixes are applied only after this long without a turn of the motion input (_STRAIGHT_TURN_RAD at most): in
#: and just after a turn the vehicle slips and the input and the fix are misaligned in time by a fraction of a
#: second, which the model cannot tell from a heading error
GNSS_STRAIGHT_S = 10.0
_STRAIGHT_TURN_RAD = math.radians(5.0)
#: nor while the input's speed changed by more than this (or _STEADY_FRACTION of it) within GNSS_STRAIGHT_S (a
#: take-off, a copter's stop at a waypoint): a lag of a fraction of a second in an acceleration looks like a
#: speed-scale error (a plane's take-off taught +6 %); gusts move an airspeed by less
_STEADY_SPEED_MPS = 1.0
_STEADY_FRACTION = 0.1
#: turn steps closer than this in time make one turn; beyond _TRANSIENT_MAX_TURN_RAD of one (a loiter's circles) the
#: turn moves the heading transient no further and adds no other uncertainty; the transient decays as after any
#: turn. A heading offset kept in the velocity sent through a loiter pulls the autopilot's yaw after it (EKF3 fuses
#: that velocity, and a turn makes its yaw observable from it): ArduPlane SITL's yaw went 12-15 degrees off in
#: the loiter over home with the transient held, 13 with it moved by every circle; the turn fraction instead added
#: 11 degrees of uncertainty per circle and raised EKF3's GPS-glitch flag
_TURN_GAP_S = 5.0
_TRANSIENT_MAX_TURN_RAD = math.pi
#: within this long after a GNSS fix the autopilot's heading is GNSS-aided: its turns do not open the heading error
#: (they would let it trade places with the wind at every turn: a pair right on one leg, wrong on the next)
GNSS_REGIME_S = 20.0
#: the drift through a manoeuvre the first GNSS fix after it may show (one-sigma): the change of the input's velocity
#: times this (a yaw or a speed that lags the truth by this long, or the equivalent slip)
GNSS_TURN_LAG_S = 2.0
#: the position's one-sigma where the filter starts before its first fix (velocities kept before it): unknown
_DIFFUSE_M = 1.0e4
_START_LEAD_S = 1.0e-3


def _clip_turn(run: float) -> float:
    """The part of one continuous turn's signed angle that moves the heading transient (half a circle at most)."""
    return max(-_TRANSIENT_MAX_TURN_RAD, min(_TRANSIENT_MAX_TURN_RAD, run))


def _steady_mps(speed: float) -> float:
    """The change of an input's speed that still counts as steady flight at ``speed``."""
    return max(_STEADY_SPEED_MPS, _STEADY_FRACTION * speed)


def chi2_2dof(p: float) -> float:
    """The chi-square quantile for 2 degrees of freedom: the Mahalanobis^2 gate that passes a fraction ``p``."""
    return -2.0 * math.log(1.0 - p)


@dataclass(frozen=True)
class NavConfig:
    """Navigation filter settings (TOML table ``[nav]``).

    Attributes:
        accel_sigma_mps2: how fast the velocity may drift from an input as it ages, m/s^2 (manoeuvres after the
            motion stream stopped): the input's one-sigma grows by this times its age.
        bias_sigma_mps_per_s: random-walk rate of the wind / velocity-bias state, (m/s) per sqrt(s).
        init_velocity_sigma_mps: one-sigma of the velocity when no motion input is known.
        init_bias_sigma_mps: one-sigma of the wind at initialisation (air-velocity input).
        init_ground_bias_sigma_mps: one-sigma of the velocity bias at initialisation (ground-velocity input).
        init_scale_sigma: one-sigma of the input's speed-scale error at initialisation (0.05 = 5 %).
        scale_sigma_per_s: random-walk rate of the scale error, per sqrt(s).
        init_heading_sigma_deg: one-sigma of the input's heading error at initialisation, degrees.
        heading_sigma_deg_per_s: random-walk rate of the heading error, degrees per sqrt(s).
        heading_turn_fraction: the heading error's one-sigma grows by this fraction of every turn of the input (an
            autopilot's yaw lags after a turn without GNSS: 0.5-4.5 % of a 90-110 degree turn in ArduPlane SITL,
            0.1-14 % in ArduCopter's, at most 2.6 % with ``EK3_MAG_M_NSE`` 0.02); not used for an air-velocity input
            with ``heading_transient_s``, where the turn gain's one-sigma takes its place.
        heading_transient_s: time constant of the heading error's transient part after a turn of an air-velocity
            input (the autopilot's yaw), seconds; 0: one heading error, no transient.
        turn_gain_sigma: one-sigma of the transient per angle turned at initialisation (0.02: 1.8 degrees after a
            90 degree turn; with the plane's slip learnt ArduPlane SITL's yaw was pulled by 0.1-2.1 % of each turn,
            without it by up to 4.8 %); used with ``heading_transient_s`` only.
        turn_gain_sigma_per_s: random-walk rate of that gain, per sqrt(s), up to ``turn_gain_sigma``: an autopilot's
            yaw stays right through turns while it has GNSS and is pulled off once it has none, so what was learnt
            before has to give way.
        loiter_slip_deg: in a loiter (one continuous turn of an air-velocity input beyond half a circle) the speed
            accuracy sent also covers this angle between the input's heading and the course (a plane slips in a
            steady turn: 3 degrees in ArduPlane SITL); 0 (the default): not. With 3 the loiter's accuracy was
            honest and EKF3's yaw followed the velocity sent less, but EKF3 flagged a GPS glitch once a flight.
        turn_slip_s: an air-velocity input's heading is led by the heading rate times this, seconds (a plane's
            course runs ahead of its nose in a turn: ArduPlane SITL's by 3 degrees at 16 degrees/s); 0: not (then
            ``learn_turn_slip``).
        learn_turn_slip: while the autopilot's own GNSS has a fix, learn the angle by which the course through the
            air leads the yaw in turns (its ground velocity less its wind, against its yaw) and, once learnt, lead an
            air-velocity input's heading by it in every turn (in proportion below 0.1 rad/s); never learnt (GNSS
            denied from take-off, or no turns before): no lead. Not used with ``turn_slip_s``.
        gnss_velocity_sigma_mps: while the autopilot's own GNSS has a fix, its ground velocity (GLOBAL_POSITION_INT,
            GNSS-backed then) is a measurement of the filter's ground velocity with this one-sigma, about once a
            second on straight steady flight: it teaches the input's wind, scale and heading errors before the
            denial (0.3: ArduPilot's GNSS-aided velocity is good to a few tenths of a m/s), from before the first
            SAR fix on (those of the last ``start_history_s`` are kept for it). 0: not used.
        course_sigma_deg: one-sigma of the strip metadata's course (the SAR's own motion measurement), applied by
            the daemon as a measurement of the course at each strip's first row while the motion input comes from
            the autopilot (it tells the heading error within seconds of a leg's first strip); 1.0 (the default;
            the simulated strips' heading carries 0.5 degree of noise); 0: not used (closed loops with and without
            it: docs/research/closed_loop.md).
        course_speed_sigma_mps: the cross-track speed error a course measurement sees besides the course's own:
            the input's sample noise at the strip's first row (as ``input_noise_mps``), m/s.
        airspeed_sigma_mps: one-sigma of an air-velocity input (airspeed and heading errors), per axis: the
            position's random walk between fixes.
        ground_sigma_mps: one-sigma of a ground-velocity input, per axis; also the drift allowed per second between
            the gated-out fixes that re-initialise the position.
        input_noise_mps: one-sigma of the motion input's sample noise, per axis (at most the input's one-sigma): its
            part of the speed accuracy sent. The input's one-sigmas above also stand for the drift that no state
            models, as the position's random walk; the velocity sent is off by the noise only (measured 0.13-0.23
            m/s on straight legs), and EKF3 takes a speed accuracy above 1.5 m/s for a GPS glitch.
        correlation_s: correlation time of the input's errors: the position variance grows by
            ``sigma^2 * correlation_s`` per second, however often inputs and fixes arrive.
        gate_chi2: Mahalanobis^2 gate for fixes (13.8 = 99.9 % for 2 dof).
        reinit_after: consecutive, mutually consistent gated-out fixes that re-initialise the position.
        history_s: how far back a delayed fix may be applied; older ones are dropped (counted).
        start_history_s: before the filter's first position, the events of this long are kept: the autopilot's
            velocities among them (``gnss_velocity_sigma_mps``) start the filter at its first fix (long enough for
            more than one heading: a straight leg teaches the wind, scale and heading errors only in sums).
        future_tolerance_s: a fix stamped later than "now" by more than this is refused (a clock problem).
        max_sigma_m: the estimate is invalid (the autopilot gets no-fix) while its one-sigma horizontal error is
            larger than this.
    """

    accel_sigma_mps2: float = 0.5
    bias_sigma_mps_per_s: float = 0.02
    init_velocity_sigma_mps: float = 15.0
    init_bias_sigma_mps: float = 5.0
    init_ground_bias_sigma_mps: float = 0.5
    init_scale_sigma: float = 0.05
    scale_sigma_per_s: float = 0.0005
    init_heading_sigma_deg: float = 3.0
    heading_sigma_deg_per_s: float = 0.05
    heading_turn_fraction: float = 0.03
    heading_transient_s: float = 30.0
    turn_gain_sigma: float = 0.02
    turn_gain_sigma_per_s: float = 0.001
    loiter_slip_deg: float = 0.0
    turn_slip_s: float = 0.0
    learn_turn_slip: bool = True
    gnss_velocity_sigma_mps: float = 0.3
    course_sigma_deg: float = 1.0
    course_speed_sigma_mps: float = 0.5
    airspeed_sigma_mps: float = 1.0
    ground_sigma_mps: float = 1.0
    input_noise_mps: float = 0.5
    correlation_s: float = 0.1
    gate_chi2: float = 13.8
    reinit_after: int = 3
    history_s: float = 180.0
    start_history_s: float = 600.0
    future_tolerance_s: float = 1.0
    max_sigma_m: float = 400.0

    def __post_init__(self) -> None:
        from sarloc.core.config import finite_number
        from sarloc.core.errors import ConfigError

        for name in (
            "accel_sigma_mps2",
            "bias_sigma_mps_per_s",
            "init_velocity_sigma_mps",
            "init_bias_sigma_mps",
            "init_ground_bias_sigma_mps",
            "init_scale_sigma",
            "scale_sigma_per_s",
            "init_heading_sigma_deg",
            "heading_sigma_deg_per_s",
            "heading_turn_fraction",
            "airspeed_sigma_mps",
            "ground_sigma_mps",
            "course_speed_sigma_mps",
            "input_noise_mps",
            "correlation_s",
            "gate_chi2",
            "history_s",
            "start_history_s",
            "max_sigma_m",
        ):
            v = finite_number(getattr(self, name))
            if v is None or v <= 0:
                raise ConfigError(f"[nav] {name}={getattr(self, name)!r:.40} must be a finite number > 0")
        for name in (
            "future_tolerance_s",
            "course_sigma_deg",
            "heading_transient_s",
            "turn_gain_sigma",
            "turn_gain_sigma_per_s",
            "loiter_slip_deg",
            "turn_slip_s",
            "gnss_velocity_sigma_mps",
        ):
            v = finite_number(getattr(self, name))
            if v is None or v < 0:
                raise ConfigError(f"[nav] {name}={getattr(self, name)!r:.40} must be a finite number >= 0")
        if not isinstance(self.learn_turn_slip, bool):
            raise ConfigError(f"[nav] learn_turn_slip={self.learn_turn_slip!r:.40} must be true or false")
        if not isinstance(self.reinit_after, int) or isinstance(self.reinit_after, bool) or self.reinit_after < 1:
            raise ConfigError(f"[nav] reinit_after={self.reinit_after!r:.40} must be an integer >= 1")


@dataclass(frozen=True)
class NavEstimate:
    """The filter's state at ``t_s`` (see :meth:`NavFilter.estimate`).

    Attributes:
        t_s: the time of the estimate (data clock).
        xy_m: (east, north); vel_mps: ground velocity (v_east, v_north); bias_mps: wind / velocity bias;
        scale: the input's speed-scale error ``k``; heading_offset_deg: the input's heading error ``d`` (with its
            transient part), degrees (clockwise: the true course is this much clockwise of the input's).
        sigma_h_m: one-sigma horizontal error (square root of the largest eigenvalue of the position covariance).
        sigma_v_mps: one-sigma ground-velocity error along its worst axis: the input's sample noise
            (``input_noise_mps``) and the wind / bias, scale and heading errors through their covariance.
        valid: initialised and ``sigma_h_m <= max_sigma_m``.
        since_fix_s: time since the newest applied fix's acquisition time.
    """

    t_s: float
    xy_m: tuple[float, float]
    vel_mps: tuple[float, float]
    bias_mps: tuple[float, float]
    scale: float
    heading_offset_deg: float
    sigma_h_m: float
    sigma_v_mps: float
    valid: bool
    since_fix_s: float


@dataclass
class _Event:
    t_s: float
    kind: str  # "air" / "ground" (motion input), "fix", "init", "course"
    z: np.ndarray
    r: np.ndarray  # fix: 2x2 covariance; motion: 1x1 sigma^2
    seq: int
    info: dict[str, Any] | None = None  # "init": {"x": state, "p": covariance} (see _make_init)


@dataclass(frozen=True)
class _Input:
    """The motion input in force: velocity (east, north), its one-sigma, since when, and its kind."""

    t_s: float
    v: np.ndarray
    sigma: float
    kind: str


@dataclass(frozen=True)
class _State:
    t_s: float
    x: np.ndarray | None  # x and p are None together: motion known, no position yet (before the first consensus)
    p: np.ndarray | None
    u: _Input | None
    turn_ref: np.ndarray | None = None  # the input direction the last turn was measured from
    turn_run: tuple[float, float] = (-math.inf, 0.0)  # time of the last counted turn step, signed angle since


def _xp(st: _State) -> tuple[np.ndarray, np.ndarray]:
    """(x, P) of a state its caller knows is initialised (predict, turn and update run only on those)."""
    assert st.x is not None and st.p is not None, "navigation state used before initialisation"
    return st.x, st.p


def _kalman(st: _State, h: np.ndarray, y: np.ndarray, r: np.ndarray) -> _State:
    """Linear Kalman update of ``st`` with measurement matrix ``h``, residual ``y`` and noise covariance ``r``."""
    sx, sp = _xp(st)
    s = h @ sp @ h.T + r
    k = sp @ h.T @ np.linalg.inv(s)
    ikh = np.eye(_N) - k @ h
    p = ikh @ sp @ ikh.T + k @ r @ k.T  # Joseph form: stays symmetric positive definite
    return dataclasses.replace(st, x=sx + k @ y, p=0.5 * (p + p.T))


def _perp(v: np.ndarray) -> np.ndarray:
    """d(R(d) v)/dd at d = 0 for a clockwise rotation of (east, north) by d: ``(v_north, -v_east)``."""
    return np.array([v[1], -v[0]])


def _vel_jacobian(u: np.ndarray) -> np.ndarray:
    """The ground velocity's Jacobian for the input ``u``: ``u + J x`` is the linearised ``(1 + k) R(d + tr) u + b``."""
    j = np.zeros((2, _N))
    j[:, 2:4] = np.eye(2)
    j[:, 4] = u
    j[:, 5] = j[:, 6] = _perp(u)
    return j


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """The angle between two vectors, radians in [0, pi]."""
    return abs(math.atan2(float(a[0] * b[1] - a[1] * b[0]), float(a @ b)))


def _sigma(p2: np.ndarray) -> float:
    return math.sqrt(max(float(np.linalg.eigvalsh(p2).max()), 0.0))


class NavFilter:
    """Delayed-measurement Kalman filter of position, velocity and wind / velocity bias (see the module docstring).

    Not thread-safe: the daemon holds a lock around every call.
    """

    def __init__(self, cfg: NavConfig = NavConfig()) -> None:
        self.cfg = cfg
        self._events: list[_Event] = []  # sorted by (t_s, seq)
        self._keys: list[tuple[float, int]] = []
        self._after: list[_State | None] = []  # state after each event (x None: not initialised)
        self._base: _State | None = None  # state before the first kept event
        self._seq = 0
        self._rejected: list[_Event] = []
        self._gnss_ref: tuple[float, np.ndarray] | None = None  # time and input of the last GNSS fix applied
        self._gnss_t: list[float] = []  # times of the GNSS fixes applied (sorted): the GNSS-aided regime
        self.last_fix_s: float | None = None
        self.stats = {
            "fixes_applied": 0,
            "fixes_gated": 0,
            "fixes_too_old": 0,
            "fixes_future": 0,
            "reinit": 0,
            "motion_inputs": 0,
            "motion_refused": 0,
            "replayed_events": 0,
            "courses_applied": 0,
            "courses_gated": 0,
            "gnss_applied": 0,
            "gnss_gated": 0,
            "gnss_dropped": 0,
            "gnss_manoeuvring": 0,
            "gnss_resets": 0,
            "velocities_applied": 0,
            "velocities_gated": 0,
            "velocities_manoeuvring": 0,
            "velocities_kept": 0,
            "velocities_before_init": 0,
        }
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------ model
    def _vel_var(self, u: _Input | None, t_s: float) -> tuple[np.ndarray, float]:
        """The input velocity at ``t_s`` and its variance per axis (growing with the input's age)."""
        if u is None:
            return np.zeros(2), self.cfg.init_velocity_sigma_mps**2
        age = max(0.0, t_s - u.t_s)
        return u.v, u.sigma**2 + (self.cfg.accel_sigma_mps2 * age) ** 2

    def _predict(self, st: _State, t_s: float) -> _State:
        dt = t_s - st.t_s
        if dt <= 0:
            return st
        sx, sp = _xp(st)
        v, var = self._vel_var(st.u, st.t_s + dt / 2.0)
        f = np.eye(_N)
        f[0:2] += _vel_jacobian(v) * dt  # position moves by ((1 + k) u + d perp(u) + b) dt: linear for a known u
        if self.cfg.heading_transient_s > 0:  # the transient decays over the step (its mean effect on the position)
            a = math.exp(-dt / self.cfg.heading_transient_s)
            f[0:2, 6] *= (1.0 - a) * self.cfg.heading_transient_s / dt
            f[6, 6] = a
        x = f @ sx
        x[:2] += v * dt
        q = np.zeros((_N, _N))
        q[0, 0] = q[1, 1] = var * self.cfg.correlation_s * dt
        q[2, 2] = q[3, 3] = self.cfg.bias_sigma_mps_per_s**2 * dt
        q[4, 4] = self.cfg.scale_sigma_per_s**2 * dt
        q[5, 5] = math.radians(self.cfg.heading_sigma_deg_per_s) ** 2 * dt
        if self.cfg.heading_transient_s > 0:  # what fixes taught of the gain gives way, up to its prior (no further:
            # the gain is learnt only from turns without GNSS, and none may come for a long time)
            q[7, 7] = min(self.cfg.turn_gain_sigma_per_s**2 * dt, max(0.0, self.cfg.turn_gain_sigma**2 - sp[7, 7]))
        return dataclasses.replace(st, t_s=t_s, x=x, p=f @ sp @ f.T + q)

    @staticmethod
    def _loitering(st: _State, t_s: float) -> bool:
        """Whether ``t_s`` is within one continuous turn of an air-velocity input beyond half a circle (a loiter)."""
        t_last, run = st.turn_run
        u = st.u
        return u is not None and u.kind == "air" and abs(run) > _TRANSIENT_MAX_TURN_RAD and t_s - t_last <= _TURN_GAP_S

    def _turned(self, st: _State, u: _Input) -> _State:
        """A turn of the input since the last counted one: the heading error's one-sigma grows by
        ``heading_turn_fraction`` of it; with the transient (air input) the transient moves by the gain times the
        clockwise angle and its uncertainty by the gain's."""
        prev = st.turn_ref
        if float(np.hypot(*u.v)) < _MIN_TURN_SPEED_MPS:
            return st
        if prev is None:
            return dataclasses.replace(st, turn_ref=u.v)
        cw = -math.atan2(prev[0] * u.v[1] - prev[1] * u.v[0], float(prev @ u.v))  # clockwise turn, radians
        if abs(cw) < _TURN_STEP_RAD:  # measured from a held reference: the input's noise is not a turn
            return st
        if self._gnss_aided(u.t_s):  # the autopilot's heading is GNSS-aided: a turn does not pull it off
            return dataclasses.replace(st, turn_ref=u.v)
        x, p = (a.copy() for a in _xp(st))
        t_last, run = st.turn_run
        run = (run if u.t_s - t_last <= _TURN_GAP_S else 0.0) + cw
        turn_run = (u.t_s, run)
        if self.cfg.heading_transient_s > 0 and u.kind == "air":
            # the yaw's transient moves by the gain times the turn; the turn's uncertainty is the gain's (its
            # one-sigma times the angle, coherent over the steps of one turn through the transient-gain covariance);
            # beyond half a circle of one turn (a loiter) nothing (see _TRANSIENT_MAX_TURN_RAD)
            f = np.eye(_N)
            f[6, 7] = _clip_turn(run) - _clip_turn(run - cw)
            return dataclasses.replace(st, x=f @ x, p=f @ p @ f.T, turn_ref=u.v, turn_run=turn_run)
        # one-sigma grows linearly with the angle turned (a yaw error proportional to the turn, like a gyro scale
        # error), not with its square root: a 90 degree turn at 10 Hz is many small steps
        p[5, 5] = (math.sqrt(p[5, 5]) + self.cfg.heading_turn_fraction * abs(cw)) ** 2
        return dataclasses.replace(st, x=x, p=p, turn_ref=u.v, turn_run=turn_run)

    @staticmethod
    def _update(st: _State, ev: _Event) -> _State:
        """Kalman update with a position fix."""
        sx, _ = _xp(st)
        return _kalman(st, _H_POS, ev.z - _H_POS @ sx, ev.r)

    def _gnss_aided(self, t_s: float) -> bool:
        """Whether a GNSS fix was applied within GNSS_REGIME_S before ``t_s`` (the GNSS-aided regime)."""
        i = bisect.bisect_right(self._gnss_t, t_s)
        return i > 0 and t_s - self._gnss_t[i - 1] <= GNSS_REGIME_S

    @staticmethod
    def _reset(st: _State, ev: _Event) -> _State:
        """The position set to a fix, the other states kept (their correlation with the old position dropped)."""
        sx, sp = (a.copy() for a in _xp(st))
        sx[:2] = ev.z
        sp[:2, :] = 0.0
        sp[:, :2] = 0.0
        sp[:2, :2] = ev.r
        return dataclasses.replace(st, x=sx, p=sp)

    def _course_model(self, st: _State, course: np.ndarray) -> tuple[np.ndarray, float, float] | None:
        """The course measurement's (H, residual, variance) at ``st``: the filter's ground velocity across the
        measured course should be zero. None without a usable motion input."""
        sx, _ = _xp(st)
        if st.u is None or float(np.hypot(*st.u.v)) < _MIN_TURN_SPEED_MPS:
            return None
        u = st.u.v
        n = np.array([course[1], -course[0]])  # unit vector to the right of the course
        h = (n @ _vel_jacobian(u))[None, :]
        y = -float(n @ u) - float(h[0] @ sx)
        return h, y, self.cfg.course_speed_sigma_mps**2

    def _velocity_model(self, st: _State) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The ground velocity's (H, prediction, input noise variance) at ``st``: ``v (1 + k) + (d + tr) perp(v) +
        b`` for the input ``v`` in force (None without one)."""
        sx, _ = _xp(st)
        if st.u is None:
            return None
        h = _vel_jacobian(st.u.v)
        return h, st.u.v + h @ sx, min(self.cfg.input_noise_mps, st.u.sigma) ** 2

    def _velocity_update(self, st: _State, ev: _Event) -> _State:
        m = self._velocity_model(st)
        if m is None:
            return st
        h, pred, var_u = m
        return _kalman(st, h, ev.z - pred, ev.r + np.eye(2) * var_u)

    def _velocity_d2(self, st: _State, ev: _Event) -> float | None:
        """Mahalanobis^2 of velocity event ``ev`` against ``st`` (None without a motion input)."""
        m = self._velocity_model(st)
        if m is None:
            return None
        h, pred, var_u = m
        _, sp = _xp(st)
        y = ev.z - pred
        return float(y @ np.linalg.solve(h @ sp @ h.T + ev.r + np.eye(2) * var_u, y))

    def _velocity_decided(self, st: _State, ev: _Event) -> bool:
        """Whether velocity event ``ev`` is applied: one kept before the first position is gated on its first
        application (``velocities_before_init`` or ``velocities_gated``); the decision stands in later replays."""
        info = ev.info
        if info is None or "gate" not in info:
            return True
        if info["gate"]:
            d2 = self._velocity_d2(st, ev)
            info["gate"], info["applied"] = False, d2 is not None and d2 <= self.cfg.gate_chi2
            self.stats["velocities_before_init" if info["applied"] else "velocities_gated"] += 1
        return bool(info["applied"])

    def _course_update(self, st: _State, ev: _Event) -> _State:
        m = self._course_model(st, ev.z)
        if m is None:
            return st
        h, y, var_x = m
        assert st.u is not None  # _course_model returns None without an input
        r = np.array([[float(ev.r[0, 0]) * float(st.u.v @ st.u.v) + var_x]])  # course noise as cross-track speed
        return _kalman(st, h, np.array([y]), r)

    # ------------------------------------------------------------------------------------------ history
    def _state_before(self, i: int) -> _State | None:
        """The state just before event ``i`` (after event i-1), or None before anything is known."""
        if i > 0:
            return self._after[i - 1]
        return self._base

    def _input_before(self, i: int) -> _Input | None:
        st = self._state_before(i)
        return None if st is None else st.u

    def _replay_from(self, i: int) -> None:
        """Recompute the states after events ``i..`` from the state before ``i``."""
        st = self._state_before(i)
        for j in range(i, len(self._events)):
            ev = self._events[j]
            if ev.kind in ("air", "ground"):
                u = _Input(ev.t_s, ev.z, float(np.sqrt(ev.r[0, 0])), ev.kind)
                if st is None or st.x is None:
                    st = _State(ev.t_s, None, None, u)
                else:
                    st = dataclasses.replace(self._predict(st, ev.t_s), u=u)
                    st = self._turned(st, u)
            elif ev.kind == "init":
                assert ev.info is not None  # _make_init sets info when it makes an event "init"
                u0 = None if st is None else st.u
                st = _State(ev.t_s, ev.info["x"], ev.info["p"], u0, None if u0 is None else u0.v)
            elif ev.kind == "reset" and st is not None and st.x is not None:
                st = self._reset(self._predict(st, ev.t_s), ev)
            elif ev.kind == "course" and st is not None and st.x is not None:
                st = self._course_update(self._predict(st, ev.t_s), ev)
            elif ev.kind == "velocity":
                if st is not None and st.x is not None:
                    st = self._predict(st, ev.t_s)
                    if self._velocity_decided(st, ev):
                        st = self._velocity_update(st, ev)
            elif st is not None and st.x is not None:
                st = self._update(self._predict(st, ev.t_s), ev)  # decisions stand: a replay never re-gates
            self._after[j] = st
            self.stats["replayed_events"] += 1

    def _insert(self, ev: _Event) -> int:
        key = (ev.t_s, ev.seq)
        i = bisect.bisect_right(self._keys, key)
        self._events.insert(i, ev)
        self._keys.insert(i, key)
        self._after.insert(i, None)
        return i

    def _prune(self, now_s: float) -> None:
        cut = now_s - (self.cfg.history_s if self.initialised else max(self.cfg.history_s, self.cfg.start_history_s))
        n = bisect.bisect_left(self._keys, (cut, -1))
        n = min(n, len(self._events) - 1)  # keep the newest event: it carries the current state
        if n <= 0:
            return
        self._base = self._after[n - 1]
        del self._events[:n], self._keys[:n], self._after[:n]
        del self._gnss_t[: bisect.bisect_left(self._gnss_t, cut - GNSS_REGIME_S)]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def initialised(self) -> bool:
        """Whether the newest state has a position (a consensus has initialised the filter)."""
        st = self._after[-1] if self._events else self._base
        return st is not None and st.x is not None

    def _oldest_s(self) -> float:
        if self._base is not None:
            return self._base.t_s
        return self._events[0].t_s if self._events else -math.inf

    def add_motion(self, t_s: float, kind: str, v_en_mps: tuple[float, float], sigma_mps: float | None = None) -> bool:
        """A velocity input at ``t_s``: ``kind`` ``"air"`` (air-velocity vector from heading and airspeed) or
        ``"ground"`` (a ground velocity), (v_east, v_north) in m/s. Returns False when refused (non-finite, or
        older than the history)."""
        v = np.asarray(v_en_mps, float)
        if kind not in ("air", "ground") or v.shape != (2,) or not np.all(np.isfinite(v)) or not math.isfinite(t_s):
            self.stats["motion_refused"] += 1
            return False
        if t_s < self._oldest_s():
            self.stats["motion_refused"] += 1
            return False
        sig = (
            sigma_mps
            if sigma_mps is not None
            else (self.cfg.airspeed_sigma_mps if kind == "air" else self.cfg.ground_sigma_mps)
        )
        ev = _Event(float(t_s), kind, v, np.eye(1) * float(sig) ** 2, self._next_seq())
        i = self._insert(ev)
        self._replay_from(i)
        self.stats["motion_inputs"] += 1
        self._prune(self._events[-1].t_s)
        return True

    def add_course(self, t_s: float, course_deg: float, sigma_deg: float, now_s: float) -> tuple[bool, str]:
        """The ground course at ``t_s`` from a source independent of the motion input (the SAR's own motion
        measurement in the strip metadata), degrees clockwise from grid north: the filter's ground velocity across
        it should be zero. It tells the input's heading error and the wind across the track within seconds of a
        turn, before the first position fix of the new leg. Gated (1 degree of freedom, 99.9 %); returns
        (applied, reason)."""
        if not (math.isfinite(t_s) and math.isfinite(course_deg) and math.isfinite(sigma_deg) and sigma_deg > 0):
            return False, "non-finite course"
        if t_s > now_s + self.cfg.future_tolerance_s or t_s < self._oldest_s():
            return False, "course outside the history"
        st = self._state_at(t_s)
        if st is None:
            return False, "not initialised"
        c = math.radians(course_deg)
        z = np.array([math.sin(c), math.cos(c)])
        m = self._course_model(st, z)
        if m is None:
            return False, "no motion input"
        h, y, var_x = m
        _, sp = _xp(st)
        assert st.u is not None
        s = float(h[0] @ sp @ h[0]) + math.radians(sigma_deg) ** 2 * float(st.u.v @ st.u.v) + var_x
        if y * y / s > _GATE_1DOF:
            self.stats["courses_gated"] += 1
            return False, f"gated out (Mahalanobis^2 {y * y / s:.1f})"
        ev = _Event(float(t_s), "course", z, np.eye(1) * math.radians(sigma_deg) ** 2, self._next_seq())
        self._replay_from(self._insert(ev))
        self.stats["courses_applied"] += 1
        self._prune(now_s)
        return True, "applied"

    def add_velocity(
        self, t_s: float, v_en_mps: tuple[float, float], sigma_mps: float, now_s: float
    ) -> tuple[bool, str]:
        """A ground velocity (east, north; grid frame) at ``t_s`` measured independently of the motion input and of
        the positions sent: the autopilot's own, while its GNSS has a fix. It teaches the input's wind, scale and
        heading errors before the GNSS is lost, so that the velocity sent at the denial is as good as stated (the
        wind prior alone leaves 2 m/s, above EKF3's glitch threshold). Like GNSS fixes, not while the input turns or
        changes its speed, or within GNSS_STRAIGHT_S after (a fraction of a second between the two looks like a
        heading or scale error then); gated (2 degrees of freedom, ``gate_chi2``). Before the filter's first
        position it is kept (``velocities_kept``; returns True): the first fix starts the filter before it, and it
        is gated then (``velocities_before_init`` or ``velocities_gated``). Returns (applied or kept, reason)."""
        v = np.asarray(v_en_mps, float)
        if v.shape != (2,) or not np.all(np.isfinite(v)) or not (math.isfinite(sigma_mps) and sigma_mps > 0):
            return False, "non-finite velocity"
        if not math.isfinite(t_s) or t_s > now_s + self.cfg.future_tolerance_s or t_s < self._oldest_s():
            return False, "velocity outside the history"
        st = self._state_at(t_s)
        if st is None:  # before the filter's first position: kept for its start (gated and applied then)
            before = self._state_before(bisect.bisect_right(self._keys, (t_s, math.inf)))
            if before is None or before.u is None:
                return False, "no motion input"
            if before.x is not None:  # initialised later only: the time is before the filter's first position
                return False, "before the filter's first position"
        elif st.u is None:
            return False, "no motion input"
        if self._manoeuvring(t_s):
            self.stats["velocities_manoeuvring"] += 1
            return False, "the motion input is turning or changing its speed"
        ev = _Event(float(t_s), "velocity", v, np.eye(2) * float(sigma_mps) ** 2, self._next_seq())
        if st is None:
            ev.info = {"gate": True}
        else:
            d2 = self._velocity_d2(st, ev)
            assert d2 is not None  # the state has an input
            if d2 > self.cfg.gate_chi2:
                self.stats["velocities_gated"] += 1
                return False, f"gated out (Mahalanobis^2 {d2:.1f})"
        bisect.insort(self._gnss_t, ev.t_s)  # before the replay: the turns after it are GNSS-aided
        self._replay_from(self._insert(ev))
        self.stats["velocities_applied" if st is not None else "velocities_kept"] += 1
        self._prune(now_s)
        return (True, "applied") if st is not None else (True, "kept for the filter's first position")

    def _check_fix(self, t_s: float, xy: np.ndarray, sigma_m: float, now_s: float) -> str | None:
        if xy.shape != (2,) or not np.all(np.isfinite(xy)) or not (math.isfinite(sigma_m) and sigma_m > 0):
            return "non-finite fix"
        if not math.isfinite(t_s) or t_s > now_s + self.cfg.future_tolerance_s:
            self.stats["fixes_future"] += 1
            self._warn_once("future", "a fix stamped %.1f s in the future was refused (clock problem?)", t_s - now_s)
            return f"fix from the future ({t_s - now_s:.1f} s ahead of now)"
        if t_s < self._oldest_s() or t_s < now_s - self.cfg.history_s:
            self.stats["fixes_too_old"] += 1
            self._warn_once(
                "old", "a fix %.1f s older than now was refused (beyond history_s; clock jump?)", now_s - t_s
            )
            return f"fix older than the history ({now_s - t_s:.1f} s > {self.cfg.history_s:g} s)"
        return None

    def innovation(self, t_s: float, xy_m: tuple[float, float], sigma_m: float) -> float | None:
        """Mahalanobis^2 of a fix against the filter at ``t_s`` (None when not initialised then)."""
        st = self.state(t_s)
        if st is None:
            return None
        x, p = st
        y = np.asarray(xy_m, float) - x[:2]
        s = p[:2, :2] + np.eye(2) * float(sigma_m) ** 2
        return float(y @ np.linalg.solve(s, y))

    def add_fix(
        self, t_s: float, xy_m: tuple[float, float], sigma_m: float, now_s: float, source: str = "window"
    ) -> tuple[bool, str]:
        """Apply one position fix acquired at ``t_s`` (one-sigma ``sigma_m`` per axis), gated, at its time.

        Returns (applied, reason). A fix never initialises the filter: :meth:`add_consensus` and :meth:`add_gnss`
        do.

        Args:
            now_s: the current time on the data clock (fixes later than it by ``future_tolerance_s`` are refused).
            source: ``"window"`` (a SAR window) or ``"gnss"`` (counted apart: ``gnss_applied``, ``gnss_gated``).
        """
        xy = np.asarray(xy_m, float)
        bad = self._check_fix(t_s, xy, sigma_m, now_s)
        if bad is not None:
            return False, bad
        d2 = self.innovation(t_s, xy_m, sigma_m)
        if d2 is None:
            return False, "not initialised (waiting for a consensus of windows)"
        prefix = "gnss" if source == "gnss" else "fixes"
        if d2 > self.cfg.gate_chi2:
            self.stats[f"{prefix}_gated"] += 1
            return False, f"gated out (Mahalanobis^2 {d2:.1f} > {self.cfg.gate_chi2:g})"
        info = {"source": "gnss"} if source == "gnss" else {}
        ev = _Event(float(t_s), "fix", xy, np.eye(2) * float(sigma_m) ** 2, self._next_seq(), info)
        self._apply(ev, now_s, f"{prefix}_applied", gnss=source == "gnss")
        return True, "applied"

    def _apply(
        self,
        ev: _Event,
        now_s: float,
        counter: str,
        gnss: bool = False,
        init: bool = False,
        bias_prior: tuple[tuple[float, float], float] | None = None,
    ) -> _Input | None:
        """Insert fix event ``ev`` (an initialisation with ``init``: see :meth:`_make_init`), note a GNSS fix's time
        (before the replay: it decides how the turns after it are taken), replay from it, count it under
        ``counter`` and prune the history. Returns the motion input in force at its time."""
        i = self._insert(ev)
        u = self._input_before(i)
        start = None
        if init:
            start = self._start_before(i, ev, bias_prior)
            if start is None:
                self._make_init(ev, u, bias_prior)
            else:  # the filter starts before the fix, which is then applied like any other
                i = start
        if gnss:
            bisect.insort(self._gnss_t, ev.t_s)
        before = self.stats["velocities_before_init"]
        self._replay_from(i)
        if init and start is not None:
            logger.info(
                "navigation filter started %.0f s before its first fix: %d velocities of the autopilot applied",
                ev.t_s - self._events[start].t_s,
                self.stats["velocities_before_init"] - before,
            )
        self.stats[counter] += 1
        self.last_fix_s = max(self.last_fix_s or -math.inf, ev.t_s)
        self._prune(now_s)
        return u

    def _gnss_reset(
        self, t_s: float, xy_m: tuple[float, float], sigma_m: float, now_s: float, drift_m: float
    ) -> tuple[bool, str]:
        """The first GNSS fix after a manoeuvre: gated with its drift (``drift_m``, one-sigma) added, then the
        position is set to it."""
        xy = np.asarray(xy_m, float)
        bad = self._check_fix(t_s, xy, sigma_m, now_s)
        if bad is not None:
            return False, bad
        d2 = self.innovation(t_s, xy_m, math.hypot(sigma_m, drift_m))
        if d2 is not None and d2 > self.cfg.gate_chi2:
            self.stats["gnss_gated"] += 1
            return False, f"gated out (Mahalanobis^2 {d2:.1f} > {self.cfg.gate_chi2:g})"
        ev = _Event(float(t_s), "reset", xy, np.eye(2) * float(sigma_m) ** 2, self._next_seq(), {"source": "gnss"})
        self._apply(ev, now_s, "gnss_applied", gnss=True)
        self.stats["gnss_resets"] += 1
        return True, "applied (position reset after a manoeuvre)"

    def _manoeuvring(self, t_s: float) -> bool:
        """Whether the motion input turned by more than _STRAIGHT_TURN_RAD or changed its speed by more than
        _STEADY_SPEED_MPS (or _STEADY_FRACTION of it) within GNSS_STRAIGHT_S before ``t_s`` (or is unknown then)."""
        st = self._state_before(bisect.bisect_right(self._keys, (t_s, math.inf)))
        if st is None or st.u is None:
            return True
        ref = st.u.v
        ref_speed = float(np.hypot(*ref))
        steady = _steady_mps(ref_speed)
        lo = bisect.bisect_left(self._keys, (t_s - GNSS_STRAIGHT_S, -1))
        hi = bisect.bisect_right(self._keys, (t_s, math.inf))
        for ev in itertools.chain([self._state_before(lo)], (self._after[j] for j in range(lo, hi))):
            u = None if ev is None else ev.u
            if u is None:
                continue
            speed = float(np.hypot(*u.v))
            if abs(speed - ref_speed) > steady:
                return True
            if speed >= _MIN_TURN_SPEED_MPS and _angle(ref, u.v) > _STRAIGHT_TURN_RAD:
                return True
        return False

    def add_gnss(
        self,
        t_s: float,
        xy_m: tuple[float, float],
        sigma_m: float,
        now_s: float,
        bias_prior: tuple[tuple[float, float], float] | None = None,
    ) -> tuple[bool, str]:
        """A fix of the autopilot's own GNSS receiver while it has one (GNSS aiding): it initialises the filter
        when the filter has no position at ``t_s``, else it is applied like a window fix, gated (a GNSS that
        disagrees with the track is not followed). While GNSS fixes arrive every second or so, the filter learns
        the motion input's wind, scale and heading errors from them, and starts the GNSS-denied flight from the
        GNSS position. Fixes while the input turns or changes its speed, or within GNSS_STRAIGHT_S after it did, are
        not applied (``gnss_manoeuvring``): in a turn the vehicle slips and a fraction of a second between the
        input's time and the fix's looks like a heading error of degrees (in an acceleration, like a scale error);
        the first fix after a manoeuvre resets the position (``gnss_resets``) instead of teaching the input's errors
        the drift through it. GNSS fixes never count towards a re-initialisation: consistent SAR consensus fixes
        that disagree with a GNSS-aided track still re-initialise it, and the GNSS fixes after the new start are
        dropped (``gnss_dropped``). Returns (applied, reason)."""
        if self.innovation(t_s, xy_m, sigma_m) is not None:
            if self._manoeuvring(t_s):
                self.stats["gnss_manoeuvring"] += 1
                return False, "the motion input is turning or changing its speed"
            st = self._state_at(t_s)
            assert st is not None and st.u is not None  # initialised; _manoeuvring is False only with an input
            last = self._gnss_ref
            change = 0.0 if last is None else float(np.hypot(*(st.u.v - last[1])))
            speed = float(np.hypot(*st.u.v))  # a change as large as _manoeuvring lets through is no manoeuvre:
            steady = _steady_mps(speed) + speed * _STRAIGHT_TURN_RAD
            if last is None or last[0] >= t_s or change <= steady:
                ok, why = self.add_fix(t_s, xy_m, sigma_m, now_s, source="gnss")
            else:  # the first fix after a manoeuvre: it resets the position (the drift through a turn or an
                # acceleration is no error of the input's wind, scale or heading, which the fixes are to teach)
                ok, why = self._gnss_reset(t_s, xy_m, sigma_m, now_s, GNSS_TURN_LAG_S * change)
            if ok:
                self._gnss_ref = (t_s, st.u.v)
            return ok, why
        xy = np.asarray(xy_m, float)
        bad = self._check_fix(t_s, xy, sigma_m, now_s)
        if bad is not None:
            return False, bad
        ev = _Event(float(t_s), "fix", xy, np.eye(2) * float(sigma_m) ** 2, self._next_seq(), {})
        u = self._apply(ev, now_s, "gnss_applied", gnss=True, init=True, bias_prior=bias_prior)
        self._gnss_ref = None if u is None else (ev.t_s, u.v)
        return True, "filter initialised"

    def add_consensus(
        self,
        t_s: float,
        xy_m: tuple[float, float],
        sigma_m: float,
        now_s: float,
        bias_prior: tuple[tuple[float, float], float] | None = None,
    ) -> tuple[bool, str]:
        """A position that several windows agree on: initialises the filter, or, while the filter disagrees with
        ``reinit_after`` consecutive mutually consistent ones, re-initialises it. Otherwise it changes nothing
        (its windows enter through :meth:`add_fix`). Returns (state changed, reason).

        Args:
            bias_prior: ``((east, north), sigma)`` of the wind to start from (e.g. the autopilot's wind estimate
                while it still had GNSS); default zero with ``init_bias_sigma_mps``. Ignored for a ground-velocity
                input.
        """
        xy = np.asarray(xy_m, float)
        bad = self._check_fix(t_s, xy, sigma_m, now_s)
        if bad is not None:
            return False, bad
        ev = _Event(float(t_s), "fix", xy, np.eye(2) * float(sigma_m) ** 2, self._next_seq(), {})
        d2 = self.innovation(t_s, xy_m, sigma_m)
        if d2 is None:
            self._apply(ev, now_s, "fixes_applied", init=True, bias_prior=bias_prior)
            return True, "filter initialised"
        if d2 <= self.cfg.gate_chi2:
            self._rejected.clear()
            return False, "consistent with the track"
        self._rejected.append(ev)
        if self._reinit_due():
            self._prune(now_s)
            return True, "filter re-initialised after consistent disagreeing consensus fixes"
        return False, f"disagrees with the track (Mahalanobis^2 {d2:.1f}); {len(self._rejected)} in a row"

    def _start_before(self, i: int, ev: _Event, bias_prior=None) -> int | None:
        """With velocities kept before the filter's first position (:meth:`add_velocity`) the filter starts just
        before the first of them, at first fix ``ev`` (event ``i``) moved back by the motion inputs, with a position
        known to _DIFFUSE_M only: the kept velocities teach the input's errors from there on and fix ``ev`` gives
        the position. Returns the index of the start event (None without kept velocities)."""
        j0 = next((j for j in range(i) if "gate" in (self._events[j].info or {})), None)
        if j0 is None:
            return None
        t0 = self._events[j0].t_s - _START_LEAD_S
        xy0 = ev.z - self.displacement_m(t0, ev.t_s)
        start = _Event(t0, "fix", xy0, np.eye(2) * _DIFFUSE_M**2, self._next_seq())
        i0 = self._insert(start)
        self._make_init(start, self._input_before(i0), bias_prior)
        return i0

    def _make_init(self, ev: _Event, u: _Input | None, bias_prior=None) -> None:
        """Turn fix event ``ev`` into an initialisation at its time (bias from ``bias_prior`` or zero; its
        uncertainty depends on the motion input ``u`` in force: a wind for an air velocity, a small bias for a
        ground velocity)."""
        ground = u is not None and u.kind == "ground"
        b0 = (self.cfg.init_ground_bias_sigma_mps if ground else self.cfg.init_bias_sigma_mps) ** 2
        b = (0.0, 0.0)
        if bias_prior is not None and not ground:
            (be, bn), bs = bias_prior
            if all(math.isfinite(v) for v in (be, bn, bs)) and bs > 0:
                b, b0 = (float(be), float(bn)), min(float(bs) ** 2, b0)
        k0 = self.cfg.init_scale_sigma**2
        d0 = math.radians(self.cfg.init_heading_sigma_deg) ** 2
        g0 = self.cfg.turn_gain_sigma**2 if self.cfg.heading_transient_s > 0 else 0.0
        ev.kind = "init"
        ev.info = {
            "x": np.array([*ev.z, *b, 0.0, 0.0, 0.0, 0.0], float),
            "p": np.diag([ev.r[0, 0], ev.r[1, 1], b0, b0, k0, d0, 0.0, g0]),
        }

    def _reinit_due(self) -> bool:
        """Re-initialise at the newest gated-out fix when the last ``reinit_after`` of them agree with each other."""
        rej = self._rejected[-self.cfg.reinit_after :]
        if len(rej) < self.cfg.reinit_after:
            return False
        for a, b in itertools.pairwise(rej):
            moved = self.displacement_m(a.t_s, b.t_s)
            d = np.asarray(b.z) - np.asarray(a.z) - moved
            s = a.r + b.r + np.eye(2) * (self.cfg.ground_sigma_mps * abs(b.t_s - a.t_s)) ** 2
            if float(d @ np.linalg.solve(s, d)) > self.cfg.gate_chi2:
                return False
        last = rej[-1]
        i = self._insert(last)
        self._make_init(last, self._input_before(i))
        # GNSS fixes after it were applied to the track now abandoned: they are dropped, not replayed on the new one
        drop = [j for j in range(i + 1, len(self._events)) if (self._events[j].info or {}).get("source") == "gnss"]
        for j in reversed(drop):
            del self._events[j], self._keys[j], self._after[j]
        kept = {e.t_s for e in self._events if e.kind == "velocity"}  # the autopilot's velocities stay applied
        self._gnss_t = [t for t in self._gnss_t if t <= last.t_s or t in kept]
        self.stats["gnss_dropped"] += len(drop)
        self._replay_from(i)
        self._rejected.clear()
        self.stats["reinit"] += 1
        self.last_fix_s = last.t_s
        logger.warning("navigation filter re-initialised: %d consistent fixes disagreed with the track", len(rej))
        return True

    # ------------------------------------------------------------------------------------------ outputs
    def state(self, t_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(x, P) at ``t_s``: from the last event at or before it, predicted; None when not initialised then."""
        st = self._state_at(t_s)
        return None if st is None else _xp(st)

    def _state_at(self, t_s: float) -> _State | None:
        st = self._state_before(bisect.bisect_right(self._keys, (t_s, math.inf)))
        if st is None or st.x is None:
            return None
        return self._predict(st, t_s)

    def displacement_m(self, t0_s: float, t1_s: float) -> np.ndarray:
        """How far the vehicle moved from ``t0_s`` to ``t1_s`` (east, north): the filter's motion where it is
        initialised, else the motion inputs alone (an air velocity taken as the ground velocity)."""
        a, b = self.state(t0_s), self.state(t1_s)
        if a is not None and b is not None:
            return b[0][:2] - a[0][:2]
        lo, hi = sorted((t0_s, t1_s))
        sign = 1.0 if t1_s >= t0_s else -1.0
        moves = [(e.t_s, e.z) for e in self._events if e.kind in ("air", "ground")]
        if self._base is not None and self._base.u is not None:
            moves.insert(0, (self._base.u.t_s, self._base.u.v))
        total = np.zeros(2)
        for k, (t, v) in enumerate(moves):
            t_end = moves[k + 1][0] if k + 1 < len(moves) else math.inf
            seg_lo, seg_hi = max(lo, t if k else -math.inf), min(hi, t_end)
            if seg_hi > seg_lo:
                total += v * (seg_hi - seg_lo)
        return sign * total

    def estimate(self, t_s: float) -> NavEstimate | None:
        """The state predicted to ``t_s`` (None before the first fix)."""
        st = self._state_at(t_s)
        if st is None:
            return None
        x, p = _xp(st)  # _state_at returns initialised states only
        v, var = self._vel_var(st.u, t_s)
        sigma_h = _sigma(p[:2, :2])
        # the ground velocity and its covariance through its Jacobian: on a straight leg the wind and the heading /
        # scale errors are each uncertain but strongly correlated, and the fixes pin down their sum, the ground velocity
        j = _vel_jacobian(v)
        vel = v + j @ x
        if st.u is not None:  # the input's own part: its sample noise, not the drift its one-sigma also stands for
            var += min(self.cfg.input_noise_mps, st.u.sigma) ** 2 - st.u.sigma**2
        p_vel = j @ p @ j.T + np.eye(2) * var
        if self.cfg.loiter_slip_deg > 0 and self._loitering(st, t_s):  # the slip, across the velocity
            n = _perp(v) * math.radians(self.cfg.loiter_slip_deg)
            p_vel += np.outer(n, n)
        return NavEstimate(
            t_s=float(t_s),
            xy_m=(float(x[0]), float(x[1])),
            vel_mps=(float(vel[0]), float(vel[1])),
            bias_mps=(float(x[2]), float(x[3])),
            scale=float(x[4]),
            heading_offset_deg=math.degrees(float(x[5] + x[6])),
            sigma_h_m=sigma_h,
            sigma_v_mps=_sigma(p_vel),
            valid=sigma_h <= self.cfg.max_sigma_m,
            since_fix_s=float(t_s - self.last_fix_s) if self.last_fix_s is not None else math.inf,
        )

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg + " (logged once)", *args)
