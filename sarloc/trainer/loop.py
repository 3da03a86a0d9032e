"""The training loop: metric loss + modality alignment, single process or DDP under torchrun."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from sarloc.core.artifacts import atomic_write_json, sha256_bytes
from sarloc.core.errors import ArtifactError, ConfigError
from sarloc.core.scene import Scene, find_scenes, load_scene
from sarloc.trainer.checkpoint import load_resume, save_checkpoint, save_resume
from sarloc.trainer.config import RESUME_FREE_KEYS, TrainConfig, config_changes
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


@dataclass
class _Run:
    """One process's training set-up: where it runs, its data, the models and their optimisers.

    ``ddp_*`` are the modules to call (DistributedDataParallel wrappers under torchrun, else the modules
    themselves); ``refiner`` is set for joint training of the graph refiner, ``adversary`` for modality alignment.
    """

    rank: int
    local_rank: int
    world: int
    device: torch.device
    scenes: list[Scene]
    sampler: PairSampler
    model: CrossModalEncoder
    ddp_model: torch.nn.Module
    opt: torch.optim.Optimizer
    ref_gen: torch.Generator
    refiner: torch.nn.Module | None = None
    ddp_refiner: torch.nn.Module | None = None
    adversary: torch.nn.Module | None = None
    ddp_adv: torch.nn.Module | None = None
    adv_opt: torch.optim.Optimizer | None = None

    @property
    def distributed(self) -> bool:
        """Under torchrun with more than one process."""
        return self.world > 1


def _init_process(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """Rank, local rank, world size and device of this process; joins the process group under torchrun and sets
    the thread count and the torch seed."""
    rank, local_rank, world = _dist_info()
    distributed = world > 1
    device = torch.device(
        f"cuda:{local_rank}"
        if torch.cuda.is_available() and distributed
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
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


def _set_up(scene_dirs: list[str | Path], cfg: TrainConfig, exclude: list[str] | None) -> _Run:
    """Process, data, models and optimisers, created in a fixed order (the torch seed is drawn from in it)."""
    rank, local_rank, world, device = _init_process(cfg)
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
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7)
    run = _Run(rank, local_rank, world, device, scenes, sampler, model, ddp_model, opt, ref_gen)
    if cfg.refiner_weight > 0:
        _add_refiner(run, cfg)
    _add_adversary(run, cfg)
    return run


RESUME_FILE = "resume.pt"
#: the files that make a folder hold a training run (``train_log.jsonl`` only when it is not empty)
RUN_FILES = ("train_log.jsonl", "checkpoint.pt", RESUME_FILE)
#: what ``force`` moves aside: a run's own files (other files in the folder are left where they are)
_RUN_FOLDER_FILES = ("config.json", "train_log.jsonl", "checkpoint.pt", "checkpoint.json", RESUME_FILE, "resume.json")


def existing_run(out_dir: str | Path) -> list[str]:
    """The files that show ``out_dir`` holds a training run already: ``checkpoint.pt``, ``resume.pt`` or a
    non-empty ``train_log.jsonl`` (an empty one is all a run that failed before its first step leaves)."""
    out_dir = Path(out_dir)
    found = []
    for name in RUN_FILES:
        p = out_dir / name
        if p.is_file() and (name != "train_log.jsonl" or p.stat().st_size > 0):
            found.append(name)
    return found


def _check_run_folder(out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one folder: without ``resume`` or ``force``, a folder holding a run is an error."""
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: continue the run or start over, not both")
    if resume:
        if not (out_dir / RESUME_FILE).is_file():
            raise ConfigError(
                f"--resume: {out_dir / RESUME_FILE} not found, so there is nothing to resume; start over with --force"
            )
        return
    found = existing_run(out_dir)
    if found and not force:
        raise ConfigError(
            f"--out {out_dir} already holds a training run ({', '.join(found)}); continue it with --resume or "
            "start over with --force (which moves the old run's files aside)"
        )


