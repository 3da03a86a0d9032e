"""Training: ``sarloc train``, ``sarloc train-refiner``, ``sarloc figures``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sarloc.cli.common import add_command, read_config
from sarloc.core.errors import SarlocError

#: options of ``sarloc train`` that the printed ``--resume`` command leaves out
_NOT_REPEATED = {"help", "verbose", "quiet", "resume", "force"}


def _resume_command(a: argparse.Namespace) -> str:
    """The ``sarloc train ... --resume`` command that continues the run of ``a`` (its options as given)."""
    parser: argparse.ArgumentParser = a.train_parser
    words = ["sarloc", "train"]
    for act in parser._actions:
        if not act.option_strings or act.dest in _NOT_REPEATED:
            continue
        v = getattr(a, act.dest, None)
        if v is None or v is False or (v == act.default and not act.required):
            continue
        flag = act.option_strings[-1]
        if v is True:
            words.append(flag)
        elif isinstance(v, list):
            words += [flag, *map(str, v)]
        else:
            words += [flag, str(v)]
    return shlex.join([*words, "--resume"])


def _cmd_train(a: argparse.Namespace) -> int:
    from sarloc.trainer.config import resolve_config
    from sarloc.trainer.loop import TrainingInterrupted, train

    enc: dict = {}
    if a.from_scratch:
        enc["pretrained"] = False
    overrides = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "align": a.align,
        "seed": a.seed,
        "max_minutes": a.max_minutes,
        "window_px": a.window_px,
        "threads": a.threads,
        "metric_loss": a.loss,
        "refiner_weight": a.refiner_weight if a.refiner_weight is not None else (0.5 if a.refiner else None),
        "checkpoint_every": a.checkpoint_every,
        "checkpoint_minutes": a.checkpoint_minutes,
        "precision": a.precision,
    }
    if enc:
        overrides["encoder"] = enc
    if a.config:
        overrides.update(read_config(a.config))
    cfg = resolve_config(a.preset, **overrides)
    if not a.scenes and not a.dataset:
        raise SarlocError("give --scenes, --dataset or both")
    try:
        ckpt = train(
            a.scenes or [],
            a.out,
            cfg,
            exclude=a.exclude,
            progress=not a.no_progress,
            resume=a.resume,
            force=a.force,
            datasets=a.dataset,
        )
    except TrainingInterrupted as e:
        if e.rank == 0:
            if e.resume_path is None:
                tail = "start over with --force"
            elif e.world > 1:
                tail = f"continue with the same torchrun command plus --resume ({_resume_command(a)})"
            else:
                tail = f"continue with: {_resume_command(a)}"
            print(f"sarloc train: {e}; {tail}", file=sys.stderr)
        return e.exit_code
    print(ckpt)
    return 0


def _cmd_train_refiner(a: argparse.Namespace) -> int:
    from sarloc.core.scene import find_scenes
    from sarloc.trainer.refiner_train import refine_checkpoint

    scenes = find_scenes(a.scenes)
    if not scenes:
        raise SarlocError(f"--scenes: no scene folders (with scene.json) under {' '.join(a.scenes)}")
    out = refine_checkpoint(a.checkpoint, scenes, a.out, steps=a.steps, queries=a.queries, joint=not a.fresh)
    for p in out.values():
        print(p)
    return 0


def _cmd_figures(a: argparse.Namespace) -> int:
    from sarloc.trainer.figures import embedding_projection, retrieval_figure

    out = Path(a.out)
    paths = [retrieval_figure(a.checkpoint, a.scene, out / "retrieval.png", window_px=a.window_px, seed=a.seed)]
    paths.append(
        embedding_projection(
            a.checkpoint,
            a.scene,
            out / "embedding_projection.png",
            baseline_checkpoint=a.baseline_checkpoint,
            window_px=a.window_px,
        )
    )
    for p in paths:
        print(p)
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add the train, train-refiner, figures subcommand(s) to ``sub``."""
    _add_train(sub, common)
    _add_train_refiner(sub, common)
    _add_figures(sub, common)


