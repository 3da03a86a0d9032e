"""Map pack search at scale: latency p50/p99 and resident memory for 10k / 100k / 1M tiles.

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py --out runs/bench_search

For each embedding size (``--dims``, default 704 and 128) and map size (``--sizes``), a synthetic pack
(``sarloc.sim.packs``: spatially correlated unit-norm float16 embeddings, 80 m stride, 640 m tiles) is
written to ``--workdir`` and searched with one query at a time (noisy copies of random tiles):

* ``exact``: full scan of the float16 memmap in blocks, raw top-10 (the recall reference);
* ``exact+nms``: the same with NMS at half a tile (what the runtime uses);
* ``prior``: only tiles within ``--prior-radius-m`` of a prior position (true tile + 40% of the radius);
* ``ivf``: the pack's IVF index at the smallest probe count reaching ``--target-recall`` of exact top-10;
* ``faiss-flat``: ``faiss.IndexFlatIP`` over a float32 copy of the same embeddings, same queries (the peer).

Resident memory is read from /proc/self/status: ``RssAnon`` (private copies) and ``RssFile`` (memmap pages in
the page cache). Prints a markdown table and writes ``results.json`` (hardware, versions, config).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> dict[str, float]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return out


def _lat(fn, n: int) -> tuple[dict[str, float], list]:
    """Call ``fn(j)`` for j in range(n), one at a time, after one warm-up call; latency stats and results."""
    fn(0)
    ts, res = [], []
    for j in range(n):
        t0 = time.perf_counter()
        res.append(fn(j))
        ts.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(ts)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }, res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _stats(a_ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(a_ms, 50)), "p99_ms": float(np.percentile(a_ms, 99)),
            "mean_ms": float(a_ms.mean())}  # fmt: skip


class _Rows:
    """The result rows of one pack: ``base`` (pack, queries, scorer) plus each method's numbers."""

    def __init__(self, base: dict) -> None:
        self.base = base
        self.rows: list[dict] = []

    def add(self, method, lat, recall, cand, extra=None) -> None:
        """One method's row; resident memory is read now."""
        self.rows.append(
            {**self.base, "method": method, **lat, "recall@10": recall, "candidates": cand, **_rss_mb(),
             **(extra or {})}
        )  # fmt: skip


def _open_pack(pack_dir: Path, n: int, dim: int):
    """The synthetic pack of ``n`` tiles of ``dim`` (written unless one of that size is there) and the seconds
    its generation took."""
    from sarloc.mappack import MapPack
    from sarloc.sim.packs import synthetic_pack

    man = pack_dir / "pack.json"
    fresh = True
    if man.is_file():
        m = json.loads(man.read_text())
        fresh = not (m["tiles"]["count"] == n and m["embeddings"]["dim"] == dim)
    t0 = time.perf_counter()
    if fresh:
        synthetic_pack(pack_dir, n, dim=dim, seed=0)
    gen_s = time.perf_counter() - t0
    return MapPack(pack_dir), gen_s


def _bench_exact(out: _Rows, raw, q: np.ndarray, nq: int, n: int, rss0: dict) -> list:
    """``exact`` alone (no FAISS); returns the exact top-10 rows of each query."""
    lat, ex = _lat(lambda j: raw.search(q[j], 10)[0], nq)
    out.add("exact", lat, 1.0, n, {"rss_anon_before_mb": rss0.get("RssAnon")})
    return [r.rows for r in ex]


