"""SLS1 stream framing (torch-free): strips and blocks as self-checking frames over UDP or TCP.

A frame is a fixed header (magic ``SLS1``, version, flags, header-JSON length, payload length, CRC32), the strip
metadata plus the block's place as JSON, and the pixels. :func:`encode_frame` / :func:`encode_frames` write them;
:class:`FrameDecoder` reads a byte stream back into blocks, resynchronising after garbage and counting what it drops
(``docs/runtime_io.md`` has the format)."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import replace
from typing import Any, TypeGuard

import numpy as np

from sarloc.core.errors import SarlocError
from sarloc.runtime.strips import MAX_NONFINITE_FRACTION, SourceStats, check_block_rows, meta_from_dict, normalise_block
from sarloc.runtime.types import Strip, StripMeta

logger = logging.getLogger(__name__)

__all__ = ["FRAME_HEADER", "MAGIC", "TCP_MAX_BYTES", "UDP_MAX_BYTES", "FrameDecoder", "encode_frame", "encode_frames"]


# --- stream framing -------------------------------------------------------------------------------------------
MAGIC = b"SLS1"
FRAME_VERSION = 1
FLAG_FINAL = 0x01
#: magic, version u8, flags u8, header-JSON length u32, payload length u32, CRC32(header JSON + payload) u32
FRAME_HEADER = struct.Struct("<4sBBIII")
FRAME_DTYPES: dict[str, np.dtype] = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}
UDP_MAX_BYTES = 60_000
TCP_MAX_BYTES = 1 << 20
_FRAME_KEYS = ("row0", "rows", "cols", "dtype")
# =============================================================================================================
# stream framing


def _is_int(v: Any) -> TypeGuard[int]:
    """An integer, and not a bool (JSON ``true`` decodes to a bool, which is an int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _frame_json(meta: StripMeta, row0: int, rows: int, cols: int, dtype: str) -> bytes:
    d = meta.to_dict()
    d.update(row0=int(row0), rows=int(rows), cols=int(cols), dtype=dtype)
    return json.dumps(d, separators=(",", ":")).encode("utf-8")


def _frame_dtype(pixels: np.ndarray) -> str:
    if pixels.dtype == np.uint8:
        return "uint8"
    if pixels.dtype == np.uint16:
        return "uint16"
    if pixels.dtype.kind == "f":
        return "float32"
    raise SarlocError(f"cannot send pixels of dtype {pixels.dtype}; use uint8, uint16 or float32")


def encode_frame(meta: StripMeta, pixels: np.ndarray, row0: int = 0, final: bool = True) -> bytes:
    """One SLS1 frame holding ``pixels`` (rows, cols) as rows ``row0..`` of strip ``meta`` (see docs/runtime_io.md).

    Pixels are sent as they are (uint8/uint16, floats as float32), encoded per ``meta.scale``.
    """
    if pixels.ndim != 2 or pixels.size == 0:
        raise SarlocError(f"strip {meta.strip_id!r}: pixels must be a non-empty (rows, cols) array")
    name = _frame_dtype(pixels)
    payload = np.ascontiguousarray(pixels, dtype=FRAME_DTYPES[name]).tobytes()
    hj = _frame_json(meta, row0, pixels.shape[0], pixels.shape[1], name)
    crc = zlib.crc32(payload, zlib.crc32(hj))
    head = FRAME_HEADER.pack(MAGIC, FRAME_VERSION, FLAG_FINAL if final else 0, len(hj), len(payload), crc)
    return head + hj + payload


def encode_frames(strip: Strip, max_bytes: int = UDP_MAX_BYTES, block_rows: int | None = None) -> list[bytes]:
    """Split a strip (or block) into frames of at most ``max_bytes`` bytes (and ``block_rows`` rows).

    Only the last frame carries the final flag, and only when ``strip.final``.

    Raises:
        SarlocError: a single row does not fit in ``max_bytes`` (use TCP, fewer columns or 8/16-bit pixels).
    """
    h, w = strip.pixels.shape
    name = _frame_dtype(strip.pixels)
    itemsize = FRAME_DTYPES[name].itemsize
    worst = len(_frame_json(strip.meta, strip.row0 + h, h, w, name)) + 16
    per = (int(max_bytes) - FRAME_HEADER.size - worst) // (w * itemsize)
    if block_rows is not None:
        per = min(per, check_block_rows(block_rows))
    if per < 1:
        raise SarlocError(
            f"strip {strip.meta.strip_id!r}: one row of {w} {name} pixels does not fit in a {max_bytes}-byte frame; "
            "use tcp://, fewer columns or uint8/uint16 pixels"
        )
    out = []
    for r in range(0, h, per):
        last = r + per >= h
        out.append(encode_frame(strip.meta, strip.pixels[r : r + per], strip.row0 + r, strip.final and last))
    return out


class FrameDecoder:
    """Incremental SLS1 frame decoder: feed bytes, get normalised :class:`Strip` blocks; never raises on bad input.

    Bad magic -> bytes skipped up to the next magic (``resyncs``); impossible header or bad JSON ->
    ``dropped_malformed``; CRC mismatch -> ``dropped_crc``; >5 % NaN/Inf -> ``dropped_nonfinite``. After a bad
    frame the decoder rescans from the byte after its magic, so a corrupted length cannot swallow good frames.
    Memory is bounded by the largest allowed frame.

    Args:
        stats: counters to update (a new :class:`SourceStats` by default).
        max_rows, max_cols: largest block accepted, pixels.
        max_payload_bytes, max_header_bytes: largest payload / header JSON accepted, bytes.
    """

    def __init__(
        self,
        stats: SourceStats | None = None,
        *,
        max_rows: int = 8192,
        max_cols: int = 16384,
        max_payload_bytes: int = 64 << 20,
        max_header_bytes: int = 16 << 10,
    ) -> None:
        self.stats = stats if stats is not None else SourceStats()
        self.max_rows, self.max_cols = int(max_rows), int(max_cols)
        self.max_payload_bytes, self.max_header_bytes = int(max_payload_bytes), int(max_header_bytes)
        self._buf = bytearray()
        self._skipping = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def _discard(self, n: int) -> None:
        if n <= 0:
            return
        if not self._skipping:
            self.stats.resyncs += 1
            self._skipping = True
        self.stats.bytes_discarded += n
        del self._buf[:n]

    def _drop_frame(self, counter: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        del self._buf[:1]  # rescan from the byte after this magic
        self._skipping = False

    def _plausible(self, hdr: Any, plen: int) -> bool:
        if not isinstance(hdr, dict):
            return False
        rows, cols, dt = hdr.get("rows"), hdr.get("cols"), hdr.get("dtype")
        if not (_is_int(rows) and _is_int(cols)):
            return False
        if not isinstance(dt, str) or dt not in FRAME_DTYPES:  # a list or dict here is unhashable
            return False
        return (
            1 <= rows <= self.max_rows
            and 1 <= cols <= self.max_cols
            and rows * cols * FRAME_DTYPES[dt].itemsize == plen
        )

    def feed(self, data: bytes) -> list[Strip]:
        """Add received bytes; return the blocks completed by them (possibly none)."""
        self._buf += data
        out: list[Strip] = []
        hs = FRAME_HEADER.size
        while True:
            i = self._buf.find(MAGIC)
            if i < 0:
                keep = next((k for k in (3, 2, 1) if self._buf.endswith(MAGIC[:k])), 0)
                self._discard(len(self._buf) - keep)
                break
            self._discard(i)
            if len(self._buf) < hs:
                break
            _, ver, flags, hlen, plen, crc = FRAME_HEADER.unpack_from(self._buf)
            if ver != FRAME_VERSION or not 2 <= hlen <= self.max_header_bytes or plen > self.max_payload_bytes:
                self._drop_frame("dropped_malformed")
                continue
            if len(self._buf) < hs + hlen:
                break
            try:
                hdr = json.loads(bytes(self._buf[hs : hs + hlen]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                hdr = None
            need = hs + hlen + plen
            whole = len(self._buf) >= need
            crc_ok = whole and zlib.crc32(memoryview(self._buf)[hs:need]) == crc
            if not self._plausible(hdr, plen):
                if crc_ok:  # intact but invalid (limits, fields): skip the whole frame
                    self.stats.dropped_malformed += 1
                    del self._buf[:need]
                    self._skipping = False
                else:  # corrupted header: do not wait for a payload length we cannot trust
                    self._drop_frame("dropped_crc" if whole else "dropped_malformed")
                continue
            if not whole:
                break
            if not crc_ok:
                self._drop_frame("dropped_crc")
                continue
            payload = bytes(self._buf[hs + hlen : need])
            del self._buf[:need]
            self._skipping = False
            block = self._make_block(hdr, flags, payload)
            if block is not None:
                self.stats.frames_ok += 1
                out.append(block)
        return out

    def _make_block(self, hdr: dict[str, Any], flags: int, payload: bytes) -> Strip | None:
        where = f"frame of strip {str(hdr.get('strip_id'))[:60]!r}"
        row0 = hdr.get("row0")
        if not isinstance(row0, int) or isinstance(row0, bool) or not 0 <= row0 < 2**31:
            self.stats.dropped_malformed += 1
            logger.debug("%s: bad row0 %r; frame dropped", where, row0)
            return None
        try:
            meta = meta_from_dict({k: v for k, v in hdr.items() if k not in _FRAME_KEYS}, where)
            raw = np.frombuffer(payload, dtype=FRAME_DTYPES[hdr["dtype"]]).reshape(hdr["rows"], hdr["cols"])
            bad = 0
            if raw.dtype.kind == "f":
                bad = int(raw.size - np.isfinite(raw).sum())
                if bad > MAX_NONFINITE_FRACTION * raw.size:
                    self.stats.dropped_nonfinite += 1
                    logger.debug("%s: %d of %d pixels NaN/Inf; frame dropped", where, bad, raw.size)
                    return None
            fill = float(raw[np.isfinite(raw)].mean(dtype=np.float64)) if bad else None
            pix = normalise_block(raw, meta.scale, fill, where)
        except SarlocError as e:
            self.stats.dropped_malformed += 1
            logger.debug("%s dropped: %s", where, e)
            return None
        self.stats.nonfinite_filled += bad
        return Strip(meta=replace(meta, scale="db"), pixels=pix, row0=row0, final=bool(flags & FLAG_FINAL))

    def end_datagram(self) -> None:
        """Discard a partial frame left at the end of a datagram or connection (counted as malformed)."""
        if self._buf:
            if self._buf.startswith(MAGIC):
                self.stats.dropped_malformed += 1
            else:
                self._discard(len(self._buf))
            self._buf.clear()
        self._skipping = False
