"""The training loop: metric loss + modality alignment, single process or DDP under torchrun.

Its parts: the state of one process (:mod:`sarloc.trainer.run`), one training step (:mod:`sarloc.trainer.steps`),
resumable training and stopping on signals (:mod:`sarloc.trainer.resume`) and the evaluation of a checkpoint
(:mod:`sarloc.trainer.evaluate`); the names used from outside are importable from here too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from sarloc.core.artifacts import atomic_write_json
from sarloc.core.scene import find_scenes, load_scene
from sarloc.trainer.checkpoint import save_checkpoint, save_resume
from sarloc.trainer.config import RESUME_FREE_KEYS, TrainConfig
from sarloc.trainer.data.datasets.training import MixedSampler, training_data
from sarloc.trainer.data.pairs import PairSampler
from sarloc.trainer.evaluate import evaluate_checkpoint
from sarloc.trainer.losses import Critic, ModalityClassifier
from sarloc.trainer.models.encoder import CrossModalEncoder
from sarloc.trainer.resume import (
    RESUME_FILE,
    RUN_FILES,
    TrainingInterrupted,
    _check_run_folder,
    _check_scenes,
    _Clock,
    _control,
    _load_for_resume,
    _move_aside,
    _restore,
    _rewind_log,
    _rng_state,
    _stop_on_signals,
    _StopFlag,
    _training_state,
    existing_run,
    scenes_digest,
)
from sarloc.trainer.run import _Run
from sarloc.trainer.steps import _AmpRun, _train_step, check_precision, lr_at, make_scaler, recalibrate_bn

logger = logging.getLogger(__name__)


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 when not distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def _init_process(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """Rank, local rank, world size and device of this process; refuses a precision the device lacks, joins the
    process group under torchrun and sets the thread count and the torch seed."""
    rank, local_rank, world = _dist_info()
    distributed = world > 1
    device = torch.device(
        f"cuda:{local_rank}"
        if torch.cuda.is_available() and distributed
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    check_precision(cfg, device)
    if distributed and device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per rank, also for the object collectives
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return rank, local_rank, world, device


def _add_refiner(run: _Run, cfg: TrainConfig) -> None:
    """Joint training of the graph refiner (:mod:`sarloc.trainer.joint`): its parameters join the optimiser."""
    from sarloc.trainer.joint import make_refiner

    refiner = make_refiner(run.model.output_dim(cfg.window_px), cfg.refiner_k).to(run.device)
    run.opt.add_param_group(
        {"params": list(refiner.parameters()), "weight_decay": 1e-2, "lr_scale": cfg.refiner_lr_scale}
    )
    run.refiner = run.ddp_refiner = refiner
    if run.distributed:
        run.ddp_refiner = torch.nn.parallel.DistributedDataParallel(refiner)


def _add_adversary(run: _Run, cfg: TrainConfig) -> None:
    """The modality adversary of ``cfg.align`` (a Wasserstein critic or a modality classifier), if any."""
    if cfg.align == "wasserstein":
        run.adversary = Critic(cfg.encoder.embed_dim).to(run.device)
        run.adv_opt = torch.optim.Adam(run.adversary.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
    elif cfg.align == "classifier":
        run.adversary = ModalityClassifier(cfg.encoder.embed_dim).to(run.device)
        run.adv_opt = torch.optim.Adam(run.adversary.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
    run.ddp_adv = run.adversary
    if run.distributed and run.adversary is not None:
        run.ddp_adv = torch.nn.parallel.DistributedDataParallel(run.adversary)


def _set_up(
    scene_dirs: list[str | Path], cfg: TrainConfig, exclude: list[str] | None, datasets: list | None
) -> _AmpRun:
    """Process, data, models and optimisers, created in a fixed order (the torch seed is drawn from in it)."""
    rank, local_rank, world, device = _init_process(cfg)
    found = find_scenes(list(scene_dirs)) if scene_dirs or not datasets else []
    paths = [p for p in found if not exclude or p.name not in exclude]
    scenes = [load_scene(p) for p in paths]
    scenes = [s for s in scenes if not exclude or s.name not in exclude]
    dataset_info: list[dict[str, Any]] = []
    sampler: PairSampler | MixedSampler
    if datasets:  # public datasets, alone or mixed with the scenes (sarloc.trainer.data.datasets)
        scenes, sampler, dataset_info = training_data(
            scenes,
            datasets,
            window_px=cfg.window_px,
            batch_size=cfg.batch_size,
            prep=cfg.preprocess,
            aug=cfg.augment,
            scenes_per_batch=cfg.scenes_per_batch,
            seed=cfg.seed,
            rank=rank,
            world=world,
        )
    else:
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
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7)
    run = _AmpRun(
        rank,
        local_rank,
        world,
        device,
        scenes,
        sampler,
        model,
        ddp_model,
        opt,
        ref_gen,
        datasets=dataset_info,
        scaler=make_scaler(cfg, device),
    )
    if cfg.refiner_weight > 0:
        _add_refiner(run, cfg)
    _add_adversary(run, cfg)
    return run


def _open_run_folder(
    out_dir: Path, cfg: TrainConfig, run: _Run, resumed: dict[str, Any] | None, force: bool
) -> IO[str]:
    """Rank 0: write ``config.json`` and open ``train_log.jsonl`` (line-buffered): a fresh one (with ``force``, after
    moving the old run's files aside), or, resuming, the old one cut back to the resumable state's position."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resumed is None and force and existing_run(out_dir):
        _move_aside(out_dir)
    atomic_write_json(
        out_dir / "config.json",
        {
            "train": cfg.to_dict(),
            "scenes": [s.name for s in run.scenes],
            "world_size": run.world,
            **({"datasets": run.datasets} if run.datasets else {}),
        },
    )
    log_path = out_dir / "train_log.jsonl"
    if resumed is None:
        log_f = open(log_path, "w", buffering=1)
    else:
        _rewind_log(log_path, int(resumed.get("log_bytes", 0)))
        log_f = open(log_path, "a", buffering=1)
    logger.info(
        "training on %d scenes (%s), %d steps x %d pairs x %d process(es), align=%s, precision=%s%s",
        len(run.scenes),
        ", ".join(s.name for s in run.scenes),
        cfg.steps,
        cfg.batch_size,
        run.world,
        cfg.align,
        cfg.precision,
        f"; resuming at step {resumed['step']}" if resumed is not None else "",
    )
    return log_f


def _save_resume(
    run: _Run,
    cfg: TrainConfig,
    out_dir: Path,
    done: int,
    clock: _Clock,
    ema: dict[str, float],
    log_f: IO[str] | None,
    resumed_from: list[int],
) -> None:
    """Every rank: gather the random states to rank 0, which writes ``out_dir/resume.pt`` (+ ``resume.json``)."""
    rngs: list[Any] = [_rng_state(run)]
    if run.distributed:
        mine, rngs = rngs[0], [None] * run.world
        torch.distributed.all_gather_object(rngs, mine)
    clock.last_save = time.monotonic()
    if run.rank != 0:
        return
    log_bytes = 0
    if log_f is not None:
        log_f.flush()
        log_bytes = os.fstat(log_f.fileno()).st_size
    info = {
        "step": done,
        "steps": cfg.steps,
        "train_seconds": round(clock.total(), 3),
        "log_bytes": log_bytes,
        "world_size": run.world,
        "precision": cfg.precision,
        "scenes": [s.name for s in run.scenes],
        "scenes_sha256": scenes_digest(run.scenes),
        "ema": ema,
        "resumed_from": resumed_from,
        "torch": torch.__version__,
    }
    path = save_resume(out_dir / RESUME_FILE, cfg, {**_training_state(run), "rng": rngs}, info)
    logger.info("saved the resumable state %s (step %d/%d)", path, done, cfg.steps)
    clock.last_save = time.monotonic()


def _progress_bar(cfg: TrainConfig, start: int, deadline: float | None):
    """A tqdm bar over all ``cfg.steps`` from ``start``, whose ETA is the earlier of the steps' end and the
    ``max_minutes`` deadline (marked "(time cap)" when that ends the run first)."""
    from tqdm import tqdm

    class _Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            n, total, elapsed, initial = d["n"], d["total"], d["elapsed"] or 0.0, d.get("initial") or 0
            rate = d["rate"] or ((n - initial) / elapsed if elapsed and n > initial else None)
            left = (total - n) / rate if rate and total else None
            capped = False
            if left is not None and deadline is not None and deadline - time.time() < left:
                left, capped = max(0.0, deadline - time.time()), True
            d["eta"] = "?" if left is None else tqdm.format_interval(left) + (" (time cap)" if capped else "")
            return d

    return _Bar(
        total=cfg.steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{eta}, {rate_fmt}{postfix}]",
    )


