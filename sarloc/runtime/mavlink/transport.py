"""The byte transport under a link: :class:`Transport` opens pymavlink's connection for a URL, writes raising on
errors (pymavlink's own writers swallow them), reads without blocking, and after a failure stays down and reopens
with back-off (``reconnect_min_s`` doubling to ``reconnect_max_s``).

pymavlink is imported lazily (in the constructor), and its module-level dialect state is left alone: the transport
owns the link's MAVLink2 codec, built from ``pymavlink.dialects.v20.<dialect>``, and uses
``mavutil.mavlink_connection`` only to open the connection. A ``udpin:`` port another program holds is an open
failure (pymavlink alone would share it silently); failures are reported with what to check for the usual causes.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

from sarloc.core.errors import ConfigError, brief
from sarloc.runtime.mavlink.config import NAV_MESSAGE, MavlinkConfig
from sarloc.runtime.mavlink.logs import RateLimitedLog

logger = logging.getLogger("sarloc.runtime.mavlink")


def _probe_udp_bind(url: str) -> None:
    """Raise OSError when the port of a ``udpin:``/``udp:`` URL is already bound.

    pymavlink binds a listening UDP socket with SO_REUSEADDR, which on Linux lets it share a port with another
    SO_REUSEADDR socket (a second sarloc, a router): both bind, and the autopilot's packets go to one of them. A bind
    without SO_REUSEADDR fails with EADDRINUSE whenever anything holds the port.
    """
    for prefix in ("udpin:", "udp:"):
        if url.startswith(prefix):
            host, _, port = url[len(prefix) :].rpartition(":")
            break
    else:
        return
    try:
        port_n = int(port)
    except ValueError:
        return  # mavutil reports the malformed URL
    if not host:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, port_n))


#: Open failures that only say the peer is not up yet (a TCP autopilot or router still booting): retried even with
#: ``require_autopilot_s``, whose deadline then reports them through ``fatal_reason``.
_PEER_NOT_UP = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


def _open_failure(url: str, e: BaseException) -> str:
    """One line: the URL, the cause and, for the usual causes, what to check."""
    hints = {
        errno.EADDRINUSE: "; another program (a MAVLink router, a ground station, a second sarloc) holds the port",
        errno.EACCES: "; no permission (for a serial device: add the user to the dialout group)",
        errno.ENOENT: "; no such device",
        errno.ECONNREFUSED: "; nothing listens there: is the autopilot (or its router) up?",
    }
    code = getattr(e, "errno", None)  # None (or anything else) for exceptions that are not OSErrors
    hint = hints.get(code, "") if isinstance(code, int) else ""
    return f"mavlink url {url!r} cannot be opened ({brief(e)}){hint}"


class LinkDownError(Exception):
    """The transport failed; the link closes it and reopens with back-off."""


class NoPeerError(Exception):
    """udpin link with no peer heard yet: nowhere to send."""


class _CodecFile:
    """What pymavlink's codec writes to (its ``file``): our raising transport write."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write


