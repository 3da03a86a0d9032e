"""benchmarks/bench_limits.py (FLOP counter, GEMM peak, bandwidth, report) and the CPU mode of gpu_check.py."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_ONNX = ROOT / "sarloc" / "demo_model" / "sar_encoder.onnx"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bl():
    return _load("bench_limits")


def _handmade_model(path: Path) -> Path:
    """X (N,3,8,8) -> Conv 3x3 pad 1 -> Relu -> depthwise Conv 3x3 stride 2 -> Flatten -> Gemm (transB) -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=4),
        helper.make_node("Flatten", ["y2"], ["f"]),
        helper.make_node("Gemm", ["f", "b", "c"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "m"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])],
        [init("w1", (4, 3, 3, 3)), init("w2", (4, 1, 3, 3)), init("b", (10, 64)), init("c", (10,)), init("m", (10, 5))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_onnx_flops_handmade_exact(bl, tmp_path):
    path = _handmade_model(tmp_path / "m.onnx")
    conv1 = 2 * 4 * 3 * 3 * 3 * 8 * 8  # Cout * Cin * kh * kw * Hout * Wout
    conv2 = 2 * 4 * 1 * 3 * 3 * 4 * 4  # depthwise: Cin/group = 1, stride 2 -> 4x4
    gemm = 2 * 1 * 10 * 64
    matmul = 2 * 1 * 5 * 10
    r = bl.onnx_flops(path)
    assert r["by_op"] == {"Conv": conv1 + conv2, "Gemm": gemm, "MatMul": matmul}
    assert r["flops"] == conv1 + conv2 + gemm + matmul == 16356
    assert r["macs"] == r["flops"] / 2
    assert r["depthwise_conv_flops"] == conv2
    assert r["uncounted_ops"] == ["Flatten", "Relu"]
    assert r["unresolved"] == []
    assert r["params"] == 4 * 27 + 4 * 9 + 640 + 10 + 50
    assert bl.onnx_flops(path, batch=3)["flops"] == 3 * 16356


def test_onnx_flops_demo_encoder_matches_torch(bl):
    r = bl.onnx_flops(DEMO_ONNX)
    # 44.8 MFLOP per 64x64 window: below the 1e8 first guessed, so the range is 1e7..1e11
    assert 1e7 < r["flops"] < 1e11
    assert set(r["by_op"]) == {"Conv", "Gemm"} and r["unresolved"] == []
    assert bl.onnx_flops(DEMO_ONNX, batch=4)["flops"] == 4 * r["flops"]
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from sarloc.trainer.models.encoder import CrossModalEncoder, EncoderConfig

    cfg = json.loads(DEMO_ONNX.with_suffix(".json").read_text())["encoder"]
    model = CrossModalEncoder(EncoderConfig(**{**cfg, "pretrained": False})).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.embed(torch.zeros(1, cfg["in_channels"], 64, 64), "sar")
    assert r["flops"] == fc.get_total_flops()


def test_peak_gflops_measures_one_thread_and_all_threads(bl, monkeypatch):
    calls = []

    def gemm(threads, n, seconds):
        calls.append((threads, n, seconds))
        return {"gflops": 10.0 * threads}

    monkeypatch.setattr(bl, "_n_threads", lambda: 4)
    monkeypatch.setattr(bl, "_gemm_subprocess", gemm)
    p = bl.peak_gflops(seconds=0.5, n=64)
    assert calls == [(1, 64, 0.5), (4, 64, 0.5)]
    assert p == {"threads_1": 10.0, "threads_all": 40.0, "n_threads_all": 4, "n": 64, "seconds": 0.5}


def test_gemm_subprocess_sets_the_threads_and_counts_2n3_flops(bl, monkeypatch):
    r = bl._gemm_subprocess(1, 128, 0.02)  # a real product in a child process
    assert r["reps"] >= 3 and r["gflops"] == pytest.approx(2 * 128**3 / r["best_s"] / 1e9)
    assert 0.01 < r["gflops"] < 1e5  # any CPU's float32 GEMM on one thread, not a unit error
    seen = {}

    def run(cmd, env, **kw):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"gflops": 1.0}\n')

    monkeypatch.setattr(bl.subprocess, "run", run)
    bl._gemm_subprocess(3, 16, 0.01)
    assert all(seen[v] == "3" for v in bl.THREAD_VARS)


def test_memory_bandwidth_is_bytes_over_the_best_time(bl, monkeypatch):
    """A fake clock: every reading costs 1 ms, each read kernel a known time (max fastest): exact GB/s."""
    lock = threading.Lock()
    clock = {"t": 0.0}
    sizes = {}

    def advance(dt):
        with lock:
            clock["t"] += dt
            return clock["t"]

    def kernel(name, cost):
        def k(x):
            sizes.setdefault(name, []).append(x.nbytes)
            advance(cost)

        return k

    costs = {"sum": 4e-3, "max": 1e-3, "bitwise_or": 2e-3}
    monkeypatch.setattr(bl, "READ_KERNELS", {n: kernel(n, c) for n, c in costs.items()})
    monkeypatch.setattr(bl, "time", SimpleNamespace(perf_counter=lambda: advance(1e-3)))
    monkeypatch.setattr(bl, "_n_threads", lambda: 2)
    b = bl.memory_bandwidth_gbs(size_mb=1, repeats=2)
    nbytes = 2**20
    assert b["read_1t_by_kernel"] == pytest.approx({n: nbytes / (c + 1e-3) / 1e9 for n, c in costs.items()})
    assert b["read_kernel"] == "max" and b["read_1t"] == pytest.approx(nbytes / 2e-3 / 1e9)
    # all threads: the fastest kernel over one chunk per thread, together the whole array (2 chunks, 1 ms each)
    assert b["read_all"] == pytest.approx(nbytes / 3e-3 / 1e9)
    assert sum(sizes["max"][-2:]) == nbytes and len(sizes["max"]) == 3 + 3 * 2
    # copy: half the array read and written (np.copyto itself costs no fake time)
    assert b["copy_1t"] == pytest.approx(2 * (nbytes / 2) / 1e-3 / 1e9)
    assert b["n_threads_all"] == 2 and b["size_mb"] == 1 and b["repeats"] == 2


