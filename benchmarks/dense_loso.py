"""Learned dense features beside CFOG, leave-one-scene-out: training, whole-map evaluation, per-query selector.

Phases (each resumable; results are JSON under ``--out``):

* ``train``: one learned block trained on the 12 training scenes (every shared scene except the five held out).
  No held-out scene is in its training set, so the same model serves all five held-out scenes.
* ``eval``: per held-out scene, 200 arbitrary 64-px queries, seed 0 (``make_queries``, the LOSO tables' queries),
  matched over the whole map with CFOG alone, ``[CFOG, w * learned]`` and the learned block alone; per-query hit
  rank, error and peak statistics, and ms/query of the three paths measured interleaved in the same run.
* ``folds``: two extra models, each trained on half of the training scenes, describe arbitrary queries (seed 1) on
  the other half: the selector's training data, from scenes its model has not seen (as at test time).
* ``report``: per-scene and pooled table (R@1, median error, wins/losses, McNemar, paired bootstrap 95 % CI),
  oracle and selector; writes ``summary.json`` and prints markdown.

    python benchmarks/dense_loso.py train --steps 1200
    python benchmarks/dense_loso.py eval
    python benchmarks/dense_loso.py folds --fold-steps 500
    python benchmarks/dense_loso.py report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HELD_OUT = ["china_shuguang", "france_s1s2", "india_sih1733_1", "india_sih1733_2", "india_sih1733_3"]
METHODS = ("cfog", "concat", "learned")


def _train_scenes(data: Path, names: list[str] | None, cfg) -> list:
    from sarloc.core.scene import change_fraction, find_scenes, load_scene
    from sarloc.trainer.dense_features_train import prepare_scene

    out = []
    for p in find_scenes([data]):
        if p.name in HELD_OUT or (names is not None and p.name not in names):
            continue
        s = load_scene(p)
        wp = cfg.window_px
        yy, xx = np.mgrid[0 : s.height_px - wp + 1 : 4, 0 : s.width_px - wp + 1 : 4]
        orig = np.stack([xx.ravel(), yy.ravel()], 1)
        orig = orig[change_fraction(s, orig, wp) <= 0.25]
        out.append(prepare_scene(s.name, s.optical_gray, s.sar_gray, cfg, orig))
    return out


def train(args: argparse.Namespace, out_dir: Path, names: list[str] | None = None, steps: int | None = None) -> Path:
    """Train (or reuse) the model of ``out_dir``."""
    from sarloc.trainer.dense_features_train import DenseTrainConfig, train_dense

    ck = out_dir / "checkpoint.pt"
    if ck.is_file():
        return ck
    cfg = DenseTrainConfig(
        steps=steps or args.steps, seed=args.seed, max_minutes=args.max_minutes, p_alone=args.p_alone
    )
    scenes = _train_scenes(Path(args.data), names, cfg)
    print("training on", [s.name for s in scenes], flush=True)
    return train_dense(scenes, out_dir, cfg)


def _hit_rank(peaks: list, centre: np.ndarray, w: int) -> int:
    for r, (px, py, _s) in enumerate(peaks):
        if abs(px - centre[0]) <= w / 2 and abs(py - centre[1]) <= w / 2:
            return r
    return 10**6


def describe_queries(model, scene, queries, w: int = 64) -> dict:
    """Per-query results of the three matchers on one scene (whole map), with interleaved timings."""
    from sarloc.core.cfog import DenseMatcher
    from sarloc.core.preprocess import crop_windows
    from sarloc.trainer.dense_features import FeatureMatcher, map_features, match_scores, peak_stats, window_features

    t0 = time.perf_counter()
    matchers = {"cfog": DenseMatcher(scene.optical_gray, max_window_px=w)}
    build_s = {"cfog": time.perf_counter() - t0}
    for m in ("concat", "learned"):
        t0 = time.perf_counter()
        matchers[m] = FeatureMatcher(map_features(model, scene.optical_gray, m), max_window_px=w)
        build_s[m] = time.perf_counter() - t0
    res = {m: {"rank": [], "pred": [], "stats": [], "top2": []} for m in METHODS}
    ms = {m: 0.0 for m in METHODS}
    for i, win in enumerate(crop_windows(scene.sar_gray, queries.origins, w)):
        for m in METHODS:
            t0 = time.perf_counter()
            if m == "cfog":
                scores = matchers[m].score_map(win)
            else:
                scores = matchers[m].score_features(window_features(model, win, m))
            peaks = match_scores(scores, w, w, top_k=10)
            ms[m] += time.perf_counter() - t0
            r = res[m]
            r["rank"].append(_hit_rank(peaks, queries.centres[i], w))
            r["pred"].append([peaks[0][0], peaks[0][1]])
            r["top2"].append([list(p[:2]) for p in peaks[:2]])
            r["stats"].append(peak_stats(scores, peaks).tolist())
    n = max(1, len(queries.origins))
    for m in METHODS:
        pred = np.asarray(res[m]["pred"])
        err = scene.frame.metric_distance(pred[:, 0], pred[:, 1], queries.centres[:, 0], queries.centres[:, 1])
        res[m].update({"err_m": err.tolist(), "ms_per_query": 1e3 * ms[m] / n, "map_build_s": build_s[m]})
    res["centres"] = queries.centres.tolist()
    res["map_mpx"] = scene.width_px * scene.height_px / 1e6
    return res


def evaluate(args: argparse.Namespace, out: Path) -> None:
    """Held-out scenes, one JSON each."""
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.trainer.dense_features_train import load_dense

    model = load_dense(out / "model" / "checkpoint.pt")
    for name in args.scenes:
        f = out / f"eval_{name}.json"
        if f.is_file():
            continue
        t0 = time.time()
        scene = load_scene(Path(args.data) / name)
        q = make_queries(scene, "arbitrary", 64, args.queries, 0)
        res = describe_queries(model, scene, q)
        res.update({"scene": name, "queries": len(q.origins), "seed": 0, "wall_s": round(time.time() - t0, 1)})
        res["host"] = {"machine": platform.machine(), "cpus": os.cpu_count(), "load": os.getloadavg()}
        atomic_write_json(f, res)
        print(name, {m: round(float(np.mean(np.asarray(res[m]["rank"]) < 1)), 3) for m in METHODS}, flush=True)


def folds(args: argparse.Namespace, out: Path) -> None:
    """Cross-fitted selector data: two half-models, each describing the other half's scenes."""
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.core.scene import find_scenes, load_scene, make_queries
    from sarloc.trainer.dense_features_train import load_dense

    names = sorted(p.name for p in find_scenes([Path(args.data)]) if p.name not in HELD_OUT)
    halves = [names[0::2], names[1::2]]
    for k, half in enumerate(halves):
        f = out / f"selector_fold{k}.json"
        if f.is_file():
            continue
        ck = train(args, out / f"fold{k}", names=half, steps=args.fold_steps)
        model = load_dense(ck)
        per = {}
        for name in halves[1 - k]:
            scene = load_scene(Path(args.data) / name)
            q = make_queries(scene, "arbitrary", 64, args.selector_queries, 1)
            per[name] = describe_queries(model, scene, q)
        atomic_write_json(f, {"train": half, "test": halves[1 - k], "scenes": per})