@contextmanager
def _log_through(bar) -> Iterator[None]:
    """Log lines go through the progress bar's ``write`` (no broken bars) while it is shown."""
    if bar is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm([logging.getLogger("sarloc")], tqdm_class=type(bar)):
        yield


def _finish(
    run: _Run,
    cfg: TrainConfig,
    out_dir: Path,
    steps_done: int,
    clock: _Clock,
    ema: dict[str, float],
    log_f: IO[str] | None,
    resumed_from: list[int],
) -> Path:
    """Precise BN, then the checkpoint (rank 0); leaves the process group under torchrun."""
    if run.rank == 0 and cfg.bn_recalib_batches:
        logger.info("re-estimating the batch-norm statistics over %d batches (precise BN)", cfg.bn_recalib_batches)
    recalibrate_bn(run.model, run.sampler, cfg.bn_recalib_batches, run.device)
    ckpt = out_dir / "checkpoint.pt"
    if run.rank == 0:
        device = run.device
        info: dict[str, Any] = {
            "steps_done": steps_done,
            "train_seconds": round(clock.total(), 1),
            "world_size": run.world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": cfg.precision,
            "torch": torch.__version__,
            "scenes": [s.name for s in run.scenes],
            "scenes_sha256": scenes_digest(run.scenes),
            "final_losses": {k: round(v, 5) for k, v in ema.items()},
        }
        if resumed_from:
            info["resumed_from"] = resumed_from
        logger.info("writing the checkpoint %s", ckpt)
        save_checkpoint(ckpt, run.model, cfg, info, refiner=run.refiner)
        if log_f is not None:
            log_f.close()
        logger.info("wrote %s (%d steps in %.0f s on %s)", ckpt, steps_done, info["train_seconds"], info["device"])
    if run.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return ckpt


