"""End-to-end training of the graph refiner with the encoder (one run, one loss), as the seed system does.

Post-hoc training (:mod:`sarloc.trainer.refiner_train`) fits the refiner to a frozen encoder's candidate lists. In
joint training (``TrainConfig.refiner_weight > 0``, ``sarloc train --refiner``) the refiner's listwise loss is added
to the encoder's metric loss and its gradient flows through the candidates' and the query's embeddings into both
encoder branches.

Candidate lists come from the batch itself. A batch holds ``scenes_per_batch`` groups of windows drawn at random
positions of one scene each, so the optical windows of a SAR window's own scene are a small gallery scattered over
that scene, like the coarse search's NMS peaks over a map:

* candidates of SAR window i = the ``k`` optical windows of i's scene most similar to it (similarities detached
  for the choice, the embeddings keep their gradient); when none of them is a positive, the best positive replaces
  the last one (post-hoc training drops lists without a positive; the forced one keeps every list useful);
* a candidate is positive when its centre lies in the window-sized box around i's true centre (the evaluation's
  rule, :meth:`sarloc.eval.refine.CandidateData.positives`);
* positions: (east, north) of the optical window centres in tile units, offsets from the list's top-1, with a
  random rotation and flip per step (the map has no preferred direction), as in post-hoc training;
* a scene with fewer than ``k`` windows in the batch pads its lists with copies of the last candidate, marked
  not positive (the runtime pads short lists the same way).

The trained refiner is saved inside the encoder checkpoint (:func:`sarloc.trainer.checkpoint.load_joint_refiner`);
``sarloc train-refiner`` starts from it (and ``--steps 0`` exports it unchanged).
"""

from __future__ import annotations

import math

import torch

from sarloc.trainer.models.refiner import GraphRefiner, listwise_loss

__all__ = ["augment_offsets", "in_batch_lists", "joint_refiner_loss", "make_refiner"]


def in_batch_lists(
    z_sar: torch.Tensor,
    z_opt: torch.Tensor,
    scene_idx: torch.Tensor,
    opt_xy: torch.Tensor,
    positive: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate lists of every SAR window of a batch among the optical windows of its own scene.

    Args:
        z_sar, z_opt: (B, D) embeddings (gradients are kept).
        scene_idx: (B,) scene of each pair (SAR window i and optical window i share it).
        opt_xy: (B, 2) optical window centres (east, north) in tile units.
        positive: (B, B) bool, ``positive[i, j]``: optical window j is a right answer for SAR window i.
        k: candidates per list.

    Returns:
        ``(query (B, D), cands (B, k, D), offsets (B, k, 2), pos (B, k) bool, index (B, k) long)``; ``index`` are
        the optical windows chosen, in similarity order except for a forced positive (last real slot) and padding.
    """
    b = z_sar.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims = (z_sar @ z_opt.T).detach()
    same = scene_idx[:, None] == scene_idx[None, :]
    s = sims.masked_fill(~same, float("-inf"))
    kk = min(k, b)
    top = s.topk(kk, dim=1).indices  # (B, kk); slots past the scene's count hold other scenes' windows
    n_real = same.sum(1).clamp(max=kk)  # (B,)
    slot = torch.arange(kk, device=top.device)[None, :]
    real = slot < n_real[:, None]
    last = top.gather(1, (n_real - 1)[:, None])
    top = torch.where(real, top, last)
    has_pos = (positive.gather(1, top) & real).any(1)
    if not bool(has_pos.all()):
        best_pos = sims.masked_fill(~(positive & same), float("-inf")).argmax(1)
        rows = torch.nonzero(~has_pos).squeeze(1)
        top[rows, n_real[rows] - 1] = best_pos[rows]
        top = torch.where(real, top, top.gather(1, (n_real - 1)[:, None]))
    if kk < k:  # fewer windows in the batch than k: pad with the last column
        pad = top[:, -1:].expand(b, k - kk)
        top = torch.cat([top, pad], 1)
        real = torch.cat([real, torch.zeros(b, k - kk, dtype=torch.bool, device=top.device)], 1)
    pos = positive.gather(1, top) & real
    xy = opt_xy[top]
    offsets = xy - xy[:, :1]
    return z_sar, z_opt[top], offsets, pos, top


def augment_offsets(offsets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random rotation (and, half of the time, an east-west flip) of (B, K, 2) offsets, one per call."""
    a = float(torch.rand((), generator=generator)) * 2 * math.pi
    rot = torch.tensor(
        [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=offsets.dtype, device=offsets.device
    )
    o = offsets @ rot.T
    if float(torch.rand((), generator=generator)) < 0.5:
        o = o * torch.tensor([-1.0, 1.0], dtype=offsets.dtype, device=offsets.device)
    return o


def joint_refiner_loss(
    refiner: torch.nn.Module,
    z_sar: torch.Tensor,
    z_opt: torch.Tensor,
    scene_idx: torch.Tensor,
    opt_xy: torch.Tensor,
    positive: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The refiner's listwise loss on in-batch candidate lists, plus logs (R@1 of the coarse and refined order)."""
    query, cands, offsets, pos, _ = in_batch_lists(z_sar, z_opt, scene_idx, opt_xy, positive, k)
    logits = refiner(query, cands, augment_offsets(offsets, generator))
    loss = listwise_loss(logits, pos)
    with torch.no_grad():
        coarse = torch.einsum("bd,bkd->bk", query, cands)
        r1_coarse = pos.gather(1, coarse.argmax(1, keepdim=True)).float().mean().item()
        r1_ref = pos.gather(1, logits.argmax(1, keepdim=True)).float().mean().item()
    return loss, {"refiner": loss.item(), "list_r1_coarse": r1_coarse, "list_r1_refined": r1_ref}


def make_refiner(embed_dim: int, k: int) -> GraphRefiner:
    """The jointly trained refiner (default :class:`~sarloc.trainer.models.refiner.RefinerConfig` but ``k`` and
    ``embed_dim``)."""
    from sarloc.trainer.models.refiner import RefinerConfig

    return GraphRefiner(RefinerConfig(k=k, embed_dim=embed_dim))
