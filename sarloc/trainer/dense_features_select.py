"""Per-query choice between CFOG and ``[CFOG, learned]`` from peak statistics, and paired statistics (numpy only).

The selector holds two logistic regressions, each the probability that one matcher's best peak is a hit given the
peak statistics of both (top score, top minus second peak, second/top ratio, sharpness) and whether the two top
peaks agree; it picks the matcher with the higher probability.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "Selector",
    "ece",
    "fit_logistic",
    "mcnemar_p",
    "paired_bootstrap_ci",
    "predict_logistic",
    "selector_features",
]

FEATURE_NAMES = (
    "cfog_top",
    "cfog_gap",
    "cfog_ratio",
    "cfog_sharp",
    "concat_top",
    "concat_gap",
    "concat_ratio",
    "concat_sharp",
    "top1_agree",
    "top2_agree",
)


def _near(a: np.ndarray, b: np.ndarray, px: float) -> np.ndarray:
    return np.max(np.abs(a - b), axis=-1) <= px


def _top2(tops) -> np.ndarray:
    """``(Q, 2, 2)`` array; a missing second peak (small maps) is put far away, so it never agrees."""
    out = np.full((len(tops), 2, 2), -1e6)
    for i, t in enumerate(tops):
        t = np.asarray(t, np.float64).reshape(-1, 2)[:2]
        out[i, : len(t)] = t
    return out


def selector_features(stats_a, stats_b, top2_a, top2_b, agree_px: float = 4.0) -> np.ndarray:
    """``(Q, 10)`` selector inputs from both matchers' peak statistics and top-2 peak centres.

    Args:
        stats_a, stats_b: ``(Q, 4)`` :func:`~sarloc.trainer.dense_features.peak_stats` of CFOG and of the
            concatenation.
        top2_a, top2_b: per query, the centres of each matcher's (up to) two best peaks.
        agree_px: two peaks agree when within this many pixels (Chebyshev).
    """
    ta, tb = _top2(top2_a), _top2(top2_b)
    agree1 = _near(ta[:, 0], tb[:, 0], agree_px)
    agree2 = _near(ta[:, 0], tb[:, 1], agree_px) | _near(ta[:, 1], tb[:, 0], agree_px)
    return np.column_stack([np.asarray(stats_a), np.asarray(stats_b), agree1, agree2]).astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> dict:
    """L2-regularised logistic regression by Newton's method on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = np.column_stack([(x - mu) / sd, np.ones(len(x))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        g = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"mean": mu.tolist(), "std": sd.tolist(), "coef": w[:-1].tolist(), "bias": float(w[-1])}


def predict_logistic(model: dict, x: np.ndarray) -> np.ndarray:
    """Probabilities of a :func:`fit_logistic` model."""
    z = (x - np.asarray(model["mean"])) / np.asarray(model["std"])
    return 1.0 / (1.0 + np.exp(-(z @ np.asarray(model["coef"]) + model["bias"])))


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[idx == b].mean() - y[idx == b].mean()) * np.mean(idx == b) for b in np.unique(idx)))


class Selector:
    """Chooses ``[CFOG, learned]`` when its hit probability beats CFOG's."""

    def __init__(self, l2: float = 1.0) -> None:
        """Unfitted selector with ridge ``l2``."""
        self.l2 = l2
        self.models: dict[str, dict] = {}

    def fit(self, x: np.ndarray, hit_cfog: np.ndarray, hit_concat: np.ndarray) -> Selector:
        """Fit both hit models on training-scene queries."""
        self.models = {
            "cfog": fit_logistic(x, hit_cfog.astype(float), self.l2),
            "concat": fit_logistic(x, hit_concat.astype(float), self.l2),
        }
        return self

    def proba(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_hit_cfog, p_hit_concat)."""
        return predict_logistic(self.models["cfog"], x), predict_logistic(self.models["concat"], x)

    def choose_concat(self, x: np.ndarray) -> np.ndarray:
        """``(Q,)`` bool: use the concatenation for this query."""
        pa, pb = self.proba(x)
        return pb > pa


def mcnemar_p(hit_a: np.ndarray, hit_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value on the discordant pairs."""
    b = int(np.sum(hit_b & ~hit_a))
    c = int(np.sum(hit_a & ~hit_b))
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def paired_bootstrap_ci(
    pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over scenes of ``R@1(b) - R@1(a)`` and its 95 % CI, resampling queries within each scene.

    Args:
        pairs: per scene, ``(hit_a, hit_b)`` boolean arrays over the same queries.
    """
    rng = np.random.default_rng(seed)
    diffs = [b.astype(float) - a.astype(float) for a, b in pairs]
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.zeros(n_boot)
    for d in diffs:
        boot += d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    boot /= len(diffs)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)
