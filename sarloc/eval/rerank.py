"""Research re-rankers and calibration metrics (torch-free): measured in the evaluations, not flown.

* :func:`dense_candidates`: the top-K places of each query over a dense gallery (the evaluations' coarse search).
* :func:`rerank`: ``none`` (coarse order), ``given`` (the list's own order), ``qe`` (alpha query expansion over the
  candidates), ``kreciprocal`` (k-reciprocal Jaccard re-ranking within the candidate set), ``spatial`` (each
  candidate supported by the others near it on the ground) and ``gnn`` (the graph refiner, as the runtime runs it).
* :func:`reliability`, :func:`expected_calibration_error`: how well a confidence matches the observed hit rate.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from sarloc.core.errors import SarlocError
from sarloc.runtime.refine import Candidates, OnnxRefiner, candidate_scores

logger = logging.getLogger(__name__)

__all__ = ["RERANKERS", "dense_candidates", "expected_calibration_error", "reliability", "rerank"]


RERANKERS = ("none", "qe", "kreciprocal", "spatial", "gnn")


def dense_candidates(
    gallery: np.ndarray, centres_px: np.ndarray, qemb: np.ndarray, k: int, window_px: int
) -> tuple[Candidates, np.ndarray]:
    """Top-K NMS peaks of each query over a dense gallery (local maxima, greedy: :func:`sarloc.core.peaks.grid_peaks`).

    Args:
        gallery: (N, D) gallery embeddings; centres_px: (N, 2) their centres (col, row), map pixels.
        qemb: (Q, D) query embeddings. k: candidates. window_px: tile side (NMS radius = half of it).

    Returns:
        (candidates with xy in tile units east/north, (Q, K, 2) candidate centres in map pixels).
    """
    from sarloc.core.peaks import GalleryGrid

    gg = GalleryGrid(centres_px)
    q, d = qemb.shape
    emb = np.zeros((q, k, d), np.float32)
    sims = np.full((q, k), -1.0, np.float32)
    px = np.zeros((q, k, 2))
    valid = np.zeros((q, k), bool)
    for i in range(q):
        s = gallery @ qemb[i]
        pk = gg.peaks(s, k, window_px / 2.0)
        n = len(pk)
        emb[i, :n], sims[i, :n], px[i, :n], valid[i, :n] = gallery[pk], s[pk], centres_px[pk], True
        if n < k:  # pad with the last peak (masked out by ``valid``)
            emb[i, n:], px[i, n:] = emb[i, n - 1], px[i, n - 1]
    xy = np.stack([px[..., 0], -px[..., 1]], -1) / float(window_px)
    return Candidates(qemb.astype(np.float32), emb, sims, xy, valid), px


# ---------------------------------------------------------------------------------------------- re-rankers
def _qe_scores(c: Candidates, n: int = 3, alpha: float = 3.0) -> np.ndarray:
    """Alpha query expansion: q' = normalise(q + sum_i max(s_i, 0)^alpha c_i over the top-n), re-scored."""
    w = np.clip(c.sims[:, :n], 0, None) ** alpha * c.valid[:, :n]
    q2 = c.query + np.einsum("qk,qkd->qd", w, c.emb[:, :n])
    q2 /= np.linalg.norm(q2, axis=1, keepdims=True) + 1e-12
    return np.einsum("qd,qkd->qk", q2, c.emb)


def _kreciprocal_scores(c: Candidates, k1: int = 4, lam: float = 0.5) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017) restricted to the query and its candidates.

    Within the set {query} + candidates, R(i) = the elements that are in i's k1 nearest and have i among theirs;
    the Jaccard distance between the query's and each candidate's reciprocal sets (soft, similarity-weighted)
    is mixed with the original distance: d* = (1 - lam) * Jaccard + lam * (1 - s).
    Every element is its own nearest (so each set holds at least itself: no empty set, even for zero or tied
    similarities); invalid candidates (padding) are in no other element's set, so they change no valid score.
    """
    q, k, _ = c.emb.shape
    out = np.empty((q, k), np.float32)
    eye = np.eye(k + 1, dtype=bool)
    for i in range(q):
        x = np.concatenate([c.query[i : i + 1], c.emb[i]], 0)
        s = x @ x.T
        ok = np.concatenate([[True], np.asarray(c.valid[i], bool)])  # the query and the valid candidates
        order = np.where(eye, np.inf, np.where(ok[None, :], s, -np.inf))
        nn = np.argsort(-order, axis=1, kind="stable")[:, : k1 + 1]
        member = np.zeros_like(s, bool)
        np.put_along_axis(member, nn, True, axis=1)
        member &= (ok[:, None] & ok[None, :]) | eye
        recip = member & member.T  # the diagonal is always in: every row of v has a positive sum
        v = np.where(recip, np.exp(s), 0.0)
        v /= v.sum(1, keepdims=True)
        jac = 1.0 - np.minimum(v[0], v[1:]).sum(1) / np.maximum(v[0], v[1:]).sum(1)
        out[i] = -((1 - lam) * jac + lam * (1.0 - s[0, 1:]))
    return out


def _spatial_scores(c: Candidates, sigma_tiles: float = 1.0, beta: float = 0.5) -> np.ndarray:
    """Spatial-consistency vote: s_i + beta * sum_{j != i} max(s_j, 0) * exp(-d_ij^2 / 2 sigma^2)."""
    d2 = ((c.xy[:, :, None] - c.xy[:, None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * sigma_tiles**2))
    w[:, np.arange(c.k), np.arange(c.k)] = 0.0
    s = np.clip(c.sims, 0, None) * c.valid
    return c.sims + beta * np.einsum("qij,qj->qi", w, s)


def rerank(c: Candidates, method: str, refiner: OnnxRefiner | None = None) -> np.ndarray:
    """(Q, K) scores of the candidates by ``method`` (higher = better); invalid candidates get -inf."""
    if method == "none":
        s = c.sims.astype(np.float64)
    elif method == "given":  # keep the list's own order (e.g. a shortlist already sorted by its model)
        s = np.broadcast_to(-np.arange(c.k, dtype=np.float64), c.sims.shape).copy()
    elif method == "qe":
        s = _qe_scores(c)
    elif method == "kreciprocal":
        s = _kreciprocal_scores(c)
    elif method == "spatial":
        s = _spatial_scores(c)
    elif method == "gnn":
        if refiner is None:
            raise SarlocError("re-ranker 'gnn' needs a trained refiner (--refiner REFINER.onnx)")
        return candidate_scores(c, refiner)
    else:
        raise SarlocError(f"unknown re-ranker {method!r}; choose one of {', '.join(RERANKERS)}")
    return np.where(c.valid, s, -np.inf)


def reliability(prob: np.ndarray, correct: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    """Predicted vs observed hit rate in equal-width probability bins (empty bins left out)."""
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for a, b in itertools.pairwise(edges):
        m = (prob >= a) & ((prob < b) if b < 1 else (prob <= b))
        if m.any():
            out.append(
                {
                    "bin": f"{a:.1f}-{b:.1f}",
                    "n": int(m.sum()),
                    "predicted": float(prob[m].mean()),
                    "observed": float(np.mean(correct[m])),
                }
            )
    return out


def expected_calibration_error(prob: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Sample-weighted mean |predicted - observed| over equal-width bins."""
    rows = reliability(prob, correct, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["predicted"] - r["observed"]) for r in rows) / max(1, n))
