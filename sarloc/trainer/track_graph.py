"""The track graph: a graph network over the candidates of a strip's consecutive windows (research).

Nodes and their features are built by :mod:`sarloc.eval.track_graph` from daemon records. Each node attends to
itself and to its ``neighbours`` nearest nodes of the strip's *other* windows within ``radius_m`` (positions moved
to the strip's reference time by the strip geometry); each edge carries its relative offset and length (in
``gate_m`` units). Blocks are pre-norm multi-head attention with a learnt
bias from the edge (as the query graph refiner, :mod:`sarloc.trainer.models.refiner`), then a feed-forward block;
the output is a logit per node (this candidate is right), trained with binary cross-entropy.

:func:`study` runs the leave-one-scene-out comparison with the daemon's strip consensus
(``benchmarks/track_graph_loso.py``): for each held-out scene the network is trained on the other scenes' strips;
its trust threshold is the lowest one without a false fix on out-of-fold predictions of those training scenes
(two halves of them, each predicted by a network trained on the other half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sarloc.eval.track_graph import (
    FALSE_RADIUS_M,
    NODE_FEATURES,
    StripGraph,
    fix_error_m,
    graph_fix,
    graphs_from_run,
    paired,
    score,
    window_decision,
    window_graphs_from_run,
)


@dataclass(frozen=True)
class TrackGraphConfig:
    """Network and training settings."""

    hidden: int = 16
    heads: int = 2
    layers: int = 2
    radius_m: float = 100.0
    neighbours: int = 8
    gate_m: float = 30.0
    epochs: int = 150
    max_strips_per_scene: int = 200
    geometry_features: bool = True
    lr: float = 3e-3
    weight_decay: float = 1e-3
    seed: int = 0


class _Block(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.kv, self.out = nn.Linear(h, h), nn.Linear(h, 2 * h), nn.Linear(h, h)
        self.rel = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, heads))
        self.ffn = nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Linear(2 * h, h))

    def forward(self, x: torch.Tensor, nb: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, h); nb (B, N, M) neighbour indices (the node itself first), rel (B, N, M, 3), mask (B, N, M)."""
        b, n, h = x.shape
        d = h // self.heads
        y = self.norm1(x)
        q = self.q(y).reshape(b, n, self.heads, d)
        kv = self.kv(y)[torch.arange(b)[:, None, None], nb]  # (B, N, M, 2h)
        k, v = kv[..., :h].reshape(*nb.shape, self.heads, d), kv[..., h:].reshape(*nb.shape, self.heads, d)
        att = torch.einsum("bnhd,bnmhd->bnmh", q, k) / math.sqrt(d) + self.rel(rel)  # (B, N, M, H)
        att = att.masked_fill(~mask.unsqueeze(-1), -1e4).softmax(2)
        x = x + self.out(torch.einsum("bnmh,bnmhd->bnhd", att, v).reshape(b, n, h))
        return x + self.ffn(self.norm2(x))