def _hits(res: dict, m: str) -> np.ndarray:
    return np.asarray(res[m]["rank"]) < 1


def _sel_x(res: dict) -> np.ndarray:
    from sarloc.trainer.dense_features_select import selector_features

    return selector_features(res["cfog"]["stats"], res["concat"]["stats"], res["cfog"]["top2"], res["concat"]["top2"])


def fit_selector(out: Path):
    """Selector fitted on the cross-fitted training-scene queries (None when the folds are missing)."""
    from sarloc.trainer.dense_features_select import Selector, ece

    files = [out / f"selector_fold{k}.json" for k in (0, 1)]
    if not all(f.is_file() for f in files):
        return None, {}
    per = [r for f in files for r in json.loads(f.read_text())["scenes"].values()]
    x = np.concatenate([_sel_x(r) for r in per])
    ha = np.concatenate([_hits(r, "cfog") for r in per])
    hb = np.concatenate([_hits(r, "concat") for r in per])
    sel = Selector().fit(x, ha, hb)
    pa, pb = sel.proba(x)
    info = {"train_queries": len(x), "train_r1_cfog": float(ha.mean()), "train_r1_concat": float(hb.mean())}
    info.update({"train_ece_cfog": ece(pa, ha), "train_ece_concat": ece(pb, hb), "models": sel.models})
    return sel, info


