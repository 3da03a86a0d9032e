"""Training of the learned dense block on the correlation surface, with hard negatives mined from whole scenes.

One step: a training scene, a search region (the whole scene when it is small), a few SAR templates in it. For each
template the ZNCC of its ``[CFOG, w * learned]`` features over the region's optical features gives one logit per
placement (divided by a learnt temperature); to these are added the template's hard negatives (its strongest false
peaks over *every* training scene, found with the current features and refreshed every ``refresh_every`` steps)
and random negatives from other scenes. Loss: softmax cross-entropy with the placements within ``pos_radius`` px of
the truth as the positive set (placements 3..``ignore_radius`` px away are left out). Regularisation: weight
decay, few channels, channel dropout, a learned-alone step with probability ``p_alone`` (so the block must carry
position on its own), SAR augmentation (speckle, contrast, small rotation).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from sarloc.core.artifacts import atomic_write_json
from sarloc.core.cfog import _nms_peaks, cfog, to_gray
from sarloc.trainer.dense_features import (
    DenseFCN,
    FCNConfig,
    FeatureMatcher,
    dense_inputs,
    learned_channels,
    window_features,
    zncc_map,
    zncc_points,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DenseTrainConfig",
    "TrainScene",
    "augment_sar",
    "load_dense",
    "mine_hard_negatives",
    "prepare_scene",
    "train_dense",
    "train_step",
]


@dataclass(frozen=True)
class DenseTrainConfig:
    """Training settings (defaults sized for one CPU thread)."""

    steps: int = 600
    seed: int = 0
    window_px: int = 64
    region_px: int = 256
    templates_per_step: int = 4
    k_hard: int = 8
    k_rand: int = 4
    pool_per_scene: int = 24
    refresh_every: int = 150
    lr: float = 3e-3
    weight_decay: float = 1e-3
    p_alone: float = 0.25
    pos_radius: int = 2
    ignore_radius: int = 8
    rot_deg: float = 6.0
    max_minutes: float = 0.0
    fcn: FCNConfig = field(default_factory=FCNConfig)


@dataclass
class TrainScene:
    """A training scene's arrays: optical CFOG, padded optical net input, SAR image, allowed template origins."""

    name: str
    opt_cfog: np.ndarray
    opt_in: np.ndarray
    sar: np.ndarray
    origins: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return self.sar.shape


def prepare_scene(
    name: str,
    optical_gray: np.ndarray,
    sar_gray: np.ndarray,
    cfg: DenseTrainConfig,
    ok_origins: np.ndarray | None = None,
) -> TrainScene:
    """Precompute a scene's optical CFOG and net input (reflect-padded by the receptive-field radius).

    ``ok_origins``: (N, 2) template top-left (x0, y0) positions allowed (default: all).
    """
    opt = to_gray(optical_gray)
    desc = cfog(opt)
    m = cfg.fcn.margin
    inp = dense_inputs(opt, "optical", desc, cfg.fcn.lcn_sigma)
    inp = np.stack([cv2.copyMakeBorder(c, m, m, m, m, cv2.BORDER_REFLECT) for c in inp])
    h, w = opt.shape
    if ok_origins is None:
        wp = cfg.window_px
        yy, xx = np.mgrid[0 : h - wp + 1 : 4, 0 : w - wp + 1 : 4]
        ok_origins = np.stack([xx.ravel(), yy.ravel()], 1)
    return TrainScene(name, desc, inp, to_gray(sar_gray), np.asarray(ok_origins, np.int64))


