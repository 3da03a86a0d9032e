"""The accuracy section's plots: recall@k per method, the error CDF, the reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import Report, num, plt, save
from .runs import COARSE, FULL_PATH, KINDS, kind_of, mean, methods_of


def plot_recall(rep: Report, ref: dict, cfog: dict, scenes: list[str], common: list[str]) -> Path:
    pyplot = plt()
    ks = (1, 5, 10)
    fig, axes = pyplot.subplots(1, 2, figsize=(9.0, 3.8), sharey=True)
    cmap = pyplot.get_cmap("tab20")
    handles: dict[str, Any] = {}
    for ax, kind in zip(axes, KINDS, strict=True):
        for i, m in enumerate(methods_of(ref, kind)):
            ys = [mean(kind_of(ref[s], kind).get(m, {}).get(f"recall@{k}") for s in scenes) for k in ks]
            full = m == FULL_PATH
            (h,) = ax.plot(
                ks,
                [np.nan if y is None else y for y in ys],
                marker="o",
                ms=3,
                color=cmap(i % 20),
                lw=2.5 if full else 1,
                label=m + (" (full path)" if full else ""),
            )
            handles.setdefault(h.get_label(), h)
        cs = common or sorted(cfog)
        ys = [mean(kind_of(cfog[s], kind).get(f"recall@{k}") for s in cs if s in cfog) for k in ks]
        if any(y is not None for y in ys):
            (h,) = ax.plot(
                ks, [np.nan if y is None else y for y in ys], "k--", marker="s", ms=3, lw=1.5, label="classical CFOG"
            )
            handles.setdefault(h.get_label(), h)
        ax.set_xticks(ks)
        ax.set_xlabel("k")
        ax.set_title(f"{kind} queries")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"recall@k (mean of {len(scenes) or len(cfog)} scene(s))")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.77, 1))
    return save(fig, rep.figure("perf_recall_at_k.png"), tight=False)


def plot_cdf(rep: Report, ref: dict, scenes: list[str]) -> Path:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.4, 3.8))
    for m, style in ((FULL_PATH, {"color": "#C44E52", "lw": 2}), (COARSE, {"color": "#4C72B0", "lw": 1.2})):
        e = np.sort(
            [
                float(x)
                for s in scenes
                for x in (kind_of(ref[s], "arbitrary").get(m) or {}).get("errors_m", [])
                if num(x) is not None
            ]
        )
        if not len(e):
            continue
        ax.step(
            np.maximum(e, 0.1),
            np.arange(1, len(e) + 1) / len(e),
            where="post",
            label=f"{'full path' if m == FULL_PATH else 'coarse'} ({len(e)} queries)",
            **style,
        )
    ax.axvline(50, color="grey", ls=":", lw=1, label="50 m")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("position error, m (log)")
    ax.set_ylabel("fraction of queries")
    ax.set_title(f"Error CDF, arbitrary queries, pooled over {len(scenes)} scene(s)")
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, rep.figure("perf_error_cdf.png"))


def _pool(bins: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability bins of every scene pooled by bin name: (count, mean predicted, mean observed), by prediction."""
    pooled: dict[str, list[float]] = {}
    for b in bins:
        n, p, o = num(b.get("n")), num(b.get("predicted")), num(b.get("observed"))
        if not n or p is None or o is None:
            continue
        acc = pooled.setdefault(str(b.get("bin")), [0.0, 0.0, 0.0])
        acc[0] += n
        acc[1] += n * p
        acc[2] += n * o
    keys = sorted(pooled, key=lambda k: pooled[k][1] / pooled[k][0])
    n = np.array([pooled[k][0] for k in keys])
    pred = np.array([pooled[k][1] for k in keys]) / np.maximum(n, 1)
    obs = np.array([pooled[k][2] for k in keys]) / np.maximum(n, 1)
    return n, pred, obs


def plot_reliability(rep: Report, bins: list[dict], n_scenes: int) -> Path:
    pyplot = plt()
    n, pred, obs = _pool(bins)
    fig, ax = pyplot.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    if len(n):
        ax.plot(pred, obs, color="#C44E52", lw=1)
        ax.scatter(pred, obs, s=20 + 400 * n / n.max(), color="#C44E52", alpha=0.7, label="full path (size ~ n)")
        for x, y, c in zip(pred, obs, n, strict=True):
            ax.annotate(f"{int(c)}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("predicted P(fix within radius)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability, pooled over {n_scenes} scene(s)")
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, rep.figure("perf_reliability.png"))
