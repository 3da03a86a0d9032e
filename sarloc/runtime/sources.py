"""Strip sources addressed by URL (torch-free): files, watched folders and network streams.

Every source is an iterable of :class:`sarloc.runtime.types.Strip` *blocks*: at most ``block_rows`` rows each, in
acquisition order, ``row0`` = index of the block's first row within its strip and ``final=True`` on a strip's last
block. Pixels come out as the scene loader produces them (``Scene.sar_gray``: float32 on a log, dB-like scale, see
:func:`sarloc.core.scene.normalise_sar`), so the yielded blocks carry ``meta.scale == "db"``.

URLs (see ``docs/runtime_io.md`` for the formats):

* ``file://PATH`` or a bare ``PATH``: one strip file (``<name>.npy|.tif|.tiff|.png`` + sidecar ``<name>.json``).
* ``dir://FOLDER``: every complete strip of a folder in name order, then (``follow=True``) the new ones.
* ``udp://HOST:PORT``: binds and reads SLS1 frames, one per datagram.
* ``tcp://HOST:PORT``: connects to a strip server and reads SLS1 frames, reconnecting with backoff;
  ``tcp://HOST:PORT?listen=1`` binds and accepts one sender at a time instead.

Replay twins: ``follow=False`` for folders, and the senders of :mod:`sarloc.sim.senders`. Sources stop on
:meth:`StripSource.stop` (thread-safe), on
``idle_timeout_s`` without data, or after ``max_strips`` final blocks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sarloc.core.errors import SarlocError
from sarloc.runtime.frames import FrameDecoder
from sarloc.runtime.strips import DEFAULT_BLOCK_ROWS, SourceStats, StripFile, check_block_rows, find_image
from sarloc.runtime.types import Strip

logger = logging.getLogger(__name__)

__all__ = [
    "DirSource",
    "FileSource",
    "StripSource",
    "TcpSource",
    "UdpSource",
    "open_source",
]


_URL_FORMS = "file://PATH (or a bare path), dir://FOLDER, udp://HOST:PORT, tcp://HOST:PORT[?listen=1]"


# =============================================================================================================
# sources


class StripSource:
    """Base of every source: iterate for blocks; ``stop()`` (any thread) ends the iteration; ``stats`` counts."""

    url: str = ""

    def __init__(
        self,
        *,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        idle_timeout_s: float | None = None,
        max_strips: int | None = None,
    ) -> None:
        self.block_rows = check_block_rows(block_rows)
        self.idle_timeout_s = idle_timeout_s
        self.max_strips = max_strips
        self.stats = SourceStats()
        self._stop = threading.Event()
        self._last_data = time.monotonic()
        self._n_final = 0

    def __iter__(self) -> Iterator[Strip]:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the iteration to end (returns at once; the reader notices within its poll interval)."""
        self._stop.set()

    def close(self) -> None:
        """Stop and release sockets (idempotent)."""
        self.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _done(self) -> bool:
        if self._stop.is_set():
            return True
        if self.max_strips is not None and self._n_final >= self.max_strips:
            return True
        return self.idle_timeout_s is not None and time.monotonic() - self._last_data > self.idle_timeout_s

    def _rechunk(self, block: Strip) -> Iterator[Strip]:
        """Split a block into ``block_rows`` pieces; count finals."""
        h = block.pixels.shape[0]
        for r in range(0, h, self.block_rows):
            last = r + self.block_rows >= h
            yield Strip(block.meta, block.pixels[r : r + self.block_rows], block.row0 + r, block.final and last)
        if block.final:
            self._n_final += 1


