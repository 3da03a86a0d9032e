"""Checkpoints: weights plus the resolved config and a manifest (no code pickled; loads with weights_only)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sarloc.core.artifacts import atomic_save, atomic_write_json, make_manifest, read_json, sha256_file
from sarloc.core.errors import ArtifactError, ConfigError
from sarloc.trainer.config import TrainConfig
from sarloc.trainer.models.encoder import CrossModalEncoder

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "sarloc.encoder-checkpoint"
RESUME_KIND = "sarloc.train-resume"


def save_checkpoint(
    path: str | Path,
    model: CrossModalEncoder,
    cfg: TrainConfig,
    info: dict[str, Any],
    refiner: torch.nn.Module | None = None,
) -> Path:
    """Write ``path`` (torch state) and ``path.with_suffix('.json')`` (manifest with the checkpoint's sha256).

    The checkpoint embeds its config as JSON text, so it loads with ``torch.load(weights_only=True)``. A graph
    refiner trained jointly with the encoder (:mod:`sarloc.trainer.joint`) is stored beside the encoder's weights.
    """
    path = Path(path)
    if refiner is not None:
        info = {**info, "joint_refiner": refiner.cfg.to_dict()}
    blob = {
        "kind": CHECKPOINT_KIND,
        "config_json": cfg.to_json(),
        "info_json": json.dumps(info),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if refiner is not None:  # its config is info["joint_refiner"]
        blob["refiner_state_dict"] = {k: v.detach().cpu() for k, v in refiner.state_dict().items()}
    atomic_save(path, lambda tmp: torch.save(blob, tmp))
    manifest = make_manifest(
        CHECKPOINT_KIND,
        parent_sha256=info.get("scenes_sha256"),
        file=path.name,
        sha256=sha256_file(path),
        config=cfg.to_dict(),
        info=info,
    )
    atomic_write_json(path.with_suffix(".json"), manifest)
    return path


def _read_blob(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ArtifactError(
            f"checkpoint {path} could not be read ({type(e).__name__}); it is corrupt or truncated"
        ) from None
    if not isinstance(blob, dict) or blob.get("kind") != CHECKPOINT_KIND:
        raise ArtifactError(f"{path} is not a sarloc encoder checkpoint")
    return blob


def load_checkpoint(path: str | Path) -> tuple[CrossModalEncoder, TrainConfig, dict[str, Any]]:
    """Load a checkpoint -> (model in eval mode, its config, its info dict).

    Raises:
        ArtifactError: missing, corrupt, truncated or not a sarloc checkpoint (one line, naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} not found; train one with `sarloc train`")
    man_path = path.with_suffix(".json")
    if man_path.is_file():
        man = read_json(man_path, "checkpoint manifest")
        if man.get("sha256") and man["sha256"] != sha256_file(path):
            raise ArtifactError(f"checkpoint {path} does not match its manifest sha256 (modified or truncated)")
    blob = _read_blob(path)
    try:
        cfg = TrainConfig.from_dict(json.loads(blob["config_json"]), where=f"checkpoint {path}: config")
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ArtifactError(f"checkpoint {path} has no readable training config; it is corrupt, retrain") from None
    except ConfigError as e:
        raise ArtifactError(f"{e}; the checkpoint is corrupt or from another sarloc version, retrain") from None
    from dataclasses import replace

    model = CrossModalEncoder(replace(cfg.encoder, pretrained=False))
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ArtifactError(f"checkpoint {path} weights do not fit its config: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, cfg, json.loads(blob.get("info_json") or "{}")


def save_resume(path: str | Path, cfg: TrainConfig, state: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write a resumable training state ``path`` (``RUN/resume.pt``) and its manifest ``path.with_suffix(".json")``.

    ``state`` holds tensors, state dicts and plain values only (the file loads with ``weights_only``); ``info`` is
    JSON (``step``, ``scenes_sha256`` (the parent), ...). The file is written to a temporary name, flushed to disk
    and renamed, so an interruption at any moment leaves the previous state whole.
    """
    path = Path(path)
    blob = {"kind": RESUME_KIND, "config_json": cfg.to_json(), "info_json": json.dumps(info), **state}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_save(path, write)
    manifest = make_manifest(
        RESUME_KIND,
        parent_sha256=info.get("scenes_sha256"),
        file=path.name,
        sha256=sha256_file(path),
        step=info.get("step"),
        config=cfg.to_dict(),
        info=info,
    )
    atomic_write_json(path.with_suffix(".json"), manifest)
    return path


def load_resume(path: str | Path) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """Read a state written by :func:`save_resume` -> (its config, its info, the whole blob).

    A manifest whose sha256 does not match (the process was stopped between the two renames) is only warned
    about: the state file itself is complete, since it is renamed into place whole.

    Raises:
        ArtifactError: missing, unreadable or not a sarloc training state (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"resumable state {path} not found; there is nothing to resume")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ArtifactError(
            f"resumable state {path} could not be read ({type(e).__name__}); start over with --force"
        ) from None
    if not isinstance(blob, dict) or blob.get("kind") != RESUME_KIND:
        raise ArtifactError(f"{path} is not a sarloc resumable training state; start over with --force")
    man_path = path.with_suffix(".json")
    if man_path.is_file():
        man = read_json(man_path, "resumable state manifest")
        if man.get("sha256") and man["sha256"] != sha256_file(path):
            logger.warning("%s does not describe %s (stopped between the two writes?); using %s", man_path, path, path)
    try:
        cfg = TrainConfig.from_dict(json.loads(blob["config_json"]), where=f"resumable state {path}: config")
        info = json.loads(blob["info_json"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ArtifactError(f"resumable state {path} has no readable config; start over with --force") from None
    except ConfigError as e:
        raise ArtifactError(
            f"{e}; the state is corrupt or from another sarloc version, start over with --force"
        ) from None
    return cfg, info, blob


def checkpoint_embed_fns(model: CrossModalEncoder):
    """Numpy embedding functions (sar, optical) over a torch model, for :mod:`sarloc.eval.retrieval`."""

    def make(modality: str):
        @torch.no_grad()
        def fn(x):
            return model.embed(torch.from_numpy(x), modality).numpy()

        return fn

    return make("sar"), make("optical")


def load_joint_refiner(path: str | Path):
    """The graph refiner trained jointly with the encoder of checkpoint ``path`` (eval mode), or None if it has none.

    Raises:
        ArtifactError: unreadable checkpoint, or refiner weights that do not fit their stored config.
    """
    from sarloc.trainer.models.refiner import GraphRefiner, RefinerConfig

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} not found; train one with `sarloc train`")
    blob = _read_blob(path)
    if "refiner_state_dict" not in blob:
        return None
    try:
        rcfg = RefinerConfig(**json.loads(blob.get("info_json") or "{}")["joint_refiner"])
        model = GraphRefiner(rcfg)
        model.load_state_dict(blob["refiner_state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"joint refiner in {path} does not fit its config: {str(e).splitlines()[0]}") from None
    model.eval()
    return model
