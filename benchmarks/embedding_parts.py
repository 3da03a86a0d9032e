"""Which part of the embedding finds the place on an unseen scene: the learned part, the layout branch, or both?

The encoder's embedding is ``normalize([z, w * layout])``: ``z`` is the learned part (``embed_dim`` values), the
layout branch is the window's CFOG channels average-pooled into cells (parameter-free, ``docs/trainer.md``). This
script scores every query of the leave-one-scene-out evaluation against the dense gallery (every 8 px, the same
gallery and query embeddings ``benchmarks/refine_loso.py`` stored in phase 1 / 1b) three ways: the whole
embedding (what the runtime does), the learned part alone and the layout part alone (each re-normalised), and
reports the hit rate of the best peak, of the top 10 and of the pool of 200 NMS peaks (a hit: the truth within
the window-sized box around a peak, as everywhere in ``docs/refine.md``).

    python benchmarks/embedding_parts.py --out runs/refine [--json runs/refine/embedding_parts.json] \
        [--plot docs/figures/embedding_parts.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SCENES = ("china_shuguang", "france_s1s2", "india_sih1733_1", "india_sih1733_2", "india_sih1733_3")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def parts_recall(gallery: np.ndarray, centres: np.ndarray, pool, learned_dim: int, window_px: int) -> dict:
    """R@1 / R@10 / pool recall@200 of the whole embedding, its learned part and its layout part."""
    from sarloc.core.peaks import GalleryGrid

    gg = GalleryGrid(centres)
    parts = {
        "whole": (gallery, pool.query),
        "learned": (_unit(gallery[:, :learned_dim]), _unit(pool.query[:, :learned_dim])),
        "layout": (_unit(gallery[:, learned_dim:]), _unit(pool.query[:, learned_dim:])),
    }
    out = {}
    for name, (g, q) in parts.items():
        hits = np.zeros((len(q), 3), bool)
        for i in range(len(q)):
            pk = gg.peaks((g @ q[i]).astype(np.float32), 200, window_px / 2.0)
            h = np.abs(centres[pk] - pool.truth[i]).max(-1) <= window_px / 2.0
            hits[i] = (h[:1].any(), h[:10].any(), h.any())
        r = hits.mean(0)
        out[name] = {"recall@1": float(r[0]), "recall@10": float(r[1]), "pool_recall@200": float(r[2])}
    return out


def plot(res: dict, path: Path) -> Path:
    """Grouped bars: R@1 and pool recall@200 of each part, per held-out scene."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarloc.core.artifacts import atomic_save

    scenes = list(res)
    parts = ("whole", "learned", "layout")
    labels = {"whole": "whole embedding (runs)", "learned": "learned part alone", "layout": "layout branch alone"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    x = np.arange(len(scenes))
    panels = (("recall@1", "R@1 (best peak)"), ("pool_recall@200", "truth among 200 peaks"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for j, part in enumerate(parts):
            ax.bar(x + (j - 1) * 0.27, [res[s][part][key] for s in scenes], 0.27, label=labels[part])
        ax.set_xticks(x, [s.replace("_sih1733", "") for s in scenes], rotation=20)
        ax.set_title(f"held-out scenes: {title}")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/refine"), help="refine_loso.py output folder")
    ap.add_argument("--set", default="eval_arbitrary", help="query set (pool_<set>.npz)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--from-json", type=Path, help="read the results from this JSON instead of computing them")
    ap.add_argument("--plot", type=Path, help="bar chart of the results (PNG)")
    a = ap.parse_args(argv)
    from sarloc.eval.refine import PoolData
    from sarloc.trainer.checkpoint import load_checkpoint

    if a.from_json:
        res = json.loads(a.from_json.read_text())
        if a.plot:
            print(plot(res, a.plot))
        return 0
    res = {}
    lines = [
        "| held-out scene | whole embedding R@1 / R@10 / pool 200 | learned part alone | layout branch alone |",
        "|---|---|---|---|",
    ]
    for s in SCENES:
        d = a.out / s
        if not (d / f"pool_{a.set}.npz").is_file():
            print(f"{s}: no {d / f'pool_{a.set}.npz'}; run benchmarks/refine_loso.py first", file=sys.stderr)
            continue
        enc = json.loads((d / "encoder.json").read_text())
        _, cfg, _ = load_checkpoint(enc["checkpoint"])
        z = np.load(d / "gallery.npz")
        pool = PoolData.load(d / f"pool_{a.set}.npz")
        r = parts_recall(z["emb"], z["centres"], pool, cfg.encoder.embed_dim, pool.window_px)
        res[s] = r
        cells = [f"{r[p]['recall@1']:.3f} / {r[p]['recall@10']:.3f} / {r[p]['pool_recall@200']:.3f}" for p in r]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if a.json:
        from sarloc.core.artifacts import atomic_write_json

        atomic_write_json(a.json, res)
    if a.plot and res:
        print(plot(res, a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
