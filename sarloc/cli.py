"""`sarloc` command line: argument parsing only; every subcommand calls a library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sarloc import __version__
from sarloc.core.errors import ConfigError, SarlocError, brief

logger = logging.getLogger("sarloc.cli")


def _cmd_synth(a: argparse.Namespace) -> int:
    from sarloc.sim.scenes import SynthConfig, write_scene

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
        "refiner_weight": a.refiner_weight if a.refiner_weight is not None else (0.5 if a.refiner else None),
    }
    if enc:
        overrides["encoder"] = enc
    if a.config:
        overrides.update(read_config_json(a.config))
    cfg = resolve_config(a.preset, **overrides)
    ckpt = train(a.scenes, a.out, cfg, exclude=a.exclude, progress=not a.no_progress)
    print(ckpt)
    return 0


def read_config_json(path: str | Path) -> dict:
    """The settings of a ``--config`` JSON file: an object (its keys are checked when the config is built).

    Raises:
        ConfigError: missing, unreadable, not JSON, or not a JSON object (one line naming the file).
    """
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path} not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        detail = brief(e)
        raise ConfigError(f"--config {path}: cannot read JSON ({detail}); fix the file") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings, got {type(obj).__name__}")
    return obj


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
    if res.get("refiner_training"):
        print(f"graph refiner: {res['refiner']} ({res['refiner_training']})")
    print(f"{'scene / queries':42s} " + " ".join(f"{c:>14s}" for c in cols))
    for k, m in res.items():
        if isinstance(m, dict) and "recall@1" in m:
            label = f"{res.get('scene', '')} {k} [{m.get('method', '')}]"
            print(
                f"{label:42s} "
                + " ".join(f"{m[c]:14.3f}" if isinstance(m.get(c), float) else f"{m.get(c, -1):14d}" for c in cols)
            )
    rel = [(k, m) for k, m in res.items() if isinstance(m, dict) and m.get("reliability")]
    for k, m in rel:
        bins = "  ".join(
            f"{b['bin']}: {b['predicted']:.2f}->{b['observed']:.2f} (n={b['n']})" for b in m["reliability"]
        )
        print(
            f"confidence {k}: abstain {m['abstain_rate']:.2f}, false fixes {m['false_fix_rate']:.3f}, "
            f"ECE {m['ece']:.3f} | {bins}"
        )


def _cmd_eval(a: argparse.Namespace) -> int:
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.retrieval import EvalConfig, evaluate_cfog

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
        from sarloc.eval.mappack import evaluate_pack

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
    elif a.refine or a.rerank:
        if not a.checkpoint:
            raise SarlocError("sarloc eval --refine/--rerank needs --checkpoint CKPT")
        from sarloc.trainer.refiner_train import evaluate_checkpoint_refined

        res = evaluate_checkpoint_refined(
            a.checkpoint,
            a.scene,
            ecfg,
            refiner=a.refiner,
            verifier=a.verifier,
            rerank_name=a.rerank,
            threshold=a.threshold,
        )
    elif a.onnx:
        from sarloc.eval.export import evaluate_onnx

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


def _cmd_train_refiner(a: argparse.Namespace) -> int:
    from sarloc.core.scene import find_scenes
    from sarloc.trainer.refiner_train import refine_checkpoint

    scenes = find_scenes(a.data)
    if not scenes:
        raise SarlocError(f"no scene folders (with scene.json) under {' '.join(a.data)}")
    out = refine_checkpoint(a.checkpoint, scenes, a.out, steps=a.steps, queries=a.queries, joint=not a.fresh)
    for p in out.values():
        print(p)
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
    if a.make_model:
        from sarloc.demo import make_demo_model

        print(make_demo_model(steps=a.steps or 400))
        return 0
    from sarloc.demo import run_flight_demo

    rep = run_flight_demo(a.out, mavlink_url=None if a.no_mavlink else a.mavlink)
    print(f"report in {Path(a.out) / 'report.json'}" + (f", track plot {rep['plot']}" if rep.get("plot") else ""))
    print(f"demo took {rep['timings']['total_s']:.0f} s")
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
        from sarloc.backends.layout import model_path, read_model_manifest
        from sarloc.core.artifacts import atomic_write_json
        from sarloc.eval.export import int8_accuracy_guard
        from sarloc.eval.retrieval import EvalConfig

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
        from sarloc.backends.layout import model_path, read_model_manifest

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
    t.add_argument(
        "--refiner",
        action="store_true",
        help="train the graph refiner jointly with the encoder (refiner_weight 0.5; stored in the checkpoint)",
    )
    t.add_argument(
        "--refiner-weight", type=float, help="weight of the joint refiner's listwise loss (implies --refiner)"
    )
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
    e.add_argument(
        "--refine",
        action="store_true",
        help="full path: re-rankers, graph refiner and metric refinement (dense gallery, top-10)",
    )
    e.add_argument(
        "--rerank",
        choices=["none", "qe", "kreciprocal", "spatial", "gnn"],
        help="evaluate only this re-ranker (alone and with metric verification)",
    )
    e.add_argument("--refiner", help="refiner ONNX (default: refiner.onnx beside the checkpoint)")
    e.add_argument("--verifier", help="verifier JSON (default: verifier.json beside the checkpoint)")
    e.add_argument("--threshold", type=float, default=0.5, help="confidence below which a query abstains")
    e.set_defaults(fn=_cmd_eval)

    r = sub.add_parser("train-refiner", help="train the graph refiner and the verifier for a trained encoder")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--data", nargs="+", required=True, help="scene folders (prefer scenes the encoder did not see)")
    r.add_argument("--out", help="output folder (default: beside the checkpoint)")
    r.add_argument(
        "--steps",
        type=int,
        default=600,
        help="refiner training steps; from a jointly trained refiner these fine-tune it, and 0 exports it unchanged",
    )
    r.add_argument(
        "--fresh", action="store_true", help="ignore a jointly trained refiner in the checkpoint; train a new one"
    )
    r.add_argument("--queries", type=int, default=400, help="arbitrary queries per scene")
    r.set_defaults(fn=_cmd_train_refiner)

    f = sub.add_parser("figures", help="retrieval visualisation and 2-D embedding projection")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--baseline-checkpoint", help="a checkpoint trained without alignment, for comparison")
    f.add_argument("--scene", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--window-px", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(fn=_cmd_figures)
    d = sub.add_parser("demo", help="fresh-machine main job: a simulated flight localised by the daemon (CPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--mavlink", default="udpout:127.0.0.1:14550", help="where the daemon sends MAVLink")
    d.add_argument("--no-mavlink", action="store_true")
    d.add_argument("--make-model", action="store_true", help="re-train the shipped demo model (needs sarloc[train])")
    d.add_argument("--steps", type=int, default=None, help="training steps (--make-model)")
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
    _add_runtime_parsers(sub)
    return p


def _cmd_run(a: argparse.Namespace) -> int:
    from sarloc.runtime.daemon import load_run_config, run

    over = {
        "source": a.source,
        "export": a.export,
        "pack": a.pack,
        "out": a.out,
        "backend": a.backend,
        "precision": a.precision,
        "stride_px": a.stride_px,
        "prior_radius_m": a.prior_radius_m,
        "max_strips": a.max_strips,
        "follow": False if a.no_follow else None,
        "resume": True if a.resume else None,
        "mavlink": True if a.mavlink else None,
        "mavlink.url": a.mavlink,
        "mavlink.signing_key_file": a.signing_key,
        "localizer.threshold": a.threshold,
    }
    cfg = load_run_config(a.config, **over)
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)}))
    print(f"records in {Path(cfg.out) / 'records.jsonl'}")
    return 0


def _cmd_replay(a: argparse.Namespace) -> int:
    from sarloc.eval.replay import replay

    res = replay(a.records, a.out, compare=not a.no_compare)
    print(json.dumps(res))
    return 0 if res.get("identical", True) else 2


def _cmd_simulate(a: argparse.Namespace) -> int:
    from sarloc.sim.flight import simulate_flight

    out = simulate_flight(
        a.scene,
        a.out,
        track=a.track,
        heading_deg=a.heading_deg,
        strip_width_px=a.strip_width_px,
        strip_rows=a.strip_rows,
        n_strips=a.n_strips,
        gsd_m=a.gsd_m,
        speed_mps=a.speed_mps,
        seed=a.seed,
        speckle_looks=a.speckle_looks,
        prior_sigma_m=a.prior_sigma_m,
        force=a.force,
    )
    print(out)
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.eval.report import format_report, load_fixes, load_truth, plot_track, score_fixes

    truth = load_truth(a.truth)
    fixes, _ = load_fixes(a.fixes)
    stats = score_fixes(fixes, truth, false_radius_m=a.false_radius_m)
    print(format_report(stats))
    if a.json:
        atomic_write_json(a.json, stats)
    if a.plot:
        basemap, frame = None, None
        if a.scene:
            from sarloc.core.scene import load_scene

            sc = load_scene(a.scene)
            basemap, frame = sc.optical_gray, sc.frame
        print(plot_track(fixes, truth, basemap, frame, a.plot))
    return 0


def _add_runtime_parsers(sub) -> None:
    r = sub.add_parser("run", help="the onboard daemon: strips in, fixes out (JSONL + MAVLink)")
    r.add_argument("--config", help="onboard.toml (flags override it)")
    r.add_argument("--source", help="dir://FOLDER, a strip file, udp://HOST:PORT or tcp://HOST:PORT")
    r.add_argument("--export", help="export folder (SAR encoder, refiner.onnx, verifier.json)")
    r.add_argument("--pack", help="map pack folder")
    r.add_argument("--out", help="output folder (records.jsonl)")
    r.add_argument("--backend", choices=["auto", "ort", "trt"])
    r.add_argument("--precision", choices=["fp32", "int8", "fp16"])
    r.add_argument("--stride-px", type=float, help="window spacing, map pixels")
    r.add_argument("--prior-radius-m", type=float, help="search around the track / INS prior (default: whole map)")
    r.add_argument("--threshold", type=float, help="window confidence threshold")
    r.add_argument("--max-strips", type=int)
    r.add_argument("--no-follow", action="store_true", help="dir:// source: stop when the folder is processed")
    r.add_argument("--resume", action="store_true", help="skip strips already fixed in OUT/records.jsonl")
    r.add_argument("--mavlink", metavar="URL", help="send MAVLink here (e.g. udpout:127.0.0.1:14550)")
    r.add_argument("--signing-key", help="MAVLink2 signing key file (32 bytes or 64 hex; mode 600)")
    r.set_defaults(fn=_cmd_run)

    p = sub.add_parser("replay", help="re-run a recorded session deterministically and compare the fixes")
    p.add_argument("--records", required=True, help="records.jsonl of the session")
    p.add_argument("--out", required=True, help="output folder of the replay")
    p.add_argument("--no-compare", action="store_true")
    p.set_defaults(fn=_cmd_replay)

    s = sub.add_parser("simulate", help="cut SAR strips along a flight path over a scene (with truth)")
    s.add_argument("--scene", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--track", choices=["straight", "lawnmower", "curve"], default="straight")
    s.add_argument("--heading-deg", type=float)
    s.add_argument("--strip-width-px", type=int, default=160)
    s.add_argument("--strip-rows", type=int, default=256)
    s.add_argument("--n-strips", type=int)
    s.add_argument("--gsd-m", type=float, help="strip metres per pixel (default: the scene's)")
    s.add_argument("--speed-mps", type=float, default=30.0)
    s.add_argument("--speckle-looks", type=float, help="add multiplicative speckle with this many looks")
    s.add_argument("--prior-sigma-m", type=float, help="write a noisy INS prior of this sigma into the sidecars")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    s.set_defaults(fn=_cmd_simulate)

    t = sub.add_parser("report", help="score fixes against a simulated flight's truth; plot the track")
    t.add_argument("--fixes", required=True, help="records.jsonl (fix records)")
    t.add_argument("--truth", required=True, help="truth.json of sarloc simulate")
    t.add_argument("--plot", help="track plot PNG")
    t.add_argument("--scene", help="scene folder: draw its optical image under the track")
    t.add_argument("--false-radius-m", type=float, default=200.0, help="a trusted fix farther than this is false")
    t.add_argument("--json", help="write the statistics here")
    t.set_defaults(fn=_cmd_report)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Known user errors print one line and return 1; bugs raise."""
    from sarloc.core.log import setup_logging

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
