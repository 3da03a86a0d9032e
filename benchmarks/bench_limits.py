"""Physical floors beside the measured numbers: encoder FLOPs vs GEMM peak, map search bytes vs memory bandwidth.

    python benchmarks/bench_limits.py --latency-json runs/bench/latency.json \
        --search-json runs/bench_search/results.json --out runs/bench/limits.json

* ``onnx_flops``: multiply-accumulates of an ONNX model from onnx shape inference (Conv, ConvInteger,
  QLinearConv, MatMul, MatMulInteger, QLinearMatMul, Gemm); other ops are listed as uncounted.
* ``peak_gflops``: float32 GEMM throughput of numpy's BLAS, one thread and all threads (each in a fresh
  subprocess with OMP/OPENBLAS/MKL thread variables set: threadpoolctl is not a dependency of sarloc).
* ``memory_bandwidth_gbs``: read bandwidth (``np.sum`` over a large float32 array, one thread and one chunk per
  thread) and copy bandwidth (``np.copyto``), best of a few repeats.

The *compute floor* of the encoder is FLOPs per window / peak GFLOP/s: no implementation on this CPU can go
faster (depthwise convolutions and small batches cannot reach GEMM peak, so real ratios of 3-20x are normal).
The *bandwidth floor* of a full-scan search is N * D * bytes per value / read bandwidth: a query must read
every embedding once (prior-window and IVF searches read fewer and may beat it; they are listed for context).
Prints a markdown table and writes JSON with hardware, versions and every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ONNX = Path(__file__).resolve().parents[1] / "sarloc" / "demo_model" / "sar_encoder.onnx"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
FULL_SCAN_METHODS = ("exact", "exact+nms", "faiss-flat")  # read all N x D values per query
BYTES_PER_VALUE = {"faiss-flat": 4}  # faiss searches a float32 copy; the pack itself is float16


# ----------------------------------------------------------------------------------------------------- FLOPs


def _shape_map(graph: Any) -> dict[str, list[int | None]]:
    """Tensor name -> static shape (None for unknown dims) from inputs, outputs, value_info, initializers."""
    import onnx

    shapes: dict[str, list[int | None]] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(onnx.helper.get_attribute_value(a).dims)
    return shapes


def _prod(dims: list[int | None]) -> int | None:
    if any(d is None for d in dims):
        return None
    return math.prod(dims)  # type: ignore[arg-type]


def onnx_flops(path: str | Path, batch: int = 1) -> dict[str, Any]:
    """Count the FLOPs (2 x multiply-accumulates) of one forward pass of an ONNX model at a given batch size.

    Every input whose first dimension is symbolic gets ``batch``; stored intermediate shapes are dropped and
    re-derived with ``onnx.shape_inference.infer_shapes(data_prop=True)``. Counted, per node:

    * Conv / ConvInteger / QLinearConv: ``2 * Cout * (Cin / group) * kh * kw * Hout * Wout`` per image
      (any number of spatial dims); bias adds are not counted.
    * MatMul / MatMulInteger / QLinearMatMul / Gemm: ``2 * M * N * K`` (batched: times the leading dims).

    Args:
        path: the ``.onnx`` file.
        batch: value for symbolic leading input dimensions.

    Returns:
        ``{"flops", "macs", "by_op": {op: flops}, "depthwise_conv_flops", "params", "nodes",
        "uncounted_ops": [op types present but not counted], "unresolved": [nodes whose shapes were unknown]}``.
    """
    import onnx

    g = _inferred_graph(path, batch)
    shapes = _shape_map(g)
    by_op: dict[str, int] = {}
    depthwise = 0
    uncounted: set[str] = set()
    unresolved: list[str] = []
    for node in g.node:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            f, dw = _conv_flops(node, attrs, shapes)
        elif op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
            f, dw = _matmul_flops(node, attrs, shapes), False
        else:
            if op not in ("Constant",):
                uncounted.add(op)
            continue
        if f is None:
            unresolved.append(node.name or op)
            continue
        by_op[op] = by_op.get(op, 0) + f
        depthwise += f if dw else 0
    flops = int(sum(by_op.values()))
    params = int(sum(math.prod(i.dims) for i in g.initializer))
    return {
        "flops": flops,
        "macs": flops / 2,
        "by_op": by_op,
        "depthwise_conv_flops": depthwise,
        "params": params,
        "nodes": len(g.node),
        "batch": int(batch),
        "uncounted_ops": sorted(uncounted),
        "unresolved": unresolved,
    }


def _inferred_graph(path: str | Path, batch: int) -> Any:
    """The model's graph with ``batch`` for symbolic leading input dims and every shape re-inferred."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    init_names = {i.name for i in g.initializer}
    for inp in g.input:
        if inp.name in init_names or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = int(batch)  # clears dim_param (oneof)
    del g.value_info[:]
    for out in g.output:
        out.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model.graph