@dataclass
class _Progress:
    """Where a training session stands: the step it started at and the steps done, the training time, the losses'
    moving averages, the steps earlier sessions were resumed at, the step the resumable state holds (None: none
    saved) and why the loop stops (out of time, or the number of the stop signal)."""

    start: int = 0
    done: int = 0
    clock: _Clock = field(default_factory=_Clock)
    ema: dict[str, float] = field(default_factory=dict)
    resumed_from: list[int] = field(default_factory=list)
    saved_step: int | None = None
    out_of_time: bool = False
    sig: int = 0


def _resume_into(
    run: _Run, cfg: TrainConfig, out_dir: Path, resumed: tuple[dict[str, Any], dict[str, Any]], p: _Progress
) -> dict[str, Any]:
    """Load the resumable state into the models, optimisers and random states and ``p``; returns its info."""
    info, blob = resumed
    _check_scenes(run, info, out_dir / RESUME_FILE)
    _restore(run, blob, out_dir / RESUME_FILE)
    del resumed, blob  # the state's tensors are copied into the models: free them
    p.start = p.done = min(int(info["step"]), cfg.steps)
    p.clock.prior_s = float(info.get("train_seconds", 0.0))
    p.ema = {k: float(v) for k, v in (info.get("ema") or {}).items()}
    p.resumed_from = [*info.get("resumed_from", []), p.start]
    p.saved_step = p.start
    if p.start >= cfg.steps and run.rank == 0:
        logger.info("%s holds the end of training (step %d); redoing what follows it", RESUME_FILE, p.start)
    return info


