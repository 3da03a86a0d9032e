"""Evaluation of re-ranking and metric refinement on a scene (torch-free; used by ``sarloc eval --refine``).

:func:`gather` runs coarse retrieval (SAR query windows against a dense optical gallery, top-K NMS peaks) and
registers every candidate locally; :func:`evaluate_refined` scores each re-ranker alone (R@k of its order, error of
its top-1 centre) and with metric verification (the :class:`~sarloc.runtime.refine.Verifier` picks the candidate, the
position is its registered sub-pixel centre), plus a reliability table of the confidence.

Rules: a candidate is a hit when the true window centre lies in the window-sized box around it (the rule of the
dense gallery and of the classical baseline); the verifier's label is the tighter "registered centre within
``radius_px`` (a quarter tile) of the truth". Errors are ground distances in metres (scene frame).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sarloc.core.errors import SarlocError
from sarloc.core.geo import TileGrid
from sarloc.core.preprocess import PreprocessConfig, crop_windows
from sarloc.core.registration import LocalRegistrar
from sarloc.core.scene import QuerySet, Scene
from sarloc.eval.rerank import dense_candidates, expected_calibration_error, reliability, rerank
from sarloc.eval.retrieval import KS, EmbedFn, embed_all
from sarloc.runtime.refine import Candidates, OnnxRefiner, Verifier, candidate_features


@dataclass
class CandidateData:
    """Candidates of a query set with their registration and truth (all arrays over Q queries, K candidates)."""

    cands: Candidates
    px: np.ndarray  # (Q, K, 2) candidate centres, map pixels
    truth: np.ndarray  # (Q, 2) true centres, map pixels
    reg_xy: np.ndarray  # (Q, K, 2) registered centres
    reg_score: np.ndarray
    reg_second: np.ndarray
    reg_border: np.ndarray
    window_px: int
    ms: dict[str, float]  # per query: embed, search, register

    def top(self, k: int) -> CandidateData:
        """The first ``k`` candidates of every query (coarse order)."""
        c = self.cands
        sl = (slice(None), slice(0, k))
        return CandidateData(
            Candidates(c.query, c.emb[sl], c.sims[sl], c.xy[sl], c.valid[sl]),
            self.px[sl],
            self.truth,
            self.reg_xy[sl],
            self.reg_score[sl],
            self.reg_second[sl],
            self.reg_border[sl],
            self.window_px,
            {**self.ms, "register": self.ms["register"] * min(1.0, k / max(1, c.k))},
        )

    def queries(self, n: int) -> CandidateData:
        """The first ``n`` queries."""
        return CandidateData(
            self.cands.subset(np.arange(min(n, len(self.truth)))),
            self.px[:n],
            self.truth[:n],
            self.reg_xy[:n],
            self.reg_score[:n],
            self.reg_second[:n],
            self.reg_border[:n],
            self.window_px,
            self.ms,
        )

    def positives(self) -> np.ndarray:
        """(Q, K) candidate centre within the window-sized box around the truth."""
        return (np.abs(self.px - self.truth[:, None]).max(-1) <= self.window_px / 2.0) & self.cands.valid

    def reg_correct(self, radius_px: float) -> np.ndarray:
        """(Q, K) registered centre within ``radius_px`` (Euclidean) of the truth."""
        return (np.linalg.norm(self.reg_xy - self.truth[:, None], axis=-1) <= radius_px) & self.cands.valid

    def features(self, scores: np.ndarray) -> np.ndarray:
        return candidate_features(
            scores, self.cands.sims, self.reg_score, self.reg_second, self.reg_border, self.cands.valid
        )

    def save(self, path) -> None:
        c = self.cands
        np.savez(
            path,
            query=c.query,
            emb=c.emb,
            sims=c.sims,
            xy=c.xy,
            valid=c.valid,
            px=self.px,
            truth=self.truth,
            reg_xy=self.reg_xy,
            reg_score=self.reg_score,
            reg_second=self.reg_second,
            reg_border=self.reg_border,
            window_px=self.window_px,
            ms=np.array([self.ms[k] for k in ("embed", "search", "register")]),
        )

    @classmethod
    def load(cls, path) -> CandidateData:
        z = np.load(path)
        c = Candidates(z["query"], z["emb"], z["sims"], z["xy"], z["valid"])
        ms = dict(zip(("embed", "search", "register"), z["ms"].tolist(), strict=True))
        return cls(
            c,
            z["px"],
            z["truth"],
            z["reg_xy"],
            z["reg_score"],
            z["reg_second"],
            z["reg_border"],
            int(z["window_px"]),
            ms,
        )


def _register_all(registrar: LocalRegistrar, qwins: np.ndarray, px: np.ndarray):
    """Register window i around its candidates ``px[i]`` (Q, K, 2) -> (xy, score, second, at_border) arrays."""
    q, k = px.shape[:2]
    reg_xy, rs, r2, rb = np.zeros((q, k, 2)), np.full((q, k), -1.0), np.full((q, k), -1.0), np.zeros((q, k), bool)
    for i in range(q):
        r = registrar.register(qwins[i], px[i])
        reg_xy[i], rs[i], r2[i], rb[i] = r.xy_px, r.score, r.second, r.at_border
    return reg_xy, rs, r2, rb


def dense_gallery(
    scene: Scene, embed_opt: EmbedFn, prep: PreprocessConfig, window_px: int, stride_px: int = 8, batch: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) embeddings and (N, 2) centres of the optical gallery every ``stride_px`` pixels."""
    grid = TileGrid(scene.width_px, scene.height_px, window_px, stride_px)
    gal = embed_all(embed_opt, crop_windows(scene.optical_gray, grid.origins(), window_px), prep, batch)
    return gal, grid.centres()


