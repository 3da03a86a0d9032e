"""Search over a map pack (torch-free): exact top-K in blocks, geo prior, NMS in metres.

* :func:`exact_topk` scans an (N, D) matrix (float16 memmap) in row blocks: each block is multiplied with the
  queries (:class:`BlockScorer`: a fused float16 kernel) and a running top-K is kept. Memory is one block, never
  the matrix.
* :class:`GridIndex` is a uniform grid over tile centres: the tiles within R metres of a prior position are found
  by visiting the cells that overlap the disc.
* :func:`nms_metres` keeps the best candidates whose centres are more than a radius apart (Chebyshev, like
  ``sarloc.core.peaks``, in metres): on a dense gallery, neighbouring tiles score alike and would fill
  the top-K with one place.
* :class:`PackSearcher` combines them for a :class:`~sarloc.mappack.pack.MapPack`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from sarloc.core.errors import SarlocError

DEFAULT_BLOCK_ROWS = 32768


@functools.cache
def _native_scan():
    """The compiled scan kernel (``sarloc._scan``), or None when the package was installed without a C compiler."""
    try:
        from sarloc import _scan
    except ImportError:
        return None
    return _scan


class BlockScorer:
    """Inner products of a block of stored embeddings with the queries: ``(B, D) x (Q, D) -> (Q, B)`` float32.

    The pack stores float16. numpy converts float16 to float32 element by element (about 1.8 ns per value here),
    which makes a numpy scan ten times slower than FAISS on float32. Three kernels, fastest first:

    * ``native``: ``sarloc._scan``, a small C extension built at install time, converts and multiplies in registers
      (AVX-512F, or AVX2 + F16C + FMA, chosen at run time; a portable C loop on other CPUs). It reads each stored
      byte once, half the bytes FAISS reads, and is bound by memory bandwidth. It releases the GIL, so
      ``threads`` > 1 splits a block over threads. Its one-pass heap top-K also replaces numpy's argpartition.
    * ``ort``: ONNX Runtime (``sarloc[cpu]``) runs a two-node graph (Cast float16 -> float32, Gemm) on cache-sized
      sub-blocks; about 2.5x slower than ``native``.
    * ``numpy``: the plain path.

    All give the same results to float32 rounding.

    Args:
        dim: embedding size D.
        backend: "auto" (native, else ONNX Runtime, else numpy), "native", "ort" or "numpy".
        sub_rows: rows per ONNX Runtime call (a few thousand keeps the float32 copy in cache).
        threads: threads of the native kernel or ONNX Runtime intra-op threads (0: ONNX Runtime's default, 1 for
            native).
    """

    thread_min_rows = 4096  # smaller blocks are scanned on the calling thread

    def __init__(self, dim: int, backend: str = "auto", sub_rows: int = 2048, threads: int = 1) -> None:
        if backend not in ("auto", "native", "ort", "numpy"):
            raise SarlocError(f"scorer backend must be auto, native, ort or numpy, got {backend!r}")
        self.dim = int(dim)
        self.sub_rows = int(sub_rows)
        self.threads = max(1, int(threads))
        self._sess = None
        self._native = None
        if backend in ("auto", "native"):
            self._native = _native_scan()
            if self._native is None and backend == "native":
                raise SarlocError(
                    "the native scorer was not built (no C compiler when sarloc was installed): "
                    "reinstall with gcc or clang present, or use --scorer ort"
                )
        if self._native is None and backend in ("auto", "ort"):
            try:
                self._sess = self._session(self.dim, threads)
            except ImportError:
                if backend == "ort":
                    raise SarlocError("the ort scorer needs onnxruntime and onnx: pip install 'sarloc[cpu]'") from None
        self.backend = "native" if self._native is not None else "ort" if self._sess is not None else "numpy"

    @property
    def kernel(self) -> str:
        """What does the work: ``native:avx512f``, ``native:avx2+f16c+fma``, ``native:generic``, ``ort``, ``numpy``."""
        return f"native:{self._native.kernel()}" if self._native is not None else self.backend

    @staticmethod
    def _session(dim: int, threads: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        nodes = [
            helper.make_node("Cast", ["E"], ["E32"], to=TensorProto.FLOAT),
            helper.make_node("Gemm", ["Q", "E32"], ["S"], transB=1),
        ]
        graph = helper.make_graph(
            nodes,
            "sarloc_pack_scan",
            [
                helper.make_tensor_value_info("E", TensorProto.FLOAT16, ["rows", dim]),
                helper.make_tensor_value_info("Q", TensorProto.FLOAT, ["queries", dim]),
            ],
            [helper.make_tensor_value_info("S", TensorProto.FLOAT, ["queries", "rows"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def _native_dot(self, blk: np.ndarray, q: np.ndarray) -> np.ndarray:
        native = self._native
        assert native is not None
        n, d = blk.shape
        nq = len(q)
        if self.threads == 1 or n < self.thread_min_rows:
            out = np.empty((nq, n), np.float32)
            native.dot_f16(blk, q, out, n, d, nq)
            return out
        from concurrent.futures import ThreadPoolExecutor

        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sarloc-scan")
        spans = list(itertools.pairwise(np.linspace(0, n, self.threads + 1).astype(int)))
        parts = [np.empty((nq, b - a), np.float32) for a, b in spans]
        futs = [
            self._pool.submit(native.dot_f16, blk[a:b], q, o, b - a, d, nq)
            for (a, b), o in zip(spans, parts, strict=True)
        ]
        for f in futs:
            f.result()
        return np.concatenate(parts, axis=1)

    def __call__(self, blk: np.ndarray, q: np.ndarray) -> np.ndarray:
        """(B, D) block (any float dtype), (Q, D) float32 queries -> (Q, B) float32 similarities."""
        if blk.dtype != np.float16 or (self._sess is None and self._native is None):
            return q @ np.asarray(blk, dtype=np.float32).T
        q = np.ascontiguousarray(q, dtype=np.float32)
        blk = np.ascontiguousarray(np.asarray(blk))  # a plain view of a memmap block: no copy
        if q.ndim != 2 or blk.ndim != 2 or q.shape[1] != blk.shape[1]:
            raise SarlocError(f"scorer: block {blk.shape} and queries {q.shape} do not match")
        if self._native is not None:
            return self._native_dot(blk, q)
        sess = self._sess
        assert sess is not None
        out = np.empty((len(q), len(blk)), np.float32)
        for s0 in range(0, len(blk), self.sub_rows):
            sub = blk[s0 : s0 + self.sub_rows]
            out[:, s0 : s0 + len(sub)] = sess.run(None, {"E": sub, "Q": q})[0]
        return out


def _as_queries(q: np.ndarray, dim: int) -> np.ndarray:
    a = np.asarray(q, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != dim:
        raise SarlocError(f"queries must be (Q, {dim}) embeddings, got shape {np.shape(q)}")
    return np.ascontiguousarray(a)


def _merge_topk(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge running (Q, k) top-K with a new (Q, m) candidate set: best first, ties by lower row (deterministic)."""
    cs = np.concatenate([best_s, s], axis=1)
    ci = np.concatenate([best_i, i], axis=1)
    order = np.lexsort((ci, -cs), axis=1)[:, :k]
    return np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)


