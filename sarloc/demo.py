"""The fresh-machine main job (``sarloc demo``): a simulated flight localised by the onboard daemon, on a CPU.

1. a generated scene (never one of the research-only scenes),
2. a map pack built from its optical image with the shipped optical encoder (:mod:`sarloc.demo_model`),
3. a simulated flight (``sarloc simulate``) cutting SAR strips along a curved track,
4. the daemon (``sarloc run``) over ``dir://`` with the shipped SAR encoder, graph refiner and verifier, sending
   MAVLink GPS_INPUT to ``udpout:127.0.0.1:14550``,
5. ``sarloc report``: error statistics and a track plot.

The shipped model was trained only on generated scenes; :func:`make_demo_model` (``sarloc demo --make-model``)
reproduces it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
from sarloc.backends.layout import DEMO_MODEL_FILES as MODEL_FILES
from sarloc.core.artifacts import atomic_write_json

logger = logging.getLogger(__name__)

TRAIN_SEEDS = (101, 102, 103, 104)
REFINER_SEEDS = (201, 202)
DEMO_SEED = 7


def make_demo_model(out_dir: str | Path = MODEL_DIR, steps: int = 400, work: str | Path = "runs/demo_model") -> Path:
    """Train and export the demo model from generated scenes only (needs ``sarloc[train]``).

    Encoder: preset ``quick`` for ``steps`` steps on 4 generated 512 x 512 scenes; the refiner and verifier on 2
    other generated scenes (held out from the encoder). Writes the ONNX models and manifests into ``out_dir``.
    """
    from sarloc.export.onnx import export_checkpoint
    from sarloc.sim.scenes import SynthConfig, write_scene
    from sarloc.trainer.config import resolve_config
    from sarloc.trainer.loop import train
    from sarloc.trainer.refiner_train import refine_checkpoint

    work = Path(work)
    for s in TRAIN_SEEDS:
        d = work / "scenes" / f"train_{s}"
        if not (d / "scene.json").is_file():
            write_scene(d, SynthConfig(width_px=512, height_px=512, seed=s), force=True)
    ref_scenes = []
    for s in REFINER_SEEDS:
        d = work / "refiner_scenes" / f"ref_{s}"
        if not (d / "scene.json").is_file():
            write_scene(d, SynthConfig(width_px=512, height_px=512, seed=s), force=True)
        ref_scenes.append(d)
    cfg = resolve_config("quick", steps=steps, seed=0)
    ckpt = work / "run" / "checkpoint.pt"
    if not ckpt.is_file():
        ckpt = train([work / "scenes"], work / "run", cfg)
    export_checkpoint(ckpt, work / "export")
    refine_checkpoint(ckpt, ref_scenes, work / "export", queries=300)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(work / "export" / name, out / name)
    (out / "README.md").write_text(
        "# sarloc demo model\n\nTrained only on generated scenes (`sarloc.sim.scenes`, seeds "
        f"{TRAIN_SEEDS} for the encoder, {REFINER_SEEDS} for the refiner and verifier), preset `quick`, {steps} "
        "steps, on a CPU. Reproduce with `sarloc demo --make-model` (needs `sarloc[train]`). Apache-2.0, like "
        "sarloc. For demonstrations and tests only: it has never seen real SAR.\n"
    )
    return out


def run_flight_demo(
    out_dir: str | Path = "runs/demo",
    model_dir: str | Path = MODEL_DIR,
    mavlink_url: str | None = "udpout:127.0.0.1:14550",
    seed: int = DEMO_SEED,
    track: str = "curve",
    n_strips: int = 12,
) -> dict[str, Any]:
    """Run the flight demo; returns the report statistics (also written to ``out_dir/report.json``)."""
    from sarloc.core.errors import SarlocError
    from sarloc.core.scene import load_scene
    from sarloc.eval.report import format_report, load_fixes, load_truth, plot_track, score_fixes
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.runtime.daemon import load_run_config, run
    from sarloc.sim.flight import simulate_flight
    from sarloc.sim.scenes import SynthConfig, write_scene

    model_dir = Path(model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise SarlocError(
            f"demo model incomplete in {model_dir} (missing {', '.join(missing)}); run `sarloc demo --make-model`"
        )
    out = Path(out_dir)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    scene_dir = out / "scene"
    if not (scene_dir / "scene.json").is_file():
        write_scene(scene_dir, SynthConfig(width_px=640, height_px=640, seed=seed), force=True)
    timings["scene_s"] = time.perf_counter() - t0
    pack = out / "pack"
    t = time.perf_counter()
    if not (pack / "pack.json").is_file():
        build_map_pack(scene_dir, model_dir / "optical_encoder.onnx", pack, MapPackConfig(), progress=True)
    timings["pack_s"] = time.perf_counter() - t
    flight = out / "flight"
    t = time.perf_counter()
    if not (flight / "truth.json").is_file():
        simulate_flight(
            scene_dir, flight, track=track, n_strips=n_strips, seed=seed, strip_width_px=160, strip_rows=256, force=True
        )
    timings["simulate_s"] = time.perf_counter() - t
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t = time.perf_counter()
    cfg = load_run_config(
        None,
        source=f"dir://{flight}",
        export=str(model_dir),
        pack=str(pack),
        out=str(run_dir),
        follow=False,
        mavlink=mavlink_url is not None,
        **({"mavlink.url": mavlink_url} if mavlink_url else {}),
    )
    stats = run(cfg, install_signals=False)
    timings["run_s"] = time.perf_counter() - t
    truth = load_truth(flight / "truth.json")
    fixes, _ = load_fixes(run_dir / "records.jsonl")
    rep = score_fixes(fixes, truth)
    print(format_report(rep))
    scene = load_scene(scene_dir)
    try:
        rep["plot"] = str(plot_track(fixes, truth, scene.optical_gray, scene.frame, out / "track.png"))
    except SarlocError as e:  # matplotlib missing: the numbers still stand
        logger.warning("%s", e)
    timings["total_s"] = time.perf_counter() - t0
    rep.update(
        daemon={k: v for k, v in stats.items() if not isinstance(v, dict)},
        timings=timings,
        mavlink=stats.get("mavlink"),
    )
    atomic_write_json(out / "report.json", rep)
    logger.info("demo: %s", json.dumps(timings))
    return rep


__all__ = ["make_demo_model", "run_flight_demo"]