def gather(
    scene: Scene,
    queries: QuerySet,
    embed_sar: EmbedFn,
    gallery: tuple[np.ndarray, np.ndarray],
    prep: PreprocessConfig,
    k: int = 10,
    registrar: LocalRegistrar | None = None,
) -> CandidateData:
    """Coarse top-K candidates of every query plus the local registration of each candidate."""
    w = queries.window_px
    gal, centres = gallery
    qwins = crop_windows(scene.sar_gray, queries.origins, w)
    n = max(1, len(qwins))
    t0 = time.perf_counter()
    qemb = embed_all(embed_sar, qwins, prep)
    t1 = time.perf_counter()
    cands, px = dense_candidates(gal, centres, qemb, k, w)
    t2 = time.perf_counter()
    reg = registrar or LocalRegistrar(scene.optical_gray)
    reg_xy, rs, r2, rb = _register_all(reg, qwins, px)
    t3 = time.perf_counter()
    ms = {"embed": (t1 - t0) * 1e3 / n, "search": (t2 - t1) * 1e3 / n, "register": (t3 - t2) * 1e3 / n}
    return CandidateData(cands, px, queries.centres.copy(), reg_xy, rs, r2, rb, w, ms)


@dataclass
class PoolData:
    """A large pool of coarse candidates per query (P NMS peaks) with their low-resolution registration scores."""

    query: np.ndarray  # (Q, D)
    idx: np.ndarray  # (Q, P) gallery rows
    sims: np.ndarray  # (Q, P)
    low: np.ndarray  # (Q, P) low-resolution registration scores
    px: np.ndarray  # (Q, P, 2) candidate centres, map pixels
    valid: np.ndarray  # (Q, P)
    truth: np.ndarray  # (Q, 2)
    window_px: int
    ms: dict[str, float]  # per query: embed, search, shortlist

    def hits(self) -> np.ndarray:
        return (np.abs(self.px - self.truth[:, None]).max(-1) <= self.window_px / 2.0) & self.valid

    def save(self, path) -> None:
        np.savez(
            path,
            query=self.query,
            idx=self.idx,
            sims=self.sims,
            low=self.low,
            px=self.px,
            valid=self.valid,
            truth=self.truth,
            window_px=self.window_px,
            ms=np.array([self.ms[k] for k in ("embed", "search", "shortlist")]),
        )

    @classmethod
    def load(cls, path) -> PoolData:
        z = np.load(path)
        ms = dict(zip(("embed", "search", "shortlist"), z["ms"].tolist(), strict=True))
        return cls(z["query"], z["idx"], z["sims"], z["low"], z["px"], z["valid"], z["truth"], int(z["window_px"]), ms)