def _bench_batches(out: _Rows, raw, fl, q: np.ndarray, nq: int, n: int, a: argparse.Namespace) -> None:
    """A SAR strip gives several windows: per-query cost of ``exact`` and FAISS when they are searched together."""
    nb = max(1, nq // a.batch)

    def both_b(j):
        qb = q[j * a.batch : (j + 1) * a.batch]
        t0 = time.perf_counter()
        raw.search(qb, 10)
        t1 = time.perf_counter()
        fl.search(qb, 10)
        return (t1 - t0) * 1e3 / len(qb), (time.perf_counter() - t1) * 1e3 / len(qb)

    _, res_b = _lat(both_b, nb)
    ours_b, peer_b = (np.asarray([r[i] for r in res_b]) for i in (0, 1))
    out.add(f"exact batch {a.batch}", _stats(ours_b), 1.0, n,
            {"per_query": True, "speed_vs_faiss_flat": float(np.median(peer_b) / np.median(ours_b))})  # fmt: skip
    out.add(f"faiss-flat batch {a.batch}", _stats(peer_b), float("nan"), n, {"per_query": True})


def _bench_vs_faiss(out: _Rows, faiss, pack, raw, q: np.ndarray, nq: int, n: int, dim: int, a, rss0: dict) -> list:
    """``exact`` and the peer, ``IndexFlatIP`` over a float32 copy, timed interleaved (same queries, same moment),
    then in batches; returns the exact top-10 rows of each query."""
    from sarloc.mappack.ann import recall_at_k

    faiss.omp_set_num_threads(a.threads)
    t0 = time.perf_counter()
    fl = faiss.IndexFlatIP(dim)
    for s0 in range(0, n, 65536):
        fl.add(np.ascontiguousarray(np.asarray(pack.embeddings[s0 : s0 + 65536], np.float32)))
    add_s = time.perf_counter() - t0
    rss_f = _rss_mb()

    def both(j):
        t0 = time.perf_counter()
        r = raw.search(q[j], 10)[0]
        t1 = time.perf_counter()
        f = fl.search(q[j : j + 1], 10)[1][0]
        return r, f, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    _, res = _lat(both, nq)
    exact_rows = [r[0].rows for r in res]
    ours, peer = (np.asarray([r[i] for r in res]) for i in (2, 3))
    out.add("exact", _stats(ours), 1.0, n, {"rss_anon_before_mb": rss0.get("RssAnon"),
            "speed_vs_faiss_flat": float(np.median(peer) / np.median(ours))})  # fmt: skip
    out.rows[-1].update({k: v for k, v in rss0.items()})  # memory before the FAISS copy existed
    out.add("faiss-flat", _stats(peer), recall_at_k(exact_rows, [r[1] for r in res], 10), n,
            {"build_s": round(add_s, 1), "index_mb": round(n * dim * 4 / 2**20, 1), **rss_f})  # fmt: skip
    if a.batch > 1:
        _bench_batches(out, raw, fl, q, nq, n, a)
    fl.reset()  # the float32 copy is freed on return, before the next methods read memory
    return exact_rows


def _bench_prior(out: _Rows, pack, raw, q: np.ndarray, nq: int, true_rows, a: argparse.Namespace) -> None:
    """``prior``: tiles within the radius of a prior at 40 % of the radius from the true tile."""
    xy = pack.centres_m()
    rng = np.random.default_rng(2)
    ang = rng.uniform(0, 2 * np.pi, nq)
    off = 0.4 * a.prior_radius_m * np.stack([np.cos(ang), np.sin(ang)], 1)
    priors = xy[true_rows] + off
    raw.grid_index  # build the spatial index outside the timing  # noqa: B018
    lat, res = _lat(lambda j: raw.search(q[j], 10, prior_xy_m=tuple(priors[j]), prior_radius_m=a.prior_radius_m)[0], nq)
    found = float(np.mean([t in r.rows for r, t in zip(res, true_rows, strict=True)]))
    out.add("prior", lat, found, int(np.mean([r.candidates for r in res])),
            {"prior_radius_m": a.prior_radius_m, "note": "recall@10 column = source tile in top-10"})  # fmt: skip


def _bench_ivf(out: _Rows, pack, raw, q: np.ndarray, nq: int, exact_rows: list, a: argparse.Namespace) -> None:
    """``ivf``: the smallest probe count reaching ``--target-recall`` of exact top-10, then timed."""
    from sarloc.mappack.ann import IvfIndex, recall_at_k

    t0 = time.perf_counter()
    index = IvfIndex.build(pack.embeddings, nlist=None, iters=a.kmeans_iters, sample=a.kmeans_sample)
    build_s = time.perf_counter() - t0
    raw._ann = index
    chosen = None
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256, index.nlist):
        if nprobe > index.nlist:
            continue
        ap = [index.search(pack.embeddings, x, 10, nprobe=nprobe, scorer=raw.scorer)[1] for x in q]
        rec = recall_at_k(exact_rows, ap, 10)
        chosen = (nprobe, rec)
        if rec >= a.target_recall:
            break
    nprobe, rec = chosen
    lat, res = _lat(lambda j: raw.search(q[j], 10, ann=True, nprobe=nprobe)[0], nq)
    out.add("ivf", lat, rec, int(np.mean([r.candidates for r in res])),
            {"nlist": index.nlist, "nprobe": nprobe, "build_s": round(build_s, 1)})  # fmt: skip
    del index
    raw._ann = None


