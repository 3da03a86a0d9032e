"""Build a map pack: tile a basemap on a metric grid, embed every tile with the optical encoder, write the pack.

``build_map_pack(basemap, encoder, out_dir, cfg) -> Path`` (CLI: ``sarloc map build``). The basemap is read in
blocks of tiles (a block is at most ``block_tiles`` x ``block_tiles`` tiles, i.e. about
``(block_tiles - 1) x stride + tile`` pixels a side), so a basemap larger than memory works; embeddings are
streamed to disk as they are computed. See :mod:`sarloc.mappack.pack` for the format.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc import __version__
from sarloc.core.artifacts import atomic_path, atomic_write_json, make_manifest, sha256_file
from sarloc.core.errors import ConfigError, SarlocError
from sarloc.core.preprocess import PreprocessConfig, crop_windows, prepare_windows
from sarloc.mappack.basemap import open_basemap
from sarloc.mappack.pack import (
    BASEMAP_NAME,
    EMBEDDINGS_NAME,
    MANIFEST_NAME,
    PACK_KIND,
    PACK_SCHEMA,
    TILE_DTYPE,
    TILES_NAME,
    save_npy,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapPackConfig:
    """How a basemap becomes a map pack.

    Attributes:
        tile_m: tile side on the ground, metres; the tile is the encoder's window, so this sets the grid's
            metres per pixel (tile_m / window_px). None: the basemap's native resolution.
        stride_m: step between tile centres, metres (overrides ``stride_px``).
        stride_px: step between tile centres, grid pixels (default: window_px // 8, the dense gallery that
            ``sarloc.eval.retrieval.evaluate_dense`` shows to work).
        min_valid_frac: tiles with a smaller fraction of valid (not nodata) pixels are skipped.
        batch: tiles per encoder call.
        block_tiles: tiles per side of a read block (memory bound while building).
        metric_crs: metric CRS of the grid (None: the basemap's own CRS when projected, else UTM of its centre).
        ann: also build the approximate (IVF) index.
        ann_nlist: IVF lists (None: about sqrt(N)).
        hash_source: record the sha256 of a GeoTIFF basemap (one extra read of the file).
    """

    tile_m: float | None = None
    stride_m: float | None = None
    stride_px: int | None = None
    min_valid_frac: float = 0.5
    batch: int = 64
    block_tiles: int = 32
    metric_crs: str | None = None
    ann: bool = False
    ann_nlist: int | None = None
    hash_source: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_m", "stride_m"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive metres, got {v}")
        if self.stride_px is not None and self.stride_px < 1:
            raise ConfigError(f"stride_px must be >= 1, got {self.stride_px}")
        if not 0.0 <= self.min_valid_frac <= 1.0:
            raise ConfigError(f"min_valid_frac must be in [0, 1], got {self.min_valid_frac}")
        if self.batch < 1 or self.block_tiles < 1:
            raise ConfigError("batch and block_tiles must be >= 1")


def _open_encoder(encoder: Any, threads: int):
    """An optical encoder: an object with ``manifest`` and ``__call__``, an ``.onnx`` file or an export folder."""
    if hasattr(encoder, "manifest") and callable(encoder):
        enc = encoder
    else:
        p = Path(encoder)
        if p.is_dir():
            from sarloc.backends.layout import model_path

            p = model_path(p, "optical")
        from sarloc.backends.encoders import OrtEncoder

        enc = OrtEncoder(p, threads=threads)
    if enc.manifest.get("modality") != "optical":
        raise SarlocError(
            f"{getattr(enc, 'path', encoder)} is the {enc.manifest.get('modality')} encoder; a map pack is built "
            "with the optical encoder (EXPORT/optical_encoder.onnx)"
        )
    return enc


def _write_npy_from_raw(path: Path, raw: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Write a .npy header for ``shape``/``dtype`` then stream the raw bytes after it."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        with open(raw, "rb") as r:
            while block := r.read(1 << 24):
                f.write(block)
        f.flush()
        os.fsync(f.fileno())


def build_map_pack(
    basemap: str | Path,
    encoder: Any,
    out_dir: str | Path,
    cfg: MapPackConfig = MapPackConfig(),
    progress: bool = True,
    threads: int = 0,
    force: bool = False,
) -> Path:
    """Tile, embed and write a map pack.

    Args:
        basemap: a GeoTIFF (any CRS) or a scene folder.
        encoder: the optical encoder: ``EXPORT/optical_encoder.onnx`` (or ``.int8.onnx``), an export folder, or a
            loaded encoder (``OrtEncoder``/``TrtEncoder``).
        out_dir: pack folder to write (created; an existing pack is replaced only with ``force``).
        cfg: tile geometry and build options.
        progress: show a tqdm bar.
        threads: ONNX Runtime intra-op threads when ``encoder`` is a path (0: default).
        force: overwrite an existing pack.

    Returns:
        The path of the pack manifest (``out_dir/pack.json``).

    Raises:
        SarlocError: bad basemap, encoder or geometry (one line); no file of a previous pack is left half-written.
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists() and not force:
        raise SarlocError(f"{out_dir} already holds a map pack; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise SarlocError(f"{out_dir} exists and is not a folder")
    enc = _open_encoder(encoder, threads)
    man_e = enc.manifest
    window = int(man_e["window_px"])
    dim = int(man_e["embed_dim"])
    prep = PreprocessConfig(**man_e["preprocess"])
    gsd = cfg.tile_m / window if cfg.tile_m else None
    bm = open_basemap(basemap, gsd_m=gsd, metric_crs=cfg.metric_crs)
    try:
        return _build(bm, enc, out_dir, cfg, window, dim, prep, progress, basemap)
    finally:
        bm.close()


def _stride_px(g, cfg: MapPackConfig, window: int, source) -> int:
    """Grid pixels between tile centres.

    Raises:
        SarlocError: the basemap is smaller than one tile.
    """
    if cfg.stride_m is not None:
        stride = max(1, round(cfg.stride_m / g.gsd_m))
    else:
        stride = int(cfg.stride_px or max(1, window // 8))
    if window > min(g.width_px, g.height_px):
        raise SarlocError(
            f"basemap {source} is {g.width_px}x{g.height_px} px at {g.gsd_m:g} m/px, smaller than one "
            f"{window}-px tile; use a smaller --tile-m"
        )
    return stride


def _embed_tiles(
    bm, enc, cfg: MapPackConfig, grid, prep, dim: int, fraw, bar
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed every tile with enough valid pixels, block by block, appending float16 rows to ``fraw``.

    Returns:
        Row, column and valid fraction of each kept tile, in the order of the embeddings.
    """
    window, stride, bt = grid.tile_px, grid.stride_px, cfg.block_tiles
    rows_l: list[np.ndarray] = []
    cols_l: list[np.ndarray] = []
    frac_l: list[np.ndarray] = []
    for r0 in range(0, grid.n_rows, bt):
        nr = min(bt, grid.n_rows - r0)
        for c0 in range(0, grid.n_cols, bt):
            nc = min(bt, grid.n_cols - c0)
            px0, py0 = c0 * stride, r0 * stride
            lum, valid = bm.read(px0, py0, (nc - 1) * stride + window, (nr - 1) * stride + window)
            rr, cc = np.meshgrid(np.arange(nr), np.arange(nc), indexing="ij")
            origins = np.stack([cc.ravel() * stride, rr.ravel() * stride], axis=1)
            frac = crop_windows(valid.astype(np.float32), origins, window).mean(axis=(1, 2))
            keep = np.flatnonzero(frac >= max(cfg.min_valid_frac, 1e-9))
            for b0 in range(0, len(keep), cfg.batch):
                sel = keep[b0 : b0 + cfg.batch]
                wins = crop_windows(lum, origins[sel], window).astype(np.float32)
                wins[~crop_windows(valid, origins[sel], window)] = np.nan  # filled by prepare_windows
                e = np.asarray(enc(prepare_windows(wins, prep)), dtype=np.float32)
                if e.shape != (len(sel), dim):
                    raise SarlocError(f"encoder returned {e.shape}, expected ({len(sel)}, {dim})")
                e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
                fraw.write(np.ascontiguousarray(e.astype(np.float16)).tobytes())
            rows_l.append((rr.ravel()[keep] + r0).astype(np.int32))
            cols_l.append((cc.ravel()[keep] + c0).astype(np.int32))
            frac_l.append(frac[keep].astype(np.float32))
            bar.update(nr * nc)
    if not rows_l:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(rows_l), np.concatenate(cols_l), np.concatenate(frac_l)


def _tile_table(g, rows: np.ndarray, cols: np.ndarray, frac: np.ndarray, window: int, stride: int) -> np.ndarray:
    """The tile table: grid row/column, valid fraction, tile centre in metres and (geo-referenced) lon/lat."""
    tiles = np.zeros(len(rows), TILE_DTYPE)
    tiles["row"] = rows
    tiles["col"] = cols
    tiles["valid_frac"] = frac
    half = window / 2.0
    x, y = g.pixel_to_metric(tiles["col"] * stride + half, tiles["row"] * stride + half)
    tiles["x_m"], tiles["y_m"] = x, y
    if g.crs is not None:
        import pyproj

        tr = pyproj.Transformer.from_crs(g.crs, "EPSG:4326", always_xy=True)
        tiles["lon_deg"], tiles["lat_deg"] = tr.transform(x, y)
    else:
        tiles["lon_deg"], tiles["lat_deg"] = np.nan, np.nan
    return tiles


def _pack_manifest(
    bm,
    enc,
    out_dir: Path,
    cfg: MapPackConfig,
    grid,
    dim: int,
    n_kept: int,
    build_s: float,
    names: list[str],
    ann: dict[str, Any] | None,
) -> dict[str, Any]:
    """The pack manifest (``pack.json``): encoder, source, grid, tiles, embeddings, index, config, file hashes."""
    g = bm.grid
    window, stride, n_rows, n_cols = grid.tile_px, grid.stride_px, grid.n_rows, grid.n_cols
    src_desc = dict(bm.description)
    if cfg.hash_source and src_desc.get("kind") == "geotiff":
        src_desc["sha256"] = sha256_file(src_desc["path"])
    man_e = enc.manifest
    return make_manifest(
        PACK_KIND,
        parent_sha256=man_e["sha256"],
        pack_schema=PACK_SCHEMA,
        encoder={
            "file": Path(getattr(enc, "path", "")).name,
            "sha256": man_e["sha256"],
            "checkpoint_sha256": man_e.get("checkpoint_sha256"),
            "modality": man_e.get("modality"),
            "precision": man_e.get("precision"),
            "window_px": window,
            "embed_dim": dim,
            "preprocess": man_e["preprocess"],
        },
        source=src_desc,
        grid={
            **g.to_dict(),
            "tile_px": window,
            "stride_px": stride,
            "tile_m": window * g.gsd_m,
            "stride_m": stride * g.gsd_m,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "centre": "tile centre = grid pixel (col * stride_px + tile_px / 2, row * stride_px + tile_px / 2)",
        },
        tiles={
            "count": n_kept,
            "skipped": n_rows * n_cols - n_kept,
            "min_valid_frac": cfg.min_valid_frac,
            "dtype": [list(f) for f in TILE_DTYPE.descr],
        },
        embeddings={"dim": dim, "dtype": "float16", "unit_norm": True},
        ann=ann,
        config=asdict(cfg),
        build={"seconds": round(build_s, 2), "tiles_per_s": round(n_rows * n_cols / max(build_s, 1e-9), 1)},
        files={n: sha256_file(out_dir / n) for n in names},
        sarloc_version=__version__,
    )


def _build(bm, enc, out_dir: Path, cfg: MapPackConfig, window: int, dim: int, prep, progress: bool, source) -> Path:
    from tqdm import tqdm

    from sarloc.core.geo import TileGrid

    g = bm.grid
    stride = _stride_px(g, cfg, window, source)
    grid = TileGrid(g.width_px, g.height_px, window, stride)
    n_rows, n_cols = grid.n_rows, grid.n_cols
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f".{EMBEDDINGS_NAME}.raw.tmp"
    t0 = time.perf_counter()
    bar = tqdm(total=n_rows * n_cols, desc="map pack tiles", unit="tile", disable=not progress)
    try:
        with open(raw, "wb") as fraw:
            rows, cols, frac = _embed_tiles(bm, enc, cfg, grid, prep, dim, fraw, bar)
        n_kept = len(rows)
        if n_kept == 0:
            raise SarlocError(
                f"basemap {source}: every tile has less than {cfg.min_valid_frac:.0%} valid pixels; nothing to pack"
            )
        tiles = _tile_table(g, rows, cols, frac, window, stride)
        with atomic_path(out_dir / EMBEDDINGS_NAME) as tmp:
            _write_npy_from_raw(tmp, raw, np.dtype(np.float16), (n_kept, dim))
    finally:
        bar.close()
        raw.unlink(missing_ok=True)
    save_npy(out_dir / TILES_NAME, tiles)
    _write_basemap_image(bm, out_dir / BASEMAP_NAME)
    build_s = time.perf_counter() - t0
    names = [EMBEDDINGS_NAME, TILES_NAME, BASEMAP_NAME]
    ann_entry = None
    if cfg.ann:
        ann_entry = _build_ann(out_dir, cfg, n_kept)
        names += ann_entry["files"]
    manifest = _pack_manifest(bm, enc, out_dir, cfg, grid, dim, n_kept, build_s, names, ann_entry)
    path = atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    skipped = n_rows * n_cols - n_kept
    logger.info("map pack %s: %d tiles (%d skipped), %d-D, %.1f s", out_dir, n_kept, skipped, dim, build_s)
    return path


def _write_basemap_image(bm, path: Path, strip_rows: int = 1024) -> Path:
    """The basemap's luminance on the pack grid as a float16 ``.npy`` (NaN = no data), written in row strips.

    The runtime's metric refinement registers SAR windows against it (:class:`sarloc.core.registration.LocalRegistrar`);
    it is read through a memory map, so only the crops around candidates are paged in.
    """
    g = bm.grid
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(g.height_px, g.width_px))
        for y0 in range(0, g.height_px, strip_rows):
            h = min(strip_rows, g.height_px - y0)
            lum, valid = bm.read(0, y0, g.width_px, h)
            arr[y0 : y0 + h] = np.where(valid, lum, np.nan).astype(np.float16)
        arr.flush()
        del arr
    return path


def _build_ann(out_dir: Path, cfg: MapPackConfig, n: int) -> dict[str, Any]:
    """Build the IVF index over the written embeddings and record its recall against exact search."""
    from sarloc.mappack.ann import IvfIndex, recall_at_k
    from sarloc.mappack.search import BlockScorer, exact_topk

    emb = np.load(out_dir / EMBEDDINGS_NAME, mmap_mode="r")
    index = IvfIndex.build(emb, nlist=min(cfg.ann_nlist or 0, n) or None)
    entry = index.save(out_dir)
    rng = np.random.default_rng(0)
    q = np.asarray(emb[np.sort(rng.choice(n, min(n, 64), replace=False))], np.float32)
    q = q + rng.normal(0, 0.02, q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scorer = BlockScorer(emb.shape[1])
    _, ex = exact_topk(emb, q, 10, scorer=scorer)
    ap = [index.search(emb, qi, 10, scorer=scorer)[1] for qi in q]
    entry["recall@10_vs_exact"] = recall_at_k(ex, ap, 10)
    entry["recall_queries"] = "64 pack rows + N(0, 0.02) noise, renormalised"
    return entry