def _move_aside(out_dir: Path) -> Path:
    """Move the previous run's files (config, log, checkpoints, resumable state) into ``out_dir/previous-<time>/``."""
    names = [n for n in _RUN_FOLDER_FILES if (out_dir / n).is_file()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, i = out_dir / f"previous-{stamp}", 1
    while dest.exists():
        dest, i = out_dir / f"previous-{stamp}-{i}", i + 1
    dest.mkdir()
    for n in names:
        os.replace(out_dir / n, dest / n)
    logger.info("--force: moved the previous run's %s to %s", ", ".join(names), dest)
    return dest


def _rewind_log(path: Path, log_bytes: int) -> None:
    """Cut ``train_log.jsonl`` back to where it was when the resumable state was saved (the lines of the steps
    after it are logged again by the resumed run)."""
    size = path.stat().st_size if path.is_file() else 0
    if size > log_bytes:
        os.truncate(path, log_bytes)
        logger.info("%s: dropped the %d bytes logged after the resumable state", path, size - log_bytes)
    elif size < log_bytes:
        logger.warning(
            "%s is shorter than when the resumable state was saved (%d < %d bytes); appending to it",
            path,
            size,
            log_bytes,
        )


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
        {"train": cfg.to_dict(), "scenes": [s.name for s in run.scenes], "world_size": run.world},
    )
    log_path = out_dir / "train_log.jsonl"
    if resumed is None:
        log_f = open(log_path, "w", buffering=1)
    else:
        _rewind_log(log_path, int(resumed.get("log_bytes", 0)))
        log_f = open(log_path, "a", buffering=1)
    logger.info(
        "training on %d scenes (%s), %d steps x %d pairs x %d process(es), align=%s%s",
        len(run.scenes),
        ", ".join(s.name for s in run.scenes),
        cfg.steps,
        cfg.batch_size,
        run.world,
        cfg.align,
        f"; resuming at step {resumed['step']}" if resumed is not None else "",
    )
    return log_f


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
    discarded at its next zero_grad. Classifier: the gradient-reversal loss; the classifier steps with the encoder.
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
        a_loss = modality_adversarial_loss(run.ddp_adv, a_opt, a_sar, lam)
        logs["modality_bce"] = a_loss.item()
        term = cfg.align_weight * a_loss
        adv_opt.zero_grad(set_to_none=True)
        return term
    return None