def bench_one(pack_dir: Path, n: int, dim: int, a: argparse.Namespace) -> list[dict]:
    """All methods on one synthetic pack."""
    from sarloc.mappack import PackSearcher
    from sarloc.sim.packs import synthetic_queries

    pack, gen_s = _open_pack(pack_dir, n, dim)
    nq = a.queries if n < 1_000_000 else max(5, a.queries // 2)
    q, true_rows = synthetic_queries(pack.embeddings, nq, noise=a.query_noise, seed=1)
    raw = PackSearcher(pack, nms_radius_m=0.0, scorer=a.scorer, threads=a.threads, block_rows=a.block_rows)
    nms = PackSearcher(pack, scorer=a.scorer, threads=a.threads, block_rows=a.block_rows)
    out = _Rows({"n_tiles": n, "dim": dim, "queries": nq, "pack_gen_s": round(gen_s, 1),
                 "scorer": raw.scorer.backend, "kernel": raw.scorer.kernel})  # fmt: skip
    rss0 = _rss_mb()
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is None:
        exact_rows = _bench_exact(out, raw, q, nq, n, rss0)
    else:
        exact_rows = _bench_vs_faiss(out, faiss, pack, raw, q, nq, n, dim, a, rss0)
    lat, res = _lat(lambda j: nms.search(q[j], 10)[0], nq)
    out.add("exact+nms", lat, float(np.mean([r.rows[0] == t for r, t in zip(res, true_rows, strict=True)])), n,
            {"note": "recall@10 column = top-1 is the source tile"})  # fmt: skip
    _bench_prior(out, pack, raw, q, nq, true_rows, a)
    _bench_ivf(out, pack, raw, q, nq, exact_rows, a)
    return out.rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[704, 128])
    p.add_argument("--queries", type=int, default=20, help="queries per pack (half at 1M tiles, at least 5)")
    p.add_argument("--query-noise", type=float, default=0.5, help="norm of the query perturbation")
    p.add_argument("--prior-radius-m", type=float, default=2000.0)
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=1, help="threads for the scorer and FAISS")
    p.add_argument("--batch", type=int, default=8, help="also time batches of this many queries (per query)")
    p.add_argument("--block-rows", type=int, default=32768)
    p.add_argument("--scorer", choices=["auto", "native", "ort", "numpy"], default="auto")
    p.add_argument("--kmeans-iters", type=int, default=6)
    p.add_argument("--kmeans-sample", type=int, default=32768)
    p.add_argument("--workdir", default="runs/bench_search/packs", help="synthetic packs (reused across runs)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic packs")
    p.add_argument("--out", default="runs/bench_search")
    a = p.parse_args(argv)

    import shutil

    import onnxruntime

    from sarloc import __version__
    from sarloc.core.artifacts import atomic_write_json

    work = Path(a.workdir)
    results = []
    t_all = time.perf_counter()
    for dim in a.dims:
        for n in a.sizes:
            d = work / f"synth_{n}_{dim}"
            t0 = time.perf_counter()
            results += bench_one(d, n, dim, a)
            print(f"  {n} x {dim}: {time.perf_counter() - t0:.1f} s", flush=True)
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
    try:
        import faiss

        faiss_v = faiss.__version__
    except ImportError:
        faiss_v = None
    meta = {
        "hardware": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": {
            "sarloc": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
            "faiss": faiss_v,
        },
        "config": vars(a),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    cols = ("n_tiles", "dim", "method", "p50_ms", "p99_ms", "recall@10", "candidates", "speed_vs_faiss_flat",
            "RssAnon", "RssFile")  # fmt: skip
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        vals = [r.get(c) for c in cols]
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals) + " |")
    print(f"\n{meta['hardware']['cpu']}, {a.threads} thread(s), scorer {results[0]['kernel'] if results else '-'}")
    out = Path(a.out) / "results.json"
    atomic_write_json(out, {**meta, "results": results})
    print(f"wrote {out} ({meta['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
