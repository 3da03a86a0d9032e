"""Strip sources addressed by URL (torch-free): files, watched folders and network streams.

Every source is an iterable of :class:`sarloc.runtime.types.Strip` *blocks*: at most ``block_rows`` rows each, in
acquisition order, ``row0`` = index of the block's first row within its strip and ``final=True`` on a strip's last
block. Pixels come out as the scene loader produces them (``Scene.sar_gray``: float32 on a log, dB-like scale, see
:func:`sarloc.scene.normalise_sar`), so the yielded blocks carry ``meta.scale == "db"``.

URLs (see ``docs/runtime_io.md`` for the formats):

* ``file://PATH`` or a bare ``PATH``: one strip file (``<name>.npy|.tif|.tiff|.png`` + sidecar ``<name>.json``).
* ``dir://FOLDER``: every complete strip of a folder in name order, then (``follow=True``) the new ones.
* ``udp://HOST:PORT``: binds and reads SLS1 frames, one per datagram.
* ``tcp://HOST:PORT``: connects to a strip server and reads SLS1 frames, reconnecting with backoff;
  ``tcp://HOST:PORT?listen=1`` binds and accepts one sender at a time instead.

Replay twins: ``follow=False`` for folders, :func:`send_strip_udp`, :func:`send_strip_tcp` (to a listening reader)
and :class:`TcpStripServer` (for a connecting reader). Sources stop on :meth:`StripSource.stop` (thread-safe), on
``idle_timeout_s`` without data, or after ``max_strips`` final blocks.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from sarloc.errors import SarlocError
from sarloc.runtime.types import Strip, StripMeta
from sarloc.scene import SAR_SCALES, normalise_sar, read_image, to_single_band
from sarloc.typed_config import finite_number

logger = logging.getLogger(__name__)

__all__ = [
    "FRAME_HEADER",
    "MAGIC",
    "MAX_NONFINITE_FRACTION",
    "STRIP_IMAGE_EXTS",
    "DirSource",
    "FileSource",
    "FrameDecoder",
    "SourceStats",
    "StripFile",
    "StripSource",
    "TcpSource",
    "TcpStripServer",
    "UdpSource",
    "encode_frame",
    "encode_frames",
    "meta_from_dict",
    "open_source",
    "read_sidecar",
    "send_strip_tcp",
    "send_strip_udp",
]

STRIP_IMAGE_EXTS = (".npy", ".tif", ".tiff", ".png")
SIDECAR_SCHEMA = 1
MAX_NONFINITE_FRACTION = 0.05
MAX_SIDECAR_BYTES = 1 << 20
DEFAULT_BLOCK_ROWS = 64

# --- stream framing -------------------------------------------------------------------------------------------
MAGIC = b"SLS1"
FRAME_VERSION = 1
FLAG_FINAL = 0x01
#: magic, version u8, flags u8, header-JSON length u32, payload length u32, CRC32(header JSON + payload) u32
FRAME_HEADER = struct.Struct("<4sBBIII")
FRAME_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}
UDP_MAX_BYTES = 60_000
TCP_MAX_BYTES = 1 << 20
_FRAME_KEYS = ("row0", "rows", "cols", "dtype")
_URL_FORMS = "file://PATH (or a bare path), dir://FOLDER, udp://HOST:PORT, tcp://HOST:PORT[?listen=1]"


@dataclass
class SourceStats:
    """Counters of a source (read them any time; only the reading thread writes them).

    Attributes:
        strips_ok: strips delivered completely (final block reached without a row gap).
        strips_skipped: strips that failed to load (files) or arrived with a row gap (streams).
        frames_ok: stream frames decoded.
        dropped_crc: frames whose CRC32 did not match.
        dropped_malformed: frames with an impossible header, bad JSON or metadata, or truncated.
        dropped_nonfinite: frames or strips refused for more than 5 % NaN/Inf pixels.
        resyncs: times the decoder skipped bytes to find the next magic; bytes_discarded: bytes skipped.
        row_gaps: blocks that did not continue their strip where the previous one ended.
        reconnects: TCP connections lost (and re-established or re-accepted).
        nonfinite_filled: NaN/Inf pixels replaced by the finite mean.
    """

    strips_ok: int = 0
    strips_skipped: int = 0
    frames_ok: int = 0
    dropped_crc: int = 0
    dropped_malformed: int = 0
    dropped_nonfinite: int = 0
    resyncs: int = 0
    bytes_discarded: int = 0
    row_gaps: int = 0
    reconnects: int = 0
    nonfinite_filled: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs and JSON)."""
        return asdict(self)


# =============================================================================================================
# sidecar / metadata