def _conv_flops(node: Any, attrs: dict[str, Any], shapes: dict) -> tuple[int | None, bool]:
    """FLOPs of a Conv / ConvInteger / QLinearConv node (None: shapes unknown) and whether it is depthwise."""
    w_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
    w, y = shapes.get(w_name), shapes.get(node.output[0])
    if w is None or y is None or _prod(w) is None or _prod(y) is None:
        return None, False
    # w: (Cout, Cin/group, k...), y: (N, Cout, spatial...); Cin/group is w[1] already
    f = 2 * _prod(y) * _prod(w[1:])  # = 2 * N * Cout * prod(spatial) * (Cin/group) * prod(k)
    return f, int(attrs.get("group", 1)) > 1 and w[1] == 1


def _matmul_flops(node: Any, attrs: dict[str, Any], shapes: dict) -> int | None:
    """FLOPs of a MatMul / MatMulInteger / QLinearMatMul / Gemm node: output elements x K (None: shapes unknown)."""
    a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    if a is None or y is None or _prod(y) is None or not a:
        return None
    k = a[0] if (node.op_type == "Gemm" and attrs.get("transA", 0)) else a[-1]
    if k is None:
        return None
    return 2 * _prod(y) * int(k)


# ------------------------------------------------------------------------------------------------ GEMM peak

_GEMM_CODE = """
import json, sys, time
import numpy as np
n, seconds = int(sys.argv[1]), float(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), dtype=np.float32)
np.matmul(a, b, out=c)
best, reps, t_end = float("inf"), 0, time.perf_counter() + seconds
while reps < 3 or time.perf_counter() < t_end:
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    best = min(best, time.perf_counter() - t0)
    reps += 1
print(json.dumps({"gflops": 2.0 * n**3 / best / 1e9, "best_s": best, "reps": reps}))
"""


