"""One training step: the learning-rate schedule, the metric loss, the modality-alignment and joint-refiner terms,
mixed precision (``TrainConfig.precision``), and precise BN after the last step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sarloc.core.errors import ConfigError
from sarloc.trainer.config import TrainConfig
from sarloc.trainer.data.pairs import PairSampler
from sarloc.trainer.losses import (
    batch_hard_triplet,
    critic_loss,
    info_nce,
    modality_adversarial_loss,
    wasserstein_estimate,
)
from sarloc.trainer.models.encoder import CrossModalEncoder
from sarloc.trainer.run import _Run

#: the autocast dtype of each mixed precision (``fp32``: no autocast)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _AmpRun(_Run):
    """A :class:`_Run` with the gradient scaler of ``precision = "fp16"`` (None in FP32 and bf16)."""

    scaler: torch.amp.GradScaler | None = None


def _scaler_of(run: _Run) -> torch.amp.GradScaler | None:
    """The gradient scaler of ``run`` (None: FP32 or bf16)."""
    return run.scaler if isinstance(run, _AmpRun) else None


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a precision ``device`` cannot train in, with one line naming the option and the fix."""
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision = 'fp16' needs a CUDA GPU (float16 training with a gradient scaler), this run is on "
            f"{device.type}; use bf16 or fp32 on CPU (--precision bf16)"
        )
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(False):
        raise ConfigError(
            f"precision = 'bf16' needs a GPU with native bfloat16 (Ampere or newer), "
            f"{torch.cuda.get_device_name(device)} has none; use fp16 or fp32 on this GPU"
        )


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """The gradient scaler of fp16 training (None for fp32 and bf16, which need none)."""
    return torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None


