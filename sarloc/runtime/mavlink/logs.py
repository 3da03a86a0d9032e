"""Logging helpers shared by the link and the sender: rate-limited warnings and durations for messages.

Every module of the package logs under ``sarloc.runtime.mavlink``, the name the package has always logged under.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("sarloc.runtime.mavlink")


def fmt_s(x: float) -> str:
    """Seconds for a log line: whole seconds from 10 s up, else one decimal."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


class RateLimitedLog:
    """Logs a warning per key at most every ``interval_s``; counts what it held back."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        if held:
            logger.warning(msg + " (%d similar in the last %.0f s not logged)", *args, held, self.interval_s)
        else:
            logger.warning(msg, *args)
