"""Shared pieces of the scene generator: land-cover classes, the scene config, the layout types and small
geometry / noise / drawing helpers (see :mod:`sarloc.sim.scenes`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from sarloc.core.errors import ConfigError

# Land-cover classes (values of the ``labels`` map).
GRASS, CROP_A, CROP_B, CROP_C, CROP_D, BARE, FOREST, WATER, ROAD, TRACK, URBAN, BUILDING, HEDGE = range(13)
CLASS_NAMES: tuple[str, ...] = (
    "grass",
    "crop_a",
    "crop_b",
    "crop_c",
    "crop_d",
    "bare_soil",
    "forest",
    "water",
    "road",
    "track",
    "urban",
    "building",
    "hedge",
)
FIELD_CLASSES: tuple[int, ...] = (GRASS, CROP_A, CROP_B, CROP_C, CROP_D, BARE)
_NC = len(CLASS_NAMES)
_IS_FIELD = np.zeros(256, bool)
_IS_FIELD[list(FIELD_CLASSES)] = True

_FORMAT_VERSION = 1
_REF_SIDE = 768.0  # counts of towns, roads, lakes are tuned for a 768 x 768 scene at 10 m


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of one synthetic scene.

    Attributes:
        width_px: image width in pixels.
        height_px: image height in pixels.
        gsd_m: ground sampling distance in metres per pixel (sizes are physical; 10 m is the reference).
        seed: random seed; the same config always gives the same scene.
        crs: coordinate reference system written to ``scene.json``.
        origin_en: easting, northing of the top-left corner of the top-left pixel.
        change_fraction: fraction of the area whose land cover changes between optical and SAR dates.
    """

    width_px: int = 768
    height_px: int = 768
    gsd_m: float = 10.0
    seed: int = 0
    crs: str = "EPSG:32631"
    origin_en: tuple[float, float] = (400000.0, 5100000.0)
    change_fraction: float = 0.03


_DEFAULT_CFG = SynthConfig()


@dataclass
class _Building:
    """One building footprint: ``corners`` (4, 2) x, y in px; corners[0] -> corners[1] is the long axis."""

    corners: np.ndarray
    height_m: float


@dataclass
class _Layout:
    """Land cover of one date plus the geometry the renderers need."""

    labels: np.ndarray  # (H, W) uint8 class
    field_id: np.ndarray  # (H, W) int32 field polygon index
    field_axis: np.ndarray  # (n_fields,) long-axis angle of each field, radians
    buildings: list[_Building] = field(default_factory=list)
    forest_height_m: float = 20.0
    k: float = 1.0  # pixels per 10 m


# ----------------------------------------------------------------------------------------------
# small helpers


def _validate(cfg: SynthConfig) -> None:
    if not (32 <= int(cfg.width_px) <= 16384 and 32 <= int(cfg.height_px) <= 16384):
        raise ConfigError(
            f"synth: image size {cfg.width_px}x{cfg.height_px} px is out of range; use 32..16384 px per side"
        )
    if not (0.5 <= float(cfg.gsd_m) <= 100.0):
        raise ConfigError(f"synth: gsd_m={cfg.gsd_m} is out of range; use 0.5..100 m")
    if not (0.0 <= float(cfg.change_fraction) <= 0.5):
        raise ConfigError(f"synth: change_fraction={cfg.change_fraction} is out of range; use 0..0.5")
    if int(cfg.seed) < 0:
        raise ConfigError(f"synth: seed={cfg.seed} is negative; use a seed >= 0")
    if len(cfg.origin_en) != 2:
        raise ConfigError("synth: origin_en must be (easting, northing)")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise with features about ``scale_px`` across."""
    scale_px = max(float(scale_px), 1.0)
    gh = math.ceil(h / scale_px) + 3
    gw = math.ceil(w / scale_px) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * scale_px), int(gh * scale_px)), interpolation=cv2.INTER_CUBIC)
    oy = int(rng.integers(0, big.shape[0] - h + 1))
    ox = int(rng.integers(0, big.shape[1] - w + 1))
    out = big[oy : oy + h, ox : ox + w]
    out = out - out.mean()
    return (out / (out.std() + 1e-6)).astype(np.float32)


def _fine_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std white noise blurred by ``sigma`` px (crown / grain texture)."""
    n = rng.standard_normal((h, w)).astype(np.float32)
    if sigma > 0:
        n = cv2.GaussianBlur(n, (0, 0), sigma)
    n -= n.mean()
    return n / (n.std() + 1e-6)