def autocast(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    """Autocast to ``cfg.precision``'s dtype on ``device`` (disabled in FP32)."""
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class _Autocast(torch.nn.Module):
    """Calls ``module`` under :func:`autocast` and returns its output in FP32 (for the losses)."""

    def __init__(self, module: torch.nn.Module, device: torch.device, cfg: TrainConfig) -> None:
        super().__init__()
        self.module, self.device, self.cfg = module, device, cfg

    def forward(self, *args: Any) -> torch.Tensor:
        with autocast(self.device, self.cfg):
            out = self.module(*args)
        return out.float()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def recalibrate_bn(model: CrossModalEncoder, sampler: PairSampler, n_batches: int, device: torch.device) -> None:
    """Precise BN: re-estimate every batch-norm running mean/var as a plain average over ``n_batches`` fresh
    batches with the final weights (running stats accumulated during training lag behind fast-moving weights).
    Runs in FP32 whatever the training precision (the statistics go into the exported model)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.autocast(device.type, enabled=False):
        for _ in range(n_batches):
            b = sampler.sample()
            model(torch.from_numpy(b.sar).to(device), torch.from_numpy(b.optical).to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def _metric_loss(z_sar, z_opt, targets, b, run: _Run, cfg: TrainConfig, logs: dict[str, float]) -> torch.Tensor:
    """InfoNCE and/or the batch-hard triplet loss of ``cfg.metric_loss`` (logged in ``logs``)."""
    if cfg.metric_loss in ("infonce", "both"):
        loss = info_nce(z_sar, z_opt, targets, cfg.temperature)
        logs["nce"] = loss.item()
    else:
        loss = z_sar.sum() * 0.0
    if cfg.metric_loss in ("triplet", "both"):
        trip = batch_hard_triplet(
            z_sar,
            z_opt,
            torch.from_numpy(b.pos_mask).to(run.device),
            cfg.margin,
            torch.from_numpy(b.semi_mask).to(run.device),
        )
        loss = loss + trip
        logs["triplet"] = trip.item()
    return loss


def _alignment_term(
    a_sar, a_opt, run: _Run, cfg: TrainConfig, step: int, logs: dict[str, float]
) -> torch.Tensor | None:
    """The weighted modality-alignment term to add to the loss (None when there is none at this step).

    Wasserstein: the critic is updated first (``critic_steps`` times); its gradients from the encoder loss are
    discarded at its next zero_grad. The critic runs in FP32 (no gradient scaler needed). Classifier: the
    gradient-reversal loss (under autocast); the classifier steps with the encoder.
    """
    adversary, adv_opt = run.adversary, run.adv_opt
    if cfg.align == "wasserstein" and adversary is not None and adv_opt is not None:
        for _ in range(cfg.critic_steps):
            c_loss = critic_loss(run.ddp_adv, a_opt, a_sar, cfg.gp_weight)
            adv_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            adv_opt.step()
        logs["critic"] = c_loss.item()
        w1 = wasserstein_estimate(adversary, a_opt, a_sar)
        logs["w1"] = w1.item()
        return cfg.align_weight * w1 if step >= cfg.align_start else None
    if cfg.align == "classifier" and adversary is not None and adv_opt is not None:
        lam = 1.0 if step >= cfg.align_start else 0.0
        with autocast(run.device, cfg):
            a_loss = modality_adversarial_loss(run.ddp_adv, a_opt, a_sar, lam)
        logs["modality_bce"] = a_loss.item()
        term = cfg.align_weight * a_loss
        adv_opt.zero_grad(set_to_none=True)
        return term
    return None


def _refiner_term(z_sar, z_opt, b, run: _Run, cfg: TrainConfig, logs: dict[str, float]) -> torch.Tensor:
    """The weighted listwise loss of the jointly trained graph refiner (its parts logged in ``logs``); the refiner
    runs under autocast, its listwise loss in FP32."""
    from sarloc.trainer.joint import joint_refiner_loss

    w = float(cfg.window_px)
    oc = torch.from_numpy(b.opt_centres).to(device=run.device, dtype=z_opt.dtype)
    refiner = run.ddp_refiner
    if refiner is not None and cfg.precision != "fp32":
        refiner = _Autocast(refiner, run.device, cfg)
    r_loss, r_logs = joint_refiner_loss(
        refiner,
        z_sar,
        z_opt,
        torch.from_numpy(b.scene_idx).to(run.device),
        torch.stack([oc[:, 0], -oc[:, 1]], 1) / w,
        torch.from_numpy(b.pos_mask | b.semi_mask).to(run.device),
        cfg.refiner_k,
        run.ref_gen,
    )
    term = cfg.refiner_weight * r_loss
    logs.update(r_logs)
    return term


def _backward_and_step(run: _Run, cfg: TrainConfig, loss: torch.Tensor) -> None:
    """Backward and the optimiser steps (the encoder's, and the classifier's with ``align = classifier``), through
    the gradient scaler in fp16 (a step with inf/NaN gradients is skipped and the scale lowered)."""
    scaler = _scaler_of(run)
    opts = [run.opt]
    if run.adv_opt is not None and cfg.align == "classifier":
        opts.append(run.adv_opt)
    if scaler is None:
        loss.backward()
        for opt in opts:
            opt.step()
        return
    scaler.scale(loss).backward()
    for opt in opts:
        scaler.step(opt)
    scaler.update()


def _train_step(run: _Run, cfg: TrainConfig, step: int) -> dict[str, float]:
    """One optimiser step on a fresh batch; returns the logged losses. The forward passes run under autocast with
    ``cfg.precision`` bf16 / fp16; the embeddings go to the losses in FP32."""
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
    b = run.sampler.sample()
    sar = torch.from_numpy(b.sar).to(run.device)
    optical = torch.from_numpy(b.optical).to(run.device)
    targets = torch.from_numpy(b.targets).to(run.device)
    with autocast(run.device, cfg):
        z_sar, z_opt = run.ddp_model(sar, optical)
    z_sar, z_opt = z_sar.float(), z_opt.float()
    logs: dict[str, float] = {}
    d = cfg.encoder.embed_dim  # the adversary sees the learned part only (the layout branch is fixed)
    a_sar, a_opt = z_sar[:, :d], z_opt[:, :d]
    loss = _metric_loss(z_sar, z_opt, targets, b, run, cfg, logs)
    align = _alignment_term(a_sar, a_opt, run, cfg, step, logs)
    if align is not None:
        loss = loss + align
    if run.ddp_refiner is not None:
        loss = loss + _refiner_term(z_sar, z_opt, b, run, cfg, logs)
    run.opt.zero_grad(set_to_none=True)
    _backward_and_step(run, cfg, loss)
    logs["loss"] = loss.item()
    return logs
