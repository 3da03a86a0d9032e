"""The state one training process works on (:class:`_Run`), shared by the loop (:mod:`sarloc.trainer.loop`), its
steps (:mod:`sarloc.trainer.steps`) and its resumable state (:mod:`sarloc.trainer.resume`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sarloc.core.scene import Scene
from sarloc.trainer.data.datasets.training import MixedSampler
from sarloc.trainer.data.pairs import PairSampler
from sarloc.trainer.models.encoder import CrossModalEncoder


@dataclass
class _Run:
    """One process's training set-up: where it runs, its data, the models and their optimisers.

    ``ddp_*`` are the modules to call (DistributedDataParallel wrappers under torchrun, else the modules
    themselves); ``refiner`` is set for joint training of the graph refiner, ``adversary`` for modality alignment.
    With public datasets (``sarloc train --dataset``) ``sampler`` is a :class:`MixedSampler`, ``scenes`` ends with
    one pixel-less stand-in per dataset and ``datasets`` describes each (name, root, split, pairs, sha256).
    """

    rank: int
    local_rank: int
    world: int
    device: torch.device
    scenes: list[Scene]
    sampler: PairSampler | MixedSampler
    model: CrossModalEncoder
    ddp_model: torch.nn.Module
    opt: torch.optim.Optimizer
    ref_gen: torch.Generator
    refiner: torch.nn.Module | None = None
    ddp_refiner: torch.nn.Module | None = None
    adversary: torch.nn.Module | None = None
    ddp_adv: torch.nn.Module | None = None
    adv_opt: torch.optim.Optimizer | None = None
    datasets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        """Under torchrun with more than one process."""
        return self.world > 1
