"""Per-window localisation against a map pack (torch-free): embed, search, re-rank, register, verify.

One :class:`Localizer` holds the SAR encoder, the map pack (memory-mapped embeddings and basemap image), the
graph refiner and the verifier, after checking that they belong together (every artifact names its parent's
hash). :meth:`Localizer.localize` takes north-up windows on the pack's pixel grid (see
:mod:`sarloc.runtime.windows`) and returns, per window, the chosen position in metres, its confidence and the
per-stage latency. Windows whose confidence is below the threshold are marked untrusted; without a verifier no
window is ever trusted (the runtime then reports but never sends a position).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.errors import ArtifactError, SarlocError
from sarloc.core.preprocess import prepare_windows
from sarloc.core.registration import LocalRegistrar, RegistrationConfig, ShortlistRegistrar, narrow_rescore
from sarloc.runtime.refine import (
    Candidates,
    OnnxRefiner,
    Shortlister,
    Verifier,
    candidate_features,
    candidate_scores,
    shortlist_features,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalizerConfig:
    """Per-window localisation settings.

    Attributes:
        k: candidates per window (the refiner's K).
        pool: coarse candidates shortlisted at low resolution before the K best are refined (needs the export's
            shortlister.json and a pack with its basemap image; 0: the coarse top-K directly).
        threshold: confidence below which a window is untrusted.
        search_px: local registration search radius, pack pixels.
        rescore: with a pool, look at the shortlist's top ``rescore`` at full resolution (a +-4 px registration
            around each low-resolution position) and pass on its first K // 2 plus the best K - K // 2 of the rest
            (:func:`sarloc.core.registration.narrow_rescore`; about 1.25 ms per candidate; 0: off).
        batch: windows per encoder call.
    """

    k: int = 10
    pool: int = 200
    threshold: float = 0.5
    search_px: int = 32
    rescore: int = 0
    batch: int = 32


@dataclass
class WindowResult:
    """Localisation of one window: position on the map (metres) and its confidence.

    ``alternatives`` lists every refined candidate (the chosen one included) as ``(x_m, y_m, verifier
    probability, refiner score, registration score, registration second peak)``, for window records and research
    on the candidates of consecutive windows (:mod:`sarloc.eval.track_graph`).
    """

    xy_m: tuple[float, float] | None
    xy_px: tuple[float, float] | None
    confidence: float
    score: float
    trusted: bool
    sigma_m: float
    candidates: int
    stage_ms: dict[str, float] = field(default_factory=dict)
    alternatives: list[tuple[float, ...]] = field(default_factory=list)


def _check_parent(what: str, parent: Any, ckpt: str | None, fix: str) -> None:
    """Refuse an artifact that does not name the SAR encoder's checkpoint as its parent (one line with the fix)."""
    if not parent:
        raise ArtifactError(
            f"{what} names no parent encoder checkpoint (parent_sha256), so it cannot be matched to the SAR encoder "
            f"(checkpoint {str(ckpt)[:12]}); {fix}"
        )
    if parent != ckpt:
        raise ArtifactError(
            f"{what} was made for encoder checkpoint {str(parent)[:12]}, the SAR encoder comes from {str(ckpt)[:12]}; "
            f"use the one exported with this model, or {fix}"
        )