class TrackGraph(nn.Module):
    """Node logits from node features and each node's neighbours (see the module docstring)."""

    def __init__(self, cfg: TrackGraphConfig = TrackGraphConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.embed = nn.Sequential(nn.Linear(len(NODE_FEATURES), h), nn.ReLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(_Block(h, cfg.heads) for _ in range(cfg.layers))
        self.head = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 1))

    def forward(self, feats: torch.Tensor, nb: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feats (B, N, F), neighbours (B, N, M), edge features (B, N, M, 3), edge mask (B, N, M) -> logits (B, N)."""
        x = self.embed(feats)
        for blk in self.blocks:
            x = blk(x, nb, rel, mask)
        return self.head(x).squeeze(-1)


def _neighbours(g: StripGraph, m: int, radius_m: float, gate_m: float) -> tuple[np.ndarray, ...]:
    """Each node's edges: itself, then up to ``m - 1`` nearest nodes of other windows within ``radius_m``."""
    n = len(g.xy_m)
    diff = g.xy_m[None] - g.xy_m[:, None]  # (N, N, 2): j - i
    dist = np.linalg.norm(diff, axis=-1)
    far = (dist > radius_m) | (g.window[None] == g.window[:, None])
    key = np.where(far, np.inf, dist)
    np.fill_diagonal(key, -1.0)
    order = np.argsort(key, axis=1, kind="stable")[:, :m]
    ok = np.isfinite(np.take_along_axis(key, order, 1))
    d = np.take_along_axis(diff, order[..., None], 1) / gate_m
    rel = np.concatenate([np.clip(d, -5, 5), np.linalg.norm(d, axis=-1, keepdims=True).clip(max=5)], -1)
    nb = np.where(ok, order, np.arange(n)[:, None])
    return nb, rel * ok[..., None], ok


def _batch(graphs: list[StripGraph], cfg: TrackGraphConfig) -> tuple[torch.Tensor, ...]:
    n, m = max(len(g.xy_m) for g in graphs), cfg.neighbours + 1
    b = len(graphs)
    f = np.zeros((b, n, len(NODE_FEATURES)), np.float32)
    nb = np.zeros((b, n, m), np.int64)
    rel = np.zeros((b, n, m, 3), np.float32)
    mask = np.zeros((b, n, m), bool)
    mask[:, :, 0] = True  # padded nodes attend to themselves only
    valid = np.zeros((b, n), bool)
    y = np.zeros((b, n), np.float32)
    for i, g in enumerate(graphs):
        k = len(g.xy_m)
        mm = min(m, k)
        f[i, :k], valid[i, :k] = g.feats, True
        if not cfg.geometry_features:  # ablation: the nodes' own evidence only
            f[i, :k, NODE_FEATURES.index("support") :] = 0.0
        nb[i, :k, :mm], rel[i, :k, :mm], mask[i, :k, :mm] = _neighbours(g, mm, cfg.radius_m, cfg.gate_m)
        nb[i, :k, mm:] = np.arange(k)[:, None]
        nb[i, k:] = np.arange(k, n)[:, None]
        if g.right is not None:
            y[i, :k] = g.right
        if g.target is not None:  # a window graph: only the decided window's nodes carry the loss
            valid[i, :k] &= g.window == g.target
    return tuple(torch.from_numpy(a) for a in (f, nb, rel, mask, valid, y))


def train(graphs: list[StripGraph], cfg: TrackGraphConfig = TrackGraphConfig()) -> TrackGraph:
    """Fit the network on labelled strip graphs (full batch, AdamW, binary cross-entropy over the valid nodes)."""
    torch.manual_seed(cfg.seed)
    model = TrackGraph(cfg)
    f, nb, rel, mask, valid, y = _batch(graphs, cfg)
    loss_fn = nn.BCEWithLogitsLoss()  # unweighted: the probabilities stay calibrated where the threshold sits
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        opt.zero_grad()
        loss = loss_fn(model(f, nb, rel, mask)[valid], y[valid])
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: TrackGraph, graphs: list[StripGraph]) -> list[np.ndarray]:
    """Node probabilities of each graph."""
    f, nb, rel, mask, _, _ = _batch(graphs, model.cfg)
    p = torch.sigmoid(model(f, nb, rel, mask)).numpy()
    return [p[i, : len(g.xy_m)] for i, g in enumerate(graphs)]


GRID = (0.5, 0.9, 0.99, 0.999, 0.9999)


def _decide(g: StripGraph, p: np.ndarray, threshold: float, gate_m: float) -> dict:
    return graph_fix(g, p, threshold, gate_m) if g.target is None else window_decision(g, p, threshold, gate_m)


def pick_threshold(graphs: list[StripGraph], probs: list[np.ndarray], gate_m: float) -> float:
    """The lowest threshold at which these graphs give no false fix (the candidates: every graph's best node
    probability; above the highest one nothing is trusted)."""
    fixes = [_decide(g, p, 0.0, gate_m) for g, p in zip(graphs, probs, strict=True)]
    err = np.array([fix_error_m(g, f) for g, f in zip(graphs, fixes, strict=True)])
    best = np.array([f["p"] for f in fixes])
    false_p = best[err > FALSE_RADIUS_M]
    if not len(false_p):
        return 0.5
    return max(0.5, float(np.nextafter(false_p.max(), np.float64(2.0))))  # just above the most confident false fix


