"""From a ranked candidate list to a position with a confidence (torch-free).

Stages, per query window:

1. **Candidates**: the top-K places of coarse retrieval (dense gallery + NMS, or a map pack search): their
   embeddings, similarities and positions (:class:`Candidates`).
2. **Scoring** (:func:`candidate_scores`): the learned graph refiner (:mod:`sarloc.trainer.models.refiner`, run
   through ONNX Runtime: :class:`OnnxRefiner`) when the export has one, else the coarse similarities. (Research
   re-rankers live in :mod:`sarloc.eval.rerank`.)
3. **Metric refinement** (:class:`sarloc.core.registration.LocalRegistrar`): each candidate is registered locally (CFOG
   correlation within +-12 px), giving a sub-pixel position and peak scores.
4. **Verification and confidence** (:class:`Verifier`): a logistic model over per-candidate features (re-ranker
   log-probability, registration score, its sharpness and its margin over the other candidates) gives, for each
   candidate, the probability that its registered position is within ``radius_px`` of the truth. The best
   candidate is the fix; its probability is the fix's confidence; below the threshold the query abstains.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeGuard

import numpy as np

from sarloc.core.artifacts import atomic_write_json, make_manifest, sha256_bytes, sha256_file
from sarloc.core.errors import ArtifactError, SarlocError

logger = logging.getLogger(__name__)

VERIFIER_KIND = "sarloc.verifier"
REFINER_KIND = "sarloc.refiner"
#: coarse similarities as logits: the graph refiner's initial scale (its logits are ``scale * sim + head``)
COARSE_LOGIT_SCALE = 20.0


@dataclass
class Candidates:
    """Top-K candidates of Q queries (coarse order: similarity, best first).

    Attributes:
        query: (Q, D) unit-norm query embeddings.
        emb: (Q, K, D) candidate embeddings.
        sims: (Q, K) cosine similarities.
        xy: (Q, K, 2) candidate centres (east, north) in units of the tile side (any origin).
        valid: (Q, K) False for padding when fewer than K candidates exist.
    """

    query: np.ndarray
    emb: np.ndarray
    sims: np.ndarray
    xy: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return int(self.sims.shape[0])

    @property
    def k(self) -> int:
        return int(self.sims.shape[1])

    def offsets(self) -> np.ndarray:
        """(Q, K, 2) offsets from each query's top-1 candidate, tile units (the refiner's position input)."""
        return (self.xy - self.xy[:, :1]).astype(np.float32)

    def subset(self, idx: np.ndarray) -> Candidates:
        return Candidates(self.query[idx], self.emb[idx], self.sims[idx], self.xy[idx], self.valid[idx])


def candidate_scores(c: Candidates, refiner: OnnxRefiner | None = None) -> np.ndarray:
    """(Q, K) scores of the candidates, higher = better: the graph refiner's when one is given, else the coarse
    similarities; invalid candidates get -inf."""
    s = c.sims.astype(np.float64) if refiner is None else refiner(c)
    return np.where(c.valid, s, -np.inf)


def _pos_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class OnnxRefiner:
    """The exported graph refiner, run with ONNX Runtime (CPU). Reads ``refiner.onnx`` + ``refiner.json``.

    Args:
        path: the .onnx file (its manifest beside it, same stem, .json).
        extra_fn: none for a refiner without extra features.
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        man = self.path.with_suffix(".json")
        if not self.path.is_file() or not man.is_file():
            raise ArtifactError(
                f"refiner {self.path} or its manifest {man.name} is missing; run `sarloc train-refiner`"
            )
        try:
            self.manifest = json.loads(man.read_text())
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
            raise ArtifactError(f"refiner manifest {man}: unreadable or malformed JSON ({str(e)[:200]})") from None
        kind = self.manifest.get("kind") if isinstance(self.manifest, dict) else None
        if kind != REFINER_KIND:
            raise ArtifactError(f"{man} is not a refiner manifest (kind {kind!r:.60})")
        if self.manifest.get("sha256") != sha256_file(self.path):
            raise ArtifactError(f"{self.path} does not match the sha256 in {man.name}; re-export the refiner")
        cfg = self.manifest.get("config")
        if not (isinstance(cfg, dict) and all(_pos_int(cfg.get(k)) for k in ("k", "embed_dim"))):
            raise ArtifactError(f"{man}: field 'config' must hold positive integers 'k' and 'embed_dim'; re-export it")
        self.cfg = cfg
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises several types for corrupt files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ArtifactError(f"refiner {self.path} could not be loaded ({first}); re-export the refiner") from None

    @property
    def k(self) -> int:
        return int(self.cfg["k"])

    @property
    def encoder_sha256(self) -> str | None:
        return self.manifest.get("parent_sha256")

    @property
    def edges(self) -> int:
        """Neighbours each candidate attends to (besides itself); unknown (older manifest): K - 1, all of them."""
        e = self.cfg.get("edges")
        return int(e) if _pos_int(e) else self.k - 1

    def __call__(self, c: Candidates) -> np.ndarray:
        """(Q, K) logits; a padded list scores its valid candidates as the list of them alone would.

        The exported graph has a fixed K and no mask input, so padding (``valid`` False) is made harmless
        (:func:`isolate_padding`): when more than ``edges`` candidates are valid, the padding is moved out of every
        valid candidate's neighbourhood and cannot change their scores; with fewer, every candidate would have to
        attend to padding, and the list gets the coarse similarities as logits (``COARSE_LOGIT_SCALE * sim``).
        Invalid candidates' logits are meaningless (:func:`candidate_scores` sets them to -inf).
        """
        if c.k != self.k or c.emb.shape[2] != int(self.cfg["embed_dim"]):
            raise SarlocError(
                f"refiner {self.path.name} takes K={self.k} candidates of dim {self.cfg['embed_dim']}, "
                f"got K={c.k}, dim {c.emb.shape[2]}"
            )
        emb, offsets, coarse = isolate_padding(c, self.edges)
        feeds = {"query": c.query.astype(np.float32), "cands": emb, "offsets": offsets}
        out = self.sess.run(["logits"], feeds)[0].astype(np.float64)
        if coarse.any():
            out[coarse] = COARSE_LOGIT_SCALE * np.asarray(c.sims, np.float64)[coarse]
        return out


