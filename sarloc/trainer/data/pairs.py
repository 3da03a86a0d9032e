"""Training pairs: SAR windows and optical patches cut from co-registered scenes, with augmentation.

Returns numpy arrays only (no torch), so the sampler is usable alone and in tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from sarloc.core.errors import ConfigError
from sarloc.core.preprocess import PreprocessConfig, prepare_windows
from sarloc.core.scene import Scene


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of training pairs.

    Attributes:
        jitter_px: optical patch centre offset from the SAR window centre, uniform in +-jitter_px per axis
            (the positive tile of an arbitrary query is off-centre by up to half a tile).
        rot_deg: SAR window rotation, uniform in +-rot_deg (heading error).
        scale_jitter: SAR window scale factor in 1 +- scale_jitter (GSD error).
        speckle_looks: (min, max) equivalent number of looks of extra multiplicative speckle (0 disables).
        contrast: SAR/optical log-domain gain in 1 +- contrast and random gamma on optical.
        band_dropout: probability to use one random band instead of the band mean / luminance.
        max_change: reject windows with a larger changed-area fraction (change masks).
    """

    jitter_px: float = 20.0
    rot_deg: float = 8.0
    scale_jitter: float = 0.08
    speckle_looks: tuple[float, float] = (2.0, 10.0)
    contrast: float = 0.3
    band_dropout: float = 0.2
    max_change: float = 0.25

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class PairBatch:
    """One batch. sar/optical: (B, C, H, W) float32; targets: (B, B) soft positives; scene_idx: (B,); centres /
    opt_centres: (B, 2) SAR and optical window centres (col, row), scene pixels."""

    sar: np.ndarray
    optical: np.ndarray
    targets: np.ndarray
    pos_mask: np.ndarray
    semi_mask: np.ndarray
    scene_idx: np.ndarray
    centres: np.ndarray = field(repr=False)
    opt_centres: np.ndarray | None = field(default=None, repr=False)


def _band_image(scene: Scene, modality: str, rng: np.random.Generator, p_drop: float) -> np.ndarray:
    img = scene.sar if modality == "sar" else scene.optical
    if img.shape[2] > 1 and rng.random() < p_drop:
        return img[..., int(rng.integers(img.shape[2]))]
    return scene.sar_gray if modality == "sar" else scene.optical_gray


