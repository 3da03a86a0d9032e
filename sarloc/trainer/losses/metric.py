"""Metric losses between SAR query embeddings and optical gallery embeddings (pure functions + modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sarloc.trainer.losses.fp32 import in_fp32


def _check_pair(q: torch.Tensor, g: torch.Tensor, targets: torch.Tensor | None = None) -> None:
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"embeddings must be (B, D) and (N, D), got {tuple(q.shape)} and {tuple(g.shape)}")
    if targets is not None and tuple(targets.shape) != (q.shape[0], g.shape[0]):
        raise ValueError(f"targets must be ({q.shape[0]}, {g.shape[0]}), got {tuple(targets.shape)}")


@in_fp32
def info_nce(
    q: torch.Tensor, g: torch.Tensor, targets: torch.Tensor, temperature: float = 0.07, symmetric: bool = True
) -> torch.Tensor:
    """InfoNCE with soft targets (semi-positives allowed).

    Args:
        q: (B, D) SAR embeddings (unit norm).
        g: (N, D) optical embeddings (unit norm).
        targets: (B, N) non-negative weights: 1 for the positive, fractions for overlapping neighbours
            (semi-positives), 0 for negatives. Each row is normalised to a distribution.
        temperature: softmax temperature.
        symmetric: also the optical->SAR direction (requires N == B).

    Returns:
        Scalar loss: cross-entropy between the target distribution and softmax(q g^T / T), computed in FP32
        under mixed precision too (:func:`~sarloc.trainer.losses.fp32.in_fp32`).
    """
    _check_pair(q, g, targets)
    logits = q @ g.t() / temperature
    t = targets / targets.sum(dim=1, keepdim=True).clamp(min=1e-12)
    loss = -(t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    if symmetric and q.shape[0] == g.shape[0]:
        tt = targets.t()
        tt = tt / tt.sum(dim=1, keepdim=True).clamp(min=1e-12)
        loss = 0.5 * (loss - (tt * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean())
    return loss


@in_fp32
def batch_hard_triplet(
    q: torch.Tensor,
    g: torch.Tensor,
    pos_mask: torch.Tensor,
    margin: float = 0.3,
    ignore_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch-hard triplet loss on cosine distance (hardest positive vs hardest negative per query).

    Args:
        q: (B, D) unit-norm query embeddings.
        g: (N, D) unit-norm gallery embeddings.
        pos_mask: (B, N) bool, True for positives (each row needs at least one).
        margin: hinge margin on distance.
        ignore_mask: (B, N) bool, pairs that are neither positive nor negative (semi-positives).

    Computed in FP32 under mixed precision too.
    """
    _check_pair(q, g, pos_mask)
    d = 1.0 - q @ g.t()
    pos = pos_mask.bool()
    neg = ~pos if ignore_mask is None else ~(pos | ignore_mask.bool())
    hardest_pos = torch.where(pos, d, torch.full_like(d, -1e4)).max(dim=1).values
    hardest_neg = torch.where(neg, d, torch.full_like(d, 1e4)).min(dim=1).values
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not valid.any():
        return d.sum() * 0.0
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


class InfoNCELoss(nn.Module):
    """Module wrapper of :func:`info_nce` with a fixed or learnable temperature."""

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = False) -> None:
        super().__init__()
        t = torch.tensor(float(temperature)).log()
        self.log_t = nn.Parameter(t) if learn_temperature else None
        self.register_buffer("_log_t", t)

    @property
    def temperature(self) -> torch.Tensor:
        """Current temperature."""
        return (self.log_t if self.log_t is not None else self._log_t).exp().clamp(0.01, 1.0)

    def forward(self, q: torch.Tensor, g: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return info_nce(q, g, targets, float(self.temperature) if self.log_t is None else self.temperature)


class TripletLoss(nn.Module):
    """Module wrapper of :func:`batch_hard_triplet`."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = margin

    def forward(
        self, q: torch.Tensor, g: torch.Tensor, pos_mask: torch.Tensor, ignore_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return batch_hard_triplet(q, g, pos_mask, self.margin, ignore_mask)