class Transport:
    """One pymavlink connection at a time for ``cfg.url``, reopened with back-off after a failure.

    Not thread-safe by itself: the link calls it under its lock. The codec (``mav``) outlives reconnects: sequence
    numbers, parser buffer and signing state are the link's, not the connection's.

    Args:
        cfg: link settings (url, baud, ids, reconnect back-off, ``require_autopilot_s``).
        dialect: the pymavlink v20 dialect module.
        stats: the link's counters (``reconnects``, ``parse_errors``).
        log: the link's rate-limited warnings.
        clock_mono: monotonic clock for the back-off.
        on_open: called after every successful open (the link makes its stream requests due).
    """

    def __init__(
        self,
        cfg: MavlinkConfig,
        dialect: Any,
        stats: dict[str, int],
        log: RateLimitedLog,
        clock_mono: Callable[[], float],
        on_open: Callable[[], None],
    ) -> None:
        from pymavlink import mavutil

        self.cfg = cfg
        self.mavutil = mavutil
        self._d = dialect
        self._stats = stats
        self._log = log
        self._mono = clock_mono
        self._on_open = on_open
        # our own MAVLink2 codec: sequence numbers, parser buffer and signing state survive reconnects
        self.mav = dialect.MAVLink(
            _CodecFile(self.write), srcSystem=cfg.source_system, srcComponent=cfg.source_component
        )
        self.mav.robust_parsing = True  # bad bytes come back as BAD_DATA messages instead of exceptions
        self.conn: Any = None
        self.last_open_error: str | None = None
        self.closed = False
        self._dest: tuple[str, int] | None = None
        self._backoff_s = cfg.reconnect_min_s
        self._next_open_s = -math.inf

    def open(self, first: bool = False) -> bool:
        """Open the transport; on failure stay down and schedule a retry. Returns whether it is open.

        Raises:
            ConfigError: a malformed URL, a missing package, or (``first`` with ``require_autopilot_s``) a failure
                other than a peer not up yet.
        """
        url = self.cfg.url
        now = self._mono()
        try:
            _probe_udp_bind(url)
            conn = self.mavutil.mavlink_connection(
                url,
                baud=self.cfg.baud,
                source_system=self.cfg.source_system,
                source_component=self.cfg.source_component,
                retries=0,  # one connect attempt; the back-off here does the retrying
                autoreconnect=False,
            )
        except ImportError as e:
            raise ConfigError(f"mavlink url {url!r} needs a missing package ({e}); pip install pyserial") from None
        except ValueError as e:
            raise ConfigError(
                f"mavlink url {url!r} is malformed ({e}); use e.g. udpout:HOST:PORT, udpin:HOST:PORT, tcp:HOST:PORT"
            ) from None
        except Exception as e:  # OSError, serial.SerialException, ...
            self._open_failed(e, first, now)
            return False
        self._adopt(conn, first)
        return True

    def _open_failed(self, e: Exception, first: bool, now: float) -> None:
        why = _open_failure(self.cfg.url, e)
        if first and self.cfg.require_autopilot_s is not None and getattr(e, "errno", None) not in _PEER_NOT_UP:
            raise ConfigError(f"{why}; the link is required (require_autopilot_s)") from None
        self._next_open_s = now + self._backoff_s
        if self.last_open_error is None:
            logger.error("%s; retrying every %.1f-%.1f s", why, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        else:
            self._log.warning("open", "%s; retrying in %.1f s", why, self._backoff_s)
        self.last_open_error = why
        self._backoff_s = min(self._backoff_s * 2.0, self.cfg.reconnect_max_s)

    def _adopt(self, conn: Any, first: bool) -> None:
        """Take a freshly opened connection into use."""
        conn.mav = self.mav  # mavutil helpers (setup_signing, recv_match) see our codec
        conn.first_byte = False  # never let mavutil swap in its global-dialect codec
        self.conn = conn
        self._dest = None
        if isinstance(conn, self.mavutil.mavudp) and not conn.udp_server:
            host, port = conn.destination_addr
            try:
                self._dest = (socket.gethostbyname(host), int(port))
            except OSError:
                self._dest = (host, int(port))
        self.reset_parser()
        self._backoff_s = self.cfg.reconnect_min_s
        self.last_open_error = None
        self._on_open()
        url = self.cfg.url
        if not first:
            self._stats["reconnects"] += 1
            logger.info("MAVLink link %s reopened", url)
        else:
            logger.info(
                "MAVLink link %s open as %d/%d (%s, %s%s)",
                url,
                self.cfg.source_system,
                self.cfg.source_component,
                self.cfg.flavour,
                NAV_MESSAGE[self.cfg.flavour],
                ", signed" if self.cfg.signing_key_file is not None else "",
            )

    def down(self, why: str) -> None:
        """The transport failed: close it and schedule a reopen after the back-off."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken transport may fail; it is gone either way
                pass
        self._next_open_s = self._mono() + self._backoff_s
        self._log.warning(
            "down", "MAVLink link %s lost (%s); reconnecting in %.1f s", self.cfg.url, why, self._backoff_s
        )
        self._backoff_s = min(self._backoff_s * 2.0, self.cfg.reconnect_max_s)

    def ensure_open(self) -> bool:
        """Whether the transport is open, reopening it when the back-off has passed (never after :meth:`close`)."""
        if self.closed:
            return False
        if self.conn is not None:
            return True
        if self._mono() < self._next_open_s:
            return False
        return self.open()

    def reset_parser(self) -> None:
        """Drop a partial frame (a new datagram or a new connection never continues the old one)."""
        mav = self.mav
        if mav.buf_len() > 0:
            self._stats["parse_errors"] += 1
        mav.buf = bytearray()
        mav.buf_index = 0
        mav.expected_length = self._d.HEADER_LEN_V1 + 2

    def close(self) -> None:
        """Close the transport for good."""
        self.closed = True
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                pass

    def write(self, buf: bytes | bytearray) -> None:
        """Transport write (raises on transport errors, unlike pymavlink's own writers, which swallow them)."""
        conn = self.conn
        mu = self.mavutil
        if conn is None:
            raise LinkDownError("not connected")
        if isinstance(conn, mu.mavudp):
            if conn.udp_server:
                if not conn.clients:
                    raise NoPeerError
                for addr in list(conn.clients):
                    conn.port.sendto(buf, addr)
            else:
                conn.port.sendto(buf, self._dest or conn.destination_addr)
        elif isinstance(conn, mu.mavtcp):
            n = conn.port.send(buf)
            if n != len(buf):
                raise LinkDownError(f"short TCP write ({n} of {len(buf)} bytes)")
        elif isinstance(conn, mu.mavserial):
            conn.port.write(bytes(buf))
        else:
            conn.write(buf)

    def read_chunks(self) -> list[tuple[bytes, Any]]:
        """Everything the transport has now, without blocking, as (bytes, UDP source address or None) chunks."""
        conn = self.conn
        mu = self.mavutil
        chunks: list[tuple[bytes, Any]] = []
        total = 0
        if isinstance(conn, (mu.mavudp, mu.mavtcp)) and isinstance(conn.port, socket.socket):
            dgram = isinstance(conn, mu.mavudp)
            while total < 1 << 20:
                addr = None
                try:
                    if dgram:
                        data, addr = conn.port.recvfrom(65535)
                    else:
                        data = conn.port.recv(65536)
                        if not data:
                            raise LinkDownError("TCP peer closed the connection")
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:  # ICMP port unreachable on UDP: nobody listening yet
                    break
                chunks.append((data, addr))
                total += len(data)
            return chunks
        for _ in range(64):  # serial and other mavutil transports
            data = conn.recv(4096)
            if not data:
                break
            chunks.append((bytes(data) if not isinstance(data, str) else data.encode("latin-1"), None))
        return chunks
