"""Retrieval evaluation through exported artefacts (torch-free) and the INT8 accuracy guard.

The twin of ``sarloc.trainer.loop.evaluate_checkpoint``: the same protocol (``sarloc.eval.retrieval``), with the
encoders run by ONNX Runtime (FP32 or INT8) or TensorRT instead of PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from sarloc.backends.encoders import load_encoder_pair
from sarloc.eval.retrieval import EvalConfig, evaluate_embeddings

logger = logging.getLogger(__name__)

MAX_INT8_DROP = 0.01
"""INT8 may lose at most 1 point of recall@1 against FP32 (fraction, 0.01 = 1 point)."""


def evaluate_onnx(
    export_dir: str | Path,
    scene_dir: str | Path,
    eval_cfg: EvalConfig,
    precision: str = "fp32",
    backend: str = "ort",
    kinds: tuple[str, ...] = ("aligned", "arbitrary"),
    overlap_arbitrary: bool = True,
    providers: list[str] | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Evaluate coarse retrieval on one scene with the models of an export folder.

    Args:
        export_dir: folder written by ``sarloc export`` (and ``sarloc calib`` for INT8).
        scene_dir: held-out scene folder.
        eval_cfg: evaluation settings; its window must equal the models' window.
        precision: "fp32", "int8" or "fp16" (TensorRT only).
        backend: "ort", "trt" or "auto" (see ``sarloc.backends.encoders.load_encoder``).
        kinds: query kinds.
        overlap_arbitrary: also evaluate arbitrary queries against a 50%-overlap gallery.
        providers, threads: ONNX Runtime options.

    Returns:
        The same structure as ``evaluate_checkpoint``: ``{"scene", "export_dir", "precision", kind: metrics}``.
    """
    from sarloc.core.errors import SarlocError
    from sarloc.core.scene import load_scene, make_queries

    sar, opt = load_encoder_pair(export_dir, precision, backend, providers, threads)
    if eval_cfg.window_px != sar.window_px:
        raise SarlocError(
            f"the exported models take {sar.window_px} px windows, not {eval_cfg.window_px}; "
            f"use --window-px {sar.window_px}"
        )
    scene = load_scene(scene_dir)
    prep = sar.preprocess
    out: dict[str, Any] = {
        "scene": scene.name,
        "export_dir": str(export_dir),
        "precision": precision,
        "backend": type(sar).__name__,
        "checkpoint_sha256": sar.manifest.get("checkpoint_sha256"),
    }
    for kind in kinds:
        q = make_queries(scene, kind, eval_cfg.window_px, eval_cfg.queries, eval_cfg.seed)
        out[kind] = evaluate_embeddings(scene, q, sar, opt, prep, eval_cfg)
        out[kind]["method"] = f"onnx-{precision}"
        if kind == "arbitrary" and overlap_arbitrary and eval_cfg.stride_px in (None, eval_cfg.window_px):
            out["arbitrary_overlap50"] = evaluate_embeddings(
                scene, q, sar, opt, prep, replace(eval_cfg, stride_px=eval_cfg.window_px // 2)
            )
            out["arbitrary_overlap50"]["method"] = f"onnx-{precision}"
    return out


def int8_accuracy_guard(
    export_dir: str | Path,
    scene_dir: str | Path,
    eval_cfg: EvalConfig,
    max_drop: float = MAX_INT8_DROP,
    threads: int = 0,
) -> dict[str, Any]:
    """Compare INT8 with FP32 recall@1 (ONNX Runtime) on a held-out scene.

    Returns:
        ``{"scene", "fp32", "int8", "drop", "max_drop", "passed"}``: recall@1 per query kind, the largest drop
        over kinds, and whether it stays within ``max_drop``. A failure is logged as an error; callers decide
        whether to stop.
    """
    res = {}
    for p in ("fp32", "int8"):
        r = evaluate_onnx(export_dir, scene_dir, eval_cfg, p, overlap_arbitrary=False, threads=threads)
        res[p] = {k: v["recall@1"] for k, v in r.items() if isinstance(v, dict) and "recall@1" in v}
        res["scene"] = r["scene"]
    drop = max(res["fp32"][k] - res["int8"][k] for k in res["fp32"])
    res.update({"drop": float(drop), "max_drop": float(max_drop), "passed": bool(drop <= max_drop + 1e-12)})
    if not res["passed"]:
        logger.error(
            "INT8 loses %.1f points of recall@1 against FP32 on %s (limit %.1f): %s vs %s",
            100 * drop,
            res["scene"],
            100 * max_drop,
            res["int8"],
            res["fp32"],
        )
    return res