def gather_pool(
    scene: Scene,
    queries: QuerySet,
    qemb: np.ndarray,
    gallery: tuple[np.ndarray, np.ndarray],
    pool: int,
    shortlister_reg,
) -> PoolData:
    """P coarse NMS peaks per query and their low-resolution registration (:class:`ShortlistRegistrar`)."""
    from sarloc.core.peaks import GalleryGrid

    w = queries.window_px
    gal, centres = gallery
    gg = GalleryGrid(centres)
    qwins = crop_windows(scene.sar_gray, queries.origins, w)
    q = len(qwins)
    idx = np.zeros((q, pool), np.int64)
    sims = np.full((q, pool), -1.0, np.float32)
    low = np.full((q, pool), -1.0)
    valid = np.zeros((q, pool), bool)
    t_search = t_low = 0.0
    for i in range(q):
        t0 = time.perf_counter()
        s = gal @ qemb[i]
        pk = gg.peaks(s, pool, w / 2.0)
        t1 = time.perf_counter()
        n = len(pk)
        idx[i, :n], sims[i, :n], valid[i, :n] = pk, s[pk], True
        idx[i, n:] = pk[-1] if n else 0
        low[i, :n] = shortlister_reg.scores(qwins[i], centres[pk])[0]
        t_search += t1 - t0
        t_low += time.perf_counter() - t1
    n = max(1, q)
    ms = {"embed": float("nan"), "search": t_search * 1e3 / n, "shortlist": t_low * 1e3 / n}
    return PoolData(qemb.astype(np.float32), idx, sims, low, centres[idx], valid, queries.centres.copy(), w, ms)


def finish_pool(
    scene: Scene,
    queries: QuerySet,
    pool: PoolData,
    gallery_emb: np.ndarray,
    shortlister,
    k: int,
    registrar: LocalRegistrar,
    rescore: int = 0,
    low_reg=None,
) -> CandidateData:
    """Top-K of each pool by the shortlister, registered at full resolution: a :class:`CandidateData`.

    With ``rescore`` > K (and ``low_reg``, the :class:`~sarloc.core.registration.ShortlistRegistrar` the pool was scored
    with), the K are the shortlister's first K // 2 plus the best K - K // 2 of the rest of its top ``rescore``
    by a narrow full-resolution registration (:func:`sarloc.core.registration.narrow_rescore`).
    """
    from sarloc.runtime.refine import shortlist_features

    p = shortlister.prob(shortlist_features(pool.low, pool.sims, pool.valid))
    p = np.where(pool.valid, p, -1.0)
    order = np.argsort(-p, axis=1, kind="stable")
    qwins = crop_windows(scene.sar_gray, queries.origins, pool.window_px)
    t0 = time.perf_counter()
    if rescore > k:
        if low_reg is None:
            raise SarlocError("finish_pool: rescore needs the ShortlistRegistrar (low_reg)")
        from sarloc.core.registration import narrow_rescore

        rows = []
        for i in range(len(qwins)):
            low_xy = np.zeros_like(pool.px[i])
            top = order[i, :rescore]
            low_xy[top] = low_reg.scores(qwins[i], pool.px[i, top])[1]
            rows.append(narrow_rescore(qwins[i], low_xy, order[i], pool.valid[i], k, rescore, registrar))
        order = np.stack(rows)
    rescore_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(qwins))
    order = order[:, :k]
    take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)  # noqa: E731
    rows = take(pool.idx)
    valid = take(pool.valid)
    px = take(pool.px)
    emb = gallery_emb[rows]
    sims = take(pool.sims)
    xy = np.stack([px[..., 0], -px[..., 1]], -1) / float(pool.window_px)
    cands = Candidates(pool.query, emb.astype(np.float32), sims.astype(np.float32), xy, valid)
    q = len(qwins)
    t0 = time.perf_counter()
    reg_xy, rs, r2, rb = _register_all(registrar, qwins, px)
    reg_ms = (time.perf_counter() - t0) * 1e3 / max(1, q) + rescore_ms
    ms = {"embed": pool.ms["embed"], "search": pool.ms["search"] + pool.ms["shortlist"], "register": reg_ms}
    return CandidateData(cands, px, pool.truth, reg_xy, rs, r2, rb, pool.window_px, ms)