class FileSource(StripSource):
    """``file://PATH``: one strip file (its own replay twin)."""

    def __init__(self, path: str | Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = Path(path)
        self.url = f"file://{self.path}"
        self._file = StripFile(self.path)  # validate eagerly: errors surface at open_source()

    def __iter__(self) -> Iterator[Strip]:
        for b in self._file.blocks(self.block_rows):
            if self._stop.is_set():
                return
            yield b
        self.stats.strips_ok += 1


class DirSource(StripSource):
    """``dir://FOLDER``: complete strips of a folder in name order, then (``follow``) new ones as they appear.

    A strip ``<name>`` is complete when ``<name>.json`` exists next to ``<name>.npy|.tif|.tiff|.png`` (writers write
    the image first, then the sidecar atomically by rename). Hidden (``.*``) and ``*.tmp`` files are ignored, as
    are JSON files without an image of the same name. A strip that fails to load is logged, counted in
    ``stats.strips_skipped`` and retried only when its sidecar changes.

    Args:
        folder: the folder to read.
        follow: keep polling for new strips (live); False = read what is there and stop (replay).
        poll_s: polling interval, seconds.
    """

    def __init__(self, folder: str | Path, *, follow: bool = True, poll_s: float = 0.5, **kw: Any) -> None:
        super().__init__(**kw)
        self.folder = Path(folder)
        self.url = f"dir://{self.folder}"
        self.follow = bool(follow)
        self.poll_s = float(poll_s)
        if not self.folder.is_dir():
            raise SarlocError(f"dir://{self.folder}: folder not found; create it or fix the URL")
        self._done_names: set[str] = set()
        self._failed: dict[str, tuple[int, int]] = {}

    def _candidates(self) -> list[Path]:
        out: list[Path] = []
        try:
            entries = sorted(self.folder.iterdir(), key=lambda p: p.name)
        except OSError as e:
            logger.warning("dir://%s: cannot list the folder (%s)", self.folder, e)
            return out
        for p in entries:
            n = p.name
            if n.startswith(".") or n.endswith(".tmp") or p.suffix.lower() != ".json" or p.stem in self._done_names:
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            if self._failed.get(p.stem) == (st.st_mtime_ns, st.st_size):
                continue
            if find_image(p) is None:
                continue  # not a strip sidecar (e.g. truth.json) or the image is still missing
            out.append(p)
        return out

    def __iter__(self) -> Iterator[Strip]:
        while not self._done():
            for sidecar in self._candidates():
                if self._done():
                    return
                try:
                    sf = StripFile(sidecar)
                    st = sidecar.stat()
                except (SarlocError, OSError) as e:
                    self._skip(sidecar, e)
                    continue
                self._done_names.add(sidecar.stem)
                try:
                    for b in sf.blocks(self.block_rows):
                        self._last_data = time.monotonic()
                        yield b
                except (SarlocError, OSError) as e:  # e.g. file replaced while being read
                    self._failed[sidecar.stem] = (st.st_mtime_ns, st.st_size)
                    self._done_names.discard(sidecar.stem)
                    self._skip(sidecar, e)
                    continue
                self._n_final += 1
                self.stats.strips_ok += 1
                self._failed.pop(sidecar.stem, None)
            if not self.follow:
                return
            self._stop.wait(self.poll_s)

    def _skip(self, sidecar: Path, err: Exception) -> None:
        self.stats.strips_skipped += 1
        try:
            st = sidecar.stat()
            self._failed[sidecar.stem] = (st.st_mtime_ns, st.st_size)
        except OSError:
            pass
        logger.warning("dir://%s: skipping strip %s: %s", self.folder, sidecar.stem, err)


class _StreamSource(StripSource):
    """Common part of the UDP and TCP readers: decoding, row-gap bookkeeping, re-chunking."""

    def __init__(self, *, poll_s: float = 0.2, decoder_opts: dict[str, int] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.poll_s = float(poll_s)
        self._decoder_opts = dict(decoder_opts or {})
        self._expect: dict[str, tuple[int, bool]] = {}  # strip_id -> (next row, gap seen)

    def _decoder(self) -> FrameDecoder:
        return FrameDecoder(self.stats, **self._decoder_opts)

    def _emit(self, blocks: list[Strip]) -> Iterator[Strip]:
        for b in blocks:
            self._last_data = time.monotonic()
            sid = b.meta.strip_id
            nxt, gap = self._expect.get(sid, (0, False))
            if b.row0 != nxt:
                self.stats.row_gaps += 1
                gap = True
                logger.warning("%s: strip %r: rows %d..%d missing or repeated", self.url, sid, nxt, b.row0 - 1)
            if b.final:
                self._expect.pop(sid, None)
                if gap:
                    self.stats.strips_skipped += 1
                else:
                    self.stats.strips_ok += 1
            else:
                if len(self._expect) > 64:  # bounded: forget the oldest unfinished strips
                    self._expect.pop(next(iter(self._expect)))
                self._expect[sid] = (b.row0 + b.pixels.shape[0], gap)
            yield from self._rechunk(b)


def _host_port(url: str) -> tuple[str, int, dict[str, list[str]]]:
    u = urlsplit(url)
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or port is None:
        raise SarlocError(f"strip source {url!r}: needs HOST:PORT, e.g. {u.scheme}://127.0.0.1:5600")
    return u.hostname, port, parse_qs(u.query)


class UdpSource(_StreamSource):
    """``udp://HOST:PORT``: binds at construction (port 0 = any free port, see ``.port``); one frame per datagram."""

    def __init__(self, host: str, port: int, *, recv_buf_bytes: int = 4 << 20, **kw: Any) -> None:
        super().__init__(**kw)
        self.url = f"udp://{host}:{port}"
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(recv_buf_bytes))
            self._sock.bind((host, int(port)))
        except OSError as e:
            self._sock.close()
            raise SarlocError(f"{self.url}: cannot bind ({e}); choose another port or host") from None
        self._sock.settimeout(self.poll_s)
        self.port = int(self._sock.getsockname()[1])

    def __iter__(self) -> Iterator[Strip]:
        dec = self._decoder()
        self._last_data = time.monotonic()
        try:
            while not self._done():
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    raise
                blocks = dec.feed(data)
                dec.end_datagram()
                yield from self._emit(blocks)
        finally:
            if self._stop.is_set():
                self._sock.close()

    def close(self) -> None:
        """Stop and close the socket."""
        super().close()
        self._sock.close()


class TcpSource(_StreamSource):
    """``tcp://HOST:PORT``: connects to a strip server, reconnecting with exponential backoff when it closes.

    With ``listen=True`` (``?listen=1``) it binds at construction instead and accepts one sender at a time.
    A frame cut by a closed connection is counted as malformed and dropped.

    Args:
        listen: bind and accept instead of connecting.
        backoff_s: (first, longest) wait between connection attempts, seconds.
        connect_timeout_s: timeout of one connection attempt.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        listen: bool = False,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        connect_timeout_s: float = 2.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.host, self.port, self.listen = host, int(port), bool(listen)
        self.url = f"tcp://{host}:{port}" + ("?listen=1" if self.listen else "")
        self.backoff_s = (float(backoff_s[0]), float(backoff_s[1]))
        self.connect_timeout_s = float(connect_timeout_s)
        self._server: socket.socket | None = None
        self._conn: socket.socket | None = None
        if self.listen:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            srv = socket.socket(fam, socket.SOCK_STREAM)
            try:
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                srv.bind((host, self.port))
                srv.listen(1)
            except OSError as e:
                srv.close()
                raise SarlocError(f"{self.url}: cannot listen ({e}); choose another port or host") from None
            srv.settimeout(self.poll_s)
            self._server = srv
            self.port = int(srv.getsockname()[1])

    def _connect(self) -> socket.socket | None:
        delay = self.backoff_s[0]
        while not self._done():
            try:
                if self._server is not None:
                    conn, peer = self._server.accept()
                    logger.info("%s: sender %s connected", self.url, peer)
                else:
                    conn = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
                    logger.info("%s: connected", self.url)
                conn.settimeout(self.poll_s)
                return conn
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return None
                logger.debug("%s: connect failed (%s); retrying in %.1f s", self.url, e, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, self.backoff_s[1])
        return None

    def __iter__(self) -> Iterator[Strip]:
        self._last_data = time.monotonic()
        try:
            while not self._done():
                conn = self._connect()
                if conn is None:
                    return
                self._conn = conn
                dec = self._decoder()
                try:
                    while not self._done():
                        try:
                            data = conn.recv(1 << 16)
                        except TimeoutError:
                            continue
                        except OSError as e:
                            logger.warning("%s: connection error (%s)", self.url, e)
                            break
                        if not data:
                            break
                        yield from self._emit(dec.feed(data))
                finally:
                    dec.end_datagram()
                    conn.close()
                    self._conn = None
                if not self._done():
                    self.stats.reconnects += 1
                    logger.info("%s: peer closed the connection; reconnecting", self.url)
                    if self._server is None:
                        self._stop.wait(self.backoff_s[0])
        finally:
            if self._stop.is_set() and self._server is not None:
                self._server.close()

    def close(self) -> None:
        """Stop and close the sockets."""
        super().close()
        if self._server is not None:
            self._server.close()


# =============================================================================================================
# factory

_COMMON = {"block_rows", "idle_timeout_s", "max_strips"}
_OPTS = {
    "file": _COMMON,
    "dir": _COMMON | {"follow", "poll_s"},
    "udp": _COMMON | {"poll_s", "decoder_opts", "recv_buf_bytes"},
    "tcp": _COMMON | {"poll_s", "decoder_opts", "listen", "backoff_s", "connect_timeout_s"},
}


def open_source(url: str | Path, **opts: Any) -> StripSource:
    """Open a strip source by URL.

    Args:
        url: ``file://PATH`` or a bare path, ``dir://FOLDER``, ``udp://HOST:PORT``, ``tcp://HOST:PORT[?listen=1]``.
        **opts: ``block_rows`` (64), ``idle_timeout_s``, ``max_strips``; dir: ``follow``, ``poll_s``; udp/tcp:
            ``poll_s``, ``decoder_opts`` (FrameDecoder limits); tcp: ``listen``, ``backoff_s``, ``connect_timeout_s``.

    Raises:
        SarlocError: unknown scheme or option, or the source cannot be opened.
    """
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    scheme = scheme.lower()
    if scheme not in _OPTS:
        raise SarlocError(f"unknown strip source {url!r}; use {_URL_FORMS}")
    unknown = sorted(set(opts) - _OPTS[scheme])
    if unknown:
        raise SarlocError(
            f"{scheme}:// source: unknown option(s) {', '.join(unknown)}; accepted: {sorted(_OPTS[scheme])}"
        )
    if not rest:
        raise SarlocError(f"strip source {url!r} names no path; use {_URL_FORMS}")
    if scheme == "file":
        return FileSource(rest, **opts)
    if scheme == "dir":
        return DirSource(rest, **opts)
    host, port, query = _host_port(url)
    if scheme == "udp":
        return UdpSource(host, port, **opts)
    if "listen" in query and "listen" not in opts:
        opts["listen"] = query["listen"][0].lower() in ("1", "true", "yes")
    return TcpSource(host, port, **opts)
