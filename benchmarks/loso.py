"""Leave-one-scene-out benchmark: each held-out scene x {cfog, none, wasserstein, classifier}.

Trains one encoder per (held-out scene, alignment variant) on all other shared scenes with the ``loso`` preset,
evaluates it on the held-out scene (aligned queries, arbitrary queries, arbitrary against a 50%-overlap gallery)
and runs the classical CFOG baseline on the same queries. Resumable: finished runs (eval.json present) are
skipped. Writes one JSON per run and ``summary.json``; ``--table`` prints the markdown table for the docs.

    python benchmarks/loso.py --data ../shared/data --out runs/loso
    python benchmarks/loso.py --out runs/loso --table > docs/loso_table.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HELD_OUT = ["india_sih1733_1", "india_sih1733_2", "india_sih1733_3", "china_shuguang", "france_s1s2"]
VARIANTS = ["none", "wasserstein", "classifier"]
KINDS = ["aligned", "arbitrary", "arbitrary_overlap50", "arbitrary_dense"]
ORDER = ["cfog", "layout", *VARIANTS]
METRICS = ["recall@1", "recall@5", "recall@10", "median_error_m", "ms_per_query"]


def run(args: argparse.Namespace) -> None:
    from sarloc.core.artifacts import atomic_write_json
    from sarloc.core.log import setup_logging
    from sarloc.core.scene import load_scene, make_queries
    from sarloc.eval.retrieval import EvalConfig, evaluate_cfog
    from sarloc.trainer.config import resolve_config
    from sarloc.trainer.loop import evaluate_checkpoint, train

    setup_logging()
    out = Path(args.out)
    ecfg = EvalConfig(window_px=args.window_px, queries=args.queries, seed=0)
    for held in args.scenes:
        scene_dir = Path(args.data) / held
        for variant in args.variants:
            run_dir = out / held / variant
            if (run_dir / "eval.json").is_file():
                continue
            t0 = time.time()
            if variant == "layout":  # parameter-free layout branch alone, from the "none" checkpoint
                ck = out / held / "none" / "checkpoint.pt"
                if not ck.is_file():
                    continue
                res = evaluate_checkpoint(ck, scene_dir, ecfg, layout_only=True)
                res["variant"] = "layout"
            elif variant == "cfog":
                scene = load_scene(scene_dir)
                res: dict = {"scene": held, "variant": "cfog"}
                for kind in ("aligned", "arbitrary"):
                    q = make_queries(scene, kind, ecfg.window_px, ecfg.queries, ecfg.seed)
                    res[kind] = evaluate_cfog(scene, q, ecfg, max_queries=args.cfog_queries)
            else:
                cfg = resolve_config(
                    args.preset,
                    align=variant,
                    steps=args.steps,
                    seed=args.seed,
                    threads=args.threads,
                    max_minutes=args.max_minutes,
                )
                ckpt = train([args.data], run_dir, cfg, exclude=[held], progress=False)
                res = evaluate_checkpoint(ckpt, scene_dir, ecfg)
                res["variant"] = variant
                res["train"] = {"preset": args.preset, "steps": cfg.steps}
            res["wall_s"] = round(time.time() - t0, 1)
            res["host"] = {
                "machine": platform.machine(),
                "python": platform.python_version(),
                "cpus": __import__("os").cpu_count(),
            }
            atomic_write_json(run_dir / "eval.json", res)
            print(held, variant, {k: round(res[k]["recall@10"], 3) for k in KINDS if k in res}, flush=True)


NAMES = {
    "cfog": "classical CFOG (whole map)",
    "layout": "layout branch only (no learning)",
    "none": "(b) encoder, no alignment",
    "wasserstein": "(c) encoder + Wasserstein",
    "classifier": "(d) encoder + class adv (GRL)",
}


def _steps_done(eval_json: Path) -> str:
    man = eval_json.parent / "checkpoint.json"
    if not man.is_file():
        return ""
    return str(json.loads(man.read_text()).get("info", {}).get("steps_done", ""))


def table(outs: list[Path]) -> str:
    """Markdown tables (one per query/gallery kind) from every eval.json under the ``outs`` roots."""
    import numpy as np

    rows = []
    for out in outs:
        for f in sorted(out.glob("*/*/eval.json")):
            r = json.loads(f.read_text())
            r["_steps"] = _steps_done(f) if r["variant"] != "layout" else "-"
            rows.append(r)
    lines = []
    for kind in KINDS:
        note = " (the CFOG rows repeat its arbitrary-query result: it has no gallery)" if kind != "arbitrary" else ""
        lines.append(f"\n**{kind}** queries{note if kind.startswith('arbitrary_') else ''}\n")
        lines.append("| held-out scene | method | steps | R@1 | R@5 | R@10 | median err (m) | ms/query |")
        lines.append("|---|---|---|---|---|---|---|---|")
        means: dict[str, list] = {}
        for r in sorted(rows, key=lambda r: (r["scene"], ORDER.index(r["variant"]))):
            m = r.get(kind)
            if m is None and r["variant"] == "cfog" and kind.startswith("arbitrary_"):
                m = r.get("arbitrary")
            if m is None:
                continue
            name = NAMES[r["variant"]]
            means.setdefault(name, []).append([m[k] for k in METRICS])
            lines.append(
                f"| {r['scene']} | {name} | {r['_steps']} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | "
                f"{m['recall@10']:.3f} | {m['median_error_m']:.0f} | {m['ms_per_query']:.1f} |"
            )
        for name in [NAMES[v] for v in ORDER if NAMES[v] in means]:
            v = np.mean(means[name], axis=0)
            n = len(means[name])
            lines.append(
                f"| **mean of {n}** | {name} | | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} | {v[3]:.0f} | {v[4]:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="runs/loso", help="run root (with --table: comma-separated roots)")
    p.add_argument("--scenes", nargs="+", default=HELD_OUT)
    p.add_argument("--variants", nargs="+", default=["cfog", *VARIANTS, "layout"])
    p.add_argument("--preset", default="loso")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--max-minutes", type=float, default=None, help="override the preset's wall-time cap (0 = none)")
    p.add_argument("--window-px", type=int, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--cfog-queries", type=int, default=100, help="CFOG is slow on big maps: cap its queries")
    p.add_argument("--table", action="store_true", help="print the markdown table of finished runs and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table([Path(o) for o in a.out.split(",")]))
        return 0
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
