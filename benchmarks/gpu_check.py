"""One short GPU check: the sarloc encoder and brute-force map search in PyTorch on CUDA (no TensorRT needed).

    bash benchmarks/gpu_check.sh                                   # on the GPU machine; writes $OUT/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/g   # smoke run on any machine

1. **Peaks**: dense GEMM TFLOP/s (FP32 with TF32 off, TF32, FP16) and device copy bandwidth, the floors the
   rows below are compared with.
2. **Encoder latency**: ``CrossModalEncoder`` SAR branch (``--checkpoint`` or random weights whose batch-norm
   statistics are re-estimated on random windows, so activations have a realistic scale), input resident on the
   device, batch 1..256, modes ``fp32`` (TF32 off), ``tf32``, ``fp16`` (``.half()``) and ``amp``
   (``torch.autocast`` float16); CUDA events around each call, warm-up first, p50/p95 per call, ms per window,
   windows/s. Batch 1 and 32 again as CUDA graphs (launch overhead removed).
3. **Parity**: each mode against the same weights in FP32 on the CPU, 16 windows: max abs diff, min cosine of the
   whole embedding and of its learned part (the first ``embed_dim`` components; the rest is the parameter-free
   layout branch).
4. **Search**: ``N x D`` float16 unit vectors resident on the device (default 1M x 704, 1.4 GB), 64 queries
   (noisy copies of stored rows), ``torch.matmul`` + ``topk(10)``, per query at batch 1 and 64, with the achieved
   read bandwidth; top-10 of a few queries checked against a CPU float32 reference computed in blocks.

Results are written after every section (a timeout keeps what was done) to ``--out``/gpu_check.json
(default ``$OUT``, else runs/gpu) and printed as markdown tables. Exit 0 unless a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

PARITY_TOL = {"fp32": {"max_abs": 1e-4}, "tf32": {"min_cos": 0.999}, "fp16": {"min_cos": 0.999}}
PARITY_TOL["amp"] = PARITY_TOL["fp16"]
SCORE_TIE_TOL = 1e-3  # float16 output rounding (half an ulp is 6e-5 at 0.2, 2.4e-4 near 1) + accumulation order


# ------------------------------------------------------------------------------------------------------ util


def _stats(ts_ms: list[float], batch: int = 1) -> dict[str, float]:
    a = np.asarray(ts_ms, dtype=float)
    p50 = float(np.percentile(a, 50))
    return {
        "p50_ms": p50,
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "ms_per_item": p50 / batch,
        "items_per_s": batch * 1e3 / p50 if p50 > 0 else float("inf"),
        "iters": len(ts_ms),
    }


def _time_ms(fn: Callable[[], Any], device: Any, iters: int, warmup: int) -> list[float]:
    """Per-call wall time in ms: CUDA events around each call on CUDA (synchronised), perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    ts = []
    for _ in range(iters):
        if cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            ts.append(t0.elapsed_time(t1))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return ts


@contextmanager
def _tf32(enabled: bool):
    """Set TF32 for cuDNN convolutions and cuBLAS matmuls (legacy flags: portable across torch versions)."""
    import torch

    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _meta(device: Any) -> dict[str, Any]:
    import torch

    m: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    }
    try:
        import sarloc

        m["sarloc"] = sarloc.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=p.total_memory / 2**30)
        m["sm_count"] = p.multi_processor_count
        try:
            q = "name,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            m["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return m


# ----------------------------------------------------------------------------------------------------- peaks


def device_peaks(device: Any, quick: bool) -> dict[str, Any]:
    """Dense GEMM TFLOP/s per precision and device-to-device copy bandwidth (GB/s, read + write)."""
    import torch

    n = 512 if quick else 8192
    out: dict[str, Any] = {"gemm_n": n}
    modes = [("fp32", torch.float32, False), ("tf32", torch.float32, True), ("fp16", torch.float16, False)]
    for name, dt, tf32 in modes:
        if device.type != "cuda" and name == "tf32":
            continue
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        with _tf32(tf32) if device.type == "cuda" else nullcontext():
            ts = _time_ms(lambda a=a, b=b: torch.matmul(a, b), device, 3 if quick else 20, 1 if quick else 5)
        out[f"gemm_{name}_tflops"] = 2 * n**3 / (min(ts) * 1e-3) / 1e12
        del a, b
    nbytes = (64 if quick else 2048) * 2**20
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ts = _time_ms(lambda: dst.copy_(src), device, 3 if quick else 20, 1 if quick else 3)
    out["copy_gbs"] = 2 * nbytes / (min(ts) * 1e-3) / 1e9
    out["copy_mib"] = nbytes / 2**20
    return out


