"""`sarloc` command line: argument parsing only; every subcommand calls a library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sarloc import __version__
from sarloc.errors import SarlocError

logger = logging.getLogger("sarloc.cli")


def _cmd_synth(a: argparse.Namespace) -> int:
    from sarloc.synth import SynthConfig, write_scene

    cfg = SynthConfig(width_px=a.width_px, height_px=a.height_px, gsd_m=a.gsd_m, seed=a.seed)
    out = write_scene(Path(a.out), cfg, force=a.force)
    print(out)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from sarloc.trainer.config import resolve_config
    from sarloc.trainer.loop import train

    enc: dict = {}
    if a.from_scratch:
        enc["pretrained"] = False
    overrides = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "align": a.align,
        "seed": a.seed,
        "max_minutes": a.max_minutes,
        "window_px": a.window_px,
        "threads": a.threads,
        "metric_loss": a.loss,
    }
    if enc:
        overrides["encoder"] = enc
    if a.config:
        try:
            overrides.update(json.loads(Path(a.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SarlocError(f"--config {a.config}: cannot read JSON ({e})") from None
    cfg = resolve_config(a.preset, **overrides)
    ckpt = train(a.scenes, a.out, cfg, exclude=a.exclude, progress=not a.no_progress)
    print(ckpt)
    return 0


def _print_table(res: dict) -> None:
    cols = (
        "recall@1",
        "recall@5",
        "recall@10",
        "median_error_m",
        "p90_error_m",
        "within_100m",
        "queries",
        "ms_per_query",
    )
    print(f"{'scene / queries':42s} " + " ".join(f"{c:>14s}" for c in cols))
    for k, m in res.items():
        if isinstance(m, dict) and "recall@1" in m:
            label = f"{res.get('scene', '')} {k} [{m.get('method', '')}]"
            print(
                f"{label:42s} " + " ".join(f"{m[c]:14.3f}" if isinstance(m[c], float) else f"{m[c]:14d}" for c in cols)
            )


def _cmd_eval(a: argparse.Namespace) -> int:
    from sarloc.artifacts import atomic_write_json
    from sarloc.evaluation import EvalConfig, evaluate_cfog
    from sarloc.scene import load_scene, make_queries

    ecfg = EvalConfig(window_px=a.window_px, stride_px=a.stride_px, queries=a.queries, seed=a.seed)
    if a.method == "cfog":
        scene = load_scene(a.scene)
        res: dict = {"scene": scene.name, "method": "cfog"}
        for kind in ("aligned", "arbitrary"):
            q = make_queries(scene, kind, ecfg.window_px, ecfg.queries, ecfg.seed)
            res[kind] = evaluate_cfog(scene, q, ecfg)
    elif getattr(a, "pack", None):
        if not a.onnx:
            raise SarlocError("sarloc eval --pack PACK needs --onnx EXPORT_DIR (its SAR encoder queries the pack)")
        from sarloc.mappack.evaluate import evaluate_pack

        res = evaluate_pack(
            a.pack,
            a.onnx,
            a.scene,
            ecfg,
            precision=a.precision,
            backend=a.backend,
            prior_radius_m=a.prior_radius_m,
            ann=a.ann,
        )
    elif a.onnx:
        from sarloc.export.evaluate import evaluate_onnx

        res = evaluate_onnx(a.onnx, a.scene, ecfg, precision=a.precision, backend=a.backend)
    else:
        if not a.checkpoint:
            raise SarlocError("sarloc eval --method encoder needs --checkpoint CKPT (or use --method cfog)")
        from sarloc.trainer.loop import evaluate_checkpoint

        res = evaluate_checkpoint(a.checkpoint, a.scene, ecfg)
    _print_table(res)
    if a.json:
        atomic_write_json(a.json, res)
        print(f"wrote {a.json}")
    return 0


def _cmd_figures(a: argparse.Namespace) -> int:
    from sarloc.trainer.figures import embedding_projection, retrieval_figure

    out = Path(a.out)
    paths = [retrieval_figure(a.checkpoint, a.scene, out / "retrieval.png", window_px=a.window_px, seed=a.seed)]
    paths.append(
        embedding_projection(
            a.checkpoint,
            a.scene,
            out / "embedding_projection.png",
            baseline_checkpoint=a.baseline_checkpoint,
            window_px=a.window_px,
        )
    )
    for p in paths:
        print(p)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from sarloc.demo import run_demo

    res = run_demo(a.out, steps=a.steps, seed=a.seed)
    _print_table(res)
    print(f"results in {Path(a.out) / 'eval.json'}")
    return 0


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

    out = calibrate_export(
        a.onnx_dir, a.scenes, n_per_scene=a.n_per_scene, seed=a.seed, calib_dir=a.calib_dir, calibrate_method=a.method
    )
    for p in out.values():
        print(p)
    if a.guard_scene:
        from sarloc.artifacts import atomic_write_json
        from sarloc.evaluation import EvalConfig
        from sarloc.export.evaluate import int8_accuracy_guard
        from sarloc.export.layout import model_path, read_model_manifest

        w = int(read_model_manifest(model_path(a.onnx_dir, "sar"))["window_px"])
        guard = int8_accuracy_guard(a.onnx_dir, a.guard_scene, EvalConfig(window_px=w, queries=a.queries))
        atomic_write_json(Path(a.onnx_dir) / "int8_guard.json", guard)
        print(f"INT8 vs FP32 recall@1 on {guard['scene']}: {guard['int8']} vs {guard['fp32']}")
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


def _cmd_map_build(a: argparse.Namespace) -> int:
    from sarloc.mappack.build import MapPackConfig, build_map_pack

    cfg = MapPackConfig(
        tile_m=a.tile_m,
        stride_m=a.stride_m,
        stride_px=a.stride_px,
        min_valid_frac=a.min_valid,
        batch=a.batch,
        block_tiles=a.block_tiles,
        metric_crs=a.metric_crs,
        ann=a.ann,
        ann_nlist=a.nlist,
    )
    path = build_map_pack(
        a.basemap, a.encoder, a.out, cfg, progress=not a.no_progress, threads=a.threads, force=a.force
    )
    print(path)
    return 0


def _cmd_map_info(a: argparse.Namespace) -> int:
    from sarloc.mappack.pack import pack_info

    info = pack_info(a.pack)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:22s} {v}")
    return 0


def _cmd_map_verify(a: argparse.Namespace) -> int:
    from sarloc.mappack.pack import MapPack, verify_map_pack

    man = verify_map_pack(a.pack)
    if a.encoder:
        from sarloc.export.layout import model_path, read_model_manifest

        p = Path(a.encoder)
        MapPack(Path(a.pack), sar_manifest=read_model_manifest(model_path(p, "sar") if p.is_dir() else p))
    print(f"{a.pack}: OK ({man['tiles']['count']} tiles, {len(man['files'])} files match their sha256)")
    return 0


def _add_map_parser(sub) -> None:
    m = sub.add_parser("map", help="map packs: build, show and verify reference-embedding packs")
    msub = m.add_subparsers(dest="map_cmd", required=True)
    b = msub.add_parser("build", help="tile a basemap (GeoTIFF in any CRS, or a scene folder) and embed every tile")
    b.add_argument("--basemap", required=True, help="GeoTIFF or scene folder")
    b.add_argument("--encoder", required=True, help="EXPORT/optical_encoder.onnx (or an export folder)")
    b.add_argument("--out", required=True, help="pack folder")
    b.add_argument("--tile-m", type=float, help="tile side on the ground, metres (default: native resolution)")
    b.add_argument("--stride-m", type=float, help="tile step, metres (default: tile / 8)")
    b.add_argument("--stride-px", type=int, help="tile step, pixels (default: window / 8)")
    b.add_argument("--min-valid", type=float, default=0.5, help="skip tiles with less valid (non-nodata) area")
    b.add_argument("--metric-crs", help="metric CRS of the grid (default: own if projected, else UTM of centre)")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--block-tiles", type=int, default=32, help="tiles per side of a read block")
    b.add_argument("--ann", action="store_true", help="also build the approximate (IVF) index")
    b.add_argument("--nlist", type=int, help="IVF lists (default: about sqrt(tiles))")
    b.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    b.add_argument("--force", action="store_true", help="replace an existing pack")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=_cmd_map_build)
    i = msub.add_parser("info", help="show a pack's manifest summary")
    i.add_argument("pack")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_map_info)
    v = msub.add_parser("verify", help="check every file's sha256 (and, with --encoder, the encoder match)")
    v.add_argument("pack")
    v.add_argument("--encoder", help="export folder or SAR encoder .onnx that will query the pack")
    v.set_defaults(fn=_cmd_map_verify)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(prog="sarloc", description="GNSS-free UAV localisation from SAR imagery.")
    p.add_argument("--version", action="version", version=f"sarloc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="generate a synthetic co-registered SAR/optical scene folder")
    s.add_argument("--out", required=True, help="scene folder to create")
    s.add_argument("--width-px", type=int, default=768)
    s.add_argument("--height-px", type=int, default=768)
    s.add_argument("--gsd-m", type=float, default=10.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty folder")
    s.set_defaults(fn=_cmd_synth)

    t = sub.add_parser("train", help="train the cross-modal encoder (torchrun for multi-GPU/multi-process)")
    t.add_argument("--scenes", nargs="+", required=True, help="scene folders or folders of scene folders")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", default="default", help="default | loso | quick | smoke")
    t.add_argument("--exclude", nargs="*", default=None, help="scene names to hold out")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--window-px", type=int)
    t.add_argument("--align", choices=["none", "wasserstein", "classifier"])
    t.add_argument("--loss", choices=["infonce", "triplet", "both"])
    t.add_argument("--from-scratch", action="store_true", help="no ImageNet initialisation")
    t.add_argument("--max-minutes", type=float)
    t.add_argument("--threads", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--config", help="JSON file of config overrides (nested keys allowed)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate retrieval on a scene (encoder checkpoint or the classical baseline)")
    e.add_argument("--scene", required=True)
    e.add_argument("--checkpoint")
    e.add_argument("--method", choices=["encoder", "cfog"], default="encoder")
    e.add_argument("--window-px", type=int, default=64)
    e.add_argument("--stride-px", type=int, default=None, help="gallery stride (default: window, no overlap)")
    e.add_argument("--queries", type=int, default=200)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write the metrics here")
    e.add_argument("--onnx", metavar="DIR", help="evaluate the exported models of DIR (sarloc export) instead")
    e.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32", help="with --onnx")
    e.add_argument("--backend", choices=["ort", "trt", "auto"], default="ort", help="with --onnx: runtime")
    e.add_argument("--pack", metavar="PACK", help="with --onnx: search this map pack instead of tiling the scene")
    e.add_argument("--prior-radius-m", type=float, help="with --pack: simulated position prior of this radius")
    e.add_argument("--ann", action="store_true", help="with --pack: use the pack's approximate index")
    e.set_defaults(fn=_cmd_eval)

    f = sub.add_parser("figures", help="retrieval visualisation and 2-D embedding projection")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--baseline-checkpoint", help="a checkpoint trained without alignment, for comparison")
    f.add_argument("--scene", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--window-px", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(fn=_cmd_figures)
    d = sub.add_parser("demo", help="fresh-machine main job: synth scenes, short training, evaluation")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the 'quick' preset)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)

    x = sub.add_parser("export", help="export the encoders to ONNX (one per modality), verified against PyTorch")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="export folder")
    x.add_argument("--scene", help="scene whose real windows are used for the parity check (default: generated)")
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto")
    x.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff on unit-norm embeddings")
    x.set_defaults(fn=_cmd_export)

    c = sub.add_parser("calib", help="calibration set + INT8 Q/DQ models beside the exported FP32 ones")
    c.add_argument("--scenes", nargs="+", required=True, help="scene folders or folders of scene folders")
    c.add_argument("--onnx-dir", required=True, help="export folder (sarloc export)")
    c.add_argument("--n-per-scene", type=int, default=32, help="windows per scene and modality")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--calib-dir", help="calibration set folder (default: ONNX_DIR/calib)")
    c.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    c.add_argument("--guard-scene", help="held-out scene: fail when INT8 loses > 1 point of recall@1 vs FP32")
    c.add_argument("--queries", type=int, default=200, help="queries per kind for --guard-scene")
    c.set_defaults(fn=_cmd_calib)

    b = sub.add_parser("build-engine", help="build a TensorRT engine from an exported ONNX model (GPU machine)")
    b.add_argument("--onnx", required=True, help="M.onnx or M.int8.onnx written by sarloc export / calib")
    b.add_argument("--out", help="engine file (default: M.engine, M.fp16.engine with --fp16)")
    b.add_argument("--fp16", action="store_true", help="allow FP16 kernels (TensorRT 10.x builder flag)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="runtime batch sizes")
    b.add_argument("--timing-cache-dir", help="folder of timing caches (keyed by TensorRT, GPU, ONNX, precision)")
    b.add_argument("--device", type=int, default=0, help="CUDA device index")
    b.set_defaults(fn=_cmd_build_engine)
    _add_map_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point. Known user errors print one line and return 1; bugs raise."""
    from sarloc.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(args.fn(args) or 0)
    except SarlocError as e:
        print(f"sarloc {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sarloc {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
