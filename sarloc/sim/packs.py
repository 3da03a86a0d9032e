"""Synthetic map packs for scale tests and benchmarks (no encoder, no basemap).

Real dense galleries are spatially smooth: neighbouring tiles overlap and embed alike. ``synthetic_pack`` mimics
that: each tile's embedding is a bilinear interpolation of a coarse random field (one node every ``corr_tiles``
tiles) plus independent noise, normalised to unit length, stored as float16 like a real pack. Queries are noisy
copies of random tiles (a SAR window embeds near its optical tile, not onto it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sarloc.core.artifacts import atomic_path, atomic_write_json, make_manifest, sha256_file
from sarloc.mappack.pack import EMBEDDINGS_NAME, MANIFEST_NAME, PACK_KIND, PACK_SCHEMA, TILE_DTYPE, TILES_NAME, save_npy


def _write_embeddings(
    path: Path,
    field: np.ndarray,
    rng: np.random.Generator,
    n_tiles: int,
    side: int,
    corr_tiles: int,
    noise: float,
    block_rows: int,
) -> None:
    """Stream ``n_tiles`` float16 embeddings to a ``.npy``: the coarse ``field`` interpolated bilinearly at each
    tile of a ``side``-wide grid, plus noise, normalised (one grid row at a time)."""
    n, dim = n_tiles, field.shape[2]
    nrows = math.ceil(n / side)
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)})
        cols = np.arange(side) / corr_tiles
        c0 = np.floor(cols).astype(int)
        fc = (cols - c0).astype(np.float32)[:, None]
        for r0 in range(0, nrows, block_rows):
            for r in range(r0, min(nrows, r0 + block_rows)):
                if written >= n:
                    break
                rr = r / corr_tiles
                i0 = int(rr)
                fr = np.float32(rr - i0)
                top = field[i0, c0] * (1 - fc) + field[i0, c0 + 1] * fc
                bot = field[i0 + 1, c0] * (1 - fc) + field[i0 + 1, c0 + 1] * fc
                e = top * (1 - fr) + bot * fr
                e += noise * rng.standard_normal(e.shape, dtype=np.float32)
                e /= np.linalg.norm(e, axis=1, keepdims=True)
                take = min(side, n - written)
                f.write(e[:take].astype(np.float16).tobytes())
                written += take


def synthetic_pack(
    out_dir: str | Path,
    n_tiles: int,
    dim: int = 704,
    seed: int = 0,
    stride_m: float = 80.0,
    tile_m: float = 640.0,
    corr_tiles: int = 4,
    noise: float = 0.25,
    block_rows: int = 64,
) -> Path:
    """Write a pack of about ``n_tiles`` synthetic tiles on a square grid (streamed: memory is one block).

    Args:
        out_dir: pack folder.
        n_tiles: tiles wanted (the grid is ceil(sqrt(n)) wide; the last row is cut to give exactly n).
        dim: embedding size.
        seed: random seed.
        stride_m, tile_m: geometry recorded in the table and manifest.
        corr_tiles: tiles between coarse-field nodes (spatial correlation length).
        noise: std of the per-tile noise relative to the field.
        block_rows: grid rows generated at a time.

    Returns:
        The manifest path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(n_tiles))
    nrows = math.ceil(n_tiles / side)
    nodes = side // corr_tiles + 2
    field = rng.standard_normal((nodes, nodes, dim), dtype=np.float32)
    _write_embeddings(out_dir / EMBEDDINGS_NAME, field, rng, n_tiles, side, corr_tiles, noise, block_rows)
    tiles = np.zeros(n_tiles, TILE_DTYPE)
    idx = np.arange(n_tiles)
    tiles["row"], tiles["col"] = idx // side, idx % side
    tiles["x_m"] = 500000.0 + tiles["col"] * stride_m
    tiles["y_m"] = 5000000.0 - tiles["row"] * stride_m
    tiles["lat_deg"], tiles["lon_deg"] = np.nan, np.nan
    tiles["valid_frac"] = 1.0
    save_npy(out_dir / TILES_NAME, tiles)
    tile_px = 64
    man = make_manifest(
        PACK_KIND,
        parent_sha256="synthetic",
        pack_schema=PACK_SCHEMA,
        encoder={"file": None, "sha256": "synthetic", "checkpoint_sha256": "synthetic", "embed_dim": dim},
        source={"kind": "synthetic", "seed": seed, "corr_tiles": corr_tiles, "noise": noise},
        grid={
            "metric_crs": None,
            "gsd_m": tile_m / tile_px,
            "tile_px": tile_px,
            "stride_px": max(1, round(stride_m / (tile_m / tile_px))),
            "tile_m": tile_m,
            "stride_m": stride_m,
            "n_rows": nrows,
            "n_cols": side,
        },
        tiles={"count": n_tiles, "skipped": 0},
        embeddings={"dim": dim, "dtype": "float16", "unit_norm": True},
        ann=None,
        files={n: sha256_file(out_dir / n) for n in (EMBEDDINGS_NAME, TILES_NAME)},
    )
    return atomic_write_json(out_dir / MANIFEST_NAME, man)


def synthetic_queries(
    embeddings: np.ndarray, n: int, noise: float = 0.05, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float32 unit-norm queries near random rows, and those rows.

    The perturbation has norm about ``noise`` (cosine to the source row about 1 / sqrt(1 + noise^2)).
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(embeddings.shape[0], n, replace=False))
    q = np.asarray(embeddings[rows], np.float32)
    q = q + (noise / math.sqrt(q.shape[1])) * rng.standard_normal(q.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, rows
