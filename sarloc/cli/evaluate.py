"""Measuring: ``sarloc eval``, ``sarloc report``, ``sarloc replay``."""

from __future__ import annotations

import argparse
import json

from sarloc.cli.common import add_command, print_table
from sarloc.core.errors import SarlocError


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
        if not a.export:
            raise SarlocError("--pack PACK needs --export DIR (the export whose SAR encoder queries the pack)")
        from sarloc.eval.mappack import evaluate_pack

        res = evaluate_pack(
            a.pack,
            a.export,
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
    elif a.export:
        from sarloc.eval.export import evaluate_onnx

        res = evaluate_onnx(a.export, a.scene, ecfg, precision=a.precision, backend=a.backend)
    else:
        if not a.checkpoint:
            raise SarlocError("sarloc eval --method encoder needs --checkpoint CKPT (or use --method cfog)")
        from sarloc.trainer.loop import evaluate_checkpoint

        res = evaluate_checkpoint(a.checkpoint, a.scene, ecfg)
    print_table(res)
    if a.json:
        atomic_write_json(a.json, res)
        print(f"wrote {a.json}")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.eval.report import (
        check_same_flight,
        fixes_geojson,
        format_report,
        load_fixes,
        load_truth,
        plot_track,
        score_fixes,
        write_fixes_csv,
        write_fixes_geojson,
    )

    truth = load_truth(a.truth)
    fixes, _ = load_fixes(a.records)
    check_same_flight(a.records, truth, fixes)
    if a.geojson:
        fixes_geojson([], truth)  # refuses a flight without geo-reference before anything is written
    stats = score_fixes(fixes, truth, false_radius_m=a.false_radius_m)
    print(format_report(stats))
    if a.json:
        atomic_write_json(a.json, stats)
    if a.csv:
        print(write_fixes_csv(fixes, truth, a.csv))
    if a.geojson:
        print(write_fixes_geojson(fixes, truth, a.geojson))
    if a.plot:
        basemap, frame = None, None
        if a.scene:
            from sarloc.core.scene import load_scene

            sc = load_scene(a.scene)
            bands = [str(b).upper() for b in (sc.meta.get("optical") or {}).get("bands") or []]
            rgb = sc.optical.ndim == 3 and sc.optical.shape[2] >= 3 and bands[:3] == ["R", "G", "B"]
            basemap, frame = (sc.optical[..., :3] if rgb else sc.optical_gray), sc.frame
        print(plot_track(fixes, truth, basemap, frame, a.plot, false_radius_m=a.false_radius_m))
    return 0


def _cmd_replay(a: argparse.Namespace) -> int:
    from sarloc.eval.replay import replay

    res = replay(a.records, a.out, compare=not a.no_compare)
    print(json.dumps(res))
    return 0 if res.get("identical", True) else 2


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add the eval, report, replay subcommand(s) to ``sub``."""
    e = add_command(sub, "eval", common, "evaluate retrieval on a scene (encoder checkpoint or the classical baseline)")
    e.add_argument("--scene", required=True, help="scene folder to evaluate on")
    e.add_argument("--checkpoint", help="encoder checkpoint (sarloc train)")
    e.add_argument(
        "--method", choices=["encoder", "cfog"], default="encoder", help="the encoder, or the classical CFOG baseline"
    )
    e.add_argument("--window-px", type=int, default=64, help="query window and gallery tile side, pixels")
    e.add_argument("--stride-px", type=int, default=None, help="gallery stride (default: window, no overlap)")
    e.add_argument("--queries", type=int, default=200, help="queries per kind (aligned, arbitrary)")
    e.add_argument("--seed", type=int, default=0, help="random seed of the queries")
    e.add_argument("--json", help="write the metrics here")
    e.add_argument("--export", metavar="DIR", help="evaluate the exported models of DIR (sarloc export) instead")
    e.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32", help="with --export")
    e.add_argument("--backend", choices=["ort", "trt", "auto"], default="ort", help="with --export: runtime")
    e.add_argument("--pack", metavar="PACK", help="with --export: search this map pack instead of tiling the scene")
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

    t = add_command(
        sub,
        "report",
        common,
        "score fixes against a simulated flight's truth; plot the track; write the fixes for a GIS",
    )
    t.add_argument("--records", required=True, help="records.jsonl of sarloc run (its fix records)")
    t.add_argument("--truth", required=True, help="truth.json of sarloc simulate")
    t.add_argument(
        "--plot",
        metavar="PNG",
        help="track map (metres from the start, scale bar, north arrow) with error-over-time and error-CDF panels",
    )
    t.add_argument("--scene", help="scene folder: draw its optical image (2-98 %% stretch) under the track")
    t.add_argument("--false-radius-m", type=float, default=200.0, help="a trusted fix farther than this is false")
    t.add_argument("--json", help="write the statistics here")
    t.add_argument(
        "--csv",
        metavar="PATH",
        help="write every fix here (strip, time, trusted, confidence, error, x/y in the metric CRS, lon/lat when "
        "geo-referenced); only when given",
    )
    t.add_argument(
        "--geojson",
        metavar="PATH",
        help="write the true track (LineString) and every fix (Point) here, WGS 84 lon/lat (RFC 7946); only when "
        "given; refused for a flight without geo-reference (use --csv)",
    )
    t.set_defaults(fn=_cmd_report)

    p = add_command(sub, "replay", common, "re-run a recorded session deterministically and compare the fixes")
    p.add_argument("--records", required=True, help="records.jsonl of the session")
    p.add_argument("--out", required=True, help="output folder of the replay")
    p.add_argument("--no-compare", action="store_true", help="do not compare the replayed fixes with the recorded ones")
    p.set_defaults(fn=_cmd_replay)