def load_scene_graphs(out: Path, scene: str, gate_m: float, unit: str = "strip") -> list[StripGraph]:
    """The graphs (one per strip, or one per window: ``unit``) of every daemon run of one scene under
    ``out/scene`` (``run_*`` next to ``flight_*``)."""
    load = graphs_from_run if unit == "strip" else window_graphs_from_run
    gs: list[StripGraph] = []
    for run in sorted(r for r in (out / scene).glob("run_*") if (r / "done").is_file()):
        flight = out / scene / ("flight_" + run.name[len("run_") :])
        gs += load(run, flight / "truth.json", f"{scene}/{run.name}", gate_m)
    return gs


def _subsample(graphs: list[StripGraph], n: int, seed: int) -> list[StripGraph]:
    if len(graphs) <= n:
        return graphs
    idx = np.random.default_rng(seed).choice(len(graphs), n, replace=False)
    return [graphs[i] for i in sorted(idx)]


def _curve(graphs: list[StripGraph], probs: list[np.ndarray], gate_m: float) -> dict:
    """Trusted-and-right and false strips at every threshold of :data:`GRID` (on the held-out scene: hindsight,
    not a choice the method could make)."""
    out = {}
    for t in GRID:
        sc = score(graphs, [_decide(g, p, t, gate_m) for g, p in zip(graphs, probs, strict=True)])
        out[str(t)] = {"trusted_right": sc["trusted_right"], "false": sc["false"]}
    return out


def _fold(data: dict[str, list[StripGraph]], held: str, cfg: TrackGraphConfig) -> tuple[dict, tuple]:
    train_scenes = [s for s in data if s != held]
    sub = {s: _subsample(data[s], cfg.max_strips_per_scene, cfg.seed) for s in train_scenes}
    halves = (train_scenes[::2], train_scenes[1::2])
    oof_g: list[StripGraph] = []
    oof_p: list[np.ndarray] = []
    for a, b in (halves, halves[::-1]):  # out-of-fold predictions on the training scenes set the threshold
        m = train([g for s in a for g in sub[s]], cfg)
        held_out = [g for s in b for g in data[s]]
        oof_g += held_out
        oof_p += predict(m, held_out)
    thr = pick_threshold(oof_g, oof_p, cfg.gate_m)
    model = train([g for s in train_scenes for g in sub[s]], cfg)
    test = data[held]
    probs = predict(model, test)
    graph = [_decide(g, p, thr, cfg.gate_m) for g, p in zip(test, probs, strict=True)]
    cons = [g.consensus for g in test]
    return {
        "scene": held,
        "threshold": thr,
        "consensus": score(test, cons),
        "graph": score(test, graph),
        "paired": paired(test, cons, graph),
        "curve": _curve(test, probs, cfg.gate_m),
        "node_right_share": float(np.mean(np.concatenate([g.right for g in test]))),
        "graphs_with_a_right_node": int(sum(bool(g.right.any()) for g in test)),
    }, (test, cons, graph)


def study(out: Path, scenes: list[str], cfg: TrackGraphConfig = TrackGraphConfig(), unit: str = "strip") -> dict:
    """Leave-one-scene-out: the track graph against the daemon on every scene (printed and returned); ``unit``
    ``strip``: against its strip consensus; ``window``: against the windows it passed to the navigation filter."""
    data = {s: load_scene_graphs(Path(out), s, cfg.gate_m, unit) for s in scenes}
    folds, all_g, all_c, all_t = [], [], [], []
    for held in scenes:
        res, (g, c, t) = _fold(data, held, cfg)
        folds.append(res)
        all_g += g
        all_c += c
        all_t += t
        print(f"{held}: consensus {res['consensus']} | graph {res['graph']} | {res['paired']}", flush=True)
    pooled = {"consensus": score(all_g, all_c), "graph": score(all_g, all_t), "paired": paired(all_g, all_c, all_t)}
    print(f"pooled: {pooled}", flush=True)
    return {"config": cfg.__dict__, "unit": unit, "folds": folds, "pooled": pooled}


__all__ = ["TrackGraph", "TrackGraphConfig", "predict", "study", "train"]