def _scene_row(res: dict, sel) -> dict:
    from sarloc.trainer.dense_features_select import mcnemar_p, paired_bootstrap_ci

    h = {m: _hits(res, m) for m in METHODS}
    h["oracle"] = h["cfog"] | h["concat"]
    row: dict = {"scene": res["scene"], "queries": len(h["cfog"]), "map_mpx": res["map_mpx"]}
    if sel is not None:
        x = _sel_x(res)
        h["selector"] = np.where(sel.choose_concat(x), h["concat"], h["cfog"])
        pa, pb = sel.proba(x)
        row["p_cfog"], row["p_concat"] = pa.tolist(), pb.tolist()
    for m, v in h.items():
        row[f"r1_{m}"] = float(v.mean())
    for m in METHODS:
        row[f"median_err_m_{m}"] = float(np.median(res[m]["err_m"]))
        row[f"ms_{m}"] = res[m]["ms_per_query"]
        row[f"map_build_s_{m}"] = res[m]["map_build_s"]
    for m in ("concat", "learned") + (("selector",) if sel is not None else ()):
        row[f"wins_{m}"] = int(np.sum(h[m] & ~h["cfog"]))
        row[f"losses_{m}"] = int(np.sum(h["cfog"] & ~h[m]))
        row[f"mcnemar_p_{m}"] = mcnemar_p(h["cfog"], h[m])
        row[f"ci_{m}"] = paired_bootstrap_ci([(h["cfog"], h[m])])
    gap = row["r1_oracle"] - row["r1_cfog"]
    if sel is not None:
        row["gap_closed"] = (row["r1_selector"] - row["r1_cfog"]) / gap if gap > 0 else float("nan")
    row["_hits"] = {m: v.tolist() for m, v in h.items()}
    return row


def report(out: Path) -> dict:
    """Summary of every evaluated scene; writes ``summary.json``."""
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.trainer.dense_features_select import ece, mcnemar_p, paired_bootstrap_ci

    sel, sel_info = fit_selector(out)
    rows = [_scene_row(json.loads(f.read_text()), sel) for f in sorted(out.glob("eval_*.json"))]
    hits = [{m: np.asarray(v, bool) for m, v in r.pop("_hits").items()} for r in rows]
    pooled: dict = {}
    for m in [k for k in hits[0] if k != "cfog"] if hits else []:
        pooled[f"r1_{m}"] = float(np.mean([h[m].mean() for h in hits]))
        pooled[f"ci_{m}"] = paired_bootstrap_ci([(h["cfog"], h[m]) for h in hits])
        allc, allm = np.concatenate([h["cfog"] for h in hits]), np.concatenate([h[m] for h in hits])
        pooled[f"wins_{m}"], pooled[f"losses_{m}"] = int(np.sum(allm & ~allc)), int(np.sum(allc & ~allm))
        pooled[f"mcnemar_p_{m}"] = mcnemar_p(allc, allm)
    if hits:
        pooled["r1_cfog"] = float(np.mean([h["cfog"].mean() for h in hits]))
    if sel is not None and rows:
        pa = np.concatenate([r.pop("p_cfog") for r in rows])
        pb = np.concatenate([r.pop("p_concat") for r in rows])
        hc, hk = np.concatenate([h["cfog"] for h in hits]), np.concatenate([h["concat"] for h in hits])
        sel_info.update({"heldout_ece_cfog": ece(pa, hc), "heldout_ece_concat": ece(pb, hk)})
        gap = pooled["r1_oracle"] - pooled["r1_cfog"]
        pooled["gap_closed"] = (pooled["r1_selector"] - pooled["r1_cfog"]) / gap if gap > 0 else float("nan")
    man = json.loads((out / "model" / "checkpoint.json").read_text())
    summary = {"scenes": rows, "pooled": pooled, "selector": sel_info, "model": {k: man[k] for k in MODEL_KEYS}}
    atomic_write_json(out / "summary.json", summary)
    return summary