def test_real_peak_and_bandwidth_are_plausible(bl):
    p = bl.peak_gflops(seconds=0.05, n=256)
    assert p["n_threads_all"] >= 1
    for k in ("threads_1", "threads_all"):
        assert math.isfinite(p[k]) and 0.01 < p[k] < 1e6, (k, p[k])  # GFLOP/s: not a unit error
    b = bl.memory_bandwidth_gbs(size_mb=16, repeats=2)
    for k in ("read_1t", "read_all", "copy_1t"):
        assert math.isfinite(b[k]) and 0.05 < b[k] < 1e5, (k, b[k])  # GB/s: not a unit error
    assert b["read_1t"] == max(b["read_1t_by_kernel"].values()) == b["read_1t_by_kernel"][b["read_kernel"]]


def test_main_reads_benchmark_json_and_writes_report(bl, tmp_path, capsys):
    lat = tmp_path / "latency.json"
    lat.write_text(
        json.dumps(
            {"meta": {"config": {"threads": 1}}, "encoder": {"ort_fp32": {"1": {"p50": 2.0}, "32": {"p50": 1.0}}}}
        )
    )
    search = tmp_path / "results.json"
    rows = [
        {"n_tiles": 100000, "dim": 704, "method": "exact", "p50_ms": 20.0},
        {"n_tiles": 100000, "dim": 704, "method": "faiss-flat", "p50_ms": 12.0},
        {"n_tiles": 100000, "dim": 704, "method": "ivf", "p50_ms": 2.0},  # not a full scan: no floor row
    ]
    search.write_text(json.dumps({"omp_num_threads": "1", "results": rows}))
    out = tmp_path / "limits.json"
    argv = ["--latency-json", str(lat), "--search-json", str(search), "--export-json", str(tmp_path / "none.json")]
    argv += ["--encoder-ms-per-window", "3.0", "--search-ms-per-query", "5.0", "--search-tiles", "1000"]
    argv += ["--search-dim", "128", "--seconds", "0.05", "--gemm-n", "256", "--bandwidth-mb", "16", "--out", str(out)]
    assert bl.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["hardware"]["cpu_count"] >= 1 and r["versions"]["onnx"]
    enc = {row["what"]: row for row in r["encoder"]["rows"]}
    assert set(enc) == {"latency ort_fp32 b1", "latency ort_fp32 b32", "encoder ms/window (given)"}
    row = enc["latency ort_fp32 b1"]
    floor = r["encoder"]["flops"] / (r["peak_gflops"]["threads_1"] * 1e9) * 1e3
    assert row["floor_1t_ms"] == pytest.approx(floor) and row["ratio_1t"] == pytest.approx(2.0 / floor)
    s = {row["what"]: row for row in r["search"]["rows"]}
    assert len(s) == 3 and not any("ivf" in k for k in s)
    flat = next(v for k, v in s.items() if "faiss-flat" in k)
    assert flat["bytes_per_query"] == 100000 * 704 * 4
    exact = next(v for k, v in s.items() if "exact" in k)
    assert exact["bytes_per_query"] == 100000 * 704 * 2
    assert exact["bandwidth_floor_1t_ms"] == pytest.approx(
        exact["bytes_per_query"] / r["bandwidth_gbs"]["read_1t"] / 1e6
    )
    assert "| quantity |" in capsys.readouterr().out


def test_main_missing_model_is_one_line_error(bl, tmp_path, capsys):
    assert bl.main(["--onnx", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "x.json")]) == 1
    assert "not found" in capsys.readouterr().err


def test_gpu_check_runs_on_cpu_quick(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    gc = _load("gpu_check")
    monkeypatch.setenv("OUT", str(tmp_path))  # the default output folder
    threads = torch.get_num_threads()
    try:
        assert gc.main(["--device", "cpu", "--quick"]) == 0  # quick mode sets 1 intra-op thread
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["errors"] == {}
    assert r["encoder_info"]["out_dim"] == 704 and r["encoder_info"]["flops_per_window"] > 1e7
    for mode in ("fp32", "fp16", "amp"):
        assert r["encoder"][mode]["1"]["p50_ms"] > 0 and r["encoder"][mode]["2"]["windows_per_s"] > 0
        assert r["parity"][mode]["passed"] and r["parity"][mode]["nan"] == 0
    assert r["parity"]["fp32"]["max_abs_diff"] <= 1e-5
    c = r["search"]["check"]
    assert c["passed"] and c["top1_is_source_row"] == c["queries"] and c["top10_overlap_mean"] > 0.9
    assert r["search"]["batch_1"]["ms_per_query"] > 0 and r["peaks"]["gemm_fp32_tflops"] > 0
