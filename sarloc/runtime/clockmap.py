"""The daemon's clock: :class:`ClockMap` maps this computer's wall clock to the clock of the strips' times.

Modes (``clock`` in :mod:`sarloc.runtime.config`): ``unix`` (the strips are on a clock synchronised with this
computer's), ``autopilot`` (on the autopilot's UNIX clock from SYSTEM_TIME, which may run faster than real time in
a simulator: the rate is fitted), ``data`` (recorded data replayed: "now" is the newest acquisition time seen,
advanced by the wall clock since), ``auto`` (``unix`` when the first strip is within 5 minutes of this computer's
clock, else ``data``). "Now" never goes backwards.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np

logger = logging.getLogger("sarloc.runtime.daemon")


class ClockMap:
    """Maps this computer's wall clock to the data clock (see the module docstring). Thread-safe."""

    def __init__(self, mode: str, max_offset_s: float = 0.5) -> None:
        self.mode = mode
        self.max_offset_s = max_offset_s
        self._lock = threading.Lock()
        self._data_s: float | None = None  # data mode: newest acquisition time ...
        self._data_wall_s = 0.0  # ... and the wall time it arrived
        self._last_now = -math.inf
        self._ap: list[tuple[float, float]] = []  # (wall_s, autopilot unix s) samples
        self.offset_s: float | None = None  # autopilot - wall, latest estimate
        self.warned = False

    def observe_data(self, t_s: float, wall_s: float) -> None:
        """A block whose newest row was acquired at ``t_s`` arrived at ``wall_s``; ``auto`` decides here."""
        with self._lock:
            if self.mode == "auto":
                self.mode = "unix" if abs(t_s - wall_s) < 300.0 else "data"
                if self.mode == "data":
                    logger.warning(
                        "strip times are %s this computer's clock: treating them as recorded data (clock = data); "
                        "set clock = unix or autopilot for a live system",
                        _duration(t_s - wall_s),
                    )
            if self._data_s is None or t_s >= self._data_s:
                self._data_s, self._data_wall_s = t_s, wall_s

    def observe_autopilot(self, wall_s: float, unix_s: float) -> None:
        """One SYSTEM_TIME sample: the autopilot's UNIX time ``unix_s`` received at ``wall_s``."""
        with self._lock:
            if self._ap and wall_s <= self._ap[-1][0]:
                return
            if self._ap and abs((unix_s - wall_s) - (self._ap[-1][1] - self._ap[-1][0])) > 60.0:
                logger.warning("autopilot clock jumped by %.1f s; restarting the clock map", unix_s - self._ap[-1][1])
                self._ap.clear()
            self._ap.append((wall_s, unix_s))
            del self._ap[:-30]
            self.offset_s = unix_s - wall_s

    def _autopilot_now(self, wall_s: float) -> float | None:
        if not self._ap:
            return None
        if len(self._ap) < 3:
            w, u = self._ap[-1]
            return u + (wall_s - w)
        a = np.asarray(self._ap, float)
        w0, u0 = a[-1]
        rate = np.polyfit(a[:, 0] - w0, a[:, 1] - u0, 1)[0]  # a simulator may run faster than real time
        rate = float(np.clip(rate, 0.05, 100.0))
        return float(u0 + rate * (wall_s - w0))

    def now(self, wall_s: float) -> float | None:
        """The data-clock time at wall time ``wall_s`` (None while unknown: ``data`` or ``auto`` before any
        strip, ``autopilot`` before any SYSTEM_TIME). Never goes backwards."""
        with self._lock:
            mode = self.mode
            t: float | None
            if mode == "unix":
                t = wall_s
            elif mode == "autopilot":
                t = self._autopilot_now(wall_s)
            elif mode == "data" and self._data_s is not None:
                t = self._data_s + max(0.0, wall_s - self._data_wall_s)
            else:
                t = None
            if t is None:
                return None
            self._last_now = max(self._last_now, t)
            return self._last_now


def _duration(dt_s: float) -> str:
    """``dt_s`` (data time - wall time) in words: "3.1 days behind", "12 s ahead of"."""
    a = abs(dt_s)
    text = f"{a / 86400:.1f} days" if a >= 86400 else f"{a / 3600:.1f} h" if a >= 3600 else f"{a:.0f} s"
    return f"{text} {'behind' if dt_s < 0 else 'ahead of'}"
