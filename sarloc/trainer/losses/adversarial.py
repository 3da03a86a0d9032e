"""Modality alignment: Wasserstein critic with gradient penalty (WGAN-GP) and a gradient-reversal classifier.

The critic f (1-Lipschitz, enforced softly by the gradient penalty) estimates the Wasserstein-1 distance
between the optical and SAR embedding distributions, W1 ~ E[f(optical)] - E[f(sar)]. The critic maximises
that estimate; the encoder minimises it, pulling the two modalities' feature distributions together.

Under mixed precision the critic and its losses run in FP32 (a small MLP on embeddings; the gradient penalty is a
double backward); the modality classifier runs under autocast, its BCE on FP32 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sarloc.trainer.losses.fp32 import in_fp32


class Critic(nn.Module):
    """MLP critic on embeddings: (B, D) -> (B,). No batch norm (it would break the per-sample gradient penalty)."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)


@in_fp32
def wasserstein_estimate(critic: nn.Module, z_opt: torch.Tensor, z_sar: torch.Tensor) -> torch.Tensor:
    """E[f(optical)] - E[f(sar)]: the critic's Wasserstein-1 estimate (encoder minimises it)."""
    return critic(z_opt).mean() - critic(z_sar).mean()


@in_fp32
def gradient_penalty(
    critic: nn.Module, z_a: torch.Tensor, z_b: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad f(x_hat)|| - 1)^2] on random interpolates of two (B, D) batches."""
    n = min(len(z_a), len(z_b))
    z_a, z_b = z_a[:n].detach(), z_b[:n].detach()
    eps = torch.rand(n, 1, generator=generator, device=z_a.device, dtype=z_a.dtype)
    x = (eps * z_a + (1 - eps) * z_b).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


@in_fp32
def critic_loss(critic: nn.Module, z_opt: torch.Tensor, z_sar: torch.Tensor, gp_weight: float = 10.0) -> torch.Tensor:
    """Loss the critic minimises: -(W1 estimate) + gp_weight * gradient penalty (embeddings detached)."""
    z_opt, z_sar = z_opt.detach(), z_sar.detach()
    return -wasserstein_estimate(critic, z_opt, z_sar) + gp_weight * gradient_penalty(critic, z_opt, z_sar)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Identity forward, gradient multiplied by -lam backward."""
    return _GradReverse.apply(x, lam)


class ModalityClassifier(nn.Module):
    """Gradient-reversal adversary ("class adv"): predicts the modality; the encoder learns to fool it."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
        return self.net(grad_reverse(z, lam)).squeeze(-1)


def modality_adversarial_loss(
    clf: ModalityClassifier, z_opt: torch.Tensor, z_sar: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """BCE of the modality classifier (optical = 1, SAR = 0) through gradient reversal.

    Minimising it trains the classifier and, through the reversed gradient, pushes the encoder to make the
    modalities indistinguishable.
    """
    logits = torch.cat([clf(z_opt, lam), clf(z_sar, lam)]).float()  # the BCE in FP32 under autocast too
    labels = torch.cat([torch.ones(len(z_opt)), torch.zeros(len(z_sar))]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, labels)