# --------------------------------------------------------------------------------------------------- encoder


def build_encoder(checkpoint: Path | None, seed: int, window_px: int, calib_batches: int) -> tuple[Any, dict]:
    """The SAR branch as a single-input module on the CPU, eval mode, and a description of its weights."""
    import torch

    from sarloc.trainer.models.encoder import CrossModalEncoder, EncoderConfig, ModalityEncoder

    if checkpoint is not None:
        from sarloc.trainer.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(checkpoint)
        enc_cfg, weights = model.cfg, f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(seed)
        enc_cfg = EncoderConfig(pretrained=False)
        model = CrossModalEncoder(enc_cfg)
        # random weights leave activations ~1e-5 after a dozen blocks with unit running statistics (float16
        # underflows to 0 and the final normalisation gives NaN); re-estimate the statistics on random windows
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            for _ in range(calib_batches):
                model.embed(torch.randn(32, enc_cfg.in_channels, window_px, window_px), "sar")
        weights = f"random (seed {seed}, batch-norm statistics from {calib_batches} x 32 random windows)"
    model.eval()
    sar = ModalityEncoder(model, "sar").eval()
    for p in sar.parameters():
        p.requires_grad_(False)
    info = {
        "weights": weights,
        "encoder_config": enc_cfg.to_dict(),
        "out_dim": model.output_dim(window_px),
        "params": sum(p.numel() for p in sar.parameters()),
    }
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc, torch.no_grad():
            sar(torch.zeros(1, enc_cfg.in_channels, window_px, window_px))
        info["flops_per_window"] = int(fc.get_total_flops())
    except ImportError:
        pass
    return sar, info


def _mode_fn(model_cpu: Any, mode: str, device: Any) -> tuple[Callable[[Any], Any], Any]:
    """(forward taking a float32 device batch, context manager to hold while calling it) for one mode."""
    import torch

    cuda = device.type == "cuda"
    if mode == "fp16":
        m = copy.deepcopy(model_cpu).half().to(device)

        def fwd(x):
            return m(x.half())

        return fwd, _tf32(False) if cuda else nullcontext()
    m = copy.deepcopy(model_cpu).to(device)
    if mode == "amp":

        def fwd(x):
            with torch.autocast(device.type, dtype=torch.float16):
                return m(x)

        return fwd, _tf32(False) if cuda else nullcontext()
    return (lambda x: m(x)), (_tf32(mode == "tf32") if cuda else nullcontext())