def isolate_padding(c: Candidates, edges: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refiner inputs in which padding cannot reach the valid candidates of a list.

    For each list with some padding and more than ``edges`` valid candidates, the padding gets the embedding of
    the valid candidate most similar to the query (so the list's best similarity, an input of every node, is
    unchanged) and a position far beyond every valid one (so it is in no valid candidate's ``edges`` nearest, and
    attention never reaches it). Offsets are taken from the first valid candidate.

    Returns:
        (Q, K, D) float32 embeddings, (Q, K, 2) float32 offsets, and (Q,) bool: the lists with padding and at
        most ``edges`` valid candidates, which the graph cannot score without the padding.
    """
    valid = np.asarray(c.valid, bool)
    emb = np.array(c.emb, np.float32)
    q = len(valid)
    ref = np.argmax(valid, axis=1)  # the first valid candidate (0 for a list without any)
    offsets = (c.xy - c.xy[np.arange(q), ref][:, None]).astype(np.float32)
    n = valid.sum(1)
    padded = (n > 0) & (n < valid.shape[1])
    for i in np.flatnonzero(padded & (n > edges)):
        v = valid[i]
        idx = np.flatnonzero(v)
        best = idx[np.argmax(emb[i, idx] @ np.asarray(c.query[i], np.float32))]
        emb[i, ~v] = emb[i, best]
        span = float(np.abs(offsets[i, v]).max())
        offsets[i, ~v] = 10.0 * (span + 1.0)  # > 3 x the largest distance between valid candidates
    return emb, offsets, padded & (n <= edges)


# ---------------------------------------------------------------------------------------------- verification
FEATURES = ("rank_logprob", "reg_score", "reg_sharpness", "reg_margin", "reg_at_border", "coarse_gap")


def candidate_features(
    rank_scores: np.ndarray,
    sims: np.ndarray,
    reg_score: np.ndarray,
    reg_second: np.ndarray,
    reg_border: np.ndarray,
    valid: np.ndarray,
) -> np.ndarray:
    """(Q, K, F) features of each candidate for the :class:`Verifier` (names in :data:`FEATURES`).

    rank_logprob: log-softmax of the re-ranker's scores over the candidates (temperature 1 for the GNN's
    logits; coarse similarities are scaled by 20, like the GNN's initial scale); reg_score: local registration
    peak; reg_sharpness: peak minus the best score away from it; reg_margin: peak minus the best peak of the
    other candidates; reg_at_border: peak on the search border; coarse_gap: similarity minus the best.
    """
    rs = np.where(valid, rank_scores, -1e9)
    if np.allclose(rank_scores[valid], sims[valid]):
        rs = np.where(valid, COARSE_LOGIT_SCALE * sims, -1e9)
    lp = rs - rs.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    reg = np.where(valid, reg_score, -1.0)
    k = reg.shape[1]
    other = np.empty_like(reg)
    for j in range(k):
        other[:, j] = np.delete(reg, j, axis=1).max(1) if k > 1 else -1.0
    f = np.stack(
        [
            np.maximum(lp, -20.0),
            reg,
            reg - np.where(reg_second > -1, reg_second, reg),
            reg - other,
            reg_border.astype(np.float64),
            np.where(valid, sims - sims.max(1, keepdims=True), -1.0),
        ],
        -1,
    )
    return f.astype(np.float64)


class Verifier:
    """Logistic model P(candidate within ``radius_px`` of the truth | features); picks the fix and its confidence.

    Fitted by Newton's method with a small L2 penalty (:meth:`fit`); saved as JSON with its parent's hash.
    """

    FEATURES: tuple[str, ...] = FEATURES  # subclasses (Shortlister) score other features
    KIND = VERIFIER_KIND

    def __init__(
        self,
        weights: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        radius_px: float,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.w = np.asarray(weights, np.float64)
        self.mean = np.asarray(mean, np.float64)
        self.std = np.asarray(std, np.float64)
        self.radius_px = float(radius_px)
        self.meta = meta or {}
        self.parent_sha256: str | None = None  # set by :meth:`load` from the file's manifest
        self.sha256: str | None = None  # set by :meth:`load`: the file's own hash (run records name it)
        self.path: Path | None = None  # set by :meth:`load`
        if self.w.shape != (len(self.FEATURES) + 1,) or not self.mean.shape == self.std.shape == (len(self.FEATURES),):
            raise ArtifactError(
                f"{self.KIND} weights must have {len(self.FEATURES) + 1} entries and mean/std {len(self.FEATURES)}, "
                f"got {self.w.shape}, {self.mean.shape}, {self.std.shape}"
            )

    def prob(self, feats: np.ndarray) -> np.ndarray:
        """(…, F) features -> (…) probabilities."""
        z = (feats - self.mean) / self.std
        return 1.0 / (1.0 + np.exp(-(z @ self.w[1:] + self.w[0])))

    @classmethod
    def fit(
        cls,
        feats: np.ndarray,
        correct: np.ndarray,
        radius_px: float,
        l2: float = 1e-2,
        meta: dict[str, Any] | None = None,
    ) -> Self:
        """Fit on (N, F) features and (N,) bool labels (every candidate of every training query)."""
        x = feats.reshape(-1, feats.shape[-1])
        y = correct.reshape(-1).astype(np.float64)
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = np.concatenate([np.ones((len(x), 1)), (x - mean) / std], 1)
        w = np.zeros(z.shape[1])
        for _ in range(50):
            p = 1.0 / (1.0 + np.exp(-(z @ w)))
            g = z.T @ (p - y) + l2 * np.r_[0.0, w[1:]]
            h = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.diag(np.r_[0.0, np.ones(len(w) - 1)])
            step = np.linalg.solve(h + 1e-9 * np.eye(len(w)), g)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(w, mean, std, radius_px, meta)

    def save(self, path: str | Path, parent_sha256: str | None = None) -> Path:
        man = make_manifest(
            self.KIND,
            parent_sha256=parent_sha256,
            features=list(self.FEATURES),
            weights=self.w.tolist(),
            mean=self.mean.tolist(),
            std=self.std.tolist(),
            radius_px=self.radius_px,
            meta=self.meta,
        )
        return atomic_write_json(Path(path), man)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            data = path.read_bytes()
            m = json.loads(data.decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
            raise ArtifactError(
                f"cannot read {cls.KIND} {path}: {str(e)[:200]}; re-run `sarloc train-refiner`"
            ) from None
        if not isinstance(m, dict) or m.get("kind") != cls.KIND or m.get("features") != list(cls.FEATURES):
            raise ArtifactError(
                f"{path} is not a {cls.KIND} for features {cls.FEATURES}; re-run `sarloc train-refiner`"
            )
        try:
            w, mean, std = (np.array(m[k], dtype=np.float64) for k in ("weights", "mean", "std"))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ArtifactError(f"{path}: weights, mean or std missing or not numbers ({type(e).__name__})") from None
        radius, meta = m.get("radius_px"), m.get("meta")
        if not all(np.isfinite(a).all() for a in (w, mean, std)) or not (std > 0).all():
            raise ArtifactError(
                f"{path}: weights, mean and std must be finite (std > 0); re-run `sarloc train-refiner`"
            )
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 < radius < math.inf:
            raise ArtifactError(f"{path}: radius_px must be a positive number, got {radius!r:.40}")
        if meta is not None and not isinstance(meta, dict):
            raise ArtifactError(f"{path}: meta must be an object or null")
        out = cls(w, mean, std, radius, meta)
        parent = m.get("parent_sha256")
        out.parent_sha256 = parent if isinstance(parent, str) else None
        out.sha256, out.path = sha256_bytes(data), path
        return out


SHORTLIST_FEATURES = ("low_score", "sim", "low_gap", "sim_gap")
SHORTLIST_KIND = "sarloc.shortlister"


class Shortlister(Verifier):
    """Logistic model that orders a large pool of coarse candidates before full-resolution registration.

    Features per candidate (:func:`shortlist_features`): the low-resolution registration score
    (:class:`sarloc.core.registration.ShortlistRegistrar`), the retrieval similarity, and both relative to the pool's
    best.
    Label when fitting: the candidate is a hit (the truth lies in the window-sized box around it).
    """

    FEATURES = SHORTLIST_FEATURES
    KIND = SHORTLIST_KIND


def shortlist_features(low: np.ndarray, sims: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(Q, P, 4) shortlist features from (Q, P) low-resolution scores and similarities."""
    lo = np.where(valid, low, -1.0)
    si = np.where(valid, sims, -1.0)
    return np.stack([lo, si, lo - lo.max(1, keepdims=True), si - si.max(1, keepdims=True)], -1).astype(np.float64)


def softmax_rows(s: np.ndarray) -> np.ndarray:
    z = s - np.max(np.where(np.isfinite(s), s, -np.inf), axis=1, keepdims=True)
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    return e / e.sum(1, keepdims=True)


__all__ = [
    "COARSE_LOGIT_SCALE",
    "FEATURES",
    "SHORTLIST_FEATURES",
    "Candidates",
    "OnnxRefiner",
    "Shortlister",
    "Verifier",
    "candidate_features",
    "candidate_scores",
    "isolate_padding",
    "shortlist_features",
    "softmax_rows",
]
