"""Retrieval evaluation against a map pack (torch-free): SAR query windows of a scene searched in a pack.

The pack replaces the gallery that ``sarloc.eval.retrieval`` embeds on the fly: SAR windows of the scene are embedded
by the export's SAR encoder and searched in the pack (exact, geo prior or ANN), with NMS in metres. As in
``evaluate_dense``, peak r is a hit when the query's true centre lies in the tile-sized box around it, and the
error is the ground distance from the best peak's centre to the true centre.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import SarlocError
from sarloc.core.preprocess import crop_windows
from sarloc.eval.retrieval import KS, EvalConfig, embed_all
from sarloc.mappack.pack import MapPack
from sarloc.mappack.search import PackSearcher

logger = logging.getLogger(__name__)


def _scene_to_pack_xy(scene, pack: MapPack, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Scene pixel positions -> (N, 2) positions in the pack's metric frame."""
    x, y = scene.frame.pixel_to_metric(col, row)
    fr_crs = scene.frame.metric_crs
    if pack.metric_crs is None or fr_crs is None:
        if (pack.metric_crs is None) != (fr_crs is None):
            raise SarlocError(f"scene {scene.path} and map pack {pack.path} are not both geo-referenced")
        return np.stack([x, y], axis=1)
    if fr_crs != pack.metric_crs:
        import pyproj

        x, y = pyproj.Transformer.from_crs(fr_crs, pack.metric_crs, always_xy=True).transform(x, y)
    return np.stack([np.asarray(x), np.asarray(y)], axis=1)


def _search_all(
    searcher: PackSearcher,
    qemb: np.ndarray,
    truth: np.ndarray,
    half: float,
    prior_radius_m: float | None,
    ann: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Search each query embedding in the pack (within a simulated prior when ``prior_radius_m`` is set).

    Returns:
        Rank of the first hit of each query (10**6 when none), the best peak's position (NaN without result) and
        the number of candidates scored per query.
    """
    hits_at = np.full(len(qemb), 10**6)
    pred = np.zeros((len(qemb), 2))
    cand = []
    for i in range(len(qemb)):
        if prior_radius_m is not None:
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, prior_radius_m / 2.0)
            prior = truth[i] + rad * np.array([np.cos(ang), np.sin(ang)])
            res = searcher.search(qemb[i], max(KS), prior_xy_m=tuple(prior), prior_radius_m=prior_radius_m)[0]
        else:
            res = searcher.search(qemb[i], max(KS), ann=ann)[0]
        cand.append(res.candidates)
        if len(res.rows) == 0:
            pred[i] = np.nan
            continue
        pred[i] = res.xy_m[0]
        hit = np.flatnonzero(np.abs(res.xy_m - truth[i]).max(axis=1) <= half)
        if len(hit):
            hits_at[i] = hit[0]
    return hits_at, pred, cand


def _pack_metrics(hits_at: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Recall at each k of ``KS``, error percentiles and the fractions within 50/100/200 m."""
    err = np.hypot(*(pred - truth).T)
    err = np.where(np.isfinite(err), err, np.inf)
    n = max(1, len(err))
    m: dict[str, Any] = {f"recall@{k}": float(np.mean(hits_at < k)) for k in KS}
    m.update(
        {
            "median_error_m": float(np.median(err)) if len(err) else float("nan"),
            "p90_error_m": float(np.percentile(err, 90)) if len(err) else float("nan"),
            "within_50m": float(np.sum(err <= 50) / n),
            "within_100m": float(np.sum(err <= 100) / n),
            "within_200m": float(np.sum(err <= 200) / n),
            "queries": len(err),
        }
    )
    return m


def evaluate_pack(
    pack_dir: str | Path,
    export_dir: str | Path,
    scene_dir: str | Path,
    eval_cfg: EvalConfig,
    precision: str = "fp32",
    backend: str = "ort",
    kinds: tuple[str, ...] = ("aligned", "arbitrary"),
    prior_radius_m: float | None = None,
    ann: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """Evaluate coarse retrieval of a scene's SAR windows against a map pack.

    Args:
        pack_dir: the map pack (built from this scene's optical image or a basemap covering it, at the scene's
            ground resolution).
        export_dir: the export folder whose SAR encoder matches the pack's optical encoder.
        scene_dir: scene whose SAR windows are the queries.
        eval_cfg: query count, seed and window (must equal the encoder's window).
        precision, backend: SAR encoder to load (see ``sarloc.backends.encoders.load_encoder``).
        kinds: query kinds.
        prior_radius_m: simulate a position prior: search only within this radius of the true centre shifted by
            a random offset of up to half the radius (seeded); None = whole pack.
        ann: search with the pack's approximate index.
        threads: ONNX Runtime threads.

    Returns:
        ``{"scene", "pack", kind: metrics}`` with the keys of ``sarloc.eval.retrieval.summarise``.
    """
    from sarloc.backends.encoders import load_encoder
    from sarloc.core.scene import load_scene, make_queries

    sar = load_encoder(export_dir, "sar", precision, backend, threads=threads)
    pack = MapPack(Path(pack_dir), sar_manifest=sar.manifest)
    w = sar.window_px
    if eval_cfg.window_px != w:
        raise SarlocError(f"the exported models take {w} px windows, not {eval_cfg.window_px}; use --window-px {w}")
    scene = load_scene(scene_dir)
    gsd = float(pack.grid["gsd_m"])
    if abs(scene.gsd_m - gsd) > 0.02 * gsd:
        raise SarlocError(
            f"scene {scene.path} has {scene.gsd_m:g} m pixels but map pack {pack.path} {gsd:g} m; rebuild the pack "
            f"with --tile-m {w * scene.gsd_m:g}"
        )
    searcher = PackSearcher(pack)
    half = pack.tile_m / 2.0
    out: dict[str, Any] = {"scene": scene.name, "pack": str(pack.path), "export_dir": str(export_dir)}
    rng = np.random.default_rng(eval_cfg.seed)
    method = "pack-prior" if prior_radius_m is not None else ("pack-ann" if ann else "pack-exact")
    for kind in kinds:
        q = make_queries(scene, kind, w, eval_cfg.queries, eval_cfg.seed)
        truth = _scene_to_pack_xy(scene, pack, q.centres[:, 0], q.centres[:, 1])
        t0 = time.perf_counter()
        qemb = embed_all(sar, crop_windows(scene.sar_gray, q.origins, w), sar.preprocess, eval_cfg.batch)
        hits_at, pred, cand = _search_all(searcher, qemb, truth, half, prior_radius_m, ann, rng)
        ms = (time.perf_counter() - t0) * 1e3 / max(1, len(qemb))
        m = _pack_metrics(hits_at, pred, truth)
        m.update(
            {
                "window_px": w,
                "gsd_m": float(scene.gsd_m),
                "ms_per_query": float(ms),
                "kind": kind,
                "method": method,
                "gallery_tiles": len(pack),
                "stride_px": int(pack.grid["stride_px"]),
                "mean_candidates": float(np.mean(cand)) if cand else 0.0,
            }
        )
        out[kind] = m
    return out
