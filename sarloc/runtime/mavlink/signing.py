"""MAVLink2 signing: the key file (:func:`load_signing_key`), signing timestamps, and :class:`Signing`, which signs
what one codec sends and checks what it receives.

With signing on, nothing unsigned or wrongly signed is accepted; the outgoing timestamp follows the wall clock and
only increases; the signature check verifies the MAC before it lets a packet move a stream's timestamp (pymavlink
does it the other way round, see :meth:`Signing.check_signature`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sarloc.core.errors import ConfigError

logger = logging.getLogger("sarloc.runtime.mavlink")

#: MAVLink2 signing timestamps count 10 us units since this UNIX time (2015-01-01T00:00:00Z).
SIGNING_EPOCH_UNIX_S = 1_420_070_400


def signing_timestamp(unix_s: float) -> int:
    """A UNIX time as a signing timestamp: 10 us units since 2015-01-01 (0 for a time before that)."""
    t = float(unix_s)
    return int((t - SIGNING_EPOCH_UNIX_S) * 100_000) if math.isfinite(t) and t > SIGNING_EPOCH_UNIX_S else 0


def load_signing_key(path: str | os.PathLike[str]) -> bytes:
    """Read a MAVLink2 signing key file: 32 raw bytes, or 64 hex characters (one trailing newline allowed).

    Refuses a file readable or writable by group/others (``mode & 0o077``). Logs the key's sha256 prefix, never the
    key.

    Raises:
        ConfigError: missing file, loose permissions or wrong format.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"signing key file {p}: cannot read it ({e.strerror}); check signing_key_file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"signing key file {p} is not a regular file; point signing_key_file at the key file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"signing key file {p} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); run chmod 600 {p}"
        )
    raw = p.read_bytes()
    if len(raw) == 32:
        key = raw
    else:
        text = raw[:-1] if raw.endswith(b"\n") else raw
        text = text[:-1] if text.endswith(b"\r") else text
        key = b""
        if len(text) == 64:
            try:
                key = bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                key = b""
        if len(key) != 32:
            raise ConfigError(
                f"signing key file {p} holds {len(raw)} bytes; it must be 32 raw bytes or 64 hex characters "
                "(make one with: python -c \"import os;open('key','wb').write(os.urandom(32))\")"
            )
    if key == bytes(32):
        raise ConfigError(f"signing key file {p} is all zeros (that disables signing); generate a random key")
    logger.info("MAVLink2 signing key loaded from %s (sha256 %s...)", p, hashlib.sha256(key).hexdigest()[:8])
    return key


class Signing:
    """MAVLink2 signing on one pymavlink codec (``mav``), set up once: the codec outlives reconnects, so does this.

    Args:
        mav: the link's MAVLink2 codec.
        key: the 32-byte secret key.
        link_id: link id put into our signatures (0..255).
        clock_wall: wall clock (UNIX time) for the outgoing timestamps.
    """

    def __init__(self, mav: Any, key: bytes, link_id: int, clock_wall: Callable[[], float]) -> None:
        self._mav = mav
        self._wall = clock_wall
        # the same fields pymavlink's mavfile.setup_signing(key, sign_outgoing=True, allow_unsigned_callback=...)
        # sets, applied to our codec (the mavfile object is recreated on reconnect; the signing state must not be)
        s = mav.signing
        s.secret_key = key
        s.sign_outgoing = True
        s.allow_unsigned_callback = self._allow_unsigned
        s.link_id = link_id
        s.timestamp = self.now()
        mav.check_signature = self.check_signature  # see check_signature

    def now(self) -> int:
        """The wall clock as a signing timestamp (:func:`signing_timestamp`)."""
        return signing_timestamp(self._wall())

    def advance(self) -> None:
        """Before a send: the timestamp follows the wall clock and only increases (pymavlink adds 1 per packet);
        frozen at start, it would fall behind what an autopilot restores after a reboot."""
        s = self._mav.signing
        s.timestamp = max(s.timestamp, self.now())

    @staticmethod
    def _allow_unsigned(_mav: Any, _msg_id: int) -> bool:
        return False  # with signing on, nothing unsigned (or wrongly signed) is accepted

    def check_signature(self, msgbuf: bytearray, src_system: int, src_component: int) -> bool:
        """pymavlink's signature check with the order fixed: MAC first, then the per-stream timestamp.

        pymavlink records a stream's timestamp before comparing the MAC, so one forged packet with a future
        timestamp would make every genuine packet of that stream look like a replay. Here only a packet signed
        with our key can move a stream's timestamp. Replays (timestamp not increasing) and streams that start
        more than 60 s behind our clock are refused, as in pymavlink.
        """
        s = self._mav.signing
        mac = hashlib.sha256(s.secret_key + bytes(msgbuf[:-6])).digest()[:6]
        if not hmac.compare_digest(mac, bytes(msgbuf[-6:])):
            return False
        link_id = msgbuf[-13]
        timestamp = int.from_bytes(bytes(msgbuf[-12:-6]), "little")
        stream = (link_id, src_system, src_component)
        last = s.stream_timestamps.get(stream)
        if last is not None and timestamp <= last:
            return False  # replay
        if last is None and timestamp + 6_000_000 < s.timestamp:
            return False  # new stream more than 60 s old
        s.stream_timestamps[stream] = timestamp
        s.timestamp = max(s.timestamp, timestamp)
        return True