def _record(run: _Run, cfg: TrainConfig, step: int, logs: dict[str, float], p: _Progress, bar, log_f) -> None:
    """Fold a step's losses into the moving averages; rank 0 shows them on the bar and logs the step."""
    for k, v in logs.items():
        p.ema[k] = v if k not in p.ema else 0.9 * p.ema[k] + 0.1 * v
    if run.rank == 0:
        if bar is not None:
            bar.update(1)
            keep = ("loss", "nce", "w1", "refiner")
            bar.set_postfix({k: f"{v:.3f}" for k, v in p.ema.items() if k in keep})
        if log_f is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            rec = {"step": step, "lr": lr_at(step, cfg), "t_s": round(p.clock.total(), 2), **logs}
            log_f.write(json.dumps(rec) + "\n")


def _run_steps(
    run: _Run,
    cfg: TrainConfig,
    out_dir: Path,
    p: _Progress,
    flag: _StopFlag,
    bar,
    log_f: IO[str] | None,
    resumed: bool,
) -> None:
    """The steps from ``p.done`` until the last, the time cap or a stop signal, saving the resumable state when due
    and at the end (``p`` follows along, for the caller to report where a KeyboardInterrupt stopped them)."""
    rank = run.rank
    if resumed and p.start < cfg.steps:  # a run resumed at its time cap stays stopped
        p.out_of_time, p.sig, _ = _control(run, cfg, p.clock, flag, p.start)
        if p.out_of_time and rank == 0:
            logger.info(
                "max_minutes=%.1f is already used up at step %d; resume with a larger --max-minutes to go on",
                cfg.max_minutes,
                p.start,
            )
    while p.done < cfg.steps and not (p.out_of_time or p.sig):
        step = p.done
        logs = _train_step(run, cfg, step)
        _record(run, cfg, step, logs, p, bar, log_f)
        p.done = step + 1
        p.out_of_time, p.sig, due = _control(run, cfg, p.clock, flag, p.done)
        if p.out_of_time and rank == 0:
            logger.info("stopping at step %d: max_minutes=%.1f reached", p.done, cfg.max_minutes)
        if due and p.done < cfg.steps and not (p.out_of_time or p.sig):
            _save_resume(run, cfg, out_dir, p.done, p.clock, p.ema, log_f, p.resumed_from)
            p.saved_step = p.done
    if p.done > p.start or not resumed:  # the state at the loop's end: precise BN and saving come after
        _save_resume(run, cfg, out_dir, p.done, p.clock, p.ema, log_f, p.resumed_from)
        p.saved_step = p.done
    if not run.distributed:  # a signal during that last save still stops the run (one process: no collective)
        p.sig = p.sig or flag.signum


