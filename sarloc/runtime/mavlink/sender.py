"""The sender thread: :class:`MavlinkSender` keeps a :class:`~sarloc.runtime.mavlink.link.MavlinkLink` talking.

HEARTBEAT at ``heartbeat_hz``, the position at ``gps_rate_hz`` (from a state function, checked for validity and
staleness; no-fix otherwise), inbound polling in between, on monotonic deadlines; one last no-fix when it stops, so
that the autopilot drops the position at once instead of after its GPS timeout.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from sarloc.core.errors import SarlocError
from sarloc.runtime.mavlink.link import MavlinkLink
from sarloc.runtime.mavlink.logs import RateLimitedLog
from sarloc.runtime.types import NavState

logger = logging.getLogger("sarloc.runtime.mavlink")


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
        self._log = RateLimitedLog()
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