def _n_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gemm_subprocess(threads: int, n: int, seconds: float) -> dict[str, float]:
    env = dict(os.environ)
    env.update({k: str(threads) for k in THREAD_VARS})
    out = subprocess.run(
        [sys.executable, "-c", _GEMM_CODE, str(n), str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60 + 10 * seconds,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_gflops(seconds: float = 2.0, n: int = 2048) -> dict[str, Any]:
    """Measured float32 GEMM throughput of numpy's BLAS (best single ``n x n @ n x n`` product).

    Each thread count runs in a fresh subprocess with the BLAS thread variables set, so the caller's thread
    pool is untouched and the setting is certain to apply.

    Args:
        seconds: time spent per thread count (at least 3 products each).
        n: matrix size.

    Returns:
        ``{"threads_1": GFLOP/s, "threads_all": GFLOP/s, "n_threads_all": int, "n": n, "seconds": seconds}``.
    """
    n_all = _n_threads()
    one = _gemm_subprocess(1, n, seconds)
    allt = _gemm_subprocess(n_all, n, seconds) if n_all > 1 else one
    return {
        "threads_1": one["gflops"],
        "threads_all": allt["gflops"],
        "n_threads_all": n_all,
        "n": n,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------------ bandwidth


READ_KERNELS = {
    "sum": np.sum,
    "max": np.max,
    "bitwise_or": lambda x: np.bitwise_or.reduce(x.view(np.uint64)),
}


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Measured DRAM bandwidth in GB/s (1e9 bytes/s), best of ``repeats``.

    * ``read_1t``: the fastest of a few serial read-only reductions (``np.sum``, ``np.max``, a bitwise-or over a
      uint64 view: pairwise ``np.sum`` alone is partly compute-bound) over a ``size_mb`` float32 array;
    * ``read_all``: that kernel over one chunk per CPU, in a thread pool (numpy releases the GIL);
    * ``copy_1t``: ``np.copyto`` of half the array, counting bytes read + written.

    Args:
        size_mb: array size (far larger than the last-level cache).
        repeats: passes per measurement.

    Returns:
        ``{"read_1t", "read_all", "copy_1t", "read_kernel", "read_1t_by_kernel", "n_threads_all", ...}``.
    """
    n = size_mb * 2**20 // 4
    n -= n % 2  # whole uint64 words
    a = np.ones(n, dtype=np.float32)  # pages touched
    nbytes = a.nbytes

    def best(fn) -> float:
        fn()
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    by_kernel = {name: nbytes / best(lambda k=k: k(a)) / 1e9 for name, k in READ_KERNELS.items()}
    kernel = max(by_kernel, key=by_kernel.get)
    n_all = _n_threads()
    chunks = [c.view(np.float32) for c in np.array_split(a.view(np.uint64), n_all)]  # even lengths for the view
    k = READ_KERNELS[kernel]
    with ThreadPoolExecutor(n_all) as pool:
        read_all = nbytes / best(lambda: list(pool.map(k, chunks))) / 1e9
    src = a[: n // 2]
    dst = np.empty_like(src)
    dst.fill(0.0)
    copy_1t = 2 * src.nbytes / best(lambda: np.copyto(dst, src)) / 1e9
    return {
        "read_1t": by_kernel[kernel],
        "read_all": read_all,
        "copy_1t": copy_1t,
        "read_kernel": kernel,
        "read_1t_by_kernel": by_kernel,
        "n_threads_all": n_all,
        "size_mb": size_mb,
        "repeats": repeats,
    }


# ------------------------------------------------------------------------------------------------ reporting


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _llc_bytes() -> int | None:
    """Size of the largest CPU cache level (Linux sysfs), or None."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            kind = (d / "type").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        v = int(size.rstrip("KMG")) * mult
        best = v if best is None else max(best, v)
    return best


def _versions() -> dict[str, str]:
    import onnx

    import sarloc

    v = {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__}
    v["sarloc"] = sarloc.__version__
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        v["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # numpy < 1.26 or an odd build: the BLAS name is only informative
        pass
    return v


def _ratio(measured: float | None, floor: float) -> float | None:
    return None if measured is None or floor <= 0 else measured / floor


def _encoder_rows(flops: float, peak: dict, measured: list[tuple[str, float | None, float]]) -> list[dict]:
    """One row per (label, measured ms per window or None, FLOPs per window of the model measured)."""
    rows = []
    for label, ms, f in measured or [("encoder ms/window", None, flops)]:
        floor_1t = f / (peak["threads_1"] * 1e9) * 1e3
        floor_all = f / (peak["threads_all"] * 1e9) * 1e3
        rows.append(
            {
                "what": label,
                "flops_per_window": f,
                "measured_ms": ms,
                "floor_1t_ms": floor_1t,
                "floor_all_ms": floor_all,
                "ratio_1t": _ratio(ms, floor_1t),
                "ratio_all": _ratio(ms, floor_all),
                "floor_kind": "compute",
            }
        )
    return rows


def _search_row(
    label: str, n: int, d: int, bpv: int, ms: float | None, bw: dict, peak: dict, llc_bytes: int | None
) -> dict:
    nbytes = n * d * bpv
    in_llc = llc_bytes is not None and nbytes <= llc_bytes
    flops = 2.0 * n * d
    bw_1t = nbytes / (bw["read_1t"] * 1e9) * 1e3
    bw_all = nbytes / (bw["read_all"] * 1e9) * 1e3
    c_1t = flops / (peak["threads_1"] * 1e9) * 1e3
    c_all = flops / (peak["threads_all"] * 1e9) * 1e3
    floor_1t, floor_all = max(bw_1t, c_1t), max(bw_all, c_all)
    return {
        "what": label,
        "n_tiles": n,
        "dim": d,
        "bytes_per_value": bpv,
        "bytes_per_query": nbytes,
        "flops_per_query": flops,
        "measured_ms": ms,
        "bandwidth_floor_1t_ms": bw_1t,
        "bandwidth_floor_all_ms": bw_all,
        "compute_floor_1t_ms": c_1t,
        "compute_floor_all_ms": c_all,
        "floor_1t_ms": floor_1t,
        "floor_all_ms": floor_all,
        "ratio_1t": _ratio(ms, floor_1t),
        "ratio_all": _ratio(ms, floor_all),
        "fits_llc": in_llc,
        "floor_kind": ("bandwidth" if bw_1t >= c_1t else "compute") + (" (fits LLC: DRAM floor not binding)" * in_llc),
    }


def _latency_numbers(path: Path) -> tuple[dict[str, float], dict]:
    """ms per window from a ``bench_latency.py`` JSON: ``["encoder"][backend][batch]["p50"]`` is already per window.

    FP32 backends only (``ort_fp32``, ``torch_eager``): the floor is a float32 GEMM peak.
    """
    d = json.loads(path.read_text())
    out = {}
    for backend in ("ort_fp32", "torch_eager"):
        for b, rec in d.get("encoder", {}).get(backend, {}).items():
            if isinstance(rec, dict) and rec.get("p50") is not None:
                out[f"{backend} b{b}"] = float(rec["p50"])
    meta = d.get("meta", {})
    return out, {"threads": meta.get("config", {}).get("threads"), "hardware": meta.get("hardware")}


def _export_numbers(path: Path, default_flops: float) -> list[tuple[str, float, float]]:
    """ms per window from a ``bench_export.py`` JSON: ``["artefacts"][name]["latency_ms_per_window"][batchB]``.

    FLOPs are counted on the artefact's own ONNX file when it is there (else those of ``--onnx``).
    """
    d = json.loads(path.read_text())
    arts = d.get("artefacts", {})
    f = default_flops
    onnx_file = Path(arts.get("ort_fp32", {}).get("file", ""))
    if onnx_file.suffix == ".onnx" and onnx_file.is_file():
        f = onnx_flops(onnx_file)["flops"]  # pytorch_eager is the checkpoint this ONNX was exported from
    out = []
    for name in ("ort_fp32", "pytorch_eager"):
        art = arts.get(name)
        if not isinstance(art, dict):
            continue
        for b, rec in art.get("latency_ms_per_window", {}).items():
            if isinstance(rec, dict) and rec.get("p50") is not None:
                out.append((f"export {name} {b.replace('batch', 'b')}", float(rec["p50"]), f))
    return out


def _fmt(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{nd}g}" if abs(x) < 0.01 else f"{x:.{nd}f}".rstrip("0").rstrip(".")


def _table(result: dict) -> str:
    lines = [
        "| quantity | measured ms | floor 1 thread ms | ratio | floor all threads ms | ratio | floor |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["encoder"]["rows"] + result["search"]["rows"]:
        lines.append(
            f"| {r['what']} | {_fmt(r['measured_ms'])} | {_fmt(r['floor_1t_ms'])} | {_fmt(r['ratio_1t'], 2)} | "
            f"{_fmt(r['floor_all_ms'])} | {_fmt(r['ratio_all'], 2)} | {r['floor_kind']} |"
        )
    e, p, b = result["encoder"], result["peak_gflops"], result["bandwidth_gbs"]
    lines += [
        "",
        f"encoder: {e['flops'] / 1e6:.1f} MFLOP/window ({e['macs'] / 1e6:.1f} MMAC; depthwise conv "
        f"{e['depthwise_conv_flops'] / 1e6:.1f} MFLOP), {e['params'] / 1e3:.0f}k params; "
        f"uncounted ops: {', '.join(e['uncounted_ops']) or 'none'}",
        f"peak fp32 GEMM: {p['threads_1']:.1f} GFLOP/s (1 thread), {p['threads_all']:.1f} GFLOP/s "
        f"({p['n_threads_all']} threads); read bandwidth {b['read_1t']:.1f} GB/s (1 thread), "
        f"{b['read_all']:.1f} GB/s ({b['n_threads_all']} threads); copy {b['copy_1t']:.1f} GB/s (1 thread)",
    ]
    return "\n".join(lines)


def run(a: argparse.Namespace) -> dict:
    """Measure the floors and compare with the given measured numbers; returns the result dict."""
    t_start = time.perf_counter()
    enc = onnx_flops(a.onnx, batch=1)
    peak = peak_gflops(a.seconds, n=a.gemm_n)
    bw = memory_bandwidth_gbs(a.bandwidth_mb)

    measured_enc: list[tuple[str, float | None, float]] = []
    sources: dict[str, str] = {}
    latency_meta: dict = {}
    if a.latency_json and Path(a.latency_json).is_file():
        numbers, latency_meta = _latency_numbers(Path(a.latency_json))
        measured_enc += [(f"latency {k}", v, enc["flops"]) for k, v in numbers.items()]
        sources["latency_json"] = str(a.latency_json)
    if a.export_json and Path(a.export_json).is_file():
        measured_enc += _export_numbers(Path(a.export_json), enc["flops"])
        sources["export_json"] = str(a.export_json)
    if a.encoder_ms_per_window is not None:
        measured_enc.append(("encoder ms/window (given)", a.encoder_ms_per_window, enc["flops"]))
    enc["rows"] = _encoder_rows(enc["flops"], peak, measured_enc)
    enc["measured_meta"] = latency_meta
    llc = _llc_bytes()

    search_rows = []
    if a.search_tiles and a.search_dim:
        search_rows.append(
            _search_row(
                f"search {a.search_tiles} x {a.search_dim} fp16 (given)",
                a.search_tiles,
                a.search_dim,
                2,
                a.search_ms_per_query,
                bw,
                peak,
                llc,
            )
        )
    search_meta = {}
    if a.search_json and Path(a.search_json).is_file():
        sj = json.loads(Path(a.search_json).read_text())
        sources["search_json"] = str(a.search_json)
        search_meta = {"omp_num_threads": sj.get("omp_num_threads"), "hardware": sj.get("hardware")}
        for r in sj.get("results", []):
            if r.get("method") not in FULL_SCAN_METHODS or r.get("p50_ms") is None:
                continue
            bpv = BYTES_PER_VALUE.get(r["method"], 2)
            label = f"search {r['n_tiles']} x {r['dim']} {r['method']} ({'fp32' if bpv == 4 else 'fp16'})"
            search_rows.append(
                _search_row(label, int(r["n_tiles"]), int(r["dim"]), bpv, float(r["p50_ms"]), bw, peak, llc)
            )
    if not search_rows:  # the floor of the largest map the runtime targets, with nothing to compare yet
        search_rows.append(_search_row("search 1000000 x 704 fp16", 1_000_000, 704, 2, None, bw, peak, llc))

    return {
        "hardware": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": _n_threads(),
            "cpu_model": _cpu_name(),
            "llc_bytes": llc,
        },
        "versions": _versions(),
        "config": {
            "onnx": str(a.onnx),
            "seconds": a.seconds,
            "gemm_n": a.gemm_n,
            "bandwidth_mb": a.bandwidth_mb,
            "env_threads": {k: os.environ.get(k) for k in THREAD_VARS},
        },
        "sources": sources,
        "encoder": enc,
        "peak_gflops": peak,
        "bandwidth_gbs": bw,
        "search": {"rows": search_rows, **search_meta},
        "total_s": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the markdown table, write ``--out`` JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="encoder ONNX model (batch-1 FLOPs)")
    p.add_argument("--encoder-ms-per-window", type=float, default=None, help="a measured encoder latency")
    p.add_argument("--latency-json", type=Path, default=Path("runs/bench/latency.json"))
    p.add_argument("--export-json", type=Path, default=Path("runs/bench_export/results.json"))
    p.add_argument("--search-ms-per-query", type=float, default=None, help="a measured search latency")
    p.add_argument("--search-tiles", type=int, default=None, help="N of that search")
    p.add_argument("--search-dim", type=int, default=None, help="D of that search")
    p.add_argument("--search-json", type=Path, default=Path("runs/bench_search/results.json"))
    p.add_argument("--seconds", type=float, default=2.0, help="GEMM timing per thread count")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--bandwidth-mb", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("runs/bench/limits.json"))
    a = p.parse_args(argv)
    if not Path(a.onnx).is_file():
        print(f"error: ONNX model {a.onnx} not found", file=sys.stderr)
        return 1
    result = run(a)
    print(_table(result))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {a.out} ({result['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
