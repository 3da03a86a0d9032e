"""The fresh-machine main job: generate scenes, train briefly, evaluate on a held-out generated scene.

Runs on a CPU with no ``../shared`` and no GPU in a few minutes. (The onboard flight demo will replace it.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sarloc.artifacts import atomic_write_json

logger = logging.getLogger(__name__)


def run_demo(out_dir: str | Path, steps: int | None = None, seed: int = 0) -> dict:
    """Generate 2 training scenes + 1 held-out scene, train the encoder (preset "quick"), evaluate.

    Returns:
        The evaluation dict, also written to ``out_dir/eval.json``.
    """
    from sarloc.evaluation import EvalConfig, evaluate_cfog
    from sarloc.scene import load_scene, make_queries
    from sarloc.synth import SynthConfig, write_scene
    from sarloc.trainer.config import resolve_config
    from sarloc.trainer.loop import evaluate_checkpoint, train

    out = Path(out_dir)
    scenes = out / "scenes"
    for i in range(2):
        d = scenes / f"train_{i}"
        if not (d / "scene.json").is_file():
            write_scene(d, SynthConfig(width_px=512, height_px=512, seed=seed * 10 + i), force=True)
    held = out / "heldout"
    if not (held / "scene.json").is_file():
        write_scene(held, SynthConfig(width_px=512, height_px=512, seed=seed * 10 + 7), force=True)
    cfg = resolve_config("quick", steps=steps, seed=seed)
    ckpt = train([scenes], out / "run", cfg)
    ecfg = EvalConfig(window_px=cfg.window_px, queries=100, seed=seed)
    res = evaluate_checkpoint(ckpt, held, ecfg)
    scene = load_scene(held)
    q = make_queries(scene, "arbitrary", ecfg.window_px, 30, seed)
    res["arbitrary_cfog"] = evaluate_cfog(scene, q, ecfg)
    atomic_write_json(out / "eval.json", res)
    logger.info("demo results: %s", json.dumps({k: v.get("recall@10") for k, v in res.items() if isinstance(v, dict)}))
    return res
