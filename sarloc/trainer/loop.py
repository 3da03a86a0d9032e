"""The training loop: metric loss + modality alignment, single process or DDP under torchrun."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from sarloc.core.artifacts import atomic_write_json, sha256_bytes
from sarloc.core.scene import Scene, find_scenes, load_scene
from sarloc.trainer.checkpoint import save_checkpoint
from sarloc.trainer.config import TrainConfig
from sarloc.trainer.data.pairs import PairSampler
from sarloc.trainer.losses import (
    Critic,
    ModalityClassifier,
    batch_hard_triplet,
    critic_loss,
    info_nce,
    modality_adversarial_loss,
    wasserstein_estimate,
)
from sarloc.trainer.models.encoder import CrossModalEncoder

logger = logging.getLogger(__name__)


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 when not distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def scenes_digest(scenes: list[Scene]) -> str:
    """sha256 over the scenes' names and image hashes (the checkpoint's parent)."""
    parts = [
        f"{s.name}:{s.meta.get('optical', {}).get('sha256')}:{s.meta.get('sar', {}).get('sha256')}" for s in scenes
    ]
    return sha256_bytes("\n".join(sorted(parts)).encode())


@torch.no_grad()
def recalibrate_bn(model: CrossModalEncoder, sampler: PairSampler, n_batches: int, device: torch.device) -> None:
    """Precise BN: re-estimate every batch-norm running mean/var as a plain average over ``n_batches`` fresh
    batches with the final weights (running stats accumulated during training lag behind fast-moving weights)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for _ in range(n_batches):
        b = sampler.sample()
        model(torch.from_numpy(b.sar).to(device), torch.from_numpy(b.optical).to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def train(
    scene_dirs: list[str | Path],
    out_dir: str | Path,
    cfg: TrainConfig,
    exclude: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Train the cross-modal encoder; returns the checkpoint path (``out_dir/checkpoint.pt``).

    Under ``torchrun`` (WORLD_SIZE > 1) each process draws its own batches and DDP averages gradients
    (gloo on CPU, NCCL on CUDA); rank 0 writes the run folder.

    Args:
        scene_dirs: scene folders or folders of scene folders.
        out_dir: run folder (config.json, train_log.jsonl, checkpoint.pt + checkpoint.json).
        cfg: resolved training config.
        exclude: scene names to leave out (e.g. the held-out scene).
        progress: show a tqdm bar (rank 0).
    """
    rank, local_rank, world = _dist_info()
    out_dir = Path(out_dir)
    distributed = world > 1
    device = torch.device(
        f"cuda:{local_rank}"
        if torch.cuda.is_available() and distributed
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    paths = [p for p in find_scenes(list(scene_dirs)) if not exclude or p.name not in exclude]
    scenes = [load_scene(p) for p in paths]
    scenes = [s for s in scenes if not exclude or s.name not in exclude]
    sampler = PairSampler(
        scenes,
        cfg.window_px,
        cfg.batch_size,
        cfg.preprocess,
        cfg.augment,
        cfg.scenes_per_batch,
        seed=cfg.seed * 1000 + rank,
    )
    model = CrossModalEncoder(cfg.encoder).to(device)
    ddp_model: torch.nn.Module = model
    if distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    refiner: torch.nn.Module | None = None
    ddp_refiner: torch.nn.Module | None = None
    ref_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7)
    if cfg.refiner_weight > 0:  # joint training of the graph refiner (sarloc.trainer.joint)
        from sarloc.trainer.joint import joint_refiner_loss, make_refiner

        refiner = make_refiner(model.output_dim(cfg.window_px), cfg.refiner_k).to(device)
        opt.add_param_group(
            {"params": list(refiner.parameters()), "weight_decay": 1e-2, "lr_scale": cfg.refiner_lr_scale}
        )
        ddp_refiner = refiner
        if distributed:
            ddp_refiner = torch.nn.parallel.DistributedDataParallel(refiner)
    adversary: torch.nn.Module | None = None
    adv_opt = None
    if cfg.align == "wasserstein":
        adversary = Critic(cfg.encoder.embed_dim).to(device)
        adv_opt = torch.optim.Adam(adversary.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
    elif cfg.align == "classifier":
        adversary = ModalityClassifier(cfg.encoder.embed_dim).to(device)
        adv_opt = torch.optim.Adam(adversary.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
    ddp_adv = adversary
    if distributed and adversary is not None:
        ddp_adv = torch.nn.parallel.DistributedDataParallel(adversary)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out_dir / "config.json", {"train": cfg.to_dict(), "scenes": [s.name for s in scenes], "world_size": world}
        )
        log_f = open(out_dir / "train_log.jsonl", "a", buffering=1)
        logger.info(
            "training on %d scenes (%s), %d steps x %d pairs x %d process(es), align=%s",
            len(scenes),
            ", ".join(s.name for s in scenes),
            cfg.steps,
            cfg.batch_size,
            world,
            cfg.align,
        )
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    t_start = time.time()
    ema: dict[str, float] = {}
    step = 0
    model.train()
    try:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
            b = sampler.sample()
            sar = torch.from_numpy(b.sar).to(device)
            optical = torch.from_numpy(b.optical).to(device)
            targets = torch.from_numpy(b.targets).to(device)
            z_sar, z_opt = ddp_model(sar, optical)
            logs: dict[str, float] = {}
            d = cfg.encoder.embed_dim  # the adversary sees the learned part only (the layout branch is fixed)
            a_sar, a_opt = z_sar[:, :d], z_opt[:, :d]
            if cfg.metric_loss in ("infonce", "both"):
                loss = info_nce(z_sar, z_opt, targets, cfg.temperature)
                logs["nce"] = loss.item()
            else:
                loss = z_sar.sum() * 0.0
            if cfg.metric_loss in ("triplet", "both"):
                trip = batch_hard_triplet(
                    z_sar,
                    z_opt,
                    torch.from_numpy(b.pos_mask).to(device),
                    cfg.margin,
                    torch.from_numpy(b.semi_mask).to(device),
                )
                loss = loss + trip
                logs["triplet"] = trip.item()
            if cfg.align == "wasserstein" and adversary is not None and adv_opt is not None:
                for _ in range(cfg.critic_steps):
                    c_loss = critic_loss(ddp_adv, a_opt, a_sar, cfg.gp_weight)
                    adv_opt.zero_grad(set_to_none=True)
                    c_loss.backward()
                    adv_opt.step()
                logs["critic"] = c_loss.item()
                w1 = wasserstein_estimate(adversary, a_opt, a_sar)
                logs["w1"] = w1.item()
                if step >= cfg.align_start:
                    loss = loss + cfg.align_weight * w1
                # the critic's gradients from the encoder loss are discarded at its next zero_grad
            elif cfg.align == "classifier" and adversary is not None and adv_opt is not None:
                lam = 1.0 if step >= cfg.align_start else 0.0
                a_loss = modality_adversarial_loss(ddp_adv, a_opt, a_sar, lam)
                logs["modality_bce"] = a_loss.item()
                loss = loss + cfg.align_weight * a_loss
                adv_opt.zero_grad(set_to_none=True)
            if ddp_refiner is not None:
                w = float(cfg.window_px)
                oc = torch.from_numpy(b.opt_centres).to(device=device, dtype=z_opt.dtype)
                r_loss, r_logs = joint_refiner_loss(
                    ddp_refiner,
                    z_sar,
                    z_opt,
                    torch.from_numpy(b.scene_idx).to(device),
                    torch.stack([oc[:, 0], -oc[:, 1]], 1) / w,
                    torch.from_numpy(b.pos_mask | b.semi_mask).to(device),
                    cfg.refiner_k,
                    ref_gen,
                )
                loss = loss + cfg.refiner_weight * r_loss
                logs.update(r_logs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if adv_opt is not None and cfg.align == "classifier":
                adv_opt.step()
            logs["loss"] = loss.item()
            for k, v in logs.items():
                ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
            if rank == 0:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items() if k in ("loss", "nce", "w1", "refiner")})
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    rec = {"step": step, "lr": lr_at(step, cfg), "t_s": round(time.time() - t_start, 2), **logs}
                    log_f.write(json.dumps(rec) + "\n")
            if cfg.max_minutes:
                stop = torch.tensor([float(time.time() - t_start > cfg.max_minutes * 60)])
                if distributed:  # every rank joins the same collective each step, so none hangs
                    torch.distributed.all_reduce(stop)
                if stop.item() == 0:
                    continue
                if rank == 0:
                    logger.info("stopping at step %d: max_minutes=%.1f reached", step + 1, cfg.max_minutes)
                break
    finally:
        if bar is not None:
            bar.close()
    recalibrate_bn(model, sampler, cfg.bn_recalib_batches, device)
    ckpt = out_dir / "checkpoint.pt"
    if rank == 0:
        info: dict[str, Any] = {
            "steps_done": step + 1,
            "train_seconds": round(time.time() - t_start, 1),
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "scenes": [s.name for s in scenes],
            "scenes_sha256": scenes_digest(scenes),
            "final_losses": {k: round(v, 5) for k, v in ema.items()},
        }
        save_checkpoint(ckpt, model, cfg, info, refiner=refiner)
        log_f.close()
        logger.info("wrote %s (%d steps in %.0f s on %s)", ckpt, step + 1, info["train_seconds"], info["device"])
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return ckpt


def evaluate_checkpoint(
    ckpt: str | Path,
    scene_dir: str | Path,
    eval_cfg,
    kinds=("aligned", "arbitrary"),
    overlap_arbitrary: bool = True,
    dense_stride_px: int | None = 8,
    layout_only: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint and evaluate coarse retrieval on one scene (see :mod:`sarloc.eval.retrieval`).

    Keys of the result: ``aligned`` and ``arbitrary`` (non-overlapping tile gallery, or ``eval_cfg.stride_px``),
    ``arbitrary_overlap50`` (50%-overlap gallery) and ``arbitrary_dense`` (gallery every ``dense_stride_px``
    pixels with non-maximum suppression; skipped when None). ``layout_only`` evaluates the parameter-free
    layout branch alone (the learned part switched off): the ablation that shows what learning adds.
    """
    from dataclasses import replace

    from sarloc.core.scene import make_queries
    from sarloc.eval.retrieval import evaluate_dense, evaluate_embeddings
    from sarloc.trainer.checkpoint import checkpoint_embed_fns, load_checkpoint

    model, cfg, info = load_checkpoint(ckpt)
    if layout_only:
        model.cfg = replace(model.cfg, layout_weight=1e4)
    scene = load_scene(scene_dir)
    fs, fo = checkpoint_embed_fns(model)
    out: dict[str, Any] = {"scene": scene.name, "checkpoint": str(ckpt), "trained_on": info.get("scenes")}
    with torch.no_grad():
        for kind in kinds:
            q = make_queries(scene, kind, eval_cfg.window_px, eval_cfg.queries, eval_cfg.seed)
            out[kind] = evaluate_embeddings(scene, q, fs, fo, cfg.preprocess, eval_cfg)
            if kind != "arbitrary":
                continue
            if overlap_arbitrary and eval_cfg.stride_px in (None, eval_cfg.window_px):
                out["arbitrary_overlap50"] = evaluate_embeddings(
                    scene, q, fs, fo, cfg.preprocess, replace(eval_cfg, stride_px=eval_cfg.window_px // 2)
                )
            if dense_stride_px:
                out["arbitrary_dense"] = evaluate_dense(scene, q, fs, fo, cfg.preprocess, eval_cfg, dense_stride_px)
    return out


__all__ = ["evaluate_checkpoint", "lr_at", "scenes_digest", "train"]
