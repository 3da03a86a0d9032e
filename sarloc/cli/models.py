"""Deployable models: ``sarloc export``, ``sarloc calib``, ``sarloc build-engine``."""

from __future__ import annotations

import argparse
from pathlib import Path

from sarloc.cli.common import add_command
from sarloc.core.errors import SarlocError


def _cmd_export(a: argparse.Namespace) -> int:
    from sarloc.export.onnx import export_checkpoint

    index = export_checkpoint(
        a.checkpoint, a.out, opset=a.opset, scene_dir=a.scene, tolerance=a.tolerance, exporter=a.exporter
    )
    for m in index["models"].values():
        par = m["parity"]
        print(f"{Path(a.out) / m['file']}  parity max |diff| {par['max_abs_diff']:.1e} <= {par['tolerance']:.0e}")
    return 0


def _cmd_calib(a: argparse.Namespace) -> int:
    from sarloc.calib.quantize import calibrate_export
    from sarloc.core.scene import find_scenes

    scenes = find_scenes(a.scenes)
    if a.guard_scene:  # the guard judges INT8 on a scene the calibration did not see
        guard = Path(a.guard_scene).resolve()
        scenes = [s for s in scenes if s.resolve() != guard]
        if not scenes:
            raise SarlocError("--scenes holds only the --guard-scene: calibrate on other scenes than the guard")
    out = calibrate_export(
        a.export, scenes, n_per_scene=a.n_per_scene, seed=a.seed, calib_dir=a.calib_dir, calibrate_method=a.method
    )
    for p in out.values():
        print(p)
    if a.guard_scene:
        from sarloc.backends.layout import model_path, read_model_manifest
        from sarloc.core.artifacts import atomic_write_json
        from sarloc.eval.export import int8_accuracy_guard
        from sarloc.eval.retrieval import EvalConfig

        w = int(read_model_manifest(model_path(a.export, "sar"))["window_px"])
        guard = int8_accuracy_guard(a.export, a.guard_scene, EvalConfig(window_px=w, queries=a.queries))
        atomic_write_json(Path(a.export) / "int8_guard.json", guard)
        for kind in guard["fp32"]:
            print(
                f"recall@1 on {guard['scene']} ({kind} queries): INT8 {guard['int8'][kind]:.3f}, "
                f"FP32 {guard['fp32'][kind]:.3f}"
            )
        if not guard["passed"]:
            raise SarlocError(
                f"INT8 loses {100 * guard['drop']:.1f} points of recall@1 against FP32 on {guard['scene']} "
                f"(limit {100 * guard['max_drop']:.0f}); do not deploy the INT8 models (see int8_guard.json)"
            )
    return 0


def _cmd_build_engine(a: argparse.Namespace) -> int:
    from sarloc.export.engine import build_engine

    out = build_engine(
        a.onnx,
        a.out,
        fp16=a.fp16,
        batch_sizes=tuple(a.batch_sizes),
        timing_cache_dir=a.timing_cache_dir,
        device=a.device,
    )
    print(out)
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add the export, calib, build-engine subcommand(s) to ``sub``."""
    x = add_command(sub, "export", common, "export the encoders to ONNX (one per modality), verified against PyTorch")
    x.add_argument("--checkpoint", required=True, help="encoder checkpoint (sarloc train)")
    x.add_argument("--out", required=True, help="export folder")
    x.add_argument("--scene", help="scene whose real windows are used for the parity check (default: generated)")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset")
    x.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto", help="PyTorch ONNX exporter")
    x.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff on unit-norm embeddings")
    x.set_defaults(fn=_cmd_export)

    c = add_command(sub, "calib", common, "calibration set + INT8 Q/DQ models beside the exported FP32 ones")
    c.add_argument("--scenes", nargs="+", required=True, help="scene folders or folders of scene folders")
    c.add_argument("--export", metavar="DIR", required=True, help="export folder (sarloc export)")
    c.add_argument("--n-per-scene", type=int, default=32, help="windows per scene and modality")
    c.add_argument("--seed", type=int, default=0, help="random seed of the calibration windows")
    c.add_argument("--calib-dir", help="calibration set folder (default: DIR/calib)")
    c.add_argument(
        "--method", choices=["minmax", "entropy", "percentile"], default="minmax", help="activation range calibration"
    )
    c.add_argument(
        "--guard-scene",
        help="held-out scene (left out of the calibration): fail when INT8 loses > 1 point of recall@1 vs FP32",
    )
    c.add_argument("--queries", type=int, default=200, help="queries per kind for --guard-scene")
    c.set_defaults(fn=_cmd_calib)

    b = add_command(sub, "build-engine", common, "build a TensorRT engine from an exported ONNX model (GPU machine)")
    b.add_argument("--onnx", required=True, help="M.onnx or M.int8.onnx written by sarloc export / calib")
    b.add_argument("--out", help="engine file (default: M.engine, M.fp16.engine with --fp16)")
    b.add_argument("--fp16", action="store_true", help="allow FP16 kernels (TensorRT 10.x builder flag)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="runtime batch sizes")
    b.add_argument("--timing-cache-dir", help="folder of timing caches (keyed by TensorRT, GPU, ONNX, precision)")
    b.add_argument("--device", type=int, default=0, help="CUDA device index")
    b.set_defaults(fn=_cmd_build_engine)
