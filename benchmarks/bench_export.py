"""Export benchmark: per artefact (PyTorch eager, ONNX Runtime FP32, ONNX Runtime INT8 Q/DQ) the file size,
retrieval on a held-out scene and CPU latency per window at batch 1 and 32, all in one run.

    python benchmarks/bench_export.py --checkpoint runs/loso/france_s1s2/wasserstein/checkpoint.pt \\
        --scene ../shared/data/france_s1s2 --calib-scenes ../shared/data --out runs/bench_export

The calibration set is drawn from ``--calib-scenes`` minus the held-out scene. Prints a markdown table and
writes ``results.json`` (hardware, versions, artefact hashes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _latency_ms_per_window(fn, x: np.ndarray, repeats: int) -> dict[str, float]:
    for _ in range(3):
        fn(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t0) * 1e3 / len(x))
    ts = np.asarray(ts)
    return {
        "p50": float(np.percentile(ts, 50)),
        "p95": float(np.percentile(ts, 95)),
        "p99": float(np.percentile(ts, 99)),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--scene", required=True, help="held-out scene for accuracy")
    p.add_argument("--calib-scenes", nargs="+", required=True)
    p.add_argument("--out", default="runs/bench_export")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def _export_and_calibrate(a: argparse.Namespace, export_dir: Path) -> dict:
    """Export the checkpoint to ONNX and calibrate INT8 on ``--calib-scenes`` minus the held-out scene."""
    from sarloc.calib.quantize import calibrate_export
    from sarloc.core.scene import find_scenes
    from sarloc.export.onnx import export_checkpoint

    exp = export_checkpoint(a.checkpoint, export_dir, scene_dir=a.scene)
    held = Path(a.scene).resolve()
    calib = [s for s in find_scenes(a.calib_scenes) if s.resolve() != held]
    calibrate_export(export_dir, calib)
    return exp


def _artefacts(a: argparse.Namespace, model, export_dir: Path) -> tuple[dict[str, tuple], dict[str, Path]]:
    """The embed functions of each artefact, and the file each one is."""
    from sarloc.backends.encoders import load_encoder_pair
    from sarloc.trainer.checkpoint import checkpoint_embed_fns

    arts: dict[str, tuple] = {"pytorch_eager": checkpoint_embed_fns(model)}
    for prec in ("fp32", "int8"):
        arts[f"ort_{prec}"] = load_encoder_pair(export_dir, prec, "ort", threads=a.threads)
    files = {
        "pytorch_eager": Path(a.checkpoint),
        "ort_fp32": export_dir / "sar_encoder.onnx",
        "ort_int8": export_dir / "sar_encoder.int8.onnx",
    }
    return arts, files


def _header(a: argparse.Namespace, scene, exp: dict, versions: dict[str, str]) -> dict:
    """``results.json`` without its artefacts: hardware, versions (torch, onnxruntime), checkpoint, scene, export."""
    from sarloc.core.artifacts import sha256_file

    return {
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **versions,
        },
        "checkpoint_sha256": sha256_file(a.checkpoint),
        "scene": scene.name,
        "threads": a.threads,
        "export": {k: v for k, v in exp.items() if isinstance(v, (str, int, float, dict))},
        "artefacts": {},
    }


def _measure(fns: tuple, f: Path, export_dir: Path, scene, q, wins, cfg, ecfg, repeats: int) -> dict:
    """Size, hash, retrieval (tiles and dense) and latency of one artefact."""
    import torch

    from sarloc.core.artifacts import sha256_file
    from sarloc.eval.retrieval import evaluate_dense, evaluate_embeddings

    fs, fo = fns
    with torch.no_grad():
        tiles = evaluate_embeddings(scene, q, fs, fo, cfg.preprocess, ecfg)
        dense = evaluate_dense(scene, q, fs, fo, cfg.preprocess, ecfg, 8)
        lat = {f"batch{b}": _latency_ms_per_window(fs, wins[:b], repeats) for b in (1, 32)}
    if not f.is_file():
        f = next(export_dir.glob("sar_encoder*int8*.onnx"), f)
    return {
        "file": str(f),
        "size_kb": f.stat().st_size / 1024,
        "sha256": sha256_file(f),
        "tiles": {k: tiles[k] for k in ("recall@1", "recall@10", "median_error_m")},
        "dense": {k: dense[k] for k in ("recall@1", "recall@10", "median_error_m")},
        "latency_ms_per_window": lat,
    }


def _print_table(res: dict, scene, q, a: argparse.Namespace, out: Path) -> None:
    print(f"\nheld-out {scene.name}, {len(q.origins)} arbitrary queries, {a.threads} threads, {platform.machine()}")
    print("| artefact | size (KB) | R@1 tiles | R@10 tiles | R@1 dense | R@10 dense | ms/window b=1 | ms/window b=32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res["artefacts"].items():
        print(
            f"| {name} | {r['size_kb']:.0f} | {r['tiles']['recall@1']:.3f} | {r['tiles']['recall@10']:.3f} | "
            f"{r['dense']['recall@1']:.3f} | {r['dense']['recall@10']:.3f} | "
            f"{r['latency_ms_per_window']['batch1']['p50']:.2f} | {r['latency_ms_per_window']['batch32']['p50']:.3f} |"
        )
    print(json.dumps({"results": str(out / "results.json")}))


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)

    import onnxruntime
    import torch

    from sarloc.core.artifacts import atomic_write_json
    from sarloc.core.log import setup_logging
    from sarloc.core.preprocess import crop_windows, prepare_windows
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.retrieval import EvalConfig
    from sarloc.trainer.checkpoint import load_checkpoint

    setup_logging()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    export_dir = out / "onnx"
    exp = _export_and_calibrate(a, export_dir)

    model, cfg, _ = load_checkpoint(a.checkpoint)
    scene = load_scene(a.scene)
    ecfg = EvalConfig(window_px=cfg.window_px, queries=a.queries)
    q = make_queries(scene, "arbitrary", ecfg.window_px, ecfg.queries, 0)
    arts, files = _artefacts(a, model, export_dir)
    wins = prepare_windows(crop_windows(scene.sar_gray, q.origins[:32], ecfg.window_px), cfg.preprocess)
    res = _header(a, scene, exp, {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__})
    for name, fns in arts.items():
        res["artefacts"][name] = _measure(fns, files[name], export_dir, scene, q, wins, cfg, ecfg, a.repeats)
    atomic_write_json(out / "results.json", res)
    _print_table(res, scene, q, a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
