"""Graph refiner: re-scores the top-K retrieved candidates of a query using their positions on the ground.

Graph (one per query, fixed size so that it exports to ONNX with static shapes):

* nodes: the K candidates, each described by the element-wise product of the query and candidate embeddings
  (projected), its similarity to the query, its similarity minus the best one, optional extra per-candidate
  features (e.g. the local registration score of :mod:`sarloc.core.registration`), and a **position embedding** of its
  offset on the ground (Fourier features of the offset from the reference point, in tile units);
* edges: each candidate to its ``edges`` nearest candidates on the ground (plus itself);
* message passing: ``layers`` blocks of multi-head attention restricted to the edges, with a learned bias from
  each edge's relative offset, then a feed-forward block (pre-norm, residual);
* output: a refined logit per candidate = ``scale * similarity + head(node)``; the residual on the coarse score
  makes an untrained head a no-op re-ranking.

Inputs (batch B, K candidates, D embedding dims, F extra features):
    ``query`` (B, D), ``cands`` (B, K, D), ``offsets`` (B, K, 2) offsets (east, north) of each candidate from the
    reference point (top-1 or a prior) divided by the tile side, ``extra`` (B, K, F) when F > 0.
Output: ``logits`` (B, K).

The model is equivariant to permutations of the candidates (permuting inputs permutes the output the same way);
nothing depends on the order but the caller's choice of reference point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RefinerConfig:
    """Graph refiner hyper-parameters.

    Attributes:
        k: candidates per query (nodes).
        embed_dim: D, the encoder's embedding size.
        extra_features: F, extra per-candidate scalars (0: embeddings and positions only).
        hidden: node feature width.
        heads: attention heads.
        layers: message-passing blocks.
        edges: nearest candidates (on the ground) each node attends to, besides itself.
        pos_freqs: Fourier frequencies of the position embedding (offsets in tile units).
        dropout: dropout in the blocks (training only).
    """

    k: int = 10
    embed_dim: int = 704
    extra_features: int = 0
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    edges: int = 5
    pos_freqs: int = 6
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def fourier_position(offsets: torch.Tensor, freqs: int) -> torch.Tensor:
    """(…, 2) offsets -> (…, 4 * freqs + 2) features: the offsets plus sin/cos at octave frequencies."""
    scales = (2.0 ** torch.arange(freqs, dtype=offsets.dtype, device=offsets.device)) * (math.pi / 8.0)
    ang = offsets.unsqueeze(-1) * scales  # (…, 2, freqs)
    feats = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(-2)
    return torch.cat([offsets, feats], dim=-1)


def knn_mask(offsets: torch.Tensor, edges: int) -> torch.Tensor:
    """(B, K, 2) offsets -> (B, K, K) bool: True where node j is i itself or one of node i's ``edges`` nearest.

    Exactly ``min(edges + 1, K)`` per row: node i ranks the nodes by (not i, squared distance, index) and keeps
    the first ones, so ties (a regular lattice, repeated candidates) are broken by index, deterministically.
    Built from a threshold on the distance matrix and a running count of the nodes tied at it (no sort, no
    scatter), so it exports to ONNX as TopK + comparisons + CumSum.
    """
    k = offsets.shape[1]
    diff = offsets.unsqueeze(2) - offsets.unsqueeze(1)
    d = (diff * diff).sum(-1)  # (B, K, K) squared distances, zero on the diagonal (cdist does not export)
    d = d - torch.eye(k, dtype=d.dtype, device=d.device)  # itself first: -1, every other node is >= 0 away
    n = min(edges + 1, k)
    kth = torch.topk(d, n, dim=-1, largest=False).values[..., -1:]  # (B, K, 1)
    less, tied = d < kth, d == kth
    room = n - less.to(torch.int32).sum(-1, keepdim=True)  # places left for the nodes exactly at the threshold
    return less | (tied & (torch.cumsum(tied.to(torch.int32), dim=-1) <= room))


class _Block(nn.Module):
    def __init__(self, cfg: RefinerConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.rel = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, cfg.heads))
        self.norm2 = nn.LayerNorm(h)
        self.ffn = nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Linear(2 * h, h))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, k, h = x.shape
        q, kk, v = self.qkv(self.norm1(x)).reshape(b, k, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ kk.transpose(-1, -2)) / math.sqrt(h // self.heads)  # (B, H, K, K)
        att = att + self.rel(rel).permute(0, 3, 1, 2)
        att = att.masked_fill(~mask.unsqueeze(1), -1e4)
        msg = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, k, h)
        x = x + self.drop(self.out(msg))
        return x + self.drop(self.ffn(self.norm2(x)))


class GraphRefiner(nn.Module):
    """The graph refiner (see the module docstring)."""

    def __init__(self, cfg: RefinerConfig = RefinerConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.proj = nn.Linear(cfg.embed_dim, h)
        self.scalars = nn.Linear(2 + cfg.extra_features, h)
        self.pos = nn.Linear(4 * cfg.pos_freqs + 2, h)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def forward(
        self, query: torch.Tensor, cands: torch.Tensor, offsets: torch.Tensor, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        sims = torch.einsum("bd,bkd->bk", query, cands)
        scal = [sims.unsqueeze(-1), (sims - sims.max(dim=1, keepdim=True).values).unsqueeze(-1)]
        if self.cfg.extra_features:
            if extra is None:
                raise ValueError(f"this refiner needs extra (B, K, {self.cfg.extra_features}) features")
            scal.append(extra)
        x = self.proj(query.unsqueeze(1) * cands) + self.scalars(torch.cat(scal, -1))
        x = x + self.pos(fourier_position(offsets, self.cfg.pos_freqs))
        mask = knn_mask(offsets, self.cfg.edges)
        diff = offsets.unsqueeze(1) - offsets.unsqueeze(2)  # (B, K, K, 2): j - i
        rel = torch.cat([diff, diff.norm(dim=-1, keepdim=True)], dim=-1)
        for blk in self.blocks:
            x = blk(x, rel, mask)
        return self.log_scale.exp() * sims + self.head(F.relu(self.norm(x))).squeeze(-1)


def listwise_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the candidates against the (normalised) multi-hot positives.

    Queries without any positive among their candidates carry no ranking signal and are left out.

    Args:
        logits: (B, K). positive: (B, K) bool.
    """
    pos = positive.float()
    has = pos.sum(1) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    target = pos[has] / pos[has].sum(1, keepdim=True)
    return -(target * F.log_softmax(logits[has], dim=1)).sum(1).mean()


__all__ = ["GraphRefiner", "RefinerConfig", "fourier_position", "knn_mask", "listwise_loss"]