def fit_verifier(
    lists: list[CandidateData],
    rerank_name: str,
    refiner: OnnxRefiner | None,
    radius_px: float,
    meta: dict | None = None,
) -> Verifier:
    """A :class:`Verifier` fitted on every valid candidate of ``lists``, with ``rerank_name``'s scores as its
    ranking feature; label: registered centre within ``radius_px`` of the truth."""
    feats = np.concatenate([d.features(rerank(d.cands, rerank_name, refiner)) for d in lists])
    lab = np.concatenate([d.reg_correct(radius_px) for d in lists])
    val = np.concatenate([d.cands.valid for d in lists])
    return Verifier.fit(feats[val], lab[val], radius_px, meta={"reranker": rerank_name, **(meta or {})})


def _errors(scene: Scene, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return scene.frame.metric_distance(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])


def _metrics(scene: Scene, d: CandidateData, order: np.ndarray, pred: np.ndarray, ms: float) -> dict:
    pos = np.take_along_axis(d.positives(), order, axis=1)
    hits_at = np.where(pos.any(1), pos.argmax(1), 10**6)
    err = _errors(scene, pred, d.truth)
    err_px = np.linalg.norm(pred - d.truth, axis=1)
    w = d.window_px
    out = {f"recall@{k}": float(np.mean(hits_at < k)) for k in KS}
    out.update(
        median_error_m=float(np.median(err)),
        p90_error_m=float(np.percentile(err, 90)),
        within_1px=float(np.mean(err_px <= 1.0)),
        within_quarter_tile=float(np.mean(err_px <= w / 4.0)),
        within_tile=float(np.mean(err_px <= w)),
        ms_per_query=float(ms),
        queries=len(err),
        errors_m=[round(float(e), 2) for e in err],
    )
    return out


def evaluate_refined(
    scene: Scene,
    d: CandidateData,
    verifier: Verifier | None = None,
    refiner: OnnxRefiner | None = None,
    rerankers: tuple[str, ...] = ("none", "qe", "kreciprocal", "spatial", "gnn"),
    threshold: float = 0.5,
) -> dict:
    """Metrics of every re-ranker, alone and (with a verifier) with metric verification.

    Returns:
        ``{"<reranker>": metrics, "<reranker>+metric": metrics with "abstain_rate", "false_fix_rate",
        "reliability", "ece"}``. ``ms_per_query`` includes the SAR embedding and the search (and registration
        for the +metric rows).
    """
    base_ms = d.ms["embed"] + d.ms["search"]
    out: dict = {}
    for name in rerankers:
        if name == "gnn" and refiner is None:
            continue
        t0 = time.perf_counter()
        s = rerank(d.cands, name, refiner)
        rr_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(d.truth))
        order = np.argsort(-s, axis=1, kind="stable")
        top = order[:, 0]
        pred = d.px[np.arange(len(top)), top]
        out[name] = _metrics(scene, d, order, pred, base_ms + rr_ms)
        if verifier is None:
            continue
        p = verifier.prob(d.features(s))
        p = np.where(d.cands.valid, p, -1.0)
        vorder = np.argsort(-p, axis=1, kind="stable")
        pick = vorder[:, 0]
        idx = np.arange(len(pick))
        pred = d.reg_xy[idx, pick]
        conf = p[idx, pick]
        m = _metrics(scene, d, vorder, pred, base_ms + rr_ms + d.ms["register"])
        correct = np.linalg.norm(pred - d.truth, axis=1) <= verifier.radius_px
        trusted = conf >= threshold
        err = _errors(scene, pred, d.truth)
        m.update(
            abstain_rate=float(np.mean(~trusted)),
            false_fix_rate=float(np.mean(~correct[trusted])) if trusted.any() else 0.0,
            trusted_median_error_m=float(np.median(err[trusted])) if trusted.any() else float("nan"),
            reliability=reliability(conf, correct),
            ece=expected_calibration_error(conf, correct),
            confidence_radius_px=verifier.radius_px,
            threshold=threshold,
        )
        out[name + "+metric"] = m
    return out


__all__ = [
    "CandidateData",
    "PoolData",
    "dense_gallery",
    "evaluate_refined",
    "finish_pool",
    "fit_verifier",
    "gather",
    "gather_pool",
]