def _add_train(sub, common: argparse.ArgumentParser) -> None:
    t = add_command(
        sub,
        "train",
        common,
        "train the cross-modal encoder (torchrun for multi-GPU/multi-process)",
        description=(
            "Train the cross-modal encoder (torchrun for multi-GPU/multi-process). A resumable state is saved in "
            "OUT/resume.pt every --checkpoint-minutes (and/or --checkpoint-every steps) and when training ends. "
            "Ctrl-C or SIGTERM stops at the end of the current step, saves it and exits 130 (SIGINT) or 143 "
            "(SIGTERM); the same command plus --resume continues the run."
        ),
    )
    t.add_argument("--scenes", nargs="+", help="scene folders or folders of scene folders")
    t.add_argument(
        "--dataset",
        nargs="+",
        metavar="NAME[@SPLIT]:ROOT",
        help="public datasets in their published layout, alone or with --scenes: sen1-2, sen12ms, qxs-saropt, "
        "osdataset, sar2opt, spacenet6 (a bare ROOT is detected; docs/trainer.md)",
    )
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", default="default", help="default | loso | quick | smoke")
    t.add_argument("--exclude", nargs="*", default=None, help="scene names to hold out")
    t.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default: the preset's)")
    t.add_argument("--window-px", type=int, help="window side, pixels (default: the preset's)")
    t.add_argument(
        "--align", choices=["none", "wasserstein", "classifier"], help="modality alignment (default: the preset's)"
    )
    t.add_argument("--loss", choices=["infonce", "triplet", "both"], help="metric loss (default: the preset's)")
    t.add_argument("--from-scratch", action="store_true", help="no ImageNet initialisation")
    t.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    t.add_argument("--threads", type=int, help="CPU threads (default: all)")
    t.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    t.add_argument(
        "--refiner",
        action="store_true",
        help="train the graph refiner jointly with the encoder (refiner_weight 0.5; stored in the checkpoint)",
    )
    t.add_argument(
        "--refiner-weight", type=float, help="weight of the joint refiner's listwise loss (implies --refiner)"
    )
    t.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="numeric precision of the forward passes (default: the config's, fp32): bf16 autocasts to bfloat16 "
        "(CUDA GPUs from Ampere on, or CPU), fp16 to float16 with a gradient scaler (CUDA only); weights and "
        "losses stay FP32 (docs/trainer.md)",
    )
    t.add_argument("--config", help="TOML (or JSON) file of config overrides, nested tables allowed")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="save the resumable state every STEPS steps (default: the config's checkpoint_every, 0 = by time only)",
    )
    t.add_argument(
        "--checkpoint-minutes",
        type=float,
        metavar="MIN",
        help="save the resumable state every MIN minutes (default: the config's checkpoint_minutes, 10; 0 = off)",
    )
    again = t.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from OUT/resume.pt (give the same options as that run)",
    )
    again.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out that holds a run, moving its files into OUT/previous-<time>/",
    )
    t.set_defaults(fn=_cmd_train, train_parser=t)


def _add_train_refiner(sub, common: argparse.ArgumentParser) -> None:
    r = add_command(sub, "train-refiner", common, "train the graph refiner and the verifier for a trained encoder")
    r.add_argument("--checkpoint", required=True, help="encoder checkpoint (sarloc train)")
    r.add_argument(
        "--scenes",
        nargs="+",
        required=True,
        help="scene folders or folders of them (prefer scenes the encoder did not see)",
    )
    r.add_argument("--out", help="output folder (default: beside the checkpoint)")
    r.add_argument(
        "--steps",
        type=int,
        default=600,
        help="refiner training steps; from a jointly trained refiner these fine-tune it, and 0 exports it unchanged",
    )
    r.add_argument(
        "--fresh", action="store_true", help="ignore a jointly trained refiner in the checkpoint; train a new one"
    )
    r.add_argument("--queries", type=int, default=400, help="arbitrary queries per scene")
    r.set_defaults(fn=_cmd_train_refiner)


def _add_figures(sub, common: argparse.ArgumentParser) -> None:
    f = add_command(sub, "figures", common, "retrieval visualisation and 2-D embedding projection")
    f.add_argument("--checkpoint", required=True, help="encoder checkpoint (sarloc train)")
    f.add_argument("--baseline-checkpoint", help="a checkpoint trained without alignment, for comparison")
    f.add_argument("--scene", required=True, help="scene folder")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--window-px", type=int, default=64, help="window side, pixels")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    f.set_defaults(fn=_cmd_figures)
