"""Figures the experiments call for: retrieval visualisation and a 2-D projection of the two modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sarloc.core.artifacts import atomic_save
from sarloc.core.geo import TileGrid
from sarloc.core.preprocess import crop_windows
from sarloc.core.scene import load_scene, make_queries
from sarloc.eval.retrieval import embed_all
from sarloc.trainer.checkpoint import checkpoint_embed_fns, load_checkpoint


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _disp(w: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(w, [2, 98])
    return np.clip((w - lo) / (hi - lo + 1e-6), 0, 1)


@torch.no_grad()
def retrieval_figure(
    checkpoint: str | Path,
    scene_dir: str | Path,
    out: str | Path,
    window_px: int = 64,
    n_queries: int = 6,
    seed: int = 0,
) -> Path:
    """SAR queries (rows), each with its top-5 optical tiles; hits framed green, misses red."""
    model, cfg, _ = load_checkpoint(checkpoint)
    scene = load_scene(scene_dir)
    fs, fo = checkpoint_embed_fns(model)
    grid = TileGrid(scene.width_px, scene.height_px, window_px, window_px)
    gal_w = crop_windows(scene.optical_gray, grid.origins(), window_px)
    gal = embed_all(fo, gal_w, cfg.preprocess)
    q = make_queries(scene, "arbitrary", window_px, n_queries, seed)
    qw = crop_windows(scene.sar_gray, q.origins, window_px)
    top = np.argsort(-(embed_all(fs, qw, cfg.preprocess) @ gal.T), axis=1)[:, :5]
    pos = grid.containing_mask(q.centres)
    plt = _plt()
    fig, axes = plt.subplots(len(qw), 6, figsize=(9, 1.6 * len(qw)))
    axes = np.atleast_2d(axes)
    for i in range(len(qw)):
        axes[i, 0].imshow(_disp(qw[i]), cmap="gray")
        axes[i, 0].set_title("SAR query", fontsize=7)
        for r in range(5):
            ax = axes[i, r + 1]
            ax.imshow(_disp(gal_w[top[i, r]]), cmap="gray")
            hit = bool(pos[i, top[i, r]])
            for s in ax.spines.values():
                s.set_edgecolor("lime" if hit else "red")
                s.set_linewidth(3)
            ax.set_title(f"#{r + 1} {'hit' if hit else ''}", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{scene.name}: SAR query and top-5 optical tiles (green = contains the query centre)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    atomic_save(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def modality_gap(zs: np.ndarray, zo: np.ndarray) -> float:
    """Distance between the SAR and optical embedding means over their mean per-dimension spread."""
    return float(np.linalg.norm(zs.mean(0) - zo.mean(0)) / (0.5 * (zs.std(0).mean() + zo.std(0).mean()) + 1e-9))


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2) principal-component projection."""
    xc = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T


@torch.no_grad()
def embedding_projection(
    checkpoint: str | Path,
    scene_dir: str | Path,
    out: str | Path,
    baseline_checkpoint: str | Path | None = None,
    window_px: int = 64,
) -> Path:
    """PCA of SAR and optical embeddings of the same tiles (one panel per checkpoint), showing the modality gap.

    The title of each panel gives the modality gap (:func:`modality_gap`) of the whole embedding and of its
    learned part (the part the adversary aligns; the rest is the fixed layout branch).
    """
    scene = load_scene(scene_dir)
    grid = TileGrid(scene.width_px, scene.height_px, window_px, window_px // 2)
    o = grid.origins()
    ckpts = [c for c in (baseline_checkpoint, checkpoint) if c]
    plt = _plt()
    fig, axes = plt.subplots(1, len(ckpts), figsize=(4.5 * len(ckpts), 4.2))
    axes = np.atleast_1d(axes)
    for ax, ck in zip(axes, ckpts, strict=True):
        model, cfg, _ = load_checkpoint(ck)
        fs, fo = checkpoint_embed_fns(model)
        zs = embed_all(fs, crop_windows(scene.sar_gray, o, window_px), cfg.preprocess)
        zo = embed_all(fo, crop_windows(scene.optical_gray, o, window_px), cfg.preprocess)
        p = pca_2d(np.concatenate([zs, zo]))
        d = cfg.encoder.embed_dim
        gap, gap_learned = modality_gap(zs, zo), modality_gap(zs[:, :d], zo[:, :d])
        ax.scatter(p[: len(zs), 0], p[: len(zs), 1], s=5, alpha=0.6, label="SAR")
        ax.scatter(p[len(zs) :, 0], p[len(zs) :, 1], s=5, alpha=0.6, label="optical")
        ax.set_title(f"align={cfg.align}  gap: all {gap:.2f}, learned part {gap_learned:.2f}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{scene.name}: PCA of embeddings ({len(o)} tiles per modality)", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    atomic_save(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
