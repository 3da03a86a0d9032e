"""Strip files and their metadata (torch-free): the sidecar JSON, image checks and normalisation, and the counters
every strip source keeps (``docs/runtime_io.md`` has the formats)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.config import finite_number
from sarloc.core.errors import SarlocError
from sarloc.core.scene import SAR_SCALES, normalise_sar, read_image, to_single_band
from sarloc.runtime.types import Strip, StripMeta

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "MAX_NONFINITE_FRACTION",
    "SIDECAR_SCHEMA",
    "STRIP_IMAGE_EXTS",
    "SourceStats",
    "StripFile",
    "check_block_rows",
    "find_image",
    "meta_from_dict",
    "normalise_block",
    "read_sidecar",
]


STRIP_IMAGE_EXTS = (".npy", ".tif", ".tiff", ".png")
SIDECAR_SCHEMA = 1
MAX_NONFINITE_FRACTION = 0.05
MAX_SIDECAR_BYTES = 1 << 20
DEFAULT_BLOCK_ROWS = 64


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


def normalise_block(raw: np.ndarray, scale: str, fill: float | None, where: str) -> np.ndarray:
    """Stored pixels of a block -> (h, W) float32 as the scene loader produces them (non-finite -> ``fill``)."""
    if fill is not None and raw.dtype.kind == "f":
        bad = ~np.isfinite(raw)
        if bad.any():
            raw = np.array(raw, copy=True)
            raw[bad] = fill
    return np.ascontiguousarray(to_single_band(normalise_sar(raw, scale, what=where), "sar"))


def find_image(sidecar: Path) -> Path | None:
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
            sidecar, image = p, find_image(p)
            if image is None:
                raise SarlocError(
                    f"strip {p}: no image {p.stem}.npy|.tif|.tiff|.png beside the sidecar; write the image first"
                )
        elif ext in STRIP_IMAGE_EXTS:
            image, sidecar = p, p.with_suffix(".json")
            if not image.is_file():
                raise SarlocError(f"strip image {image} not found; check the path")
        elif p.is_dir():
            raise SarlocError(f"strip source {p} is a folder: use dir://{p} for a folder of strips")
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
        block_rows = check_block_rows(block_rows)
        meta = replace(self.meta, scale="db")
        h = self.height_px
        for r in range(0, h, block_rows):
            raw = np.asarray(self._arr[r : r + block_rows])
            pix = normalise_block(raw, self.meta.scale, self._fill, f"strip image {self.image_path}")
            yield Strip(meta=meta, pixels=pix, row0=r, final=r + block_rows >= h)

    def read(self) -> Strip:
        """The whole strip as one normalised block."""
        return next(self.blocks(max(self.height_px, 1)))


def check_block_rows(block_rows: int) -> int:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise SarlocError(f"block_rows={block_rows!r} must be a positive integer")
    return block_rows