def _sort_topk(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((i, -s), axis=1) if s.size else np.zeros(s.shape, np.int64)
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def exact_topk(
    emb: np.ndarray,
    queries: np.ndarray,
    k: int,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    rows: np.ndarray | None = None,
    scorer: BlockScorer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-K over ``emb`` (or its subset ``rows``), scanning blocks of rows.

    Args:
        emb: (N, D) embeddings, any float dtype (a float16 memmap is read block by block).
        queries: (Q, D) or (D,) query embeddings.
        k: results per query (fewer when fewer rows).
        block_rows: rows converted to float32 at a time (memory: block_rows x D x 4 bytes).
        rows: optional (M,) int row subset (sorted ascending reads the memmap sequentially).
        scorer: the block kernel (default: numpy; pass a :class:`BlockScorer` to reuse ONNX Runtime).

    Returns:
        (Q, k) float32 scores, best first (ties: lower row first), and (Q, k) int64 row indices into ``emb``.
    """
    q = _as_queries(queries, emb.shape[1])
    n = emb.shape[0] if rows is None else len(rows)
    k = int(min(k, n))
    if block_rows < 1:
        raise SarlocError(f"block_rows must be positive, got {block_rows}")
    best_s = np.empty((len(q), 0), np.float32)
    best_i = np.empty((len(q), 0), np.int64)
    if k <= 0:
        return best_s, best_i
    native = _native_scan()
    if native is not None and _fused_ok(emb, q, rows, scorer):
        # one query over the whole float16 matrix: dot products and heap in one C pass (the FAISS design)
        s = np.empty(k, np.float32)
        i = np.empty(k, np.int64)
        m = native.search_f16(emb, q[0], emb.shape[0], emb.shape[1], k, s, i)
        return s[None, :m], i[None, :m]
    if native is not None:
        return _exact_topk_heap(native, emb, q, k, n, block_rows, rows, scorer)
    for s0 in range(0, n, block_rows):
        s1 = min(n, s0 + block_rows)
        if rows is None:
            blk = emb[s0:s1]
            idx = np.arange(s0, s1, dtype=np.int64)
        else:
            idx = np.asarray(rows[s0:s1], dtype=np.int64)
            blk = emb[idx]
        sims = scorer(blk, q) if scorer is not None else q @ np.asarray(blk, dtype=np.float32).T  # (Q, B)
        if best_s.shape[1] == k:
            # only columns that beat some query's current k-th score can enter its top-K (cheap compare first)
            cols = np.flatnonzero((sims > best_s.min(axis=1, keepdims=True)).any(axis=0))
            sims, idx = sims[:, cols], idx[cols]
        if sims.shape[1] > k:
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            best_s, best_i = _merge_topk(best_s, best_i, np.take_along_axis(sims, part, 1), idx[part], k)
        else:
            best_s, best_i = _merge_topk(best_s, best_i, sims, np.broadcast_to(idx, sims.shape), k)
    return _sort_topk(best_s, best_i)


def _fused_ok(emb: np.ndarray, q: np.ndarray, rows, scorer) -> bool:
    """The single-call C search applies: one query, every row, a C-contiguous float16 matrix (a memmap is one),
    and a native scorer on one thread (or none given)."""
    return (
        len(q) == 1
        and rows is None
        and emb.dtype == np.float16
        and emb.flags["C_CONTIGUOUS"]
        and (scorer is None or (scorer.backend == "native" and scorer.threads == 1))
    )


def _exact_topk_heap(native, emb, q, k, n, block_rows, rows, scorer) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_topk` with the compiled one-pass heap selection, per query on 1-D arrays (small maps are
    dominated by per-call overhead: no argpartition, no take_along_axis)."""
    best_s: list[np.ndarray] = [np.empty(0, np.float32)] * len(q)
    best_i: list[np.ndarray] = [np.empty(0, np.int64)] * len(q)
    for s0 in range(0, n, block_rows):
        s1 = min(n, s0 + block_rows)
        if rows is None:
            blk, idx = emb[s0:s1], None
        else:
            idx = np.asarray(rows[s0:s1], dtype=np.int64)
            blk = emb[idx]
        sims = scorer(blk, q) if scorer is not None else q @ np.asarray(blk, dtype=np.float32).T
        sims = np.ascontiguousarray(sims, dtype=np.float32)
        kk = min(k, s1 - s0)
        for j in range(len(q)):
            part = np.empty(kk, np.int64)
            native.topk(sims[j], s1 - s0, kk, part)  # best first, ties by lower position
            sj, ij = sims[j][part], (part + s0 if idx is None else idx[part])
            if best_s[j].size:
                cs, ci = np.concatenate([best_s[j], sj]), np.concatenate([best_i[j], ij])
                o = np.lexsort((ci, -cs))[:k]
                sj, ij = cs[o], ci[o]
            best_s[j], best_i[j] = sj, ij
    if rows is not None:  # a row subset may be unsorted: ties by lower row
        for j in range(len(q)):
            o = np.lexsort((best_i[j], -best_s[j]))
            best_s[j], best_i[j] = best_s[j][o], best_i[j][o]
    if len(q) == 1:
        return best_s[0][None], best_i[0][None]
    return np.stack(best_s), np.stack(best_i)


class GridIndex:
    """A uniform grid over 2-D points (tile centres, metres) for radius queries.

    Args:
        xy_m: (N, 2) easting, northing.
        cell_m: cell side (a radius of a few cells is cheap; default: about sqrt(area / N) x 8).
    """

    def __init__(self, xy_m: np.ndarray, cell_m: float | None = None) -> None:
        xy = np.asarray(xy_m, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise SarlocError(f"GridIndex needs (N, 2) points, got {xy.shape}")
        self.xy = xy
        n = max(1, len(xy))
        lo = xy.min(axis=0) if len(xy) else np.zeros(2)
        hi = xy.max(axis=0) if len(xy) else np.ones(2)
        if cell_m is None:
            area = max(float(np.prod(np.maximum(hi - lo, 1.0))), 1.0)
            cell_m = 8.0 * math.sqrt(area / n)
        self.cell_m = float(cell_m)
        self.origin = lo
        cij = np.floor((xy - lo) / self.cell_m).astype(np.int64)
        self.shape = (int(cij[:, 0].max()) + 1, int(cij[:, 1].max()) + 1) if len(xy) else (1, 1)
        key = cij[:, 0] * self.shape[1] + cij[:, 1]
        self.order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=self.shape[0] * self.shape[1])
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def within(self, x_m: float, y_m: float, radius_m: float) -> np.ndarray:
        """Sorted indices of the points within ``radius_m`` (Euclidean) of (x_m, y_m)."""
        if radius_m < 0:
            raise SarlocError(f"prior radius must be >= 0 m, got {radius_m}")
        i0, j0 = np.floor((np.array([x_m, y_m]) - radius_m - self.origin) / self.cell_m).astype(np.int64)
        i1, j1 = np.floor((np.array([x_m, y_m]) + radius_m - self.origin) / self.cell_m).astype(np.int64)
        i0, j0 = max(i0, 0), max(j0, 0)
        i1, j1 = min(i1, self.shape[0] - 1), min(j1, self.shape[1] - 1)
        if i0 > i1 or j0 > j1:
            return np.zeros(0, np.int64)
        parts = []
        for i in range(i0, i1 + 1):
            a, b = self.offsets[i * self.shape[1] + j0], self.offsets[i * self.shape[1] + j1 + 1]
            parts.append(self.order[a:b])
        cand = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        d2 = np.sum((self.xy[cand] - (x_m, y_m)) ** 2, axis=1)
        return np.sort(cand[d2 <= radius_m * radius_m])


def nms_metres(scores: np.ndarray, idx: np.ndarray, xy_m: np.ndarray, k: int, radius_m: float) -> np.ndarray:
    """Greedy non-maximum suppression in metres: the best-first candidates kept when more than ``radius_m``
    (Chebyshev) from every one kept before.

    Args:
        scores: (M,) candidate scores.
        idx: (M,) candidate rows.
        xy_m: (N, 2) centres of all rows (indexed by ``idx``).
        k: peaks wanted.
        radius_m: suppression radius (0: no suppression).

    Returns:
        Positions (into the candidate arrays) of up to ``k`` peaks, best first.
    """
    order = np.argsort(-scores, kind="stable")
    if radius_m <= 0:
        return order[:k]
    c = xy_m[idx[order]]
    picked: list[int] = []
    kept = np.empty((0, 2))
    for p in range(len(order)):
        if len(kept) and np.min(np.max(np.abs(kept - c[p]), axis=1)) <= radius_m:
            continue
        picked.append(int(order[p]))
        kept = np.vstack([kept, c[p]])
        if len(picked) == k:
            break
    return np.asarray(picked, dtype=np.int64)


@dataclass
class SearchResult:
    """Top-K of one query, best first.

    Attributes:
        rows: (K,) tile rows in the pack.
        scores: (K,) cosine similarities.
        xy_m: (K, 2) tile centres (easting, northing), metres.
        candidates: tiles scored (N for exact search, the disc for a prior, the probed lists for ANN).
    """

    rows: np.ndarray
    scores: np.ndarray
    xy_m: np.ndarray
    candidates: int


class PackSearcher:
    """Top-K tiles of a map pack for query embeddings, with NMS in metres and an optional geo prior or ANN.

    Args:
        pack: an opened :class:`~sarloc.mappack.pack.MapPack`.
        block_rows: rows per block of the exact scan.
        nms_radius_m: suppression radius (default: half a tile; 0 disables NMS).
        pool: candidates kept before NMS (default: max(50 k, 1000); dense galleries need many).
        cell_m: cell of the prior's grid index (default: automatic).
        scorer: "auto" (the native kernel, else ONNX Runtime, else numpy), "native", "ort" or "numpy"; see
            :class:`BlockScorer`.
        threads: threads of the scorer.
    """

    def __init__(
        self,
        pack,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        nms_radius_m: float | None = None,
        pool: int | None = None,
        cell_m: float | None = None,
        scorer: str = "auto",
        threads: int = 1,
    ) -> None:
        self.pack = pack
        self.scorer = BlockScorer(pack.dim, scorer, threads=threads)
        self.block_rows = int(block_rows)
        self.nms_radius_m = pack.tile_m / 2.0 if nms_radius_m is None else float(nms_radius_m)
        self.pool = pool
        self.xy = pack.centres_m()
        self._cell_m = cell_m
        self._grid: GridIndex | None = None
        self._ann = None

    @property
    def grid_index(self) -> GridIndex:
        """The spatial index over tile centres (built on first use)."""
        if self._grid is None:
            self._grid = GridIndex(self.xy, self._cell_m)
        return self._grid

    def _pool(self, k: int) -> int:
        if self.nms_radius_m <= 0:
            return k
        return int(self.pool or max(50 * k, 1000))

    def _finish(self, s: np.ndarray, i: np.ndarray, k: int, candidates: int) -> SearchResult:
        keep = nms_metres(s, i, self.xy, k, self.nms_radius_m)
        rows = i[keep]
        return SearchResult(rows, s[keep].astype(np.float32), self.xy[rows], candidates)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        prior_xy_m: tuple[float, float] | None = None,
        prior_radius_m: float | None = None,
        ann: bool = False,
        nprobe: int | None = None,
    ) -> list[SearchResult]:
        """Top-K tiles per query.

        Args:
            queries: (Q, D) or (D,) unit-norm query embeddings (float32).
            k: peaks per query after NMS.
            prior_xy_m, prior_radius_m: search only tiles within the radius of this metric position (use
                ``pack.to_metric(lon, lat)`` for a lat/lon prior).
            ann: use the pack's approximate index (built with ``sarloc map build --ann``) instead of a full scan.
            nprobe: lists probed by the ANN index (default: the index's).

        Returns:
            One :class:`SearchResult` per query.
        """
        q = _as_queries(queries, self.pack.dim)
        pool = self._pool(k)
        if prior_xy_m is not None:
            if prior_radius_m is None:
                raise SarlocError("a prior position needs a prior radius in metres")
            rows = self.grid_index.within(float(prior_xy_m[0]), float(prior_xy_m[1]), float(prior_radius_m))
            s, i = exact_topk(self.pack.embeddings, q, pool, self.block_rows, rows=rows, scorer=self.scorer)
            return [self._finish(s[j], i[j], k, len(rows)) for j in range(len(q))]
        if ann:
            index = self.ann_index()
            out = []
            for j in range(len(q)):
                s, i, n = index.search(self.pack.embeddings, q[j], pool, nprobe=nprobe, scorer=self.scorer)
                out.append(self._finish(s, i, k, n))
            return out
        s, i = exact_topk(self.pack.embeddings, q, pool, self.block_rows, scorer=self.scorer)
        return [self._finish(s[j], i[j], k, len(self.pack)) for j in range(len(q))]

    def _grid_inverse(self) -> np.ndarray:
        if getattr(self, "_inv", None) is None:
            g = self.pack.manifest["grid"]
            inv = np.full(int(g["n_rows"]) * int(g["n_cols"]), -1, np.int64)
            t = self.pack.tiles
            inv[t["row"].astype(np.int64) * int(g["n_cols"]) + t["col"]] = np.arange(len(t))
            self._inv = inv
        return self._inv

    def peaks(
        self,
        query: np.ndarray,
        k: int,
        prior_xy_m: tuple[float, float] | None = None,
        prior_radius_m: float | None = None,
    ) -> SearchResult:
        """Top-``k`` peaks of one query over the pack's tile grid (whole map or a prior disc), with NMS.

        Every tile in scope is scored (blocks of the memmap), the scores are laid on the tile grid and the peaks
        taken with :func:`sarloc.core.peaks.grid_peaks` (local maxima within the NMS radius, greedy): unlike
        :meth:`search`, any number of well-separated peaks can be asked for (a pool of 200 for the shortlist).
        """
        from sarloc.core.peaks import grid_peaks

        q = _as_queries(query, self.pack.dim)
        g = self.pack.manifest["grid"]
        n_rows, n_cols = int(g["n_rows"]), int(g["n_cols"])
        rows = None
        if prior_xy_m is not None:
            if prior_radius_m is None:
                raise SarlocError("a prior position needs a prior radius in metres")
            rows = self.grid_index.within(float(prior_xy_m[0]), float(prior_xy_m[1]), float(prior_radius_m))
            if len(rows) == 0:
                return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 2)), 0)
        n = len(self.pack) if rows is None else len(rows)
        scores = np.empty(n, np.float32)
        for s0 in range(0, n, self.block_rows):
            s1 = min(n, s0 + self.block_rows)
            blk = self.pack.embeddings[s0:s1] if rows is None else self.pack.embeddings[rows[s0:s1]]
            scores[s0:s1] = self.scorer(blk, q)[0]
        t = self.pack.tiles if rows is None else self.pack.tiles[rows]
        r, c = t["row"].astype(np.int64), t["col"].astype(np.int64)
        r0, c0 = (int(r.min()), int(c.min())) if rows is not None else (0, 0)
        h, w = (int(r.max()) - r0 + 1, int(c.max()) - c0 + 1) if rows is not None else (n_rows, n_cols)
        grid = np.full((h, w), -np.inf, np.float32)
        grid[r - r0, c - c0] = scores
        stride_m = float(g["stride_m"])
        cells = int(self.nms_radius_m // stride_m) if self.nms_radius_m > 0 else 0
        flat = grid_peaks(grid, k, cells)
        pr, pc = np.divmod(flat, w)
        tile_rows = self._grid_inverse()[(pr + r0) * n_cols + (pc + c0)]
        return SearchResult(tile_rows, grid.ravel()[flat], self.xy[tile_rows], n)

    def ann_index(self):
        """The pack's approximate index (:class:`~sarloc.mappack.ann.IvfIndex`), loaded on first use."""
        if self._ann is None:
            from sarloc.mappack.ann import IvfIndex

            self._ann = IvfIndex.load(self.pack.path, self.pack.manifest)
        return self._ann