def _num(obj: dict[str, Any], key: str, where: str, *, optional: bool = False, positive: bool = False):
    v = obj.get(key)
    if v is None:
        if optional:
            return None
        raise SarlocError(f"{where}: field {key!r} is missing; add it (strip metadata schema: docs/runtime_io.md)")
    f = finite_number(v)
    if f is None or (positive and f <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise SarlocError(f"{where}: field {key!r} must be {kind}, got {v!r:.40}; fix the strip metadata")
    return f


def _pair(obj: dict[str, Any], key: str, where: str) -> tuple[float, float] | None:
    v = obj.get(key)
    if v is None:
        return None
    xy = [finite_number(x) for x in v] if isinstance(v, (list, tuple)) and len(v) == 2 else [None]
    if any(x is None for x in xy):
        raise SarlocError(f"{where}: field {key!r} must be [x, y] (two finite numbers) or null, got {v!r:.40}")
    return (xy[0], xy[1])  # type: ignore[return-value]


def meta_from_dict(obj: Any, where: str, default_strip_id: str | None = None) -> StripMeta:
    """Validate a strip-metadata JSON object (a sidecar or a frame header) into a :class:`StripMeta`.

    Required: ``gsd_m``, ``t0_s``, ``row_rate_hz``, ``scale``; optional: ``strip_id`` (default
    ``default_strip_id``), ``heading_deg`` (null), ``across_offset_m`` (0), ``prior_xy_m``, ``prior_lonlat_deg``,
    ``prior_sigma_m``, ``schema`` (1). Unknown keys are ignored.

    Raises:
        SarlocError: one line naming ``where``, the field and the fix.
    """
    if not isinstance(obj, dict):
        raise SarlocError(f"{where}: must hold a JSON object with the strip metadata (see docs/runtime_io.md)")
    schema = obj.get("schema", SIDECAR_SCHEMA)
    if schema != SIDECAR_SCHEMA or isinstance(schema, bool):
        raise SarlocError(f"{where}: schema {schema!r:.20} is not supported (expected {SIDECAR_SCHEMA}); update sarloc")
    sid = obj.get("strip_id", default_strip_id)
    if not isinstance(sid, str) or not sid or len(sid) > 200:
        raise SarlocError(f"{where}: field 'strip_id' must be a non-empty string (<= 200 chars), got {sid!r:.40}")
    scale = obj.get("scale")
    if scale is None:
        raise SarlocError(f"{where}: field 'scale' is missing; add one of {', '.join(SAR_SCALES)}")
    if scale not in SAR_SCALES:
        raise SarlocError(f"{where}: field 'scale' is {scale!r:.40}; expected one of {', '.join(SAR_SCALES)}")
    fields = {
        "gsd_m": _num(obj, "gsd_m", where, positive=True),
        "t0_s": _num(obj, "t0_s", where),
        "row_rate_hz": _num(obj, "row_rate_hz", where, positive=True),
        "heading_deg": _num(obj, "heading_deg", where, optional=True),
        "across_offset_m": _num(obj, "across_offset_m", where, optional=True) or 0.0,
        "prior_sigma_m": _num(obj, "prior_sigma_m", where, optional=True, positive=True),
        "prior_xy_m": _pair(obj, "prior_xy_m", where),
        "prior_lonlat_deg": _pair(obj, "prior_lonlat_deg", where),
    }
    try:
        return StripMeta(strip_id=sid, scale=str(scale), **fields)
    except SarlocError as e:
        raise SarlocError(f"{where}: {e}") from None


def read_sidecar(path: str | Path, default_strip_id: str | None = None) -> StripMeta:
    """Read and validate a strip sidecar JSON (``strip_id`` defaults to the file stem).

    Raises:
        SarlocError: the sidecar is missing, unreadable, malformed or has a bad field.
    """
    path = Path(path)
    if not path.is_file():
        raise SarlocError(f"strip sidecar {path} not found; write {path.name} beside the image (docs/runtime_io.md)")
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise SarlocError(f"strip sidecar {path} is larger than {MAX_SIDECAR_BYTES} bytes; it is not a sidecar")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
        raise SarlocError(f"strip sidecar {path}: unreadable or malformed JSON ({str(e)[:200]}); rewrite it") from None
    return meta_from_dict(obj, f"strip sidecar {path}", default_strip_id or path.stem)


# =============================================================================================================
# pixels


def _check_image(arr: np.ndarray, where: str) -> None:
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and not 1 <= arr.shape[2] <= 4):
        raise SarlocError(f"{where}: unusable shape {arr.shape}; a strip is (rows, cols) or (rows, cols, bands<=4)")
    if arr.dtype.kind not in "uf" or arr.dtype.itemsize not in ((1, 2) if arr.dtype.kind == "u" else (4, 8)):
        raise SarlocError(f"{where}: unsupported dtype {arr.dtype}; store uint8, uint16, float32 or float64")


