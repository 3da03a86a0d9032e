"""Evaluating a trained checkpoint: coarse retrieval on one scene (:mod:`sarloc.eval.retrieval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sarloc.core.scene import load_scene


def evaluate_checkpoint(
    ckpt: str | Path,
    scene_dir: str | Path,
    eval_cfg,
    kinds=("aligned", "arbitrary"),
    overlap_arbitrary: bool = True,
    dense_stride_px: int | None = 8,
    layout_only: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint and evaluate coarse retrieval on one scene (see :mod:`sarloc.eval.retrieval`).

    Keys of the result: ``aligned`` and ``arbitrary`` (non-overlapping tile gallery, or ``eval_cfg.stride_px``),
    ``arbitrary_overlap50`` (50%-overlap gallery) and ``arbitrary_dense`` (gallery every ``dense_stride_px``
    pixels with non-maximum suppression; skipped when None). ``layout_only`` evaluates the parameter-free
    layout branch alone (the learned part switched off): the ablation that shows what learning adds.
    """
    from dataclasses import replace

    from sarloc.core.scene import make_queries
    from sarloc.eval.retrieval import evaluate_dense, evaluate_embeddings
    from sarloc.trainer.checkpoint import checkpoint_embed_fns, load_checkpoint

    model, cfg, info = load_checkpoint(ckpt)
    if layout_only:
        model.cfg = replace(model.cfg, layout_weight=1e4)
    scene = load_scene(scene_dir)
    fs, fo = checkpoint_embed_fns(model)
    out: dict[str, Any] = {"scene": scene.name, "checkpoint": str(ckpt), "trained_on": info.get("scenes")}
    with torch.no_grad():
        for kind in kinds:
            q = make_queries(scene, kind, eval_cfg.window_px, eval_cfg.queries, eval_cfg.seed)
            out[kind] = evaluate_embeddings(scene, q, fs, fo, cfg.preprocess, eval_cfg)
            if kind != "arbitrary":
                continue
            if overlap_arbitrary and eval_cfg.stride_px in (None, eval_cfg.window_px):
                out["arbitrary_overlap50"] = evaluate_embeddings(
                    scene, q, fs, fo, cfg.preprocess, replace(eval_cfg, stride_px=eval_cfg.window_px // 2)
                )
            if dense_stride_px:
                out["arbitrary_dense"] = evaluate_dense(scene, q, fs, fo, cfg.preprocess, eval_cfg, dense_stride_px)
    return out
