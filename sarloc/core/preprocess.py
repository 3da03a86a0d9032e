"""Window preprocessing shared by trainer, export and runtime (torch-free: numpy + OpenCV).

Every window (SAR or optical) enters the encoder as a single log/luminance band, standardised per window
(zero mean, unit variance, clipped), followed by ``n_orient`` CFOG channels of that window (unsigned oriented
gradients |gx cos t + gy sin t|, smoothed, normalised per pixel; invariant to the intensity reversals common
between SAR and optical; see :mod:`sarloc.core.cfog`).
The same function runs in training, in the exported model's manifest contract and on board.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sarloc.core.errors import SarlocError


@dataclass(frozen=True)
class PreprocessConfig:
    """How a (H, W) single-band window becomes a (C, H, W) float32 tensor.

    Attributes:
        n_orient: number of CFOG orientation channels appended (0 = intensity only).
        clip_sigma: clip standardised intensity to +-clip_sigma.
        grad_sigma: CFOG spatial smoothing of each orientation channel (pixels).
        eps_rel: CFOG softened per-pixel normalisation (see :class:`sarloc.core.cfog.CFOGConfig`).
    """

    n_orient: int = 9
    clip_sigma: float = 4.0
    grad_sigma: float = 0.8
    eps_rel: float = 0.3

    @property
    def channels(self) -> int:
        """Channels of the prepared tensor."""
        return 1 + self.n_orient

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def standardise(win: np.ndarray, clip_sigma: float = 4.0) -> np.ndarray:
    """(..., H, W) -> per-window zero-mean, unit-variance float32, clipped to +-clip_sigma."""
    w = np.asarray(win, dtype=np.float32)
    mu = w.mean(axis=(-2, -1), keepdims=True)
    sd = w.std(axis=(-2, -1), keepdims=True)
    out = (w - mu) / (sd + 1e-6)
    return np.clip(out, -clip_sigma, clip_sigma, out=out)


def orientation_channels(std_win: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(H, W) standardised window -> (n_orient, H, W) CFOG descriptor of the window."""
    from sarloc.core.cfog import CFOGConfig, cfog

    return cfog(std_win, CFOGConfig(n_orient=cfg.n_orient, sigma=cfg.grad_sigma, eps_rel=cfg.eps_rel))


def prepare_windows(wins: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Prepare a batch of single-band windows for the encoder.

    Args:
        wins: (B, H, W) or (H, W) float array (log-SAR or optical luminance, any scale).
        cfg: preprocessing configuration (must match the model's manifest).

    Returns:
        (B, C, H, W) float32, C = cfg.channels.
    """
    a = np.asarray(wins)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] < 8 or a.shape[2] < 8:
        raise SarlocError(f"windows must be (B, H, W) with H, W >= 8, got shape {a.shape}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        a = a.copy()
        for i in range(len(a)):
            bad = ~np.isfinite(a[i])
            if bad.all():
                a[i] = 0.0
            elif bad.any():
                a[i][bad] = float(np.mean(a[i][~bad]))
    s = standardise(a, cfg.clip_sigma)
    out = np.empty((a.shape[0], cfg.channels, a.shape[1], a.shape[2]), np.float32)
    out[:, 0] = s
    if cfg.n_orient:
        for i in range(len(s)):
            out[i, 1:] = orientation_channels(s[i], cfg)
    return out


def crop_windows(img: np.ndarray, origins: np.ndarray, window_px: int) -> np.ndarray:
    """(H, W) image, (N, 2) top-left (x0, y0) -> (N, window, window) copies."""
    o = np.asarray(origins, dtype=np.int64)
    if len(o) == 0:
        return np.zeros((0, window_px, window_px), img.dtype)
    h, w = img.shape[:2]
    if o[:, 0].min() < 0 or o[:, 1].min() < 0 or o[:, 0].max() + window_px > w or o[:, 1].max() + window_px > h:
        raise SarlocError(f"window of {window_px} px at some origin falls outside the {w}x{h} image")
    iy = o[:, 1, None, None] + np.arange(window_px)[None, :, None]
    ix = o[:, 0, None, None] + np.arange(window_px)[None, None, :]
    return img[iy, ix]
