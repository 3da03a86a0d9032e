"""Stream requests: the autopilot messages the link reads, asked for with ``COMMAND_LONG``
``MAV_CMD_SET_MESSAGE_INTERVAL`` on open, after an autopilot reboot, and again while one of them does not arrive
(ArduPilot's SERIAL1/2 stream rates default to 0).

:class:`StreamRequests` keeps, per stream, when it was last heard and when to ask again: a stream not heard for
``STREAM_MISSING_S`` is requested after ``STREAM_RETRY_MIN_S``, then at doubling intervals up to
``STREAM_RETRY_MAX_S`` while it stays away (a GPS2_RAW that never comes, without a second GPS, costs little).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sarloc.runtime.mavlink.config import MavlinkConfig

MAV_CMD_SET_MESSAGE_INTERVAL = 511
#: What the link reads from the autopilot; each is requested with MAV_CMD_SET_MESSAGE_INTERVAL.
INBOUND_TYPES = (
    "ATTITUDE",
    "VFR_HUD",
    "GLOBAL_POSITION_INT",
    "SYSTEM_TIME",
    "GPS_RAW_INT",
    "GPS2_RAW",
    "WIND",
    "OPTICAL_FLOW",
)
#: SYSTEM_TIME is requested at this rate (the clock offset needs no more); the rest at ``stream_rate_hz``.
SYSTEM_TIME_RATE_HZ = 2.0
#: A requested stream not heard for this long is requested again (first retry after STREAM_RETRY_MIN_S, doubling
#: to STREAM_RETRY_MAX_S while it stays away: a GPS2_RAW that never comes, without a second GPS, costs little).
STREAM_MISSING_S = 3.0
STREAM_RETRY_MIN_S = 2.0
STREAM_RETRY_MAX_S = 30.0


class StreamRequests:
    """When to request each inbound stream. Not thread-safe by itself: the link calls it under its lock.

    Args:
        cfg: link settings (``request_streams``, ``stream_rate_hz``, the autopilot's ids).
        dialect: the pymavlink dialect module (message ids; a stream the dialect lacks is not requested).
        clock_mono: monotonic clock.
    """

    def __init__(self, cfg: MavlinkConfig, dialect: Any, clock_mono: Callable[[], float]) -> None:
        self.cfg = cfg
        self._mono = clock_mono
        #: stream name -> message id
        self.ids = {n: i for n in INBOUND_TYPES if (i := getattr(dialect, f"MAVLINK_MSG_ID_{n}", None))}
        self._rx: dict[str, float] = {}  # last receipt
        self._next: dict[str, float] = {}  # next request
        self._retry: dict[str, float] = {}  # retry interval

    def command(self, mav: Any, name: str) -> Any:
        """The COMMAND_LONG MAV_CMD_SET_MESSAGE_INTERVAL that requests stream ``name``, encoded with codec ``mav``."""
        rate_hz = SYSTEM_TIME_RATE_HZ if name == "SYSTEM_TIME" else self.cfg.stream_rate_hz
        return mav.command_long_encode(
            self.cfg.autopilot_system,
            self.cfg.autopilot_component,
            MAV_CMD_SET_MESSAGE_INTERVAL,
            0,
            float(self.ids[name]),  # param1: message id
            1e6 / rate_hz,  # param2: interval, us
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,  # param7: response target 0 = the requester
        )

    def heard(self, name: str, now: float) -> None:
        """A message of stream ``name`` arrived at ``now`` (any type: ignored unless it is a stream)."""
        if name in self.ids:
            self._rx[name] = now
            self._retry.pop(name, None)

    def due(self, reset_seen: bool) -> None:
        """Make every stream request due now (after an open or an autopilot reboot)."""
        self._next.clear()
        self._retry.clear()
        if reset_seen:
            self._rx.clear()

    def request_missing(self, request: Callable[[str], bool], connected: Callable[[], bool]) -> None:
        """Request the streams not heard for STREAM_MISSING_S, each at most every retry interval (with back-off).

        ``request(name)`` sends one request and says whether it was delivered; ``connected()`` is checked before
        each (a failed send takes the link down).
        """
        if not self.cfg.request_streams:
            return
        now = self._mono()
        for name in self.ids:
            if not connected():
                return
            last = self._rx.get(name)
            if (last is not None and now - last <= STREAM_MISSING_S) or now < self._next.get(name, -math.inf):
                continue
            retry = self._retry.get(name, STREAM_RETRY_MIN_S)
            if request(name):
                self._next[name] = now + retry
                self._retry[name] = min(retry * 2.0, STREAM_RETRY_MAX_S)
            else:  # not delivered (no peer yet, link down): try again soon, without back-off
                self._next[name] = now + STREAM_RETRY_MIN_S

    def rebooted(self, now: float) -> None:
        """The autopilot rebooted (seen in a SYSTEM_TIME at ``now``): every request is due again, SYSTEM_TIME heard."""
        self.due(reset_seen=True)
        self._rx["SYSTEM_TIME"] = now
