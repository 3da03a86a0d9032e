"""Approximate search for large map packs (torch-free, numpy only): an inverted-file (IVF) index over the memmap.

Spherical k-means on a sample of the embeddings gives ``nlist`` centroids; every row is assigned to its nearest
centroid, and the rows are listed by centroid (``ivf_order.npy``, ``ivf_offsets.npy``). A query scores the
centroids, takes the ``nprobe`` best lists and scores only their rows exactly, reading them from the same
float16 memmap as exact search: the index adds 8 bytes per tile and nlist x D float32, never a second copy of
the embeddings. Recall against exact search is measured by :func:`recall_at_k` (and recorded in the manifest
at build time); raise ``nprobe`` for more recall at more cost.

FAISS (``pip install 'sarloc[ann]'``) is only the benchmark's peer (``benchmarks/bench_search.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import ArtifactError, SarlocError

logger = logging.getLogger(__name__)

IVF_FILES = ("ivf_centroids.npy", "ivf_order.npy", "ivf_offsets.npy")


def default_nlist(n: int) -> int:
    """About sqrt(N) lists, between 1 and 4096."""
    return int(min(4096, max(1, round(math.sqrt(max(n, 1))))))


def _normalise(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(
    emb: np.ndarray, nlist: int, iters: int = 10, sample: int = 65536, seed: int = 0, block_rows: int = 32768
) -> np.ndarray:
    """(nlist, D) float32 unit-norm centroids of a sample of the rows of ``emb`` (cosine k-means)."""
    n = emb.shape[0]
    if nlist < 1 or nlist > n:
        raise SarlocError(f"nlist must be in [1, {n}] for {n} embeddings, got {nlist}")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(n, min(n, max(sample, nlist)), replace=False))
    x = np.asarray(emb[take], dtype=np.float32)
    c = x[rng.choice(len(x), nlist, replace=False)].copy()
    for _ in range(iters):
        a = assign(x, c, block_rows)
        o = np.argsort(a, kind="stable")
        counts = np.bincount(a, minlength=nlist)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.zeros_like(c)
        full = counts > 0
        sums[full] = np.add.reduceat(x[o], starts[full], axis=0)
        if (~full).any():  # re-seed empty lists with random rows
            sums[~full] = x[rng.choice(len(x), int((~full).sum()), replace=False)]
        c = _normalise(sums)
    return c.astype(np.float32)


def assign(emb: np.ndarray, centroids: np.ndarray, block_rows: int = 32768) -> np.ndarray:
    """(N,) int32 nearest centroid (max inner product) of every row, in blocks."""
    out = np.empty(emb.shape[0], np.int32)
    for s0 in range(0, emb.shape[0], block_rows):
        blk = np.asarray(emb[s0 : s0 + block_rows], dtype=np.float32)
        out[s0 : s0 + len(blk)] = np.argmax(blk @ centroids.T, axis=1)
    return out


@dataclass
class IvfIndex:
    """Inverted lists over the rows of an embedding matrix.

    Attributes:
        centroids: (nlist, D) float32.
        order: (N,) int64 rows grouped by list, ascending within a list.
        offsets: (nlist + 1,) int64: list l is ``order[offsets[l]:offsets[l+1]]``.
        nprobe: default lists probed per query.
    """

    centroids: np.ndarray
    order: np.ndarray
    offsets: np.ndarray
    nprobe: int = 8

    @classmethod
    def build(
        cls,
        emb: np.ndarray,
        nlist: int | None = None,
        nprobe: int | None = None,
        iters: int = 10,
        sample: int = 65536,
        seed: int = 0,
    ) -> IvfIndex:
        """Train centroids on a sample and assign every row (the matrix is read in blocks)."""
        nlist = nlist or default_nlist(emb.shape[0])
        c = spherical_kmeans(emb, nlist, iters=iters, sample=sample, seed=seed)
        a = assign(emb, c)
        order = np.argsort(a, kind="stable").astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=nlist))]).astype(np.int64)
        return cls(c, order, offsets, min(nlist, nprobe or max(8, nlist // 8)))

    @property
    def nlist(self) -> int:
        """Number of lists."""
        return len(self.centroids)

    def probe_rows(self, q: np.ndarray, nprobe: int | None = None) -> np.ndarray:
        """Sorted rows of the ``nprobe`` lists nearest to the (D,) query."""
        p = int(min(self.nlist, nprobe or self.nprobe))
        cs = self.centroids @ q
        lists = np.argpartition(-cs, p - 1)[:p] if p < self.nlist else np.arange(self.nlist)
        rows = np.concatenate([self.order[self.offsets[li] : self.offsets[li + 1]] for li in lists])
        return np.sort(rows)

    def search(
        self, emb: np.ndarray, q: np.ndarray, k: int, nprobe: int | None = None, scorer=None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Approximate top-``k`` of one (D,) query: (scores, rows) best first, and the number of rows scored.

        ``scorer`` is an optional :class:`sarloc.mappack.search.BlockScorer` for the probed rows.
        """
        q = np.asarray(q, np.float32).reshape(-1)
        rows = self.probe_rows(q, nprobe)
        if len(rows) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), 0
        blk = emb[rows]
        sims = scorer(blk, q[None])[0] if scorer is not None else np.asarray(blk, dtype=np.float32) @ q
        kk = min(k, len(rows))
        part = np.argpartition(-sims, kk - 1)[:kk]
        o = part[np.argsort(-sims[part], kind="stable")]
        return sims[o], rows[o], len(rows)

    def save(self, pack_dir: Path) -> dict[str, Any]:
        """Write the three .npy files atomically; returns the manifest entry (without hashes)."""
        from sarloc.mappack.pack import save_npy

        for name, arr in zip(IVF_FILES, (self.centroids, self.order, self.offsets), strict=True):
            save_npy(Path(pack_dir) / name, arr)
        return {"kind": "ivf", "nlist": self.nlist, "nprobe": self.nprobe, "files": list(IVF_FILES)}

    @classmethod
    def load(cls, pack_dir: Path, manifest: dict[str, Any]) -> IvfIndex:
        """Load the index named in a pack manifest (memory-mapped)."""
        ann = manifest.get("ann")
        if not ann or ann.get("kind") != "ivf":
            raise ArtifactError(
                f"map pack {pack_dir} has no approximate index; rebuild it with `sarloc map build ... --ann`"
            )
        from sarloc.mappack.pack import _load_npy

        c, o, f = (_load_npy(Path(pack_dir) / n, "ANN index") for n in IVF_FILES)
        n = int(manifest["tiles"]["count"])
        if o.shape != (n,) or f.shape != (len(c) + 1,) or int(f[-1]) != n:
            raise ArtifactError(f"map pack {pack_dir}: the ANN index does not match the {n} tiles; rebuild the pack")
        return cls(np.asarray(c), o, np.asarray(f), int(ann.get("nprobe", 8)))


def recall_at_k(
    exact_rows: np.ndarray | Sequence[np.ndarray], approx_rows: np.ndarray | Sequence[np.ndarray], k: int
) -> float:
    """Mean fraction of the exact top-``k`` rows found in the approximate top-``k`` (per query rows; a sequence of
    row arrays may be ragged, e.g. an index that found fewer than ``k`` rows for some queries)."""
    hits = [
        len(set(e[:k].tolist()) & set(a[:k].tolist())) / max(1, min(k, len(e)))
        for e, a in zip(exact_rows, approx_rows, strict=True)
    ]
    return float(np.mean(hits)) if hits else float("nan")
