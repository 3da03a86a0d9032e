"""Losses that stay in FP32 under mixed precision (``TrainConfig.precision`` bf16 / fp16).

Autocast runs matrix products in bfloat16 or float16; in a loss that hurts: cosine similarities divided by a small
temperature (InfoNCE), hardest-pair margins (triplet), the critic's Wasserstein estimate and its gradient penalty
(a double backward). :func:`in_fp32` runs a loss with autocast off and its half-precision tensor arguments cast to
float32 (a no-op in FP32 training).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


_HALF = (torch.float16, torch.bfloat16)


def _to_fp32(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in _HALF else x


def in_fp32(fn: F) -> F:
    """Decorator: run ``fn`` with autocast disabled and its float16 / bfloat16 tensor arguments in float32 (float32
    and float64 ones are passed as they are)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_to_fp32(a) for a in args)
        kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