def _nonfinite_scan(arr: np.ndarray, where: str, chunk_rows: int = 1024) -> tuple[int, float]:
    """(count of NaN/Inf, finite mean) over ``arr`` in row chunks (bounded memory for memory maps)."""
    if arr.dtype.kind != "f":
        return 0, 0.0
    n_bad, n_good, total = 0, 0, 0.0
    for r in range(0, arr.shape[0], chunk_rows):
        c = np.asarray(arr[r : r + chunk_rows], dtype=np.float64)
        ok = np.isfinite(c)
        n_bad += int(c.size - ok.sum())
        n_good += int(ok.sum())
        total += float(c[ok].sum())
    frac = n_bad / max(arr.size, 1)
    if frac > MAX_NONFINITE_FRACTION:
        raise SarlocError(
            f"{where}: {100 * frac:.1f}% of the pixels are NaN/Inf (limit {100 * MAX_NONFINITE_FRACTION:.0f}%); "
            "re-export the strip"
        )
    return n_bad, (total / n_good if n_good else 0.0)


def _normalise_block(raw: np.ndarray, scale: str, fill: float | None, where: str) -> np.ndarray:
    """Stored pixels of a block -> (h, W) float32 as the scene loader produces them (non-finite -> ``fill``)."""
    if fill is not None and raw.dtype.kind == "f":
        bad = ~np.isfinite(raw)
        if bad.any():
            raw = np.array(raw, copy=True)
            raw[bad] = fill
    return np.ascontiguousarray(to_single_band(normalise_sar(raw, scale, what=where), "sar"))


def _find_image(sidecar: Path) -> Path | None:
    for ext in STRIP_IMAGE_EXTS:
        p = sidecar.with_suffix(ext)
        if p.is_file():
            return p
    return None


class StripFile:
    """One strip on disk (image + sidecar), opened and validated eagerly.

    ``.npy`` images are memory-mapped (only ``block_rows`` rows are in memory at a time); TIFF and PNG images are
    decoded whole. Float images with NaN/Inf: more than 5 % -> refused, else filled with the finite mean (logged).

    Args:
        path: the image (``<name>.npy|.tif|.tiff|.png``) or its sidecar (``<name>.json``).

    Raises:
        SarlocError: one line naming the file and the fix (missing, corrupt, truncated, wrong shape/dtype,
            too many NaN/Inf, bad sidecar).
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        ext = p.suffix.lower()
        if ext == ".json":
            sidecar, image = p, _find_image(p)
            if image is None:
                raise SarlocError(
                    f"strip {p}: no image {p.stem}.npy|.tif|.tiff|.png beside the sidecar; write the image first"
                )
        elif ext in STRIP_IMAGE_EXTS:
            image, sidecar = p, p.with_suffix(".json")
            if not image.is_file():
                raise SarlocError(f"strip image {image} not found; check the path")
        else:
            raise SarlocError(f"strip {p}: unsupported extension {ext!r}; use .npy, .tif, .tiff or .png (+ .json)")
        self.image_path, self.sidecar_path = image, sidecar
        self.meta = read_sidecar(sidecar)
        where = f"strip image {image}"
        if image.suffix.lower() == ".npy":
            try:
                arr = np.load(image, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # truncated, corrupt header, pickled object arrays, ...
                raise SarlocError(f"{where}: unreadable ({type(e).__name__}: {e}); re-copy or re-export it") from None
        else:
            arr = read_image(image, what="strip image")
        _check_image(arr, where)
        self._arr = arr
        self.n_nonfinite, mean = _nonfinite_scan(arr, where)
        self._fill = mean if self.n_nonfinite else None
        if self.n_nonfinite:
            logger.warning("%s: filled %d NaN/Inf pixels with the finite mean %.4g", where, self.n_nonfinite, mean)

    @property
    def height_px(self) -> int:
        """Rows of the strip."""
        return int(self._arr.shape[0])

    @property
    def width_px(self) -> int:
        """Columns of the strip."""
        return int(self._arr.shape[1])

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[Strip]:
        """Yield the strip as normalised blocks of at most ``block_rows`` rows."""
        block_rows = _check_block_rows(block_rows)
        meta = replace(self.meta, scale="db")
        h = self.height_px
        for r in range(0, h, block_rows):
            raw = np.asarray(self._arr[r : r + block_rows])
            pix = _normalise_block(raw, self.meta.scale, self._fill, f"strip image {self.image_path}")
            yield Strip(meta=meta, pixels=pix, row0=r, final=r + block_rows >= h)

    def read(self) -> Strip:
        """The whole strip as one normalised block."""
        return next(self.blocks(max(self.height_px, 1)))


def _check_block_rows(block_rows: int) -> int:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise SarlocError(f"block_rows={block_rows!r} must be a positive integer")
    return block_rows


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
        self.block_rows = _check_block_rows(block_rows)
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
        out = []
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
            if _find_image(p) is None:
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


# =============================================================================================================
# stream framing


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
        per = min(per, _check_block_rows(block_rows))
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
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rows, cols)):
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
            pix = _normalise_block(raw, meta.scale, fill, where)
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
