"""Section "Held-out accuracy: full path vs classical CFOG" from the leave-one-scene-out runs.

Reads ``<refine>/<scene>/refine_eval.json`` (``benchmarks/refine_loso.py``) and ``<loso>/<scene>/cfog/eval.json``
(``benchmarks/loso.py``); the plots are in :mod:`report.accuracy_plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .accuracy_plots import plot_cdf, plot_recall, plot_reliability
from .common import DASH, Report, code, cols, fx, load_all, machine, ms, not_run, num, table
from .runs import COARSE, FULL_PATH, KINDS, LABELS, kind_of, mean, methods_of

TITLE = "Held-out accuracy: full path vs classical CFOG"
CLASSICAL_TARGET_RATIO = 0.01  # encoder + search + refine per window vs the classical per-query time
TARGET = f"encoder + search + refine per window <= {CLASSICAL_TARGET_RATIO:.0%} of the classical per-query time"
METHOD_COLUMNS = "method|R@1|R@5|R@10|median err m|p90 err m|<= 1 tile|ms/query|abstain|false fixes|ECE"


def _runs(refine: Path, loso: Path) -> tuple[dict[str, dict], dict[str, dict], dict, list[str]]:
    """Refinement and CFOG results by scene, the first CFOG run (its machine), a message per unreadable file."""
    refine_paths = sorted(Path(refine).glob("*/refine_eval.json")) if Path(refine).is_dir() else []
    cfog_paths = sorted(Path(loso).glob("*/cfog/eval.json")) if Path(loso).is_dir() else []
    ref_found, errs = load_all(refine_paths)
    cfog_found, cfog_errs = load_all(cfog_paths)
    ref = {str(d.get("scene") or p.parent.name): d for p, d in ref_found}
    cfog = {str(d.get("scene") or p.parent.parent.name): d for p, d in cfog_found}
    return ref, cfog, cfog_found[0][1] if cfog_found else {}, errs + cfog_errs


def section_accuracy(rep: Report, refine: Path, loso: Path, cmd_refine: str, cmd_cfog: str) -> None:
    rep.commands.append((TITLE + " (refinement)", cmd_refine))
    rep.commands.append((TITLE + " (CFOG baseline)", cmd_cfog))
    ref, cfog, cfog_host, errs = _runs(refine, loso)
    if not ref and not cfog:
        rep.sections.append(not_run(TITLE, f"{cmd_cfog}; {cmd_refine}", "; ".join(errs) or None))
        rep.targets.append((TARGET, "not measured", "not measured"))
        return
    out = [
        "",
        f"## {TITLE}",
        "",
        "Commands:",
        "",
        *code(f"{cmd_cfog}\n{cmd_refine}\n{cmd_refine} --table   # the full tables"),
    ]
    out += [
        "",
        f"Machine: refinement runs: {machine(next(iter(ref.values()))) if ref else DASH}; "
        f"CFOG runs: {machine(cfog_host) if cfog_host else DASH}.",
        "",
        "Each scene held out in turn: encoder, shortlister, graph refiner and verifier trained without it. "
        "`ms/query` is per query after the one-off gallery embedding (encoder: SAR embedding + search + "
        "re-ranking, + registration for the verified rows; CFOG: FFT correlation over the whole map).",
    ]
    if errs:
        out += ["", "Skipped: " + "; ".join(errs)]
    if not ref:
        out += ["", f"Refinement not run: `{cmd_refine}`"]
    if not cfog:
        out += ["", f"CFOG baseline not run: `{cmd_cfog}`"]
    scenes = sorted(ref)
    common = [s for s in scenes if s in cfog]
    out += _per_scene(rep, ref, cfog, common)
    for kind in KINDS:
        out += _method_table(ref, cfog, scenes, common, kind)
    out += _confidence(ref, scenes)
    out += _plots(rep, ref, cfog, scenes, common)
    rep.sections.append(out)


def _per_scene(rep: Report, ref: dict, cfog: dict, common: list[str]) -> list[str]:
    """The per-scene table of arbitrary queries; adds the time-ratio target and the R@1 headline."""
    rows, ratios = [], []
    for s in sorted(set(ref) | set(cfog)):
        a = kind_of(ref.get(s, {}), "arbitrary")
        full = a.get(FULL_PATH) or a.get("gnn+metric") or {}
        coarse = a.get(COARSE) or {}
        c = kind_of(cfog.get(s, {}), "arbitrary")
        fm, cm = num(full.get("ms_per_query")), num(c.get("ms_per_query"))
        ratio = fm / cm if fm is not None and cm else None
        if ratio is not None:
            ratios.append(ratio)
        rows.append(
            [
                s,
                fx(full.get("recall@1"), 3),
                fx(coarse.get("recall@1"), 3),
                fx(c.get("recall@1"), 3),
                ms(full.get("ms_per_query")),
                ms(c.get("ms_per_query")),
                DASH if ratio is None else f"{100 * ratio:.1f} %",
            ]
        )
    if common:
        rows.append(_mean_row(ref, cfog, common, ratios))
    spec = "held-out scene|full path R@1|coarse R@1|CFOG R@1|full path ms/query|CFOG ms/query|full / CFOG time"
    _ratio_target(rep, ratios)
    if common:
        fr = mean(kind_of(ref[s], "arbitrary").get(FULL_PATH, {}).get("recall@1") for s in common)
        cr = mean(kind_of(cfog[s], "arbitrary").get("recall@1") for s in common)
        measured = f"{fx(fr, 3)} vs {fx(cr, 3)} (mean of {len(common)} scene(s))"
        rep.headlines.append(("held-out R@1, arbitrary queries (full path vs CFOG)", measured, TITLE))
    return ["", "### Per scene (arbitrary queries)", "", *table(cols(spec), rows)]


def _mean_row(ref: dict, cfog: dict, common: list[str], ratios: list[float]) -> list[str]:
    def full(s: str, key: str) -> object:
        return kind_of(ref[s], "arbitrary").get(FULL_PATH, {}).get(key)

    return [
        "**mean of common scenes**",
        fx(mean(full(s, "recall@1") for s in common), 3),
        fx(mean(kind_of(ref[s], "arbitrary").get(COARSE, {}).get("recall@1") for s in common), 3),
        fx(mean(kind_of(cfog[s], "arbitrary").get("recall@1") for s in common), 3),
        ms(mean(full(s, "ms_per_query") for s in common)),
        ms(mean(kind_of(cfog[s], "arbitrary").get("ms_per_query") for s in common)),
        f"{100 * float(np.mean(ratios)):.1f} %" if ratios else DASH,
    ]


def _ratio_target(rep: Report, ratios: list[float]) -> None:
    if not ratios:
        rep.targets.append((TARGET, "needs refinement and CFOG runs of the same scene", "not measured"))
        return
    worst = max(ratios)
    measured = (
        f"full path / CFOG time {100 * min(ratios):.1f}-{100 * worst:.1f} % over {len(ratios)} "
        f"scene(s), mean {100 * float(np.mean(ratios)):.1f} %"
    )
    rep.targets.append((TARGET + " (same map)", measured, "met" if worst <= CLASSICAL_TARGET_RATIO else "missed"))


def _method_table(ref: dict, cfog: dict, scenes: list[str], common: list[str], kind: str) -> list[str]:
    """The mean over scenes per method for one kind of query, CFOG last."""
    methods = methods_of(ref, kind)
    if not methods:
        return []
    rows = []
    for m in methods:
        per_scene = [kind_of(ref[s], kind)[m] for s in scenes if m in kind_of(ref[s], kind)]
        rows.append(_method_row(LABELS.get(m, m), per_scene))
    cs = [kind_of(cfog[s], kind) for s in common if kind_of(cfog[s], kind)]
    if cs:
        rows.append(_method_row(LABELS["cfog"] + (f" ({len(cs)} common scene(s))"), cs))
    return ["", f"### Mean over {len(scenes)} scene(s), {kind} queries", "", *table(cols(METHOD_COLUMNS), rows)]


def _method_row(label: str, per_scene: list[dict]) -> list[str]:
    def avg(key: str) -> float | None:
        return mean(m.get(key) for m in per_scene)

    return [
        label,
        fx(avg("recall@1"), 3),
        fx(avg("recall@5"), 3),
        fx(avg("recall@10"), 3),
        fx(avg("median_error_m"), 0),
        fx(avg("p90_error_m"), 0),
        fx(avg("within_tile"), 2),
        ms(avg("ms_per_query")),
        fx(avg("abstain_rate"), 2),
        fx(avg("false_fix_rate"), 3),
        fx(avg("ece"), 3),
    ]


def _confidence(ref: dict, scenes: list[str]) -> list[str]:
    rows = []
    for s in scenes:
        m = kind_of(ref[s], "arbitrary").get(FULL_PATH) or {}
        if m.get("abstain_rate") is not None or m.get("ece") is not None:
            rows.append(
                [
                    s,
                    fx(m.get("abstain_rate"), 2),
                    fx(m.get("false_fix_rate"), 3),
                    fx(m.get("ece"), 3),
                    ms(m.get("trusted_median_error_m")),
                ]
            )
    if not rows:
        return []
    head = ["held-out scene", "abstain", "false fixes among trusted", "ECE", "trusted median err m"]
    return ["", "### Confidence of the full path (arbitrary queries)", "", *table(head, rows)]


def _plots(rep: Report, ref: dict, cfog: dict, scenes: list[str], common: list[str]) -> list[str]:
    out = []
    if ref or cfog:
        out += ["", rep.image(plot_recall(rep, ref, cfog, scenes, common), "recall@k per method")]
    if any("errors_m" in kind_of(ref[s], "arbitrary").get(m, {}) for s in scenes for m in (FULL_PATH, COARSE)):
        out += ["", rep.image(plot_cdf(rep, ref, scenes), "error CDF, full path vs coarse")]
    bins = [b for s in scenes for b in (kind_of(ref[s], "arbitrary").get(FULL_PATH) or {}).get("reliability") or []]
    if bins:
        out += ["", rep.image(plot_reliability(rep, bins, len(scenes)), "reliability diagram of the full path")]
    return out
