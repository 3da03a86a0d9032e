"""Resumable training: the run folder's checks (a folder holds one run), stopping on SIGINT/SIGTERM, the clock
and the per-step stop/save decision, and the models', optimisers' and random states saved and restored."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarloc.core.artifacts import sha256_bytes
from sarloc.core.errors import ArtifactError, ConfigError
from sarloc.core.scene import Scene
from sarloc.trainer.checkpoint import load_resume
from sarloc.trainer.config import TrainConfig, config_changes
from sarloc.trainer.run import _Run
from sarloc.trainer.steps import _scaler_of

logger = logging.getLogger(__name__)


def scenes_digest(scenes: list[Scene]) -> str:
    """sha256 over the scenes' names and image hashes (the checkpoint's parent)."""
    parts = [
        f"{s.name}:{s.meta.get('optical', {}).get('sha256')}:{s.meta.get('sar', {}).get('sha256')}" for s in scenes
    ]
    return sha256_bytes("\n".join(sorted(parts)).encode())


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
    """The models' and optimisers' state dicts, and in fp16 the gradient scaler's (there is no scheduler state:
    the learning rate is a pure function of the step, :func:`lr_at`)."""
    state: dict[str, Any] = {"model": run.model.state_dict(), "opt": run.opt.state_dict()}
    scaler = _scaler_of(run)
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
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
        scaler = _scaler_of(run)
        if scaler is not None:
            scaler.load_state_dict(blob["scaler"])
        _restore_rng(run, blob["rng"][run.rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(
            f"resumable state {path} does not fit this run ({detail}); start over with --force"
        ) from None


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