def _refiner_term(z_sar, z_opt, b, run: _Run, cfg: TrainConfig, logs: dict[str, float]) -> torch.Tensor:
    """The weighted listwise loss of the jointly trained graph refiner (its parts logged in ``logs``)."""
    from sarloc.trainer.joint import joint_refiner_loss

    w = float(cfg.window_px)
    oc = torch.from_numpy(b.opt_centres).to(device=run.device, dtype=z_opt.dtype)
    r_loss, r_logs = joint_refiner_loss(
        run.ddp_refiner,
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


def _train_step(run: _Run, cfg: TrainConfig, step: int) -> dict[str, float]:
    """One optimiser step on a fresh batch; returns the logged losses."""
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
    b = run.sampler.sample()
    sar = torch.from_numpy(b.sar).to(run.device)
    optical = torch.from_numpy(b.optical).to(run.device)
    targets = torch.from_numpy(b.targets).to(run.device)
    z_sar, z_opt = run.ddp_model(sar, optical)
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
    loss.backward()
    run.opt.step()
    if run.adv_opt is not None and cfg.align == "classifier":
        run.adv_opt.step()
    logs["loss"] = loss.item()
    return logs


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT (Ctrl-C) or SIGTERM; raised on every rank once the resumable state is saved.

    A KeyboardInterrupt, so code that lets Ctrl-C through still does. ``exit_code`` is 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM).

    Attributes:
        signum: the signal.
        step: steps done when training stopped.
        steps: steps of the whole run.
        resume_path: the resumable state to continue from (None: none was ever written).
        saved_step: the step ``resume_path`` holds: ``step``, or an earlier one when a second Ctrl-C aborted before
            the state could be saved.
        rank, world: this process's rank and the number of processes.
    """

    def __init__(
        self,
        signum: int,
        step: int,
        steps: int,
        resume_path: Path | None,
        saved_step: int | None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.signum, self.step, self.steps = int(signum), step, steps
        self.resume_path, self.saved_step = resume_path, saved_step
        self.rank, self.world = rank, world
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        head = f"stopped by {name} at step {self.step}/{self.steps}"
        if self.resume_path is None or self.saved_step is None:
            return f"{head}; nothing was saved"
        if self.saved_step == self.step:
            return f"{head}; saved {self.resume_path}"
        return f"{head} without saving; {self.resume_path} holds step {self.saved_step}"


class _StopFlag:
    """SIGINT/SIGTERM handler for the training loop: the first signal asks it to stop after the current step; in a
    single process a second Ctrl-C more than a second later aborts at once, without saving (under torchrun the
    launcher forwards the terminal's SIGINT, so each worker sees two; there the launcher's kill timeout rules)."""

    def __init__(self, abort_on_repeat: bool) -> None:
        self.signum = 0
        self._at = 0.0
        self._abort_on_repeat = abort_on_repeat

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum:
            if self._abort_on_repeat and signum == signal.SIGINT and time.monotonic() - self._at > 1.0:
                raise KeyboardInterrupt
            return
        self.signum, self._at = signum, time.monotonic()
        logger.warning(
            "%s: stopping after this step to save a resumable checkpoint%s",
            signal.Signals(signum).name,
            " (Ctrl-C again to abort without saving)" if self._abort_on_repeat else "",
        )


@contextmanager
def _stop_on_signals(flag: _StopFlag, install: bool) -> Iterator[None]:
    """``flag`` handles SIGINT and SIGTERM for the block (main thread only; a signal ignored before stays ignored);
    the previous handlers are put back after it, as in :func:`sarloc.runtime.daemon.run`."""
    if not (install and threading.current_thread() is threading.main_thread()):
        yield
        return
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, flag)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


@dataclass
class _Clock:
    """Training time: ``prior_s`` from earlier sessions of a resumed run plus this session's."""

    prior_s: float = 0.0
    t0: float = field(default_factory=time.time)
    last_save: float = field(default_factory=time.monotonic)

    def total(self) -> float:
        """Seconds of training so far, over all sessions."""
        return self.prior_s + time.time() - self.t0

    def deadline(self, cfg: TrainConfig) -> float | None:
        """The wall-clock time (``time.time()``) at which ``max_minutes`` of training is reached (None: no cap)."""
        return self.t0 + cfg.max_minutes * 60 - self.prior_s if cfg.max_minutes else None


