"""Strip senders (torch-free): the other end of the daemon's UDP and TCP strip sources, for tests, benchmarks and
replays (SLS1 frames, see :mod:`sarloc.runtime.frames`)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable

from sarloc.core.errors import SarlocError
from sarloc.runtime.frames import TCP_MAX_BYTES, UDP_MAX_BYTES, encode_frames
from sarloc.runtime.types import Strip

logger = logging.getLogger(__name__)

__all__ = ["TcpStripServer", "send_strip_tcp", "send_strip_udp"]


# =============================================================================================================
# writers (replay twins)


def _as_strips(strips: Strip | Iterable[Strip]) -> Iterable[Strip]:
    return [strips] if isinstance(strips, Strip) else strips


def send_strip_udp(
    strips: Strip | Iterable[Strip],
    host: str,
    port: int,
    *,
    max_bytes: int = UDP_MAX_BYTES,
    pace_s: float = 0.0,
) -> int:
    """Send strips (or blocks) as SLS1 frames, one per datagram of at most ``max_bytes``; returns frames sent.

    Args:
        pace_s: pause between datagrams, seconds (UDP drops datagrams a slow reader cannot buffer).
    """
    if not 64 <= int(max_bytes) <= 65_507:
        raise SarlocError(f"max_bytes={max_bytes} must be 64..65507 for a UDP datagram")
    n = 0
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        for strip in _as_strips(strips):
            for f in encode_frames(strip, max_bytes):
                s.sendto(f, (host, int(port)))
                n += 1
                if pace_s > 0:
                    time.sleep(pace_s)
    return n


def send_strip_tcp(
    strips: Strip | Iterable[Strip],
    host: str,
    port: int,
    *,
    max_bytes: int = TCP_MAX_BYTES,
    timeout_s: float = 5.0,
) -> int:
    """Connect to a listening reader (``tcp://HOST:PORT?listen=1``) and send strips as SLS1 frames.

    Returns:
        Frames sent.

    Raises:
        SarlocError: the reader cannot be reached.
    """
    try:
        s = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as e:
        raise SarlocError(f"tcp://{host}:{port}: cannot connect ({e}); start the reader first") from None
    n = 0
    with s:
        for strip in _as_strips(strips):
            for f in encode_frames(strip, max_bytes):
                s.sendall(f)
                n += 1
        s.shutdown(socket.SHUT_WR)
    return n


class TcpStripServer:
    """Replay twin of a sensor serving strips over TCP (for a connecting :class:`TcpSource`).

    Binds at construction (port 0 = any free port, see ``.port``); :meth:`serve` accepts one connection, sends the
    strips and closes it (call it again to serve a reconnecting reader).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, int(port)))
            self._sock.listen(1)
        except OSError as e:
            self._sock.close()
            raise SarlocError(f"tcp://{host}:{port}: cannot listen ({e}); choose another port") from None
        self.host = host
        self.port = int(self._sock.getsockname()[1])

    def serve(
        self, strips: Strip | Iterable[Strip], *, max_bytes: int = TCP_MAX_BYTES, accept_timeout_s: float = 10.0
    ) -> int:
        """Accept one reader, send ``strips`` as frames, close; returns frames sent.

        Raises:
            SarlocError: no reader connected within ``accept_timeout_s``.
        """
        self._sock.settimeout(accept_timeout_s)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise SarlocError(f"tcp://{self.host}:{self.port}: no reader connected in {accept_timeout_s} s") from None
        n = 0
        with conn:
            for strip in _as_strips(strips):
                for f in encode_frames(strip, max_bytes):
                    conn.sendall(f)
                    n += 1
        return n

    def close(self) -> None:
        """Close the listening socket."""
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