def _shift(mask: np.ndarray, dx: int, dy: int = 0) -> np.ndarray:
    """Translate a 2-D array by integer (dx, dy), filling with zeros."""
    out = np.zeros_like(mask)
    h, w = mask.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _sweep(mask: np.ndarray, n: int, sign: int) -> np.ndarray:
    """Union of ``mask`` shifted by sign*1 .. sign*n pixels along x."""
    out = np.zeros_like(mask)
    for i in range(1, n + 1):
        out |= _shift(mask, sign * i)
    return out


def _pts(poly: np.ndarray) -> np.ndarray:
    """Float polygon -> int32 points in 1/16 px for ``cv2`` drawing with ``shift=4``."""
    return np.round(np.asarray(poly, np.float64) * 16.0).astype(np.int32).reshape(-1, 1, 2)


def _fill(img: np.ndarray, poly: np.ndarray, value: float | tuple[float, ...]) -> None:
    if isinstance(value, tuple):
        color = value
    else:
        color = (float(value),)
    cv2.fillPoly(img, [_pts(poly)], color, lineType=cv2.LINE_8, shift=4)


def _polyline(img: np.ndarray, pts: np.ndarray, value: float, thickness: int) -> None:
    cv2.polylines(img, [_pts(pts)], False, (float(value),), thickness=max(1, int(thickness)), shift=4)


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    ux, uy = math.cos(angle), math.sin(angle)
    ax, ay = 0.5 * length * ux, 0.5 * length * uy
    bx, by = -0.5 * width * uy, 0.5 * width * ux
    return np.array(
        [
            [cx - ax - bx, cy - ay - by],
            [cx + ax - bx, cy + ay - by],
            [cx + ax + bx, cy + ay + by],
            [cx - ax + bx, cy - ay + by],
        ]
    )


def _blob_poly(
    rng: np.random.Generator, cx: float, cy: float, radius: float, rough: float = 0.3, n: int = 40
) -> np.ndarray:
    """Irregular closed polygon (noisy ellipse) around (cx, cy)."""
    phi = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for j in range(1, 5):
        r += rough * rng.normal() * np.cos(j * phi + rng.uniform(0, 2 * math.pi)) / j
    r = np.clip(r, 0.35, 2.0) * radius
    ecc = rng.uniform(0.6, 1.0)
    rot = rng.uniform(0, math.pi)
    x, y = r * np.cos(phi), ecc * r * np.sin(phi)
    cr, sr = math.cos(rot), math.sin(rot)
    return np.stack([cx + cr * x - sr * y, cy + sr * x + cr * y], axis=1)


def _clip_halfplane(poly: np.ndarray, n: np.ndarray, s: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Keep the part of convex ``poly`` with ``p . n <= s``; also return the cut's end points."""
    d = poly @ n - s
    out: list[np.ndarray] = []
    cut: list[np.ndarray] = []
    m = len(poly)
    for i in range(m):
        j = (i + 1) % m
        if d[i] <= 0:
            out.append(poly[i])
        if (d[i] < 0 < d[j]) or (d[j] < 0 < d[i]):
            x = poly[i] + d[i] / (d[i] - d[j]) * (poly[j] - poly[i])
            out.append(x)
            cut.append(x)
    return np.array(out).reshape(-1, 2), cut