def encoder_latency(
    model_cpu: Any, modes: list[str], batches: list[int], device: Any, a: argparse.Namespace, in_ch: int
) -> dict[str, Any]:
    """ms per call / per window for every mode and batch (input already on the device)."""
    import torch

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(1)
    xs = {b: torch.randn(b, in_ch, a.window_px, a.window_px, generator=g).to(device) for b in batches}
    for mode in modes:
        fwd, ctx = _mode_fn(model_cpu, mode, device)
        out[mode] = {}
        with ctx, torch.inference_mode():
            for b in batches:
                iters = a.iters if b <= 64 else max(5, a.iters // 2)
                ts = _time_ms(lambda b=b, fwd=fwd: fwd(xs[b]), device, iters, a.warmup)
                s = _stats(ts, b)
                out[mode][str(b)] = {**s, "ms_per_window": s["ms_per_item"], "windows_per_s": s["items_per_s"]}
    return out


def cuda_graph_latency(model_cpu: Any, modes: list[str], batches: list[int], device: Any, a, in_ch: int) -> dict:
    """Batch latencies with the forward captured as a CUDA graph (replay cost only), and its parity with eager."""
    import torch

    out: dict[str, Any] = {}
    for mode in modes:
        fwd, ctx = _mode_fn(model_cpu, mode, device)
        out[mode] = {}
        with ctx, torch.inference_mode():
            for b in batches:
                x = torch.randn(b, in_ch, a.window_px, a.window_px, device=device)
                s = torch.cuda.Stream(device)
                s.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(s):
                    for _ in range(3):
                        fwd(x)
                torch.cuda.current_stream(device).wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = fwd(x)
                graph.replay()
                torch.cuda.synchronize(device)
                diff = float((y.float() - fwd(x).float()).abs().max())
                st = _stats(_time_ms(graph.replay, device, a.iters, a.warmup), b)
                out[mode][str(b)] = {
                    **st,
                    "ms_per_window": st["ms_per_item"],
                    "windows_per_s": st["items_per_s"],
                    "max_abs_diff_vs_eager": diff,
                }
    return out


def encoder_parity(model_cpu: Any, modes: list[str], device: Any, n: int, window_px: int, in_ch: int, embed_dim: int):
    """Each mode on ``device`` vs FP32 on the CPU, same weights, ``n`` windows."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, in_ch, window_px, window_px, generator=g)
    with torch.inference_mode():
        ref = model_cpu(x).float()
    out = {}
    for mode in modes:
        fwd, ctx = _mode_fn(model_cpu, mode, device)
        with ctx, torch.inference_mode():
            y = fwd(x.to(device)).float().cpu()
        cos = F.cosine_similarity(y, ref, dim=1)
        cos_l = F.cosine_similarity(y[:, :embed_dim], ref[:, :embed_dim], dim=1)
        r = {
            "windows": n,
            "max_abs_diff": float((y - ref).abs().max()),
            "min_cosine": float(cos.min()),
            "min_cosine_learned": float(cos_l.min()),
            "nan": int(torch.isnan(y).sum()),
            "tolerance": PARITY_TOL[mode],
        }
        tol = PARITY_TOL[mode]
        ok = r["nan"] == 0
        if "max_abs" in tol:
            ok = ok and r["max_abs_diff"] <= tol["max_abs"]
        if "min_cos" in tol:
            ok = ok and r["min_cosine"] >= tol["min_cos"] and r["min_cosine_learned"] >= tol["min_cos"]
        r["passed"] = bool(ok)
        out[mode] = r
    return out


# ---------------------------------------------------------------------------------------------------- search


def _make_db(n: int, d: int, device: Any, seed: int, block: int = 65536):
    import torch
    import torch.nn.functional as F

    db = torch.empty(n, d, device=device, dtype=torch.float16)
    g = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, n, block):
        m = min(block, n - i)
        db[i : i + m] = F.normalize(torch.randn(m, d, device=device, generator=g), dim=1).half()
    return db


def _cpu_topk(db_cpu: Any, q: Any, k: int, block: int) -> tuple[Any, Any]:
    """float32 top-k of ``q @ db.T`` over float16 ``db_cpu`` (N, D) in row blocks: (scores, indices), (Q, k)."""
    import torch

    qf = q.float().cpu()
    best_s = torch.full((len(qf), k), -float("inf"))
    best_i = torch.zeros((len(qf), k), dtype=torch.long)
    for i in range(0, len(db_cpu), block):
        s = qf @ db_cpu[i : i + block].float().T
        kk = min(k, s.shape[1])
        v, j = torch.topk(s, kk, dim=1)
        cat_s, cat_i = torch.cat([best_s, v], 1), torch.cat([best_i, j + i], 1)
        top = torch.topk(cat_s, k, dim=1)
        best_s, best_i = top.values, torch.gather(cat_i, 1, top.indices)
    return best_s, best_i


def search_check(device: Any, a: argparse.Namespace) -> dict[str, Any]:
    """Latency of matmul + topk over a device-resident float16 map, and top-k vs a CPU float32 reference."""
    import torch
    import torch.nn.functional as F

    n, d, nq, k = a.search_n, a.search_dim, a.search_queries, 10
    t0 = time.perf_counter()
    db = _make_db(n, d, device, seed=3)
    g = torch.Generator(device=device).manual_seed(4)
    true_idx = torch.randint(0, n, (nq,), device=device, generator=g)
    noise = torch.randn(nq, d, device=device, generator=g) * (0.7 / d**0.5)
    q = F.normalize(db[true_idx].float() + noise, dim=1).half()  # cosine ~0.8 with its source row
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict[str, Any] = {"n_tiles": n, "dim": d, "queries": nq, "k": k, "db_bytes": db.numel() * 2}
    out["build_s"] = time.perf_counter() - t0

    def one(j: int):
        return torch.topk(torch.matmul(db, q[j]), k)

    def batch():
        return torch.topk(torch.matmul(q, db.T), k, dim=1)

    with torch.inference_mode():
        counter = iter(range(10**9))
        ts1 = _time_ms(lambda: one(next(counter) % nq), device, max(nq, a.iters), a.warmup)
        tsb = _time_ms(batch, device, a.iters, a.warmup)
        res = batch()
    s1, sb = _stats(ts1, 1), _stats(tsb, nq)
    for b, st in ((1, s1), (nq, sb)):
        st["read_gbs"] = out["db_bytes"] / (st["p50_ms"] * 1e-3) / 1e9
        out[f"batch_{b}"] = {**st, "ms_per_query": st["ms_per_item"], "queries_per_s": st["items_per_s"]}
    out["batch_sizes"] = [1, nq]

    # reference: a few queries in float32 on the CPU, in row blocks (bounded memory)
    t1 = time.perf_counter()
    nc = min(a.search_check, nq)
    db_cpu = db.cpu()
    ref_s, ref_i = _cpu_topk(db_cpu, q[:nc], k, block=131072)
    gpu_i = res.indices[:nc].cpu()
    exact = [bool(torch.equal(gpu_i[j], ref_i[j])) for j in range(nc)]
    same_set = [set(gpu_i[j].tolist()) == set(ref_i[j].tolist()) for j in range(nc)]
    overlap = [len(set(gpu_i[j].tolist()) & set(ref_i[j].tolist())) / k for j in range(nc)]
    # a differing member is a tie when its float32 reference score is within SCORE_TIE_TOL of the k-th score
    explained, gaps = [], [0.0]
    qf = q[:nc].float().cpu()
    for j in range(nc):
        extra = sorted(set(gpu_i[j].tolist()) - set(ref_i[j].tolist()))
        if not extra:
            explained.append(True)
            continue
        sc = qf[j] @ db_cpu[extra].float().T
        gaps.append(float((ref_s[j, -1] - sc).max()))
        explained.append(gaps[-1] <= SCORE_TIE_TOL)
    top1 = gpu_i[:, 0] == true_idx[:nc].cpu()
    out["check"] = {
        "queries": nc,
        "top10_equal_ordered": sum(exact),
        "top10_equal_set": sum(same_set),
        "top10_overlap_mean": float(np.mean(overlap)),
        "differences_are_ties": sum(explained),
        "tie_tolerance": SCORE_TIE_TOL,
        "max_tie_gap": max(gaps),
        "top1_is_source_row": int(top1.sum()),
        "passed": bool(all(explained) and bool(top1.all())),
        "reference_s": time.perf_counter() - t1,
    }
    return out


# -------------------------------------------------------------------------------------------------- reporting


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1 else (f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}")
    return str(x)


def tables(r: dict[str, Any]) -> str:
    """Markdown tables of whatever sections are present."""
    lines = [f"device: {r['meta'].get('gpu', r['meta']['device'])}, torch {r['meta']['torch']}"]
    if "peaks" in r:
        p = r["peaks"]
        lines.append(
            "peaks: "
            + ", ".join(f"{k} {_f(v)}" for k, v in p.items() if k.endswith("tflops") or k.endswith("gbs"))
            + f" (GEMM n={p['gemm_n']})"
        )
    if "encoder" in r:
        e = r["encoder"]
        fl = r.get("encoder_info", {}).get("flops_per_window")
        lines += [
            "",
            f"encoder ({r['encoder_info']['weights']}; {_f(fl / 1e6 if fl else None)} MFLOP/window)",
            "",
            "| mode | batch | p50 ms/call | p95 ms/call | ms/window | windows/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        graphs = [(f"{mode} + CUDA graph", rows) for mode, rows in r.get("cuda_graph", {}).items()]
        for label, rows in [*e.items(), *((m, v) for m, v in graphs if isinstance(v, dict))]:
            for b, s in rows.items():
                lines.append(
                    f"| {label} | {b} | {_f(s['p50_ms'])} | {_f(s['p95_ms'])} | {_f(s['ms_per_window'])} | "
                    f"{_f(s['windows_per_s'])} |"
                )
    if "parity" in r:
        lines += [
            "",
            "| parity vs CPU fp32 | windows | max abs diff | min cosine | min cosine (learned part) | NaN | passed |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for mode, p in r["parity"].items():
            lines.append(
                f"| {mode} | {p['windows']} | {p['max_abs_diff']:.2e} | {p['min_cosine']:.6f} | "
                f"{p['min_cosine_learned']:.6f} | {p['nan']} | {p['passed']} |"
            )
    if "search" in r:
        s = r["search"]
        lines += [
            "",
            f"search: {s['n_tiles']} x {s['dim']} float16 ({s['db_bytes'] / 1e9:.2f} GB), matmul + topk({s['k']})",
            "",
            "| batch | p50 ms/call | p95 ms/call | ms/query | queries/s | read GB/s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for b in s["batch_sizes"]:
            x = s[f"batch_{b}"]
            lines.append(
                f"| {b} | {_f(x['p50_ms'])} | {_f(x['p95_ms'])} | {_f(x['ms_per_query'])} | "
                f"{_f(x['queries_per_s'])} | {_f(x['read_gbs'])} |"
            )
        c = s["check"]
        lines.append(
            f"\ntop-10 vs CPU float32 on {c['queries']} queries: {c['top10_equal_ordered']} identical, "
            f"{c['top10_equal_set']} same set, overlap {c['top10_overlap_mean']:.3f}, {c['differences_are_ties']} "
            f"explained (ties within {c['tie_tolerance']}, largest gap {c['max_tie_gap']:.1e}), "
            f"top-1 = source row {c['top1_is_source_row']}; passed: {c['passed']}"
        )
    if r.get("errors"):
        lines += ["", "errors:"] + [f"- {k}: {v.splitlines()[-1]}" for k, v in r["errors"].items()]
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the defaults that depend on ``--quick`` filled in."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument("--checkpoint", type=Path, default=None, help="sarloc encoder checkpoint (else random weights)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else runs/gpu)")
    p.add_argument("--window-px", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default torch's; quick: 1)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 64 128 256 (quick: 1 4)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per point (default 50, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10, quick 1)")
    p.add_argument("--search-n", type=int, default=None, help="map tiles (default 1000000, quick 4096)")
    p.add_argument("--search-dim", type=int, default=704)
    p.add_argument("--search-queries", type=int, default=64)
    p.add_argument("--search-check", type=int, default=8, help="queries checked against the CPU reference")
    p.add_argument("--skip", nargs="*", default=[], choices=["peaks", "encoder", "graph", "parity", "search"])
    a = p.parse_args(argv)
    a.batches = a.batches or ([1, 2] if a.quick else [1, 8, 32, 64, 128, 256])
    a.iters = a.iters or (2 if a.quick else 50)
    a.threads = a.threads or (1 if a.quick else None)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 10)
    a.search_n = a.search_n or (4096 if a.quick else 1_000_000)
    if a.quick:
        a.search_queries = min(a.search_queries, 8)
        a.search_check = min(a.search_check, 4)
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the sections in order, writing the JSON after each; print tables. 1 when a check fails or errors."""
    a = _parse_args(argv)
    out_dir = a.out or Path(os.environ.get("OUT") or "runs/gpu")

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device} but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    res: dict[str, Any] = {"meta": _meta(device), "config": {k: str(v) for k, v in vars(a).items()}, "errors": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"

    def save() -> None:
        res["total_s"] = time.perf_counter() - t_start
        path.write_text(json.dumps(res, indent=2))

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name in a.skip:
            return
        t = time.perf_counter()
        try:
            res[name if name != "graph" else "cuda_graph"] = fn()
        except Exception:  # one failing section must not lose the others on a rented machine
            res["errors"][name] = traceback.format_exc()
            print(f"[{name}] failed:\n{res['errors'][name]}", file=sys.stderr)
        res.setdefault("section_s", {})[name] = time.perf_counter() - t
        save()
        print(f"[{name}] {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    from sarloc.core.errors import SarlocError

    try:
        model, info = build_encoder(a.checkpoint, seed=0, window_px=a.window_px, calib_batches=2 if a.quick else 8)
    except SarlocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res["encoder_info"] = info
    save()
    section("peaks", lambda: device_peaks(device, a.quick))
    in_ch, embed_dim = info["encoder_config"]["in_channels"], info["encoder_config"]["embed_dim"]
    modes = ["fp32", "tf32", "fp16", "amp"] if device.type == "cuda" else ["fp32", "fp16", "amp"]
    section("encoder", lambda: encoder_latency(model, modes, a.batches, device, a, in_ch))
    if device.type == "cuda":
        section("graph", lambda: cuda_graph_latency(model, ["fp32", "fp16"], [1, 32], device, a, in_ch))
    section("parity", lambda: encoder_parity(model, modes, device, 16, a.window_px, in_ch, embed_dim))
    section("search", lambda: search_check(device, a))
    save()
    print(tables(res))
    print(f"\nwrote {path} ({res['total_s']:.1f} s)")
    failed = bool(res["errors"]) or not all(p["passed"] for p in res.get("parity", {}).values())
    failed = failed or not res.get("search", {}).get("check", {}).get("passed", "search" in a.skip)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