class Localizer:
    """Embed + search + refine + verify for windows on a map pack's grid.

    Args:
        encoder: the SAR encoder (:class:`~sarloc.backends.encoders.OrtEncoder` or ``TrtEncoder``).
        pack: an opened :class:`~sarloc.mappack.pack.MapPack` (checked against ``encoder``).
        refiner: optional :class:`~sarloc.runtime.refine.OnnxRefiner` (its parent must be the encoder's checkpoint).
        verifier: optional :class:`~sarloc.runtime.refine.Verifier` (same rule); without it nothing is trusted.
    """

    def __init__(
        self,
        encoder,
        pack,
        refiner: OnnxRefiner | None = None,
        verifier: Verifier | None = None,
        cfg: LocalizerConfig = LocalizerConfig(),
        shortlister: Shortlister | None = None,
    ) -> None:
        from sarloc.mappack.pack import check_encoder_match
        from sarloc.mappack.search import PackSearcher

        man = encoder.manifest
        if man.get("modality") != "sar":
            raise SarlocError(f"the localizer needs the SAR encoder, got a {man.get('modality')!r} one")
        check_encoder_match(pack.manifest, man, pack.path)
        ckpt = man.get("checkpoint_sha256")
        if refiner is not None:
            fix = "re-export it for this model (`sarloc train-refiner --checkpoint CKPT`)"
            _check_parent(f"refiner {refiner.path}", refiner.encoder_sha256, ckpt, fix)
        fit = "re-fit it for this model (`sarloc train-refiner --checkpoint CKPT`)"
        if verifier is not None:
            _check_parent(f"verifier {verifier.path or '(in memory)'}", verifier.parent_sha256, ckpt, fit)
        if shortlister is not None:
            _check_parent(f"shortlister {shortlister.path or '(in memory)'}", shortlister.parent_sha256, ckpt, fit)
        self.encoder, self.pack, self.refiner, self.verifier, self.cfg = encoder, pack, refiner, verifier, cfg
        if refiner is not None and refiner.k != cfg.k:
            raise SarlocError(f"refiner {refiner.path.name} takes K={refiner.k} candidates; set k = {refiner.k}")
        self.searcher = PackSearcher(pack)
        self.grid = pack.metric_grid()
        self.window_px = int(pack.manifest["grid"]["tile_px"])
        self.tile_m = pack.tile_m
        base = pack.basemap()
        self.shortlister = shortlister
        self.short_reg = None
        if base is None:
            logger.warning("map pack %s has no basemap image: metric refinement is off (rebuild the pack)", pack.path)
            self.registrar = None
        else:
            self.registrar = LocalRegistrar(base, RegistrationConfig(search_px=cfg.search_px))
            if cfg.pool > cfg.k and shortlister is not None:
                t0 = time.perf_counter()
                self.short_reg = ShortlistRegistrar(base, search_px=cfg.search_px)
                logger.info("shortlist descriptors of the map in %.1f s", time.perf_counter() - t0)
            elif cfg.pool > cfg.k:
                logger.warning(
                    "no shortlister.json in the export: using the coarse top-%d without a pool (`sarloc train-refiner` "
                    "writes it)",
                    cfg.k,
                )
        if verifier is None:
            logger.warning(
                "no verifier.json in the export: every window is untrusted and no position will be sent; fit one "
                "with `sarloc train-refiner --checkpoint CKPT --scenes SCENES --out EXPORT`"
            )
        self.prep = encoder.preprocess
        self.fallback_onnx: Path | None = None  # FP32 ONNX to fall back to when the backend fails at run time
        self.stats = {"backend_errors": 0, "backend_fallbacks": 0}

    @classmethod
    def from_paths(
        cls,
        export_dir: str | Path,
        pack_dir: str | Path,
        cfg: LocalizerConfig = LocalizerConfig(),
        backend: str = "ort",
        precision: str = "fp32",
        verify_pack: bool = True,
    ) -> Localizer:
        """Load the SAR encoder of an export folder, the pack, and the refiner/verifier found in the export."""
        from sarloc.backends.encoders import load_encoder
        from sarloc.mappack.pack import MapPack

        export_dir = Path(export_dir)
        enc = load_encoder(export_dir, "sar", precision=precision, backend=backend)
        pack = MapPack(Path(pack_dir), verify=verify_pack, sar_manifest=enc.manifest)
        rp, vp = export_dir / "refiner.onnx", export_dir / "verifier.json"
        refiner = OnnxRefiner(rp) if rp.is_file() else None
        verifier = Verifier.load(vp) if vp.is_file() else None
        sp = export_dir / "shortlister.json"
        shortlister = Shortlister.load(sp) if sp.is_file() else None
        loc = cls(enc, pack, refiner, verifier, cfg, shortlister=shortlister)
        fp32 = export_dir / "sar_encoder.onnx"
        loc.fallback_onnx = fp32 if fp32.is_file() else None
        return loc

    def _candidates(self, q: np.ndarray, res) -> tuple[Candidates, np.ndarray, np.ndarray]:
        k = self.cfg.k
        d = q.shape[0]
        n = len(res.rows)
        emb = np.zeros((1, k, d), np.float32)
        sims = np.full((1, k), -1.0, np.float32)
        xy = np.zeros((1, k, 2))
        valid = np.zeros((1, k), bool)
        rows = np.zeros(k, np.int64)
        if n:
            emb[0, :n] = np.asarray(self.pack.embeddings[res.rows], np.float32)
            sims[0, :n] = res.scores
            xy[0, :n] = res.xy_m / self.tile_m
            valid[0, :n] = True
            rows[:n] = res.rows
            if n < k:
                emb[0, n:], xy[0, n:], rows[n:] = emb[0, n - 1], xy[0, n - 1], rows[n - 1]
        return Candidates(q[None].astype(np.float32), emb, sims, xy, valid), rows, valid[0]

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """Embed prepared windows; a failing backend is replaced by ONNX Runtime on the CPU (once, logged)."""
        try:
            emb = np.asarray(self.encoder(x), np.float32)
        except Exception as e:
            self.stats["backend_errors"] += 1
            if self.fallback_onnx is None or self.stats["backend_fallbacks"]:
                raise SarlocError(f"SAR encoder failed at run time ({type(e).__name__}: {e}); no fallback left") from e
            from sarloc.backends.encoders import OrtEncoder

            logger.error(
                "SAR encoder %r failed (%s: %s); falling back to ONNX Runtime on the CPU (%s)",
                self.encoder,
                type(e).__name__,
                e,
                self.fallback_onnx,
            )
            fb = OrtEncoder(self.fallback_onnx, providers=["CPUExecutionProvider"])
            if fb.manifest.get("sha256") != self.encoder.manifest.get("sha256") and fb.manifest.get(
                "checkpoint_sha256"
            ) != self.encoder.manifest.get("checkpoint_sha256"):
                raise SarlocError(f"fallback model {self.fallback_onnx} is not the same model; no fallback") from e
            self.encoder = fb
            self.stats["backend_fallbacks"] += 1
            emb = np.asarray(self.encoder(x), np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(x) or not np.all(np.isfinite(emb)):
            raise SarlocError(f"SAR encoder returned {emb.shape} with non-finite values; window batch dropped")
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb

    def localize(
        self, windows: np.ndarray, prior_xy_m: tuple[float, float] | None = None, prior_radius_m: float | None = None
    ) -> list[WindowResult]:
        """Localise (N, h, w) north-up windows on the pack grid (h = w = the pack's tile side).

        Args:
            prior_xy_m, prior_radius_m: search only within this radius of a prior position (metres); None: the
                whole map.
        """
        wins = np.asarray(windows, dtype=np.float32)
        if wins.ndim != 3 or wins.shape[1:] != (self.window_px, self.window_px):
            raise SarlocError(
                f"windows must be (N, {self.window_px}, {self.window_px}) on the pack grid, got {wins.shape}"
            )
        out: list[WindowResult] = []
        for b0 in range(0, len(wins), self.cfg.batch):
            chunk = wins[b0 : b0 + self.cfg.batch]
            t0 = time.perf_counter()
            x = prepare_windows(chunk, self.prep)
            t1 = time.perf_counter()
            emb = self._encode(x)
            t2 = time.perf_counter()
            per = len(chunk)
            pre_ms, enc_ms = (t1 - t0) * 1e3 / per, (t2 - t1) * 1e3 / per
            for i in range(per):
                out.append(self._one(chunk[i], emb[i], prior_xy_m, prior_radius_m, pre_ms, enc_ms))
        return out

    def _one(self, win, q, prior_xy_m, prior_radius_m, pre_ms, enc_ms) -> WindowResult:
        t0 = time.perf_counter()
        n = self.cfg.pool if self.short_reg is not None else self.cfg.k
        if prior_xy_m is not None and prior_radius_m:
            res = self.searcher.peaks(q, n, prior_xy_m=prior_xy_m, prior_radius_m=prior_radius_m)
        else:
            res = self.searcher.peaks(q, n)
        t1 = time.perf_counter()
        stage = {"preprocess": pre_ms, "encode": enc_ms, "search": (t1 - t0) * 1e3}
        if self.short_reg is not None and len(res.rows) > self.cfg.k:
            low, low_xy = self.short_reg.scores(win, self.pack.tile_centres_px(res.rows))
            valid = np.ones((1, len(res.rows)), bool)
            assert self.shortlister is not None  # short_reg is only built with a shortlister (__init__)
            p = self.shortlister.prob(shortlist_features(low[None], res.scores[None].astype(np.float64), valid))[0]
            order = np.argsort(-p, kind="stable")
            if self.cfg.rescore > self.cfg.k and self.registrar is not None:
                order = narrow_rescore(win, low_xy, order, valid[0], self.cfg.k, self.cfg.rescore, self.registrar)
            keep = order[: self.cfg.k]
            res = type(res)(res.rows[keep], res.scores[keep], res.xy_m[keep], res.candidates)
            t1b = time.perf_counter()
            stage["shortlist"] = (t1b - t1) * 1e3
            t1 = t1b
        if len(res.rows) == 0:
            return WindowResult(None, None, 0.0, -1.0, False, float("inf"), res.candidates, stage)
        c, rows, valid = self._candidates(q, res)
        scores = candidate_scores(c, self.refiner)
        t2 = time.perf_counter()
        centres = self.pack.tile_centres_px(rows)
        if self.registrar is not None:
            reg = self.registrar.register(win, centres)
            reg_xy, rs, r2, rb = reg.xy_px, reg.score, reg.second, reg.at_border
        else:
            reg_xy, rs, r2, rb = centres, np.full(len(rows), -1.0), np.full(len(rows), -1.0), np.zeros(len(rows), bool)
        t3 = time.perf_counter()
        if self.verifier is not None:
            f = candidate_features(scores, c.sims, rs[None], r2[None], rb[None], c.valid)
            p = np.where(valid, self.verifier.prob(f)[0], -1.0)
            pick = int(np.argmax(p))
            conf = float(p[pick])
        else:
            p = np.zeros(len(rows))
            pick = int(np.argmax(scores[0]))
            conf = 0.0
        t4 = time.perf_counter()
        stage.update(rerank=(t2 - t1) * 1e3, register=(t3 - t2) * 1e3, verify=(t4 - t3) * 1e3)
        xpx, ypx = float(reg_xy[pick, 0]), float(reg_xy[pick, 1])
        xm, ym = self.grid.pixel_to_metric(np.array(xpx), np.array(ypx))
        # one-sigma error of a right fix: ~1.5 px of registration (co-registration + sub-pixel fit); wrong fixes
        # are the verifier's business, not this number's
        sigma = 1.5 * self.grid.gsd_m if self.registrar is not None else self.tile_m / 2.0
        cx, cy = self.grid.pixel_to_metric(reg_xy[:, 0], reg_xy[:, 1])
        alts: list[tuple[float, ...]] = [
            (round(float(cx[j]), 2), round(float(cy[j]), 2), round(float(p[j]), 4),
             round(float(scores[0, j]), 4), round(float(rs[j]), 4), round(float(r2[j]), 4))
            for j in np.flatnonzero(valid)
        ]  # fmt: skip
        return WindowResult(
            (float(xm), float(ym)),
            (xpx, ypx),
            conf,
            float(rs[pick]),
            conf >= self.cfg.threshold and self.verifier is not None,
            sigma,
            res.candidates,
            stage,
            alts,
        )


__all__ = ["Localizer", "LocalizerConfig", "WindowResult"]