MODEL_KEYS = (
    "training_scenes",
    "steps_done",
    "final_loss",
    "weight",
    "tau",
    "wall_minutes",
    "mining_minutes",
    "parameters",
)


def _ci(c) -> str:
    return f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]"


def _r1_cells(r: dict, has_sel: bool) -> str:
    cells = [f"{r[f'r1_{m}']:.3f}" for m in ("cfog", "concat", "learned", "oracle")]
    if has_sel:
        cells += [f"{r['r1_selector']:.3f}", f"{r['gap_closed']:.2f}"]
    return " | ".join(cells) + " |"


def _pair_cells(r: dict, m: str) -> str:
    return f"{r[f'wins_{m}']}/{r[f'losses_{m}']} | {r[f'mcnemar_p_{m}']:.3f} | {_ci(r[f'ci_{m}'])}"


def markdown(s: dict) -> str:
    """Markdown tables of a :func:`report` summary."""
    has_sel = "r1_selector" in s["pooled"]
    head = "| held-out scene | Mpx | CFOG | CFOG+learned | learned | oracle |"
    head += " selector | gap closed |" if has_sel else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in s["scenes"]:
        lines.append(f"| {r['scene']} | {r['map_mpx']:.2f} | " + _r1_cells(r, has_sel))
    p = s["pooled"]
    lines.append(f"| **mean of {len(s['scenes'])}** | | " + _r1_cells(p, has_sel))
    lines += [
        "",
        "| held-out scene | vs CFOG | wins/losses | McNemar p | R@1 diff, 95 % CI | median err CFOG / +learned (m) "
        "| ms/query CFOG / +learned / learned |",
        "|---|---|---|---|---|---|---|",
    ]
    extra = ("selector",) if has_sel else ()
    for r in s["scenes"]:
        for m in ("concat", "learned", *extra):
            cost = f"{r['ms_cfog']:.1f} / {r['ms_concat']:.1f} / {r['ms_learned']:.1f}" if m == "concat" else ""
            err = f"{r['median_err_m_cfog']:.0f} / {r['median_err_m_concat']:.0f}" if m == "concat" else ""
            lines.append(f"| {r['scene']} | {m} | {_pair_cells(r, m)} | {err} | {cost} |")
    for m in ("concat", "learned", "oracle", *extra):
        lines.append(f"| **pooled** | {m} | {_pair_cells(p, m)} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "eval", "folds", "report", "all"], nargs="?", default="all")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="runs/dense")
    p.add_argument("--scenes", nargs="+", default=HELD_OUT)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--fold-steps", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=0.0)
    p.add_argument("--p-alone", type=float, default=0.25, help="probability of a learned-alone training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--selector-queries", type=int, default=100)
    a = p.parse_args(argv)
    import torch

    from sarloc.core.log import setup_logging

    setup_logging()
    torch.set_num_threads(1)
    out = Path(a.out)
    if a.phase in ("train", "all"):
        train(a, out / "model")
    if a.phase in ("eval", "all"):
        evaluate(a, out)
    if a.phase in ("folds", "all"):
        folds(a, out)
    if a.phase in ("report", "all"):
        print(markdown(report(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
