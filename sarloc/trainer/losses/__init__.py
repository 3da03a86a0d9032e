"""Losses: metric (InfoNCE, batch-hard triplet) and modality alignment (Wasserstein critic, gradient reversal)."""

from sarloc.trainer.losses.adversarial import (
    Critic,
    ModalityClassifier,
    critic_loss,
    gradient_penalty,
    modality_adversarial_loss,
    wasserstein_estimate,
)
from sarloc.trainer.losses.metric import InfoNCELoss, TripletLoss, batch_hard_triplet, info_nce

__all__ = [
    "Critic",
    "InfoNCELoss",
    "ModalityClassifier",
    "TripletLoss",
    "batch_hard_triplet",
    "critic_loss",
    "gradient_penalty",
    "info_nce",
    "modality_adversarial_loss",
    "wasserstein_estimate",
]