def augment_sar(win: np.ndarray, rng: np.random.Generator, rot_deg: float) -> np.ndarray:
    """Speckle (log-Gamma, 2-8 looks, in the image's log units), monotone contrast change, small rotation."""
    g = win.astype(np.float32)
    span = float(g.max() - g.min()) + 1e-6
    if rot_deg > 0:
        h, w = g.shape
        rot = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(rng.uniform(-rot_deg, rot_deg)), 1.0)
        g = cv2.warpAffine(g, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    looks = float(rng.uniform(2.0, 8.0))
    sp = 10.0 * np.log10(rng.gamma(looks, 1.0 / looks, g.shape) + 1e-3)
    g = g + np.float32(rng.uniform(0.0, 0.5) * span / 40.0) * sp.astype(np.float32)
    lo, hi = float(g.min()), float(g.max())
    u = (g - lo) / max(hi - lo, 1e-6)
    return (lo + (hi - lo) * u ** np.float32(math.exp(rng.uniform(-0.35, 0.35)))).astype(np.float32)


def _learned_crops(model: DenseFCN, sc_list: list[TrainScene], where: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """Learned features ``(K, out_ch, h, w)`` of optical crops ``where`` = (K, 3) rows (scene, x0, y0)."""
    h, w = hw
    m = model.cfg.margin
    batch = np.stack([sc_list[int(s)].opt_in[:, y : y + h + 2 * m, x : x + w + 2 * m] for s, x, y in where])
    return model(torch.from_numpy(batch))[:, :, m : m + h, m : m + w]


def _feats(model: DenseFCN, desc: np.ndarray, learned: torch.Tensor, alone: bool) -> torch.Tensor:
    w = model.log_w.exp()
    if alone:
        return learned
    return torch.cat([torch.from_numpy(desc), w * learned], dim=-3)


def _region(sc: TrainScene, cfg: DenseTrainConfig, rng: np.random.Generator, anchor: np.ndarray) -> tuple:
    """Search region (x, y, w, h) inside the scene that contains the template window at ``anchor``."""
    h, w = sc.shape
    rw, rh = min(cfg.region_px, w), min(cfg.region_px, h)
    wp = cfg.window_px
    x = int(rng.integers(max(0, anchor[0] + wp - rw), min(anchor[0], w - rw) + 1))
    y = int(rng.integers(max(0, anchor[1] + wp - rh), min(anchor[1], h - rh) + 1))
    return x, y, rw, rh


def _template_loss(logits_map, extra, truth, cfg: DenseTrainConfig, tau) -> torch.Tensor:
    """Multi-positive InfoNCE over the region's placements plus the extra negatives."""
    hh, ww = logits_map.shape
    yy = torch.arange(hh)[:, None] - truth[1]
    xx = torch.arange(ww)[None, :] - truth[0]
    d = torch.maximum(yy.abs(), xx.abs())
    pos = d <= cfg.pos_radius
    keep = (d <= cfg.pos_radius) | (d > cfg.ignore_radius)
    lm = logits_map / tau
    all_logits = torch.cat([lm[keep], extra / tau])
    return torch.logsumexp(all_logits, 0) - torch.logsumexp(lm[pos], 0)


def train_step(model, scenes, bank, pool, cfg, rng) -> torch.Tensor:
    """Loss of one step (see the module docstring)."""
    si = int(rng.integers(len(scenes)))
    sc = scenes[si]
    mine = np.flatnonzero(pool[:, 0] == si)
    anchor = pool[rng.choice(mine)] if len(mine) else np.array([si, *sc.origins[rng.integers(len(sc.origins))]])
    rx, ry, rw, rh = _region(sc, cfg, rng, anchor[1:])
    wp = cfg.window_px
    inside = mine[
        (pool[mine, 1] >= rx)
        & (pool[mine, 2] >= ry)
        & (pool[mine, 1] + wp <= rx + rw)
        & (pool[mine, 2] + wp <= ry + rh)
    ]
    picks = rng.choice(inside, min(cfg.templates_per_step, len(inside)), replace=False) if len(inside) else []
    alone = bool(rng.random() < cfg.p_alone)
    region = _feats(
        model,
        sc.opt_cfog[:, ry : ry + rh, rx : rx + rw],
        _learned_crops(model, scenes, np.array([[si, rx, ry]]), (rh, rw))[0],
        alone,
    )
    losses = []
    for ti in picks:
        _, x0, y0 = pool[ti]
        win = augment_sar(sc.sar[y0 : y0 + wp, x0 : x0 + wp], rng, cfg.rot_deg)
        desc = cfog(win)
        t_learned = model(torch.from_numpy(dense_inputs(win, "sar", desc, cfg.fcn.lcn_sigma)[None]))[0]
        tfeat = _feats(model, desc, t_learned, alone)
        negs = _negatives(bank.get(int(ti)), scenes, si, cfg, rng)
        opt_desc = np.stack([scenes[int(s)].opt_cfog[:, y : y + wp, x : x + wp] for s, x, y in negs])
        crops = _feats(model, opt_desc, _learned_crops(model, scenes, negs, (wp, wp)), alone)
        extra = zncc_points(tfeat, crops)
        smap = zncc_map(tfeat, region)
        losses.append(_template_loss(smap, extra, (x0 - rx, y0 - ry), cfg, model.log_tau.exp().clamp(0.01, 0.3)))
    return torch.stack(losses).mean() if losses else torch.zeros((), requires_grad=True)


def _negatives(hard: np.ndarray | None, scenes, si: int, cfg: DenseTrainConfig, rng) -> np.ndarray:
    """(K, 3) rows (scene, x0, y0): mined hard negatives plus random ones from other scenes."""
    rows = []
    if hard is not None and len(hard):
        take = rng.permutation(len(hard))[: cfg.k_hard]
        rows.extend(hard[take].tolist())
    others = [i for i in range(len(scenes)) if i != si] or [si]
    while len(rows) < cfg.k_hard + cfg.k_rand:
        j = int(rng.choice(others))
        h, w = scenes[j].shape
        rows.append([j, int(rng.integers(0, w - cfg.window_px + 1)), int(rng.integers(0, h - cfg.window_px + 1))])
    return np.asarray(rows, np.int64)


@torch.no_grad()
def mine_hard_negatives(model: DenseFCN, scenes: list[TrainScene], pool: np.ndarray, k: int, wp: int = 64) -> dict:
    """Each pool template's ``2k`` strongest false peaks over all training scenes with the current features.

    Returns:
        ``{template index: (n, 3) int64 rows (scene, x0, y0)}``, strongest first; peaks of the template's own
        scene within half a window of the truth are excluded.
    """
    matchers = []
    for sc in scenes:
        m = model.cfg.margin
        inner = sc.opt_in[:, m:-m, m:-m] if m else sc.opt_in
        learned = learned_channels(model, np.ascontiguousarray(inner))
        matchers.append(FeatureMatcher(np.concatenate([sc.opt_cfog, np.float32(model.weight) * learned])))
    bank: dict[int, np.ndarray] = {}
    for ti, (si, x0, y0) in enumerate(pool):
        feats = window_features(model, scenes[si].sar[y0 : y0 + wp, x0 : x0 + wp], "concat")
        cands = []
        for sj, mt in enumerate(matchers):
            if mt.shape[0] < wp or mt.shape[1] < wp:
                continue
            s = mt.score_features(feats)
            if sj == si:
                s[max(0, y0 - wp // 2) : y0 + wp // 2 + 1, max(0, x0 - wp // 2) : x0 + wp // 2 + 1] = -np.inf
            cands += [(float(s[py, px]), sj, px, py) for py, px in _nms_peaks(s, 2 * k, 8) if np.isfinite(s[py, px])]
        cands.sort(key=lambda c: -c[0])
        bank[ti] = np.array([c[1:] for c in cands[: 2 * k]], np.int64).reshape(-1, 3)
    return bank


def _draw_pool(scenes: list[TrainScene], n: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    for si, sc in enumerate(scenes):
        idx = rng.choice(len(sc.origins), min(n, len(sc.origins)), replace=False)
        rows += [[si, *sc.origins[i]] for i in idx]
    return np.asarray(rows, np.int64)


def train_dense(scenes: list[TrainScene], out_dir: str | Path, cfg: DenseTrainConfig) -> Path:
    """Train the learned block on ``scenes``; writes ``checkpoint.pt`` and ``checkpoint.json`` under ``out_dir``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = DenseFCN(cfg.fcn)
    decay = [p for n, p in model.named_parameters() if n.startswith("net.")]
    other = [p for n, p in model.named_parameters() if not n.startswith("net.")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    t0, hist, run, step, mine_s = time.time(), [], [], 0, 0.0
    bank: dict = {}
    pool = _draw_pool(scenes, cfg.pool_per_scene, rng)
    for step in range(1, cfg.steps + 1):
        if (step - 1) % cfg.refresh_every == 0:
            tm = time.time()
            pool = _draw_pool(scenes, cfg.pool_per_scene, rng)
            bank = mine_hard_negatives(model, scenes, pool, cfg.k_hard, cfg.window_px)
            mine_s += time.time() - tm
        loss = train_step(model, scenes, bank, pool, cfg, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.append(float(loss.detach()))
        if step % 25 == 0:
            hist.append(
                {
                    "step": step,
                    "loss": float(np.mean(run)),
                    "w": model.weight,
                    "tau": float(model.log_tau.detach().exp()),
                    "min": round((time.time() - t0) / 60, 2),
                }
            )
            logger.info(
                "dense step %d loss %.3f w %.2f tau %.3f", step, hist[-1]["loss"], model.weight, hist[-1]["tau"]
            )
            run = []
        if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
            break
    return _save(model, out_dir, cfg, scenes, step, hist, time.time() - t0, mine_s)


def _save(model, out_dir, cfg, scenes, step, hist, wall_s, mine_s) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "fcn": model.config_dict()}, out / "checkpoint.pt")
    manifest = {
        "kind": "dense_features",
        "config": json.loads(json.dumps(asdict(cfg))),
        "training_scenes": [s.name for s in scenes],
        "steps_done": step,
        "loss_history": hist,
        "final_loss": hist[-1]["loss"] if hist else None,
        "weight": model.weight,
        "tau": float(model.log_tau.detach().exp()),
        "wall_minutes": round(wall_s / 60, 2),
        "mining_minutes": round(mine_s / 60, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    atomic_write_json(out / "checkpoint.json", manifest)
    return out / "checkpoint.pt"


def load_dense(path: str | Path) -> DenseFCN:
    """Load a checkpoint written by :func:`train_dense` (eval mode)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DenseFCN(FCNConfig(**blob["fcn"]))
    model.load_state_dict(blob["state"])
    return model.eval()
