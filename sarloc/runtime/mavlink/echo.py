"""The echo check: does the autopilot take sarloc's positions?

An autopilot that uses the positions sent reports them back in ``GPS_RAW_INT`` (or ``GPS2_RAW`` for the second
instance; with ArduPilot the link checks only sarloc's instance, as the other one is the GNSS receiver, which agrees
with sarloc's positions while sarloc is GNSS-aided). :class:`EchoCheck` remembers the valid positions sent in the
last ``ECHO_WINDOW_S``, matches each echo with a 3D fix against them (within ``ECHO_TOL_M``), and warns once, with
what to check, when valid positions go unechoed for ``echo_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from sarloc.runtime.mavlink.config import NAV_MESSAGE, MavlinkConfig
from sarloc.runtime.mavlink.fields import GPS_FIX_TYPE_3D_FIX
from sarloc.runtime.mavlink.logs import fmt_s

logger = logging.getLogger("sarloc.runtime.mavlink")

#: An echo (GPS_RAW_INT / GPS2_RAW with a 3D fix) matches a position sent at most ECHO_WINDOW_S ago within ECHO_TOL_M.
ECHO_WINDOW_S = 2.0
ECHO_TOL_M = 5.0


def _distance_m(lat1_e7: int, lon1_e7: int, lat2_e7: int, lon2_e7: int) -> float:
    """Ground distance between two 1e7-degree positions (equirectangular: fine for metres)."""
    m_per_e7 = 111_319.49e-7
    dn = (lat2_e7 - lat1_e7) * m_per_e7
    de = (lon2_e7 - lon1_e7) * m_per_e7 * math.cos(math.radians(lat1_e7 * 1e-7))
    return math.hypot(dn, de)


class EchoCheck:
    """Valid positions sent, matched against the autopilot's GPS echo (thread-safe with the link's ``lock``).

    Args:
        cfg: link settings (``echo_timeout_s``, flavour and ids for the warning).
        lock: the link's lock.
        stats: the link's counters (``echo_ok``, ``echo_missing``).
        clock_mono: monotonic clock.
    """

    def __init__(
        self, cfg: MavlinkConfig, lock: threading.RLock, stats: dict[str, int], clock_mono: Callable[[], float]
    ) -> None:
        self.cfg = cfg
        self._lock = lock
        self._stats = stats
        self._mono = clock_mono
        # valid positions sent recently (rx mono, lat_e7, lon_e7), current unechoed streak
        self._sent_positions: deque[tuple[float, int, int]] = deque(maxlen=512)
        self._last_valid_send: float | None = None
        self._unechoed_since: float | None = None
        self._echo_warned = False
        self._last_echo: tuple[float, str] | None = None  # (rx_mono_s, message type)

    def note_sent(self, lat_e7: int, lon_e7: int, heard: bool) -> None:
        """Remember a valid position sent; warn once when valid positions go unechoed for ``echo_timeout_s``.

        ``heard``: whether anything authentic came from the autopilot yet (the warning differs).
        """
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
            if not heard:  # nobody there at all (a demo, a wrong port): say that, not "check GPSn"
                logger.warning(
                    "nothing heard from autopilot %d/%d on %s for %s s: the positions sent are not acknowledged",
                    self.cfg.autopilot_system,
                    self.cfg.autopilot_component,
                    self.cfg.url,
                    fmt_s(now - self._unechoed_since),
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
                fmt_s(now - self._unechoed_since),
            )

    def check(self, name: str, m: Any, now: float) -> None:
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

    def status(self) -> dict[str, Any]:
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
