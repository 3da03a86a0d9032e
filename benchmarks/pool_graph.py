"""Does a graph over the candidate pool shortlist better than the logistic shortlister? (leave-one-scene-out)

    python benchmarks/pool_graph.py --out runs/refine [--top 50] [--steps 500] [--edges 6] [--json FILE]

Reads the pools that ``benchmarks/refine_loso.py`` (phase 1b) wrote: for each query, the 200 coarse peaks with
their retrieval similarity and half-resolution CFOG score. For each held-out scene:

* the logistic shortlister (:class:`sarloc.runtime.refine.Shortlister`, as in the full path) is fitted on the other
  scenes' training pools and orders each pool;
* a :class:`~sarloc.trainer.models.refiner.GraphRefiner` takes that order's top ``--top`` candidates as nodes
  (edges: each node's ``--edges`` nearest on the ground; position embeddings of the offset from the shortlister's
  best; node features: CFOG score, similarity, both relative to the pool's best and standardised, the
  shortlister's logit and rank) and is trained with the listwise loss on the other scenes' training pools;
* both are scored on the held-out scene's arbitrary-query pool: recall@1/5/10 of a hit (truth in the window-sized
  box around a candidate), i.e. whether the 10 candidates passed to full-resolution registration contain the
  truth.

The embeddings are left out (each held-out scene has its own encoder; the scalars are comparable across them).
Prints a table and writes ``--json``. CPU, about 35 s per scene with one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SCENES = ("china_shuguang", "france_s1s2", "india_sih1733_1", "india_sih1733_2", "india_sih1733_3")


def _fit_shortlister(pools):
    from sarloc.runtime.refine import Shortlister, shortlist_features

    f = np.concatenate([shortlist_features(p.low, p.sims, p.valid)[p.valid] for p in pools])
    y = np.concatenate([p.hits()[p.valid] for p in pools])
    return Shortlister.fit(f, y, radius_px=32.0)


def _graph_inputs(pool, shortlister, top: int):
    """Top ``top`` of each pool in shortlister order: (query, cands, offsets, extra, hits, valid) tensors."""
    import torch

    from sarloc.runtime.refine import shortlist_features

    prob = np.where(pool.valid, shortlister.prob(shortlist_features(pool.low, pool.sims, pool.valid)), -1.0)
    order = np.argsort(-prob, 1, kind="stable")[:, :top]

    def take(a):
        return np.take_along_axis(a, order if a.ndim == 2 else order[..., None], 1)

    lo, si = take(np.where(pool.valid, pool.low, -1.0)), take(np.where(pool.valid, pool.sims, -1.0))
    pr, val, px, hits = take(prob), take(pool.valid), take(pool.px), take(pool.hits() & pool.valid)

    def z(a):
        return (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-6)

    p = np.clip(pr, 1e-6, 1 - 1e-6)
    rank = np.broadcast_to(np.arange(top) / top, lo.shape)
    extra = np.stack(
        [lo, si, lo - lo.max(1, keepdims=True), si - si.max(1, keepdims=True), z(lo), z(si), np.log(p / (1 - p)), rank],
        -1,
    )
    off = (px - px[:, :1]) / float(pool.window_px)
    off = np.stack([off[..., 0], -off[..., 1]], -1)  # east, north in tile units

    def t(a, dtype=np.float32):
        return torch.from_numpy(np.ascontiguousarray(a).astype(dtype))

    # embeddings left out: a one-dimensional "embedding" whose product is the similarity itself
    return (t(np.ones((len(px), 1))), t(si[..., None]), t(off), t(extra), t(hits, bool), t(val, bool))


def _recall(scores: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    ph = np.take_along_axis(pos, np.argsort(-scores, 1, kind="stable"), 1)
    return {f"recall@{k}": float(ph[:, :k].any(1).mean()) for k in (1, 5, 10)}


def run_scene(held: str, out: Path, top: int, steps: int, edges: int, seed: int) -> dict:
    import torch

    from sarloc.eval.refine import PoolData
    from sarloc.trainer.models.refiner import GraphRefiner, RefinerConfig, listwise_loss

    others = [s for s in SCENES if s != held and (out / s / "pool_train.npz").is_file()]
    train_pools = [PoolData.load(out / s / "pool_train.npz") for s in others]
    sl = _fit_shortlister(train_pools)
    tr = [_graph_inputs(p, sl, top) for p in train_pools]
    eval_pool = PoolData.load(out / held / "pool_eval_arbitrary.npz")
    ev = _graph_inputs(eval_pool, sl, top)
    q, c, o, e, pos, val = (torch.cat([t[i] for t in tr]) for i in range(6))
    keep = pos.any(1)
    q, c, o, e, pos, val = q[keep], c[keep], o[keep], e[keep], pos[keep], val[keep]
    torch.manual_seed(seed)
    cfg = RefinerConfig(k=top, embed_dim=1, extra_features=e.shape[-1], edges=edges)
    model = GraphRefiner(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(0, len(q), (32,), generator=g)
        a = float(torch.rand((), generator=g)) * 2 * np.pi  # the map has no preferred direction
        rot = torch.tensor([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=torch.float32)
        logits = model(q[idx], c[idx], o[idx] @ rot.T, e[idx]).masked_fill(~val[idx], -1e4)
        loss = listwise_loss(logits, pos[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        s = model(*ev[:4]).masked_fill(~ev[5], -1e4).numpy()
    p = (ev[4] & ev[5]).numpy()
    ex = ev[3].numpy()
    v = ev[5].numpy()
    return {
        "scene": held,
        "trained_on": others,
        "truth_in_pool": float((eval_pool.hits() & eval_pool.valid).any(1).mean()),
        f"truth_in_top{top}": float(p.any(1).mean()),
        "coarse": _recall(np.where(v, ex[..., 1], -9.0), p),
        "cfog_low": _recall(np.where(v, ex[..., 0], -9.0), p),
        "logistic": _recall(-np.broadcast_to(np.arange(top, dtype=float), p.shape), p),
        "graph": _recall(s, p),
        "train_s": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/refine"), help="refine_loso.py's folder")
    ap.add_argument("--scenes", default=",".join(SCENES))
    ap.add_argument("--top", type=int, default=50, help="graph nodes: the shortlister's top of the pool")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--edges", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    res = []
    for s in a.scenes.split(","):
        if not (a.out / s / "pool_eval_arbitrary.npz").is_file():
            print(f"{s}: no pools in {a.out / s} (run refine_loso.py --phase 1b first)", file=sys.stderr)
            return 2
        res.append(run_scene(s, a.out, a.top, a.steps, a.edges, a.seed))
        print(json.dumps(res[-1]), flush=True)
    methods = ("coarse", "cfog_low", "logistic", "graph")
    print(
        f"\n| held-out scene | truth in pool | in top {a.top} | "
        + " | ".join(f"{m} R@1 / R@10" for m in methods)
        + " |"
    )
    print("|---" * (3 + len(methods)) + "|")
    for r in [*res, None]:
        if r is None:
            mean = {m: {k: float(np.mean([x[m][k] for x in res])) for k in ("recall@1", "recall@10")} for m in methods}
            cells = ["**mean**", f"{np.mean([x['truth_in_pool'] for x in res]):.3f}",
                     f"{np.mean([x[f'truth_in_top{a.top}'] for x in res]):.3f}"]  # fmt: skip
            src = mean
        else:
            cells = [r["scene"], f"{r['truth_in_pool']:.3f}", f"{r[f'truth_in_top{a.top}']:.3f}"]
            src = r
        cells += [f"{src[m]['recall@1']:.3f} / {src[m]['recall@10']:.3f}" for m in methods]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        from sarloc.core.artifacts import atomic_write_json

        atomic_write_json(a.json, {"config": {k: str(v) for k, v in vars(a).items()}, "results": res})
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