def _stop_early(run: _Run, log_f: IO[str] | None) -> None:
    """After a stop signal: close the log and, under torchrun, leave the process group."""
    if log_f is not None:
        log_f.close()
    if run.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train(
    scene_dirs: list[str | Path],
    out_dir: str | Path,
    cfg: TrainConfig,
    exclude: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
    handle_signals: bool = True,
    datasets: list | None = None,
) -> Path:
    """Train the cross-modal encoder; returns the checkpoint path (``out_dir/checkpoint.pt``).

    Under ``torchrun`` (WORLD_SIZE > 1) each process draws its own batches and DDP averages gradients
    (gloo on CPU, NCCL on CUDA); rank 0 writes the run folder.

    A resumable state (``out_dir/resume.pt`` + ``resume.json``: weights, optimisers, random states of every rank,
    the step, the training time, the log position) is written every ``cfg.checkpoint_every`` steps and/or
    ``cfg.checkpoint_minutes`` minutes and when the loop ends, before precise BN and the checkpoint. SIGINT or
    SIGTERM stops training at the end of the current step (every rank at the same step), saves that state and
    raises :class:`TrainingInterrupted`.

    Args:
        scene_dirs: scene folders or folders of scene folders.
        out_dir: run folder (config.json, train_log.jsonl, checkpoint.pt + checkpoint.json, resume.pt + resume.json).
        cfg: resolved training config.
        exclude: scene names to leave out (e.g. the held-out scene).
        progress: show a tqdm bar (rank 0).
        resume: continue from ``out_dir/resume.pt``: same config (up to :data:`RESUME_FREE_KEYS`), scenes and
            number of processes; the result equals that of an uninterrupted run.
        force: start over in a folder that holds a run, moving its files into ``out_dir/previous-<time>/``.
        handle_signals: install the SIGINT/SIGTERM handlers for the loop (main thread only; restored after it).
        datasets: public datasets to train on as well (or alone, with no ``scene_dirs``): ``NAME[@SPLIT]:ROOT``
            strings, :class:`~sarloc.trainer.data.datasets.DatasetSpec` or opened
            :class:`~sarloc.trainer.data.datasets.PairSource` (:mod:`sarloc.trainer.data.datasets`); they are
            listed in ``config.json`` and their listings' digests join the checkpoint's parent digest.

    Raises:
        ConfigError: ``out_dir`` holds a run and neither ``resume`` nor ``force`` is given; ``resume`` without a
            resumable state, or with a different config (naming the key), scenes or number of processes.
        TrainingInterrupted: stopped by SIGINT or SIGTERM (after saving the resumable state).
    """
    out_dir = Path(out_dir)
    _check_run_folder(out_dir, resume, force)
    resumed = _load_for_resume(out_dir, cfg, _dist_info()[2]) if resume else None
    run = _set_up(scene_dirs, cfg, exclude, datasets)
    rank, p = run.rank, _Progress()
    info = _resume_into(run, cfg, out_dir, resumed, p) if resumed is not None else None
    del resumed  # the state's tensors are copied into the models: free them
    log_f = _open_run_folder(out_dir, cfg, run, info, force) if rank == 0 else None
    resume_path = out_dir / RESUME_FILE
    flag = _StopFlag(abort_on_repeat=not run.distributed)
    bar = _progress_bar(cfg, p.start, p.clock.deadline(cfg)) if progress and rank == 0 else None
    run.model.train()
    with _stop_on_signals(flag, handle_signals), _log_through(bar):
        try:
            _run_steps(run, cfg, out_dir, p, flag, bar, log_f, resumed=info is not None)
        except KeyboardInterrupt:  # a second Ctrl-C (or one outside the main thread): no saving
            raise TrainingInterrupted(
                flag.signum or signal.SIGINT,
                p.done,
                cfg.steps,
                resume_path if p.saved_step is not None else None,
                p.saved_step,
                rank,
                run.world,
            ) from None
        finally:
            if bar is not None:
                bar.close()
    if p.sig:
        _stop_early(run, log_f)
        raise TrainingInterrupted(p.sig, p.done, cfg.steps, resume_path, p.saved_step, rank, run.world)
    try:
        return _finish(run, cfg, out_dir, p.done, p.clock, p.ema, log_f, p.resumed_from)
    except KeyboardInterrupt:  # Ctrl-C during precise BN or the checkpoint: the state before them is saved
        raise TrainingInterrupted(
            signal.SIGINT, p.done, cfg.steps, resume_path, p.saved_step, rank, run.world
        ) from None


__all__ = [
    "RESUME_FILE",
    "RESUME_FREE_KEYS",
    "RUN_FILES",
    "TrainingInterrupted",
    "evaluate_checkpoint",
    "existing_run",
    "lr_at",
    "recalibrate_bn",
    "scenes_digest",
    "train",
]
