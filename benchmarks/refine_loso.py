"""Leave-one-scene-out evaluation of re-ranking, the graph refiner and metric refinement (issue 3).

Uses the encoders of ``benchmarks/loso.py`` (``runs/loso/<held-out>/<variant>/checkpoint.pt``, each trained
without its held-out scene). Phase 1, per held-out scene S (cached): dense optical gallery (every 8 px) with S's
encoder, coarse top-K candidates and their local registration for an evaluation query set (arbitrary and aligned,
seed 0, the same queries as the LOSO table) and a training query set (arbitrary, seed 1).

Phase 2, per held-out scene S: the graph refiner and the verifier are trained on the *training* query sets of the
other held-out scenes only (each produced by an encoder that had not seen that scene: the situation at test time),
never on S; then every re-ranker, alone and with metric verification, is evaluated on S.

    python benchmarks/refine_loso.py --out runs/refine            # all phases (resumable)
    python benchmarks/refine_loso.py --out runs/refine --table    # markdown tables from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SCENES = ("china_shuguang", "france_s1s2", "india_sih1733_1", "india_sih1733_2", "india_sih1733_3")
METHODS = (
    "none",
    "qe",
    "kreciprocal",
    "spatial",
    "gnn",
    "none+metric",
    "gnn+metric",
    "none+metric@k20",
    "shortlist",
    "shortlist+gnn",
    "shortlist+metric",
    "shortlist+gnn+metric",
)
LABELS = {
    "none": "coarse (no re-ranking)",
    "qe": "alpha query expansion",
    "kreciprocal": "k-reciprocal",
    "spatial": "spatial vote",
    "gnn": "graph refiner (GNN)",
    "none+metric": "coarse + metric verification",
    "gnn+metric": "GNN + metric verification",
    "none+metric@k20": "coarse + metric verification, 20 candidates",
    "shortlist": "pool 200 + low-res shortlist (top 10, shortlist order)",
    "shortlist+gnn": "pool 200 + shortlist + GNN",
    "shortlist+metric": "pool 200 + shortlist + metric verification",
    "shortlist+gnn+metric": "**full path**: pool 200 + shortlist + GNN + metric verification",
}


def phase1(scene_name: str, data: Path, loso: Path, out: Path, variant: str, k: int, n_eval: int, n_train: int):
    import torch

    from sarloc.core.registration import LocalRegistrar
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.refine import dense_gallery, gather
    from sarloc.trainer.checkpoint import checkpoint_embed_fns, load_checkpoint

    d = out / scene_name
    d.mkdir(parents=True, exist_ok=True)
    sets = {
        "eval_arbitrary": ("arbitrary", n_eval, 0),
        "eval_aligned": ("aligned", n_eval, 0),
        "train": ("arbitrary", n_train, 1),
    }
    if all((d / f"{s}.npz").is_file() for s in sets):
        return
    scene = load_scene(data / scene_name)
    ckpt = loso / scene_name / variant / "checkpoint.pt"
    model, cfg, _ = load_checkpoint(ckpt)
    fs, fo = checkpoint_embed_fns(model)
    w = 64
    t0 = time.time()
    with torch.no_grad():
        gcache = d / "gallery.npz"
        if gcache.is_file():
            z = np.load(gcache)
            gal = (z["emb"], z["centres"])
        else:
            gal = dense_gallery(scene, fo, cfg.preprocess, w, 8)
            np.savez(gcache, emb=gal[0], centres=gal[1])
        print(f"{scene_name}: gallery {len(gal[0])} windows in {time.time() - t0:.0f} s", flush=True)
        reg = LocalRegistrar(scene.optical_gray)
        for name, (kind, n, seed) in sets.items():
            if (d / f"{name}.npz").is_file():
                continue
            q = make_queries(scene, kind, w, n, seed)
            cd = gather(scene, q, fs, gal, cfg.preprocess, k, reg)
            cd.save(d / f"{name}.npz")
            print(f"{scene_name}/{name}: {len(q.origins)} queries, ms/query {cd.ms}", flush=True)
    (d / "encoder.json").write_text(json.dumps({"checkpoint": str(ckpt), "sha256": _sha(ckpt)}))


def phase1b(scene_name: str, data: Path, out: Path, pool: int) -> None:
    """Pools of ``pool`` coarse candidates per query with their low-resolution registration (fold-independent)."""
    from sarloc.core.registration import ShortlistRegistrar
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.refine import CandidateData, gather_pool

    d = out / scene_name
    sets = {"eval_arbitrary": ("arbitrary", 0), "eval_aligned": ("aligned", 0), "train": ("arbitrary", 1)}
    if all((d / f"pool_{s}.npz").is_file() for s in sets):
        return
    scene = load_scene(data / scene_name)
    z = np.load(d / "gallery.npz")
    gal = (z["emb"], z["centres"])
    t0 = time.time()
    sreg = ShortlistRegistrar(scene.optical_gray)
    init_s = time.time() - t0
    for name, (kind, seed) in sets.items():
        cd = CandidateData.load(d / f"{name}.npz")
        q = make_queries(scene, kind, cd.window_px, len(cd.truth) if kind == "arbitrary" else None, seed)
        if kind == "aligned":
            q = make_queries(scene, kind, cd.window_px, 200, seed)
        assert np.allclose(q.centres, cd.truth), "queries differ from phase 1"
        pd = gather_pool(scene, q, cd.cands.query, gal, pool, sreg)
        pd.ms["embed"] = cd.ms["embed"]
        pd.save(d / f"pool_{name}.npz")
        print(f"{scene_name}/{name}: pool {pool}, ms/query {pd.ms}, shortlist init {init_s:.1f} s", flush=True)


def _sha(p: Path) -> str:
    from sarloc.core.artifacts import sha256_file

    return sha256_file(p)


def phase2(
    scene_name: str,
    data: Path,
    out: Path,
    k: int,
    steps: int,
    threshold: float,
    radius_px: float,
    rescore: int = 0,
    joint: bool = False,
):
    import torch

    from sarloc.core.scene import load_scene
    from sarloc.eval.refine import CandidateData, evaluate_refined, fit_verifier
    from sarloc.runtime.refine import OnnxRefiner
    from sarloc.trainer.checkpoint import load_joint_refiner
    from sarloc.trainer.models.refiner import RefinerConfig
    from sarloc.trainer.refiner_train import export_refiner, train_refiner

    torch.set_num_threads(1)
    d = out / scene_name
    res_path = d / "refine_eval.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    others = [s for s in SCENES if s != scene_name and (out / s / "train.npz").is_file()]
    train = [CandidateData.load(out / s / "train.npz").top(k) for s in others]
    dim = train[0].cands.emb.shape[2]
    enc = json.loads((d / "encoder.json").read_text())
    init = load_joint_refiner(enc["checkpoint"]) if joint else None
    if joint and init is None:
        raise SystemExit(f"--joint: {enc['checkpoint']} has no jointly trained refiner (sarloc train --refiner)")
    t0 = time.time()
    model = train_refiner(
        [(t.cands, t.positives()) for t in train], RefinerConfig(k=k, embed_dim=dim), steps=steps, init=init
    )
    onnx_path = export_refiner(
        model, d / "refiner.onnx", parent_sha256=enc["sha256"], info={"trained_on": others, "held_out": scene_name}
    )
    train_s = time.time() - t0
    refiner = OnnxRefiner(onnx_path)
    # verifier: fitted per re-ranker feature source on the same training lists
    verifiers = {}
    for rr in ("none", "gnn"):
        verifiers[rr] = fit_verifier(train, rr, refiner, radius_px, meta={"trained_on": others})
        verifiers[rr].save(d / f"verifier_{rr}.json", parent_sha256=enc["sha256"])
    scene = load_scene(data / scene_name)
    result = {"scene": scene_name, "trained_on": others, "refiner_train_s": train_s, "joint": joint, "steps": steps}
    for name in ("eval_arbitrary", "eval_aligned"):
        full = CandidateData.load(d / f"{name}.npz")
        cd = full.top(k)
        r = evaluate_refined(scene, cd, None, refiner, ("none", "qe", "kreciprocal", "spatial", "gnn"))
        for rr, v in verifiers.items():
            r[rr + "+metric"] = evaluate_refined(scene, cd, v, refiner, (rr,), threshold)[rr + "+metric"]
        # the first 100 queries: the classical baseline's query set in the LOSO table
        r["gnn+metric@100"] = evaluate_refined(scene, cd.queries(100), verifiers["gnn"], refiner, ("gnn",), threshold)[
            "gnn+metric"
        ]
        if full.cands.k > k:  # verification over more coarse candidates (no GNN: it takes K nodes)
            v2 = verifiers["none"]
            r[f"none+metric@k{full.cands.k}"] = evaluate_refined(scene, full, v2, None, ("none",), threshold)[
                "none+metric"
            ]
        result[name.replace("eval_", "")] = r
    if all((out / s / "pool_train.npz").is_file() for s in [*others, scene_name]):
        _pool_family(
            scene_name, data, out, others, k, steps, threshold, radius_px, result, enc["sha256"], rescore, init
        )
    res_path.write_text(json.dumps(result, indent=1))
    return result


def _pool_family(
    scene_name, data, out, others, k, steps, threshold, radius_px, result, parent, rescore=0, init=None
) -> None:
    """The full path: pool of P -> shortlister -> top-K -> GNN -> full-resolution registration -> verifier.

    With ``rescore`` > K, the K are chosen with a narrow full-resolution look at the shortlister's top ``rescore``
    (:func:`sarloc.eval.refine.rescored_order`), for the training lists too. ``init``: the refiner trained jointly
    with the encoder (``steps`` fine-tune it; 0 keeps it).
    """
    from sarloc.core.registration import LocalRegistrar, ShortlistRegistrar
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.refine import PoolData, evaluate_refined, finish_pool, fit_verifier
    from sarloc.runtime.refine import OnnxRefiner, Shortlister, shortlist_features
    from sarloc.trainer.models.refiner import RefinerConfig
    from sarloc.trainer.refiner_train import export_refiner, train_refiner

    d = out / scene_name
    pools = {s: PoolData.load(out / s / "pool_train.npz") for s in others}
    f = np.concatenate([shortlist_features(p.low, p.sims, p.valid)[p.valid] for p in pools.values()])
    y = np.concatenate([p.hits()[p.valid] for p in pools.values()])
    sl = Shortlister.fit(f, y, radius_px=32.0, meta={"trained_on": others})
    sl.save(d / "shortlister.json", parent_sha256=parent)

    def lists(name, pool, kind, seed):
        scene = load_scene(data / name)
        gal = np.load(out / name / "gallery.npz")["emb"]
        n = len(pool.truth)
        q = make_queries(scene, kind, pool.window_px, n if kind == "arbitrary" else 200, seed)
        low = ShortlistRegistrar(scene.optical_gray) if rescore > k else None
        return scene, finish_pool(scene, q, pool, gal, sl, k, LocalRegistrar(scene.optical_gray), rescore, low)

    t0 = time.time()
    train = [lists(s, pools[s], "arbitrary", 1)[1] for s in others]
    dim = train[0].cands.emb.shape[2]
    model = train_refiner(
        [(t.cands, t.positives()) for t in train], RefinerConfig(k=k, embed_dim=dim), steps=steps, init=init
    )
    rpath = export_refiner(
        model,
        d / "refiner_pool.onnx",
        parent_sha256=parent,
        info={"trained_on": others, "held_out": scene_name, "lists": "pool+shortlist"},
    )
    refiner = OnnxRefiner(rpath)
    verifiers = {}
    for rr in ("none", "gnn"):
        verifiers[rr] = fit_verifier(train, rr, refiner, radius_px, meta={"trained_on": others, "lists": "pool"})
        verifiers[rr].save(d / f"verifier_pool_{rr}.json", parent_sha256=parent)
    result["pool_train_s"] = time.time() - t0
    result["rescore"] = rescore
    for name, kind in (("eval_arbitrary", "arbitrary"), ("eval_aligned", "aligned")):
        pool = PoolData.load(d / f"pool_{name}.npz")
        scene, cd = lists(scene_name, pool, kind, 0)
        r = result[kind]
        r["shortlist"] = evaluate_refined(scene, cd, None, refiner, ("given",))["given"]
        r["shortlist+gnn"] = evaluate_refined(scene, cd, None, refiner, ("gnn",))["gnn"]
        r["shortlist+metric"] = evaluate_refined(scene, cd, verifiers["none"], refiner, ("none",), threshold)[
            "none+metric"
        ]
        r["shortlist+gnn+metric"] = evaluate_refined(scene, cd, verifiers["gnn"], refiner, ("gnn",), threshold)[
            "gnn+metric"
        ]
        r["shortlist+gnn+metric@100"] = evaluate_refined(
            scene, cd.queries(100), verifiers["gnn"], refiner, ("gnn",), threshold
        )["gnn+metric"]


def cfog_result(loso: Path, scene_name: str, kind: str) -> dict | None:
    p = loso / scene_name / "cfog" / "eval.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())
    r = r.get("results", r)
    return r.get(kind)


def table(out: Path, loso: Path) -> str:
    lines = []
    for kind in ("arbitrary", "aligned"):
        lines += [
            f"\n**{kind}** queries (64-px windows, 200 per scene; CFOG: the first 100)\n",
            "| held-out scene | method | R@1 | R@5 | R@10 | median err (m) | p90 err (m) | <=1 px | <=1/4 tile | "
            "<=1 tile | ms/query |",
            "|---" * 11 + "|",
        ]
        agg: dict[str, list] = {}
        for s in SCENES:
            p = out / s / "refine_eval.json"
            if not p.is_file():
                continue
            r = json.loads(p.read_text())[kind]
            c = cfog_result(loso, s, kind)
            rows = [("classical CFOG (whole map)", c)] + [(LABELS[m], r.get(m)) for m in METHODS]
            for label, m in rows:
                if not m:
                    continue
                agg.setdefault(label, []).append(m)
                lines.append(
                    f"| {s} | {label} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | "
                    f"{m['median_error_m']:.0f} | {m['p90_error_m']:.0f} | {m.get('within_1px', float('nan')):.2f} | "
                    f"{m.get('within_quarter_tile', float('nan')):.2f} | {m.get('within_tile', float('nan')):.2f} | "
                    f"{m['ms_per_query']:.1f} |"
                )
        for label, ms in agg.items():

            def mean(key, ms=ms):
                return float(np.mean([m.get(key, np.nan) for m in ms]))

            lines.append(
                f"| **mean of {len(ms)}** | {label} | {mean('recall@1'):.3f} | {mean('recall@5'):.3f} | "
                f"{mean('recall@10'):.3f} | {mean('median_error_m'):.0f} | {mean('p90_error_m'):.0f} | "
                f"{mean('within_1px'):.2f} | {mean('within_quarter_tile'):.2f} | {mean('within_tile'):.2f} | "
                f"{mean('ms_per_query'):.1f} |"
            )
    lines += [
        "\n**confidence** (full path, arbitrary queries; P(registered centre within 16 px)); threshold 0.5\n",
        "| held-out scene | abstain | false fixes among trusted | ECE | reliability bins (predicted/observed, n) |",
        "|---|---|---|---|---|",
    ]
    for s in SCENES:
        p = out / s / "refine_eval.json"
        if not p.is_file():
            continue
        a = json.loads(p.read_text())["arbitrary"]
        m = a.get("shortlist+gnn+metric", a["gnn+metric"])
        bins = "; ".join(f"{b['predicted']:.2f}/{b['observed']:.2f} ({b['n']})" for b in m["reliability"])
        lines.append(f"| {s} | {m['abstain_rate']:.2f} | {m['false_fix_rate']:.3f} | {m['ece']:.3f} | {bins} |")
    return "\n".join(lines)


def summary(outs: list[Path], loso: Path, kind: str = "arbitrary") -> str:
    """One compact table comparing several runs (output folders) of this script, per held-out scene."""
    from sarloc.eval.refine import PoolData

    cols = [
        ("pool recall@200", None),
        ("coarse", "none"),
        ("GNN", "gnn"),
        ("shortlist", "shortlist"),
        ("shortlist + GNN", "shortlist+gnn"),
        ("full path", "shortlist+gnn+metric"),
    ]
    head = "| held-out scene | run | " + " | ".join(c for c, _ in cols) + " | full path median err (m) | CFOG |"
    lines = [f"R@1 of each stage, {kind} queries", "", head, "|---" * (len(cols) + 4) + "|"]
    means: dict[str, list] = {}
    for s in SCENES:
        c = cfog_result(loso, s, kind)
        for out in outs:
            p = out / s / "refine_eval.json"
            if not p.is_file():
                continue
            r = json.loads(p.read_text())[kind]
            pool = PoolData.load(out / s / f"pool_eval_{kind}.npz")
            vals = [float(pool.hits().any(1).mean())] + [r[m]["recall@1"] if m in r else np.nan for _, m in cols[1:]]
            full = r.get("shortlist+gnn+metric", {})
            means.setdefault(str(out), []).append(vals)
            cf = f"{c['recall@1']:.3f}" if c else "-"
            lines.append(
                f"| {s} | {out.name} | "
                + " | ".join(f"{v:.3f}" for v in vals)
                + f" | {full.get('median_error_m', np.nan):.0f} | {cf} |"
            )
    for out, rows in means.items():
        m = np.nanmean(np.array(rows), 0)
        lines.append(f"| **mean of {len(rows)}** | {Path(out).name} | " + " | ".join(f"{v:.3f}" for v in m) + " | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--loso", type=Path, default=Path("runs/loso"))
    ap.add_argument("--out", type=Path, default=Path("runs/refine"))
    ap.add_argument("--variant", default="none")
    ap.add_argument("--scenes", default=",".join(SCENES))
    ap.add_argument("--k", type=int, default=10, help="candidates per query (GNN nodes)")
    ap.add_argument("--store-k", type=int, default=20, help="candidates gathered and registered in phase 1")
    ap.add_argument("--eval-queries", type=int, default=200)
    ap.add_argument("--train-queries", type=int, default=400)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--radius-px", type=float, default=16.0)
    ap.add_argument("--pool", type=int, default=200, help="coarse candidates shortlisted at low resolution")
    ap.add_argument("--phase", choices=("1", "1b", "2", "all"), default="all")
    ap.add_argument(
        "--rescore", type=int, default=0, help="full path: narrow full-resolution look at the shortlister's top N"
    )
    ap.add_argument(
        "--joint",
        action="store_true",
        help="start from the refiner trained jointly with each encoder (sarloc train --refiner); --steps 0 keeps it",
    )
    ap.add_argument("--table", action="store_true")
    ap.add_argument(
        "--summary", nargs="+", type=Path, metavar="OUT", help="compact R@1-per-stage table comparing these runs"
    )
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.out, a.loso))
        return 0
    if a.summary:
        print(summary(a.summary, a.loso))
        return 0
    scenes = a.scenes.split(",")
    if a.phase in ("1", "all"):
        for s in scenes:
            phase1(s, a.data, a.loso, a.out, a.variant, a.store_k, a.eval_queries, a.train_queries)
    if a.phase in ("1b", "all"):
        for s in scenes:
            phase1b(s, a.data, a.out, a.pool)
    if a.phase in ("2", "all"):
        for s in scenes:
            r = phase2(s, a.data, a.out, a.k, a.steps, a.threshold, a.radius_px, a.rescore, a.joint)
            a_ = r["arbitrary"]
            print(s, {m: round(a_[m]["recall@1"], 3) for m in METHODS if m in a_}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