def _control(run: _Run, cfg: TrainConfig, clock: _Clock, flag: _StopFlag, done: int) -> tuple[bool, int, bool]:
    """(out of time, stop signal number or 0, resumable checkpoint due) after ``done`` steps.

    Under torchrun every rank joins the same all-reduce (max) each step, so all of them stop, or save, at the same
    step, whichever rank got the signal or saw the clock pass.
    """
    out_of_time = bool(cfg.max_minutes) and clock.total() > cfg.max_minutes * 60
    due = (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or (
        cfg.checkpoint_minutes > 0 and time.monotonic() - clock.last_save >= cfg.checkpoint_minutes * 60
    )
    vals = [float(out_of_time), float(flag.signum), float(due)]
    if run.distributed:
        t = torch.tensor(vals, device=run.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        vals = t.tolist()
    return bool(vals[0]), int(vals[1]), bool(vals[2])


def _rng_state(run: _Run) -> dict[str, Any]:
    """This process's random states: torch's (CPU, and its CUDA device), the joint refiner's generator, and as
    JSON the batch sampler's, numpy's and Python's global ones."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "ref_gen": run.ref_gen.get_state(),
        "json": json.dumps(
            {
                "sampler": run.sampler.rng.bit_generator.state,
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "python": random.getstate(),
            }
        ),
    }
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def _restore_rng(run: _Run, state: dict[str, Any]) -> None:
    """Inverse of :func:`_rng_state`."""
    torch.set_rng_state(state["torch"])
    if run.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], run.device)
    run.ref_gen.set_state(state["ref_gen"])
    j = json.loads(state["json"])
    run.sampler.rng.bit_generator.state = j["sampler"]
    n = j["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = j["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _training_state(run: _Run) -> dict[str, Any]:
    """The models' and optimisers' state dicts (there is no scheduler or scaler state: the learning rate is a pure
    function of the step, :func:`lr_at`, and training runs in FP32)."""
    state: dict[str, Any] = {"model": run.model.state_dict(), "opt": run.opt.state_dict()}
    if run.refiner is not None:
        state["refiner"] = run.refiner.state_dict()
    if run.adversary is not None:
        state["adversary"] = run.adversary.state_dict()
    if run.adv_opt is not None:
        state["adv_opt"] = run.adv_opt.state_dict()
    return state


def _restore(run: _Run, blob: dict[str, Any], path: Path) -> None:
    """Load the models, optimisers and this rank's random states saved in ``blob``."""
    try:
        run.model.load_state_dict(blob["model"])
        run.opt.load_state_dict(blob["opt"])
        if run.refiner is not None:
            run.refiner.load_state_dict(blob["refiner"])
        if run.adversary is not None:
            run.adversary.load_state_dict(blob["adversary"])
        if run.adv_opt is not None:
            run.adv_opt.load_state_dict(blob["adv_opt"])
        _restore_rng(run, blob["rng"][run.rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(
            f"resumable state {path} does not fit this run ({detail}); start over with --force"
        ) from None


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
        "scenes": [s.name for s in run.scenes],
        "scenes_sha256": scenes_digest(run.scenes),
        "ema": ema,
        "resumed_from": resumed_from,
        "torch": torch.__version__,
    }
    path = save_resume(out_dir / RESUME_FILE, cfg, {**_training_state(run), "rng": rngs}, info)
    logger.info("saved the resumable state %s (step %d/%d)", path, done, cfg.steps)
    clock.last_save = time.monotonic()


def _load_for_resume(out_dir: Path, cfg: TrainConfig, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The info and blob of ``out_dir/resume.pt``, refusing a config that differs in what matters (naming the key)
    or another number of processes."""
    path = out_dir / RESUME_FILE
    old, info, blob = load_resume(path)
    changes = config_changes(old, cfg)
    if changes:
        key, was, now = changes[0]
        more = f" (and {', '.join(c[0] for c in changes[1:])})" if len(changes) > 1 else ""
        raise ConfigError(
            f"--resume: {key} = {now!r:.60} differs from the {was!r:.60} of {path}{more}; resume with the options of "
            "the interrupted run, or start over with --force"
        )
    if int(info.get("world_size", 1)) != world:
        raise ConfigError(
            f"--resume: {path} was written by {info.get('world_size')} process(es), this run has {world}; resume with "
            "the same number of processes (torchrun --nproc_per_node)"
        )
    return info, blob


def _check_scenes(run: _Run, info: dict[str, Any], path: Path) -> None:
    """Refuse to resume on other training scenes than the saved run's."""
    if info.get("scenes_sha256") != scenes_digest(run.scenes):
        was, now = ", ".join(info.get("scenes") or []), ", ".join(s.name for s in run.scenes)
        raise ConfigError(
            f"--resume: the training scenes ({now:.200}) differ from those of {path} ({was:.200}) or their images "
            "changed; use the same --scenes and --exclude, or start over with --force"
        )


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


def train(
    scene_dirs: list[str | Path],
    out_dir: str | Path,
    cfg: TrainConfig,
    exclude: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
    handle_signals: bool = True,
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

    Raises:
        ConfigError: ``out_dir`` holds a run and neither ``resume`` nor ``force`` is given; ``resume`` without a
            resumable state, or with a different config (naming the key), scenes or number of processes.
        TrainingInterrupted: stopped by SIGINT or SIGTERM (after saving the resumable state).
    """
    out_dir = Path(out_dir)
    _check_run_folder(out_dir, resume, force)
    resumed = _load_for_resume(out_dir, cfg, _dist_info()[2]) if resume else None
    run = _set_up(scene_dirs, cfg, exclude)
    rank = run.rank
    start, clock, ema, resumed_from = 0, _Clock(), {}, []
    info: dict[str, Any] | None = None
    if resumed is not None:
        info, blob = resumed
        _check_scenes(run, info, out_dir / RESUME_FILE)
        _restore(run, blob, out_dir / RESUME_FILE)
        del blob
        start = min(int(info["step"]), cfg.steps)
        clock.prior_s = float(info.get("train_seconds", 0.0))
        ema = {k: float(v) for k, v in (info.get("ema") or {}).items()}
        resumed_from = [*info.get("resumed_from", []), start]
    log_f = _open_run_folder(out_dir, cfg, run, info, force) if rank == 0 else None
    resume_path = out_dir / RESUME_FILE
    saved_step: int | None = start if resumed is not None else None
    flag = _StopFlag(abort_on_repeat=not run.distributed)
    bar = _progress_bar(cfg, start, clock.deadline(cfg)) if progress and rank == 0 else None
    done, sig, out_of_time = start, 0, False
    run.model.train()
    with _stop_on_signals(flag, handle_signals), _log_through(bar):
        try:
            if resumed is not None and start < cfg.steps:  # a run resumed at its time cap stays stopped
                out_of_time, sig, _ = _control(run, cfg, clock, flag, start)
                if out_of_time and rank == 0:
                    logger.info(
                        "max_minutes=%.1f is already used up at step %d; resume with a larger --max-minutes to go on",
                        cfg.max_minutes,
                        start,
                    )
            while done < cfg.steps and not (out_of_time or sig):
                step = done
                logs = _train_step(run, cfg, step)
                for k, v in logs.items():
                    ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
                if rank == 0:
                    if bar is not None:
                        bar.update(1)
                        keep = ("loss", "nce", "w1", "refiner")
                        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items() if k in keep})
                    if log_f is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                        rec = {"step": step, "lr": lr_at(step, cfg), "t_s": round(clock.total(), 2), **logs}
                        log_f.write(json.dumps(rec) + "\n")
                done = step + 1
                out_of_time, sig, due = _control(run, cfg, clock, flag, done)
                if out_of_time and rank == 0:
                    logger.info("stopping at step %d: max_minutes=%.1f reached", done, cfg.max_minutes)
                if due and done < cfg.steps and not (out_of_time or sig):
                    _save_resume(run, cfg, out_dir, done, clock, ema, log_f, resumed_from)
                    saved_step = done
            if done > start or resumed is None:  # the state at the loop's end: precise BN and saving come after
                _save_resume(run, cfg, out_dir, done, clock, ema, log_f, resumed_from)
                saved_step = done
            if not run.distributed:  # a signal during that last save still stops the run (one process: no collective)
                sig = sig or flag.signum
        except KeyboardInterrupt:  # a second Ctrl-C (or one outside the main thread): no saving
            raise TrainingInterrupted(
                flag.signum or signal.SIGINT,
                done,
                cfg.steps,
                resume_path if saved_step is not None else None,
                saved_step,
                rank,
                run.world,
            ) from None
        finally:
            if bar is not None:
                bar.close()
    if sig:
        if log_f is not None:
            log_f.close()
        if run.distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        raise TrainingInterrupted(sig, done, cfg.steps, resume_path, saved_step, rank, run.world)
    try:
        return _finish(run, cfg, out_dir, done, clock, ema, log_f, resumed_from)
    except KeyboardInterrupt:  # Ctrl-C during precise BN or the checkpoint: the state before them is saved
        raise TrainingInterrupted(signal.SIGINT, done, cfg.steps, resume_path, saved_step, rank, run.world) from None


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


__all__ = [
    "RESUME_FILE",
    "RESUME_FREE_KEYS",
    "TrainingInterrupted",
    "evaluate_checkpoint",
    "existing_run",
    "lr_at",
    "scenes_digest",
    "train",
]
