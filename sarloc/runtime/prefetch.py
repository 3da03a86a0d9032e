"""Network strips read ahead: :class:`Prefetcher` reads a ``udp://`` or ``tcp://`` source on its own thread into a
bounded queue, so that a burst the daemon is slow to process costs the oldest blocks (counted), not datagrams the
kernel drops silently."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("sarloc.runtime.daemon")


class Prefetcher:
    """Reads a network source on its own thread into a bounded queue; when full, the oldest blocks are dropped.

    Network strips are ephemeral: if processing falls behind a burst, the kernel would drop datagrams silently.
    Here the newest data wins (the autopilot wants the current position), drops are counted and logged, and the
    window stream skips the windows that needed the missing rows.
    """

    def __init__(self, source, max_blocks: int = 256) -> None:
        import collections

        self.source = source
        self.q: collections.deque = collections.deque()
        self.max_blocks = int(max_blocks)
        self.dropped = 0
        self.done = threading.Event()
        self.cv = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sarloc-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for block in self.source:
                with self.cv:
                    self.q.append(block)
                    while len(self.q) > self.max_blocks:
                        self.q.popleft()
                        self.dropped += 1
                        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                            logger.warning(
                                "processing behind the stream: %d blocks dropped (oldest first)", self.dropped
                            )
                    self.cv.notify()
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()
            with self.cv:
                self.cv.notify()

    def __iter__(self):
        while True:
            with self.cv:
                while not self.q and not self.done.is_set():
                    self.cv.wait(0.2)
                if self.q:
                    block = self.q.popleft()
                elif self.error is not None:
                    raise self.error
                else:
                    return
            yield block

    def close(self) -> None:
        stop = getattr(self.source, "stop", None)
        if stop:
            stop()
        close = getattr(self.source, "close", None)
        if close:
            close()
        self.thread.join(timeout=5.0)