def _warp_crop(img: np.ndarray, cx: float, cy: float, size: int, angle_deg: float, scale: float) -> np.ndarray:
    """Crop a size x size window centred at continuous (cx, cy), rotated by angle and scaled (reflect border)."""
    m = cv2.getRotationMatrix2D((cx, cy), angle_deg, scale)
    m[0, 2] += size / 2.0 - cx
    m[1, 2] += size / 2.0 - cy
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class PairSampler:
    """Draws batches of (SAR window, optical patch) pairs from several scenes.

    Each batch mixes ``scenes_per_batch`` scenes (so most negatives are same-scene look-alikes, the hard case
    retrieval faces); scenes are drawn with probability proportional to sqrt(area).
    """

    def __init__(
        self,
        scenes: list[Scene],
        window_px: int,
        batch_size: int,
        prep: PreprocessConfig,
        aug: AugmentConfig = AugmentConfig(),
        scenes_per_batch: int = 4,
        seed: int = 0,
        semi_weight: float = 0.5,
    ) -> None:
        if not scenes:
            raise ConfigError("training needs at least one scene")
        usable = [s for s in scenes if min(s.width_px, s.height_px) >= window_px]
        if not usable:
            raise ConfigError(f"no scene is at least {window_px} px on each side; use a smaller window")
        self.scenes = usable
        self.window_px = window_px
        self.batch_size = batch_size
        self.prep = prep
        self.aug = aug
        self.scenes_per_batch = max(1, min(scenes_per_batch, len(usable), batch_size))
        self.rng = np.random.default_rng(seed)
        self.semi_weight = semi_weight
        area = np.array([math.sqrt(s.width_px * s.height_px) for s in usable])
        self.p = area / area.sum()
        self._integ = [
            None
            if s.change_mask is None
            else np.pad(s.change_mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            for s in usable
        ]

    def _changed(self, k: int, cx: float, cy: float) -> float:
        integ = self._integ[k]
        if integ is None:
            return 0.0
        s = self.scenes[k]
        h = self.window_px // 2
        x0, y0 = int(max(0, cx - h)), int(max(0, cy - h))
        x1, y1 = int(min(s.width_px, cx + h)), int(min(s.height_px, cy + h))
        if x1 <= x0 or y1 <= y0:
            return 0.0
        tot = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
        return float(tot) / ((x1 - x0) * (y1 - y0))

    def sample(self) -> PairBatch:
        """Draw one batch."""
        rng, a, w = self.rng, self.aug, self.window_px
        b = self.batch_size
        chosen = rng.choice(
            len(self.scenes), size=self.scenes_per_batch, replace=len(self.scenes) < self.scenes_per_batch, p=self.p
        )
        per = np.full(self.scenes_per_batch, b // self.scenes_per_batch)
        per[: b % self.scenes_per_batch] += 1
        sar_w, opt_w, centres, sidx, opt_c = [], [], [], [], []
        for k, n in zip(chosen, per, strict=True):
            s = self.scenes[k]
            sar_img = _band_image(s, "sar", rng, a.band_dropout)
            opt_img = _band_image(s, "optical", rng, a.band_dropout)
            half = w / 2.0
            for _ in range(int(n)):
                for _try in range(10):
                    cx = rng.uniform(half, s.width_px - half)
                    cy = rng.uniform(half, s.height_px - half)
                    if self._changed(k, cx, cy) <= a.max_change:
                        break
                jx, jy = rng.uniform(-a.jitter_px, a.jitter_px, 2)
                ox = float(np.clip(cx + jx, half, s.width_px - half))
                oy = float(np.clip(cy + jy, half, s.height_px - half))
                ang = rng.uniform(-a.rot_deg, a.rot_deg)
                sc = 1.0 + rng.uniform(-a.scale_jitter, a.scale_jitter)
                sw = _warp_crop(sar_img, cx, cy, w, ang, sc)
                if a.speckle_looks[1] > 0 and rng.random() < 0.7:
                    looks = rng.uniform(*a.speckle_looks)
                    g = rng.gamma(looks, 1.0 / looks, size=sw.shape).astype(np.float32)
                    sw = sw + 10.0 * np.log10(np.maximum(g, 1e-3))
                sw = sw * (1.0 + rng.uniform(-a.contrast, a.contrast))
                ow = _warp_crop(opt_img, ox, oy, w, 0.0, 1.0)
                ow = np.clip(ow, 0, None) ** (1.0 + rng.uniform(-a.contrast, a.contrast))
                sar_w.append(sw)
                opt_w.append(ow)
                centres.append((cx, cy))
                opt_c.append((ox, oy))
                sidx.append(k)
        sar = prepare_windows(np.stack(sar_w), self.prep)
        opt = prepare_windows(np.stack(opt_w), self.prep)
        centres_a = np.asarray(centres)
        opt_a = np.asarray(opt_c)
        sidx_a = np.asarray(sidx)
        d = np.abs(centres_a[:, None, :] - opt_a[None, :, :])
        same = sidx_a[:, None] == sidx_a[None, :]
        contains = same & (d[..., 0] < w / 2.0) & (d[..., 1] < w / 2.0)
        overlap = np.clip(w - d[..., 0], 0, None) * np.clip(w - d[..., 1], 0, None) / float(w * w)
        eye = np.eye(len(sidx_a), dtype=bool)
        semi = contains & ~eye
        targets = eye.astype(np.float32) + self.semi_weight * (semi * overlap).astype(np.float32)
        return PairBatch(
            sar=sar,
            optical=opt,
            targets=targets,
            pos_mask=eye,
            semi_mask=semi,
            scene_idx=sidx_a,
            centres=centres_a,
            opt_centres=opt_a,
        )
