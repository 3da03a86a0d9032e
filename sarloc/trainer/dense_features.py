"""Learned dense features beside CFOG: a small fully-convolutional net whose channels are appended to CFOG's.

Both modalities share one net (a constant modality channel tells them apart). Its input is the grey image after
local contrast normalisation, the image's CFOG channels and the modality flag; its output channels are softly
unit-normalised per pixel and weighted by a learnt scalar ``w`` before being concatenated to CFOG, so the matcher
correlates ``[CFOG, w * learned]`` with the same zero-normalised cross-correlation (ZNCC) as
:class:`sarloc.core.cfog.DenseMatcher`. The optical side is precomputable: :func:`map_features` describes a whole
map once and :class:`FeatureMatcher` holds its FFT; a query costs one CFOG, one small forward pass and one FFT
correlation with more channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sarloc.core.cfog import DenseMatcher, _nms_peaks, _parabola_offset, cfog, to_gray

__all__ = [
    "DenseFCN",
    "FCNConfig",
    "FeatureMatcher",
    "dense_inputs",
    "map_features",
    "match_scores",
    "peak_stats",
    "window_features",
    "zncc_map",
    "zncc_points",
]

N_CFOG = 9


@dataclass(frozen=True)
class FCNConfig:
    """Shape of the learned block: ``layers`` convolutions of ``kernel`` px (receptive field ``layers*(k-1)+1``)."""

    hidden: int = 8
    out_ch: int = 8
    layers: int = 4
    kernel: int = 5
    dropout: float = 0.1
    lcn_sigma: float = 8.0

    @property
    def margin(self) -> int:
        """Receptive-field radius: context pixels needed around a crop for exact features."""
        return self.layers * (self.kernel // 2)


class DenseFCN(nn.Module):
    """Shared two-modality FCN; ``forward`` maps ``(B, 11, H, W)`` inputs to ``(B, out_ch, H, W)`` features."""

    def __init__(self, cfg: FCNConfig = FCNConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        mods: list[nn.Module] = []
        c = N_CFOG + 2
        for _ in range(cfg.layers - 1):
            mods += [nn.Conv2d(c, cfg.hidden, cfg.kernel, padding=cfg.kernel // 2, padding_mode="reflect"), nn.ReLU()]
            if cfg.dropout > 0:
                mods.append(nn.Dropout2d(cfg.dropout))
            c = cfg.hidden
        mods.append(nn.Conv2d(c, cfg.out_ch, cfg.kernel, padding=cfg.kernel // 2, padding_mode="reflect"))
        self.net = nn.Sequential(*mods)
        self.log_w = nn.Parameter(torch.zeros(()))  # weight of the learned block against CFOG
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.05)))  # InfoNCE temperature

    @property
    def weight(self) -> float:
        """The learned block's scalar weight ``w``."""
        return float(self.log_w.detach().exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softly unit-normalised learned channels (per-pixel norm in [0, 1))."""
        y = self.net(x)
        return y / torch.sqrt((y * y).sum(1, keepdim=True) + 1.0)

    def config_dict(self) -> dict:
        """JSON-able architecture."""
        return asdict(self.cfg)


def dense_inputs(gray: np.ndarray, modality: str, desc: np.ndarray | None = None, sigma: float = 8.0) -> np.ndarray:
    """``(11, H, W)`` float32 net input: local-contrast-normalised grey, CFOG channels, modality flag.

    Args:
        gray: ``(H, W)`` image (SAR: log intensity; optical: luminance).
        modality: ``"sar"`` or ``"optical"``.
        desc: its CFOG descriptor when already computed (``cfog(gray)``).
    """
    g = to_gray(gray)
    mu = cv2.GaussianBlur(g, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    z = g - mu
    sd = np.sqrt(cv2.GaussianBlur(z * z, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) + 1e-6)
    lcn = np.clip(z / (sd + 0.05 * float(sd.mean()) + 1e-6), -3.0, 3.0).astype(np.float32)
    d = cfog(g) if desc is None else desc
    flag = np.full_like(lcn, 1.0 if modality == "sar" else -1.0)
    return np.concatenate([lcn[None], d, flag[None]]).astype(np.float32, copy=False)


@torch.no_grad()
def learned_channels(model: DenseFCN, inp: np.ndarray, strip_rows: int = 512) -> np.ndarray:
    """``(out_ch, H, W)`` learned features of a whole input stack (eval mode, row strips with context)."""
    was = model.training
    model.eval()
    _, h, w = inp.shape
    m = model.cfg.margin
    out = np.empty((model.cfg.out_ch, h, w), np.float32)
    for y0 in range(0, h, strip_rows):
        a, b = max(0, y0 - m), min(h, y0 + strip_rows + m)
        y = model(torch.from_numpy(np.ascontiguousarray(inp[None, :, a:b])))[0].numpy()
        out[:, y0 : min(h, y0 + strip_rows)] = y[:, y0 - a : y0 - a + min(strip_rows, h - y0)]
    model.train(was)
    return out


def _stack(desc: np.ndarray, learned: np.ndarray, weight: float, mode: str) -> np.ndarray:
    if mode == "cfog":
        return desc
    if mode == "learned":
        return learned
    return np.concatenate([desc, np.float32(weight) * learned])


def map_features(model: DenseFCN, optical_gray: np.ndarray, mode: str = "concat") -> np.ndarray:
    """Whole-map optical features, computed once: ``cfog``, ``learned`` or ``concat`` (``[CFOG, w * learned]``)."""
    desc = cfog(to_gray(optical_gray))
    if mode == "cfog":
        return desc
    learned = learned_channels(model, dense_inputs(optical_gray, "optical", desc, model.cfg.lcn_sigma))
    return _stack(desc, learned, model.weight, mode)


def window_features(model: DenseFCN, sar_window: np.ndarray, mode: str = "concat") -> np.ndarray:
    """Features of one SAR window, described on its own (as onboard)."""
    desc = cfog(to_gray(sar_window))
    if mode == "cfog":
        return desc
    learned = learned_channels(model, dense_inputs(sar_window, "sar", desc, model.cfg.lcn_sigma))
    return _stack(desc, learned, model.weight, mode)


class FeatureMatcher(DenseMatcher):
    """:class:`DenseMatcher` on precomputed map features of any channel count; queries come as features."""

    def __init__(self, map_feats: np.ndarray, max_window_px: int = 256) -> None:
        """Hold ``(C, H, W)`` map features and their FFT."""
        self.max_window_px = int(max_window_px)
        self.normalise = True
        self._desc = np.ascontiguousarray(map_feats, dtype=np.float32)
        _, h, w = self._desc.shape
        self.shape = (h, w)
        self._fft_shape = (cv2.getOptimalDFTSize(h), cv2.getOptimalDFTSize(w))
        self._map_fft = np.fft.rfft2(self._desc, s=self._fft_shape).astype(np.complex64, copy=False)
        self._dft_cols = {}
        self._denom_cache = {}
        self._integrals = None
        self._norm2_integral = None

    def score_features(self, feats: np.ndarray) -> np.ndarray:
        """ZNCC of ``(C, h, w)`` window features at every valid placement (as ``DenseMatcher.score_map``)."""
        from sarloc.core.cfog import _dft_matrix

        _, h, w = feats.shape
        mh, mw = self.shape
        ph, pw = self._fft_shape
        d = feats - feats.mean(axis=(1, 2), keepdims=True)
        wnorm = float(np.sqrt(np.einsum("chw,chw->", d, d, dtype=np.float64)))
        if wnorm <= 0.0:
            return np.zeros((mh - h + 1, mw - w + 1), np.float32)
        rows = np.fft.rfft(d, n=pw, axis=-1)
        dft = self._dft_cols.get(h)
        if dft is None:
            dft = self._dft_cols[h] = _dft_matrix(ph, h)
        wf = np.matmul(dft, rows.astype(np.complex64, copy=False))
        np.conjugate(wf, out=wf)
        spec = np.einsum("chw,chw->hw", wf, self._map_fft)
        corr = np.fft.irfft2(spec, s=(ph, pw))[: mh - h + 1, : mw - w + 1]
        denom = np.maximum(self._local_denominator(h, w), np.float32(1e-2 * math.sqrt(h * w)))
        return np.ascontiguousarray(corr / (wnorm * denom), dtype=np.float32)


def match_scores(scores: np.ndarray, h: int, w: int, top_k: int = 10, nms_px: int | None = None) -> list:
    """Peaks of a score map as ``DenseMatcher.match`` returns them: ``(x_centre, y_centre, score)``, best first."""
    r = max(h, w) // 2 if nms_px is None else int(nms_px)
    out = []
    for py, px in _nms_peaks(scores, top_k, r):
        dy, dx = _parabola_offset(scores, py, px)
        out.append((px + dx + w / 2.0, py + dy + h / 2.0, float(scores[py, px])))
    return out


def peak_stats(scores: np.ndarray, peaks: list) -> np.ndarray:
    """Per-query peak statistics: top score, top minus second, second/top ratio, sharpness (top minus 3-6 px ring)."""
    s1 = peaks[0][2]
    s2 = peaks[1][2] if len(peaks) > 1 else -1.0
    h = scores.shape
    y, x = int(np.argmax(scores) // h[1]), int(np.argmax(scores) % h[1])
    a, b = max(0, y - 6), min(h[0], y + 7)
    c, d = max(0, x - 6), min(h[1], x + 7)
    patch = scores[a:b, c:d]
    yy, xx = np.mgrid[a:b, c:d]
    ring = np.maximum(np.abs(yy - y), np.abs(xx - x)) >= 3
    sharp = s1 - float(patch[ring].mean()) if ring.any() else 0.0
    return np.array([s1, s1 - s2, s2 / max(s1, 1e-3), sharp], np.float64)


def _box(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    ii = F.pad(x.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return ii[..., h:, w:] - ii[..., :-h, w:] - ii[..., h:, :-w] + ii[..., :-h, :-w]


def zncc_map(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Differentiable ZNCC of ``(C, h, w)`` template features over ``(C, H, W)`` map features (FFT)."""
    _, h, w = t.shape
    _, hh, ww = m.shape
    tz = t - t.mean((1, 2), keepdim=True)
    tn = tz.pow(2).sum().clamp_min(1e-12).sqrt()
    spec = (torch.fft.rfft2(m, s=(hh, ww)) * torch.fft.rfft2(tz, s=(hh, ww)).conj()).sum(0)
    corr = torch.fft.irfft2(spec, s=(hh, ww))[: hh - h + 1, : ww - w + 1]
    var = _box((m * m).sum(0), h, w) - (_box(m, h, w) ** 2).sum(0) / (h * w)
    den = (var.clamp_min(0.0) + 1e-6).sqrt().float().clamp_min(1e-2 * math.sqrt(h * w))
    return corr / (tn * den)


def zncc_points(t: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """ZNCC of ``(C, h, w)`` template features with ``(K, C, h, w)`` map crops -> ``(K,)``."""
    tz = t - t.mean((1, 2), keepdim=True)
    cz = crops - crops.mean((2, 3), keepdim=True)
    num = (cz * tz[None]).sum((1, 2, 3))
    den = tz.pow(2).sum().clamp_min(1e-12).sqrt() * cz.pow(2).sum((1, 2, 3)).clamp_min(1e-4 * t[0].numel()).sqrt()
    return num / den
