"""Synthetic co-registered SAR/optical scenes for training, tests and demos.

A scene is built in two stages. First a land-cover *layout* is drawn: a patchwork of agricultural
fields (recursive oblique splits of a rotated square), forest blobs, hedgerows, a meandering river,
lakes and ponds, long main roads, field-edge roads and tracks, towns with a street grid and
buildings, and farmsteads. Then two modalities are rendered from the layout *independently*:

* optical (RGB, 8 bit): per-class palettes with a per-field tint, tramline stripes, soil and crown
  texture, roof colours, cast shadows from a random sun, mild blur;
* SAR (single band, linear power scaled to ``[0, 1]``): per-class backscatter levels drawn at
  random per scene, per-field offsets drawn independently of the optical tint, specular water and
  roads, forest volume texture, building double bounce, layover toward the sensor (``-x``) and
  radar shadow (``+x``) proportional to height, brighter field edges, Gamma speckle.

Each modality draws from its own random stream (spawned from the seed), so SAR brightness is not a
function of optical colour. Between the two dates a few areas change (recultivated fields, new
buildings, forest clearings, new ponds); the SAR is rendered from the changed layout and
``change_mask`` marks those pixels.

Lengths are physical: a 10 m pixel is the reference, other ``gsd_m`` values rescale every size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sarloc.core.errors import ConfigError, SarlocError

__all__ = [
    "CLASS_NAMES",
    "FIELD_CLASSES",
    "SynthConfig",
    "generate_scene",
    "make_preview",
    "write_scene",
]

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


# ----------------------------------------------------------------------------------------------
# layout


def _patchwork(
    rng: np.random.Generator, h: int, w: int, k: float
) -> tuple[list[np.ndarray], list[float], list[tuple[np.ndarray, int]]]:
    """Recursive oblique splits of a rotated square covering the image.

    Returns:
        Field polygons, their long-axis angles, and the cut segments with their split depth.
    """
    half = 0.5 * math.hypot(w, h) + 40 * k
    ang = rng.uniform(0, math.pi / 2)
    u = np.array([math.cos(ang), math.sin(ang)])
    v = np.array([-u[1], u[0]])
    c = np.array([w / 2.0, h / 2.0])
    hu, hv = half * u, half * v
    root = np.stack([c - hu - hv, c + hu - hv, c + hu + hv, c - hu + hv])
    grain = _smooth_noise(rng, h, w, 220 * k)  # regions of small and large fields
    lo, hi = math.log(24 * k), math.log(150 * k)
    min_w = 10 * k
    polys: list[np.ndarray] = []
    axes: list[float] = []
    cuts: list[tuple[np.ndarray, int]] = []
    stack: list[tuple[np.ndarray, int]] = [(root, 0)]
    while stack:
        poly, depth = stack.pop()
        lo_xy, hi_xy = poly.min(0), poly.max(0)
        if hi_xy[0] < 0 or hi_xy[1] < 0 or lo_xy[0] > w or lo_xy[1] > h:
            continue  # entirely outside the image
        cen = poly.mean(0)
        dv = poly - cen
        _, vecs = np.linalg.eigh(dv.T @ dv)
        a1 = vecs[:, 1]
        a2 = np.array([-a1[1], a1[0]])
        p1, p2 = dv @ a1, dv @ a2
        l1, l2 = float(np.ptp(p1)), float(np.ptp(p2))
        gy = int(np.clip(cen[1], 0, h - 1))
        gx = int(np.clip(cen[0], 0, w - 1))
        z = 1.4 * float(grain[gy, gx]) + rng.normal(0, 0.7)
        target = math.exp(lo + (hi - lo) / (1.0 + math.exp(-z)))
        aspect = 1.0 + rng.exponential(0.7)
        axis, ext = None, 0.0
        if l1 > target * aspect:
            axis, ext = a1, l1
        elif l2 > target:
            axis, ext = a2, l2  # split along the long axis: strip fields
        if axis is None or ext * 0.3 < min_w:
            polys.append(poly)
            axes.append(math.atan2(a1[1], a1[0]))
            continue
        if rng.random() < 0.8:
            # cut parallel to the polygon edge most perpendicular to the split axis: fields stay quadrilateral
            ed = np.roll(poly, -1, axis=0) - poly
            el = np.hypot(ed[:, 0], ed[:, 1]) + 1e-9
            j = int(np.argmin(np.abs(ed @ axis) / el - 0.02 * el / ext))
            nrm = np.array([-ed[j, 1], ed[j, 0]]) / el[j]
            if nrm @ axis < 0:
                nrm = -nrm
        else:
            nrm = axis
        jit = rng.normal(0, 0.25 if depth < 2 else 0.03)
        cj, sj = math.cos(jit), math.sin(jit)
        nrm = np.array([cj * nrm[0] - sj * nrm[1], sj * nrm[0] + cj * nrm[1]])
        pn = poly @ nrm
        s = float(pn.min() + rng.uniform(0.3, 0.7) * np.ptp(pn))
        a, seg = _clip_halfplane(poly, nrm, s)
        b, _ = _clip_halfplane(poly, -nrm, -s)
        if len(a) < 3 or len(b) < 3:
            polys.append(poly)
            axes.append(math.atan2(a1[1], a1[0]))
            continue
        if len(seg) == 2:
            cuts.append((np.stack(seg), depth))
        stack.append((a, depth + 1))
        stack.append((b, depth + 1))
    return polys, axes, cuts


def _border_point(rng: np.random.Generator, h: int, w: int, margin: float) -> np.ndarray:
    t = rng.uniform(0, 2 * (w + h))
    if t < w:
        return np.array([t, -margin])
    if t < w + h:
        return np.array([w + margin, t - w])
    if t < 2 * w + h:
        return np.array([t - w - h, h + margin])
    return np.array([-margin, t - 2 * w - h])


def _wander(
    rng: np.random.Generator,
    h: int,
    w: int,
    step: float,
    turn_sigma: float,
    meander: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """A path entering and leaving the image through two different sides.

    Args:
        meander: amplitude (rad) and wavelength (px of path) of a sine-generated heading (rivers).
    """
    margin = 20.0
    centre = np.array([w / 2.0, h / 2.0])
    for _ in range(50):  # end points on the border, the chord passing through the interior
        p0 = _border_point(rng, h, w, margin)
        p1 = _border_point(rng, h, w, margin)
        chord = np.hypot(*(p1 - p0))
        if chord > 0.6 * min(w, h) and np.hypot(*(0.5 * (p0 + p1) - centre)) < 0.42 * min(w, h):
            break
    amp, lam = meander
    phase = rng.uniform(0, 2 * math.pi)
    p = p0.copy()
    heading = math.atan2(*(p1 - p0)[::-1])
    drift = 0.0
    pts = [p.copy()]
    n_max = int(4 * (w + h) / step)
    been_inside = False
    for i in range(n_max):
        dist = float(np.hypot(*(p1 - p)))
        desired = math.atan2(p1[1] - p[1], p1[0] - p[0])
        err = (desired - heading + math.pi) % (2 * math.pi) - math.pi
        gain = 0.12 + 0.6 * min(max(1.0 - dist / (0.25 * min(w, h)), 0.0), 1.0)
        heading += gain * err + rng.normal(0, turn_sigma)
        drift = 0.95 * drift + rng.normal(0, 0.05)
        fade = min(1.0, dist / (0.2 * min(w, h)))  # straighten out near the exit point
        hd = heading + amp * math.sin(2 * math.pi * i * step / lam + phase) * fade + drift
        p = p + step * np.array([math.cos(hd), math.sin(hd)])
        pts.append(p.copy())
        inside = 0 <= p[0] < w and 0 <= p[1] < h
        been_inside |= inside
        if dist < 2 * step or (been_inside and not inside and i > 10):
            break
    return np.array(pts)


def _occupied(labels: np.ndarray) -> np.ndarray:
    occ = np.isin(labels, (ROAD, TRACK, WATER, BUILDING)).astype(np.uint8)
    return occ


def _try_building(
    labels: np.ndarray,
    occ: np.ndarray,
    allowed: np.ndarray,
    rect: np.ndarray,
    height_m: float,
    out: list[_Building],
) -> bool:
    """Place ``rect`` if its sample points are inside ``allowed`` and free; update maps."""
    h, w = labels.shape
    pts = rect.tolist()
    cx = 0.25 * (pts[0][0] + pts[1][0] + pts[2][0] + pts[3][0])
    cy = 0.25 * (pts[0][1] + pts[1][1] + pts[2][1] + pts[3][1])
    if not (0 <= cx < w - 0.5 and 0 <= cy < h - 0.5):
        return False
    samples = [(cx, cy)]
    for i in range(4):
        x, y = pts[i]
        x2, y2 = pts[(i + 1) % 4]
        samples.append((0.85 * x + 0.15 * cx, 0.85 * y + 0.15 * cy))
        samples.append((0.5 * (x + x2), 0.5 * (y + y2)))
    for x, y in samples:
        xi, yi = int(x + 0.5), int(y + 0.5)
        if 0 <= xi < w and 0 <= yi < h and (occ[yi, xi] or not allowed[yi, xi]):
            return False
    _fill(labels, rect, BUILDING)
    _fill(occ, rect, 1)
    cv2.polylines(occ, [_pts(rect)], True, (1,), thickness=2, shift=4)
    out.append(_Building(rect.astype(np.float64), float(height_m)))
    return True


def _town(
    rng: np.random.Generator,
    labels: np.ndarray,
    centre: np.ndarray,
    heading: float,
    k: float,
    buildings: list[_Building],
    fields: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """A town: core blob plus nearby whole fields, jittered street grid, buildings along the streets.

    Args:
        fields: field-id map, per-field pixel count, centroid x, centroid y.
    """
    h, w = labels.shape
    radius = rng.uniform(35, 85) * k
    foot = np.zeros((h, w), np.uint8)
    _fill(foot, _blob_poly(rng, centre[0], centre[1], 0.6 * radius, rough=0.35, n=48), 1)
    fid, cnt, fcx, fcy = fields
    near = np.hypot(fcx - centre[0], fcy - centre[1]) < radius * rng.uniform(0.7, 1.0)
    near &= cnt < (0.9 * radius) ** 2
    foot |= near[fid].astype(np.uint8)
    foot &= (labels != WATER).astype(np.uint8)
    labels[foot > 0] = URBAN
    # street grid
    g = heading + rng.normal(0, 0.1)
    u = np.array([math.cos(g), math.sin(g)])
    v = np.array([-u[1], u[0]])
    spacing = rng.uniform(11, 22) * k
    streets = np.zeros((h, w), np.uint8)
    n_lines = int(1.3 * radius / spacing) + 1
    for a, b in ((u, v), (v, u)):
        for i in range(-n_lines, n_lines + 1):
            if rng.random() > 0.85:
                continue
            off = (i + rng.normal(0, 0.15)) * spacing
            length = 1.6 * radius * rng.uniform(0.6, 1.0)
            s0 = centre + off * b - length * a
            s1 = centre + off * b + length * a
            _polyline(streets, np.stack([s0, s1]), 1, 1)
    streets &= foot
    labels[(streets > 0) & (labels != WATER)] = ROAD
    # buildings along streets, denser and taller in the centre
    occ = _occupied(labels)
    allowed = (foot > 0) & (labels == URBAN)
    sy, sx = np.nonzero(streets)
    if len(sx) == 0:
        return
    n_try = int(foot.sum() / (3.0 * k * k)) + 20
    j = rng.integers(0, len(sx), n_try)
    px, py = sx[j].astype(np.float64), sy[j].astype(np.float64)
    r = np.hypot(px - centre[0], py - centre[1]) / radius
    keep = rng.random(n_try) < np.exp(-1.2 * r * r)
    px, py, r = px[keep], py[keep], r[keep]
    n = len(px)
    di = rng.integers(0, 4, n)
    big = rng.random(n) < 0.12 * (1.0 - np.minimum(r, 1.0)) + 0.02
    length = np.where(big, rng.uniform(35, 90, n), rng.uniform(12, 40, n)) * (k / 10.0)
    width = np.where(big, rng.uniform(15, 35, n), rng.uniform(9, 20, n)) * (k / 10.0)
    hgt = np.where(big, rng.uniform(10, 32, n), rng.uniform(5, 13, n))
    off = 0.5 * width + rng.uniform(1.0, 3.0, n) * k
    slide = rng.uniform(-2, 2, n) * k
    jit = rng.normal(0, 0.04, n)
    dirs = (u, -u, v, -v)
    for i in range(n):
        d = dirs[di[i]]
        along = v if di[i] < 2 else u  # the street runs perpendicular to the offset
        cx = px[i] + off[i] * d[0] + slide[i] * along[0]
        cy = py[i] + off[i] * d[1] + slide[i] * along[1]
        ang = math.atan2(along[1], along[0]) + jit[i]
        _try_building(labels, occ, allowed, _rect(cx, cy, length[i], width[i], ang), hgt[i], buildings)
    # a warehouse or two at the edge of some towns
    for _ in range(int(rng.integers(0, 3))):
        phi = rng.uniform(0, 2 * math.pi)
        c = centre + 0.8 * radius * np.array([math.cos(phi), math.sin(phi)])
        rect = _rect(c[0], c[1], rng.uniform(6, 14) * k, rng.uniform(4, 8) * k, g + rng.normal(0, 0.03))
        _try_building(labels, occ, allowed, rect, rng.uniform(8, 15), buildings)


def _farmsteads(
    rng: np.random.Generator,
    labels: np.ndarray,
    road_mask: np.ndarray,
    n: int,
    k: float,
    out: list[_Building],
) -> None:
    """Small clusters of 2-6 buildings in a yard next to a road."""
    h, w = labels.shape
    ry, rx = np.nonzero(road_mask)
    if len(rx) == 0:
        return
    for _ in range(n):
        j = int(rng.integers(0, len(rx)))
        phi = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(5, 10) * k
        cx, cy = rx[j] + dist * math.cos(phi), ry[j] + dist * math.sin(phi)
        if not (0 <= cx < w and 0 <= cy < h) or labels[int(cy), int(cx)] in (WATER, ROAD, URBAN, BUILDING):
            continue
        yard = np.zeros((h, w), np.uint8)
        _fill(yard, _blob_poly(rng, cx, cy, rng.uniform(3.5, 7) * k, rough=0.25, n=20), 1)
        yard_m = (yard > 0) & ~np.isin(labels, (WATER, ROAD, TRACK, BUILDING))
        labels[yard_m] = URBAN
        occ = _occupied(labels)
        ang = rng.uniform(0, math.pi)
        for _ in range(int(rng.integers(3, 9))):
            c = np.array([cx, cy]) + rng.normal(0, 2.5 * k, 2)
            length = rng.uniform(1.5, 5.5) * k
            width = min(length, rng.uniform(1.0, 2.6) * k)
            a = ang + (math.pi / 2 if rng.random() < 0.4 else 0.0) + rng.normal(0, 0.03)
            _try_building(labels, occ, yard_m, _rect(c[0], c[1], length, width, a), rng.uniform(5, 12), out)


def _make_layout(cfg: SynthConfig, rng: np.random.Generator) -> _Layout:
    h, w = int(cfg.height_px), int(cfg.width_px)
    k = 10.0 / float(cfg.gsd_m)
    area_ratio = (h * w) / (k * k) / (_REF_SIDE * _REF_SIDE)  # physical area vs a 768 px, 10 m scene

    # 1. field patchwork
    polys, axes, cuts = _patchwork(rng, h, w, k)
    field_id = np.zeros((h, w), np.int32)
    for i, poly in enumerate(polys):
        _fill(field_id, poly, i)
    n_fields = len(polys)
    cls_p = np.array([0.18, 0.18, 0.16, 0.14, 0.13, 0.15, 0.05])
    cls_of = np.array([GRASS, CROP_A, CROP_B, CROP_C, CROP_D, BARE, FOREST], np.uint8)
    field_cls = cls_of[rng.choice(len(cls_of), size=n_fields, p=cls_p / cls_p.sum())]
    labels = field_cls[field_id]

    # 2. forest blobs (irregular, bounded in size by the noise scale)
    fbm = _smooth_noise(rng, h, w, 80 * k) + 0.45 * _smooth_noise(rng, h, w, 20 * k)
    frac = rng.uniform(0.04, 0.1)
    thr = float(np.quantile(fbm[::4, ::4], 1.0 - frac))
    labels[fbm > thr] = FOREST

    # 3. hedgerows on field boundaries in "bocage" regions
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= field_id[:, :-1] != field_id[:, 1:]
    edge[:-1, :] |= field_id[:-1, :] != field_id[1:, :]
    bocage = _smooth_noise(rng, h, w, 150 * k) > rng.uniform(-0.3, 0.6)
    gaps = _smooth_noise(rng, h, w, 6 * k) > -0.4
    labels[edge & bocage & gaps & _IS_FIELD[labels]] = HEDGE

    # 4. roads: main (wandering), field-edge roads and tracks (along patchwork cuts)
    main_paths = [_wander(rng, h, w, 6.0 * k, 0.05) for _ in range(1 + int(rng.poisson(1.6 * math.sqrt(area_ratio))))]
    roads = np.zeros((h, w), np.uint8)
    tracks = np.zeros((h, w), np.uint8)
    for seg, depth in cuts:
        length = float(np.hypot(*(seg[1] - seg[0])))
        if depth <= 3 and length > 100 * k and rng.random() < 0.5:
            _polyline(roads, seg, 1, max(1, round(1.0 * k)))
        elif depth >= 3 and rng.random() < 0.1:
            _polyline(tracks, seg, 1, max(1, round(0.8 * k)))
    for path in main_paths:
        _polyline(roads, path, 1, max(1, round(2.0 * k)))
    no_lake = cv2.dilate(roads | tracks, np.ones((5, 5), np.uint8)) > 0

    # 5. water: a meandering river (most scenes), lakes, ponds
    water = np.zeros((h, w), np.uint8)
    if rng.random() < 0.8:
        step = 2.0 * k
        path = _wander(rng, h, w, step, 0.02, (rng.uniform(0.5, 1.1), rng.uniform(120, 320) * k))
        w0 = rng.uniform(2.5, 9.0) * k
        wid = w0 * (1.0 + 0.3 * np.sin(np.arange(len(path)) * step / (200 * k) + rng.uniform(0, 6.3)))
        for i in range(len(path) - 1):
            _polyline(water, path[i : i + 2], 1, max(1, round(wid[i])))
        if rng.random() < 0.6:  # riparian trees
            n_it = max(1, round(rng.uniform(2, 4) * k))
            rip = cv2.dilate(water, np.ones((3, 3), np.uint8), iterations=n_it)
            rip_m = (rip > 0) & (_smooth_noise(rng, h, w, 10 * k) > 0.0) & _IS_FIELD[labels]
            labels[rip_m] = FOREST
    lakes = [(rng.uniform(8, 38) * k, 40) for _ in range(int(rng.poisson(1.2 * area_ratio)))]
    lakes += [(rng.uniform(1.5, 4.0) * k, 12) for _ in range(int(rng.poisson(5 * area_ratio)))]
    for r, n_vert in lakes:  # lakes and ponds keep clear of roads
        for _ in range(10):
            blob = np.zeros((h, w), np.uint8)
            _fill(blob, _blob_poly(rng, rng.uniform(0, w), rng.uniform(0, h), r, n=n_vert), 1)
            if not no_lake[blob > 0].any():
                water |= blob
                break
    labels[water > 0] = WATER

    # 6. towns on the main roads (street grids drawn inside _town)
    buildings: list[_Building] = []
    n_towns = max(1, int(rng.poisson(1.8 * area_ratio)))
    cnt = np.bincount(field_id.ravel(), minlength=n_fields).astype(np.float64)
    yy, xx = np.indices((h, w), dtype=np.float64)
    fcx = np.bincount(field_id.ravel(), xx.ravel(), n_fields) / np.maximum(cnt, 1)
    fcy = np.bincount(field_id.ravel(), yy.ravel(), n_fields) / np.maximum(cnt, 1)
    town_sites = []
    for t in range(n_towns):
        path = main_paths[t % len(main_paths)]
        inside = np.nonzero(
            (path[:, 0] > 0.1 * w) & (path[:, 0] < 0.9 * w) & (path[:, 1] > 0.1 * h) & (path[:, 1] < 0.9 * h)
        )[0]
        inside = inside[inside < len(path) - 1]
        if len(inside) == 0:
            site = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h])
            town_sites.append((site, rng.uniform(0, math.pi)))
            continue
        j = int(rng.choice(inside))
        d = path[j + 1] - path[j]
        town_sites.append((path[j], math.atan2(d[1], d[0])))
    labels[(tracks > 0) & (labels != WATER)] = TRACK
    labels[roads > 0] = ROAD  # roads cross water on bridges
    for centre, heading in town_sites:
        _town(rng, labels, centre, heading, k, buildings, (field_id, cnt, fcx, fcy))
    labels[roads > 0] = ROAD  # main roads run through towns
    _farmsteads(rng, labels, roads, int(rng.poisson(9 * area_ratio)), k, buildings)

    return _Layout(
        labels=labels.astype(np.uint8),
        field_id=field_id,
        field_axis=np.asarray(axes, np.float32),
        buildings=buildings,
        forest_height_m=float(rng.uniform(15, 25)),
        k=k,
    )


# ----------------------------------------------------------------------------------------------
# change between the optical and the SAR date


def _apply_changes(
    lay: _Layout, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[_Building], np.ndarray]:
    """Return SAR-date labels, SAR-date buildings and the 0/255 change mask."""
    labels = lay.labels.copy()
    buildings = list(lay.buildings)
    h, w = labels.shape
    k = lay.k
    target = fraction * h * w
    changed = np.zeros((h, w), bool)
    if target < 1:
        return labels, buildings, changed.astype(np.uint8)
    kinds = ("recultivate", "construction", "clearing", "flood")
    prob = np.array([0.5, 0.2, 0.15, 0.15])
    for _ in range(60):
        remaining = target - changed.sum()
        if remaining <= 0.1 * target:
            break
        kind = kinds[int(rng.choice(4, p=prob))]
        r_max = 15 * k if kind == "construction" else 35 * k
        r = float(np.clip(math.sqrt(remaining / math.pi) * rng.uniform(0.6, 1.1), 5 * k, r_max))
        blob = np.zeros((h, w), np.uint8)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        _fill(blob, _blob_poly(rng, cx, cy, r, rough=0.3), 1)
        blob_m = blob > 0
        is_field = _IS_FIELD[labels] & ~changed
        if kind == "recultivate":
            fids = lay.field_id[blob_m & is_field]
            if len(fids) == 0:
                continue
            f = int(np.bincount(fids).argmax())
            m = (lay.field_id == f) & is_field
            if m.sum() > 1.5 * remaining + 50:
                m &= blob_m
            old = int(np.bincount(labels[m]).argmax())
            new = int(rng.choice([c for c in FIELD_CLASSES if c != old]))
            labels[m] = new
        elif kind == "construction":
            m = blob_m & is_field
            if m.sum() < 10 * k * k:
                continue
            labels[m] = URBAN
            occ = _occupied(labels)
            ang = rng.uniform(0, math.pi)
            ys, xs = np.nonzero(m)
            for _ in range(int(m.sum() / (4.0 * k * k)) + 3):
                j = int(rng.integers(0, len(xs)))
                length = rng.uniform(1.5, 7.0) * k
                width = min(length, rng.uniform(1.0, 4.0) * k)
                a = ang + (math.pi / 2 if rng.random() < 0.3 else 0.0) + rng.normal(0, 0.02)
                rect = _rect(xs[j], ys[j], length, width, a)
                _try_building(labels, occ, m, rect, rng.uniform(6, 25), buildings)
        elif kind == "clearing":
            m = blob_m & (labels == FOREST) & ~changed
            if m.sum() < 10 * k * k:
                continue
            labels[m] = BARE
        else:
            m = blob_m & is_field
            if m.sum() < 10 * k * k:
                continue
            labels[m] = WATER
        changed |= labels != lay.labels
    return labels, buildings, (changed.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------------------------
# optical rendering

# Per-class RGB palettes: several phenology / management states per class.
_PALETTES: dict[int, list[tuple[int, int, int]]] = {
    GRASS: [(92, 128, 60), (112, 140, 72), (128, 146, 88), (140, 150, 96)],
    CROP_A: [(186, 170, 112), (152, 160, 92), (112, 146, 70), (204, 186, 132)],
    CROP_B: [(84, 122, 52), (120, 132, 80), (152, 130, 98), (70, 108, 48)],
    CROP_C: [(208, 198, 92), (104, 138, 62), (170, 152, 120), (150, 170, 90)],
    CROP_D: [(132, 118, 92), (96, 134, 84), (162, 142, 112), (120, 150, 110)],
    BARE: [(146, 116, 90), (122, 100, 80), (172, 148, 120), (110, 92, 78)],
}
_CLASS_RGB = {
    FOREST: (46, 74, 38),
    WATER: (30, 52, 62),
    ROAD: (104, 104, 102),
    TRACK: (176, 160, 130),
    URBAN: (140, 134, 126),
    BUILDING: (150, 150, 150),
    HEDGE: (48, 76, 38),
}
_ROOFS = [(168, 74, 58), (150, 66, 52), (98, 98, 104), (172, 172, 170), (228, 226, 220), (128, 98, 78)]
_ROOF_P = np.array([0.25, 0.15, 0.2, 0.15, 0.15, 0.1])


def _render_optical(lay: _Layout, rng: np.random.Generator, gsd_m: float) -> np.ndarray:
    labels, fid = lay.labels, lay.field_id
    h, w = labels.shape
    k = lay.k
    nf = len(lay.field_axis)
    img = np.zeros((h, w, 3), np.float32)
    for c, rgb in _CLASS_RGB.items():
        img[labels == c] = rgb

    # fields: per (field, class) colour with a random tint
    lut = np.zeros((nf * _NC, 3), np.float32)
    idx = np.arange(nf) * _NC
    for c in FIELD_CLASSES:
        pal = np.asarray(_PALETTES[c], np.float32)
        col = pal[rng.integers(0, len(pal), nf)] * rng.normal(1.0, 0.07, (nf, 1)) + rng.normal(0, 7, (nf, 3))
        lut[idx + c] = col
    fm = _IS_FIELD[labels]
    key = fid * _NC + labels
    img[fm] = lut[key[fm]]
    # tramline / row stripes with a per-field orientation, period and strength
    ang = lay.field_axis + np.where(rng.random(nf) < 0.35, math.pi / 2, 0.0) + rng.normal(0, 0.05, nf)
    period = rng.uniform(2.2, 5.0, nf) * k
    amp = rng.uniform(0.0, 0.13, nf) * (rng.random(nf) > 0.2)
    phase = rng.uniform(0, 2 * math.pi, nf)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = np.clip(fid, 0, nf - 1)
    arg = (xx * np.cos(ang)[f] + yy * np.sin(ang)[f]) * (2 * math.pi / period[f]) + phase[f]
    stripes = 1.0 + (amp[f] * np.sin(arg)).astype(np.float32)
    soil = 1.0 + 0.06 * _smooth_noise(rng, h, w, 14 * k)
    img[fm] *= (stripes * soil)[fm, None]
    # field margins: a thin lighter or darker line where fields meet
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= fid[:, :-1] != fid[:, 1:]
    edge[:-1, :] |= fid[:-1, :] != fid[1:, :]
    img[edge & fm] *= rng.uniform(0.85, 1.12)

    # forest / hedges: crown texture, deciduous vs conifer mix
    crown = _fine_noise(rng, h, w, 0.8 * k)
    mix = (_smooth_noise(rng, h, w, 60 * k) > 0.3)[..., None]
    veg = (labels == FOREST) | (labels == HEDGE)
    tex = np.where(mix, np.float32([0.78, 0.86, 1.0]), np.float32([1.0, 1.0, 1.0]))
    img[veg] *= tex[veg] * (1.0 + 0.22 * crown[veg, None])

    # water: wind texture, greener shallow margins
    wm = labels == WATER
    if wm.any():
        dist = cv2.distanceTransform(wm.astype(np.uint8), cv2.DIST_L2, 3)
        shallow = np.clip(1.0 - dist / (2.0 * k), 0, 1)[..., None]
        tint = np.float32(rng.normal(0, 5, 3))
        wc = np.float32(_CLASS_RGB[WATER]) + tint + shallow * np.float32([18, 22, 4])
        img[wm] = wc[wm] * (1.0 + 0.04 * _smooth_noise(rng, h, w, 20 * k)[wm, None])

    # urban ground: paved vs gardens
    um = labels == URBAN
    garden = (_smooth_noise(rng, h, w, 3 * k) > -0.3)[..., None]
    uc = np.where(garden, np.float32([94, 118, 72]), np.float32([142, 136, 128]))
    img[um] = uc[um] * (1.0 + 0.08 * crown[um, None])

    # roofs: random colours, pitched roofs lit on one side
    hm = np.zeros((h, w), np.uint8)
    for b in lay.buildings:
        rgb = np.float32(_ROOFS[int(rng.choice(len(_ROOFS), p=_ROOF_P))]) * rng.normal(1.0, 0.06)
        c = b.corners
        if rng.random() < 0.7:  # gable roof: ridge along the long axis
            m1 = 0.5 * (c[1] + c[2])
            m0 = 0.5 * (c[3] + c[0])
            _fill(img, np.stack([c[0], c[1], m1, m0]), tuple(float(x) for x in rgb))
            _fill(img, np.stack([m0, m1, c[2], c[3]]), tuple(float(x) for x in rgb * 0.8))
        else:
            _fill(img, c, tuple(float(x) for x in rgb))
        _fill(hm, c, 1)

    # cast shadows away from a southern sun
    az = math.radians(rng.uniform(120, 240))
    el = math.radians(rng.uniform(30, 60))
    to_sun = np.array([math.sin(az), -math.cos(az)])
    shadow = np.zeros((h, w), np.uint8)
    for b in lay.buildings:
        off = -to_sun * b.height_m / math.tan(el) / gsd_m
        hull = cv2.convexHull(np.concatenate([b.corners, b.corners + off]).astype(np.float32))
        _fill(shadow, hull.reshape(-1, 2), 1)
    fl = lay.forest_height_m / math.tan(el) / gsd_m
    fmask = ((labels == FOREST) | (labels == HEDGE)).astype(np.uint8)
    n_sh = max(1, round(fl))
    for i in range(1, n_sh + 1):
        t = fl * i / n_sh
        shadow |= _shift(fmask, round(-to_sun[0] * t), round(-to_sun[1] * t))
    sm = (shadow > 0) & (hm == 0) & (fmask == 0)
    img[sm] *= np.float32([0.5, 0.53, 0.62])

    # sensor look: fine grain, slight haze, large-scale illumination, mild blur
    img *= (1.0 + 0.05 * _fine_noise(rng, h, w, 0.0) + 0.03 * _smooth_noise(rng, h, w, 250 * k))[..., None]
    img = img * rng.uniform(1.0, 1.08) + np.float32([6, 8, 12])
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# SAR rendering


def _render_sar(
    labels: np.ndarray, lay: _Layout, buildings: list[_Building], rng: np.random.Generator, gsd_m: float
) -> np.ndarray:
    """Linear-power SAR (sensor looking toward +x), scaled to [0, 1] at the 99.5th percentile."""
    fid = lay.field_id
    h, w = labels.shape
    k = lay.k
    nf = len(lay.field_axis)
    # per-class sigma0 levels (dB), redrawn for every scene: crop type says little about brightness
    level = np.full(_NC, -12.0, np.float32)
    for c in (CROP_A, CROP_B, CROP_C, CROP_D):
        level[c] = rng.uniform(-16, -8)
    level[GRASS] = rng.uniform(-15, -11)
    level[BARE] = rng.uniform(-19, -11)
    level[FOREST] = rng.uniform(-8.5, -6.5)
    level[WATER] = rng.uniform(-26, -21)
    level[ROAD] = rng.uniform(-22, -18)
    level[TRACK] = rng.uniform(-15, -11)
    level[URBAN] = rng.uniform(-11, -8)
    level[BUILDING] = -16.0  # footprint at ground position: mostly hidden behind the displaced roof
    level[HEDGE] = level[FOREST] + rng.uniform(0.5, 2.0)
    db = level[labels]

    # fields: independent per-field offset (moisture, growth stage) and within-field texture
    fm = _IS_FIELD[labels]
    off = rng.normal(0, 2.0, nf * _NC).astype(np.float32)
    db[fm] += off[(fid * _NC + labels)[fm]]
    db[fm] += (1.0 * _smooth_noise(rng, h, w, 12 * k))[fm]
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= fid[:, :-1] != fid[:, 1:]
    edge[:-1, :] |= fid[:-1, :] != fid[1:, :]
    db[edge & fm] += rng.uniform(1.0, 2.5)

    # forest: volume texture; water: wind roughening; urban: point scatterers
    veg = (labels == FOREST) | (labels == HEDGE)
    tex = 1.3 * _fine_noise(rng, h, w, 1.2 * k) + 0.8 * _smooth_noise(rng, h, w, 30 * k)
    db[veg] += tex[veg]
    wm = labels == WATER
    db[wm] += (1.5 * _smooth_noise(rng, h, w, 40 * k))[wm]
    um = labels == URBAN
    pts = um & (rng.random((h, w)) < 0.05)
    db[pts] += rng.uniform(6, 14, int(pts.sum())).astype(np.float32)

    # forest edges: canopy layover toward the sensor (-x), radar shadow behind (+x)
    theta = math.radians(rng.uniform(30, 45))
    fmask = (labels == FOREST).astype(np.uint8)
    lf = lay.forest_height_m / math.tan(theta) / gsd_m
    sf = lay.forest_height_m * math.tan(theta) / gsd_m
    near = _sweep(fmask, max(1, round(0.5 * lf)), -1).astype(bool) & (fmask == 0)
    far = _sweep(fmask, max(1, round(sf)), +1).astype(bool) & (fmask == 0)
    db[near] = np.maximum(db[near], level[FOREST] + 2.5)
    db[far] = np.minimum(db[far], -21.0)

    p = np.power(np.float32(10.0), db / np.float32(10.0)).astype(np.float32)

    # buildings: shadow, layover (wall + roof displaced toward -x), double bounce at the near wall
    shadow = np.zeros((h, w), np.uint8)
    bright = np.zeros((h, w), np.float32)
    order = sorted(range(len(buildings)), key=lambda i: -float(buildings[i].corners[:, 0].mean()))
    for i in order:
        b = buildings[i]
        c = b.corners
        lo = b.height_m / math.tan(theta) / gsd_m
        sh = b.height_m * math.tan(theta) / gsd_m
        hull = cv2.convexHull(np.concatenate([c, c + np.array([sh, 0.0])]).astype(np.float32)).reshape(-1, 2)
        _fill(shadow, hull, 1)
    for i in order:
        b = buildings[i]
        c = b.corners
        lo = b.height_m / math.tan(theta) / gsd_m
        hull = cv2.convexHull(np.concatenate([c, c - [lo, 0.0]]).astype(np.float32)).reshape(-1, 2)
        _fill(bright, hull, float(10 ** (rng.uniform(-1, 5) / 10)))
        _fill(bright, c - [lo, 0.0], float(10 ** (rng.uniform(-10, 3) / 10)))
        cen = c.mean(0)
        for j in range(4):
            a, e = c[j], c[(j + 1) % 4]
            mid = 0.5 * (a + e)
            d = e - a
            nrm = np.array([d[1], -d[0]]) / (np.hypot(*d) + 1e-9)
            if np.dot(nrm, mid - cen) < 0:
                nrm = -nrm
            if nrm[0] < -0.2:  # wall faces the sensor
                val = 10 ** (rng.uniform(8, 15) / 10) * abs(nrm[0]) ** 4
                cv2.line(bright, tuple(_pts(a)[0, 0]), tuple(_pts(e)[0, 0]), (float(val),), 1, cv2.LINE_8, 4)
    sm = shadow > 0
    p[sm] = np.minimum(p[sm], np.float32(10 ** (-23 / 10)))
    p = np.where(bright > 0, p + bright, p)
    # impulse response: a little blur before speckle
    p = cv2.GaussianBlur(p, (0, 0), 0.5)

    # multiplicative Gamma speckle (L looks) plus thermal noise
    looks = rng.uniform(3.0, 4.0)
    p *= rng.gamma(looks, 1.0 / looks, (h, w)).astype(np.float32)
    p += np.float32(10 ** (-25 / 10)) * rng.exponential(1.0, (h, w)).astype(np.float32)
    top = float(np.percentile(p, 99.5))
    return np.clip(p / max(top, 1e-12), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# public API


def generate_scene(cfg: SynthConfig, *, extras: bool = False) -> dict[str, np.ndarray]:
    """Generate one co-registered synthetic SAR/optical scene.

    Args:
        cfg: scene parameters; the same config always gives the same arrays.
        extras: also return ``labels_sar`` (land cover at the SAR date) and ``field_id``.

    Returns:
        ``optical`` (H, W, 3) uint8 RGB, ``sar`` (H, W) float32 linear power in [0, 1],
        ``change_mask`` (H, W) uint8 0/255 and ``labels`` (H, W) uint8 land-cover class at the
        optical date (see ``CLASS_NAMES``).

    Raises:
        ConfigError: a configuration value is out of range.
    """
    _validate(cfg)
    ss = np.random.SeedSequence(int(cfg.seed))
    s_layout, s_change, s_opt, s_sar = (np.random.default_rng(s) for s in ss.spawn(4))
    gsd = float(cfg.gsd_m)
    lay = _make_layout(cfg, s_layout)
    labels_sar, buildings_sar, change = _apply_changes(lay, float(cfg.change_fraction), s_change)
    optical = _render_optical(lay, s_opt, gsd)
    sar = _render_sar(labels_sar, lay, buildings_sar, s_sar, gsd)
    out = {"optical": optical, "sar": sar, "change_mask": change, "labels": lay.labels}
    if extras:
        out["labels_sar"] = labels_sar
        out["field_id"] = lay.field_id
    return out


def make_preview(scene: dict[str, np.ndarray]) -> np.ndarray:
    """Side-by-side RGB preview: optical | SAR in dB (2-98 % stretch) | change mask.

    Args:
        scene: the dict returned by :func:`generate_scene`.

    Returns:
        (H, 3W + 8, 3) uint8 RGB image.
    """
    opt = scene["optical"]
    h = opt.shape[0]
    db = 10.0 * np.log10(np.maximum(scene["sar"].astype(np.float64), 1e-6))
    lo, hi = np.percentile(db, [2, 98])
    sar8 = np.clip((db - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    sep = np.full((h, 4, 3), 255, np.uint8)
    cm = scene["change_mask"]
    panels = [opt, sep, np.repeat(sar8[..., None], 3, 2), sep, np.repeat(cm[..., None], 3, 2)]
    return np.concatenate(panels, axis=1)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - cv2 always encodes uint8 PNG
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def write_scene(
    out_dir: Path, cfg: SynthConfig = _DEFAULT_CFG, name: str | None = None, *, force: bool = False
) -> Path:
    """Generate a scene and write it as a scene folder (``scene.json`` + images).

    Files are written to a temporary name in the same folder and renamed, ``scene.json`` last.

    Args:
        out_dir: folder to create (parents included).
        cfg: scene parameters.
        name: scene name in ``scene.json``; default ``synth_seed<seed>``.
        force: overwrite the scene files in an existing non-empty folder.

    Returns:
        ``out_dir``.

    Raises:
        SarlocError: ``out_dir`` exists and is not empty and ``force`` is false, or it is a file.
        ConfigError: a configuration value is out of range.
    """
    import io

    import tifffile

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SarlocError(f"synth: {out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise SarlocError(f"synth: output folder {out_dir} is not empty; choose an empty folder or pass --force")
    scene = generate_scene(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)

    files: dict[str, bytes] = {}
    files["optical.png"] = _png_bytes(cv2.cvtColor(scene["optical"], cv2.COLOR_RGB2BGR))
    buf = io.BytesIO()
    tifffile.imwrite(buf, scene["sar"].astype(np.float32), photometric="minisblack")
    files["sar.tif"] = buf.getvalue()
    files["change_mask.png"] = _png_bytes(scene["change_mask"])
    sha = {fname: hashlib.sha256(data).hexdigest() for fname, data in files.items()}
    for fname, data in files.items():
        _atomic_write(out_dir / fname, data)

    gsd = float(cfg.gsd_m)
    x0, y0 = (float(v) for v in cfg.origin_en)
    seed = int(cfg.seed)
    meta = {
        "name": name if name is not None else f"synth_seed{seed}",
        "description": f"Synthetic co-registered SAR/optical scene generated by sarloc synth (seed {seed})",
        "optical": {
            "file": "optical.png",
            "sha256": sha["optical.png"],
            "bands": ["R", "G", "B"],
            "scale": "display8",
        },
        "sar": {
            "file": "sar.tif",
            "sha256": sha["sar.tif"],
            "bands": ["VV"],
            "scale": "linear_0_1",
            "sensor": "synthetic",
        },
        "change_mask": {
            "file": "change_mask.png",
            "sha256": sha["change_mask.png"],
            "meaning": "255 = land cover changed between the two dates",
        },
        "crs": cfg.crs,
        "geotransform": [x0, gsd, 0.0, y0, 0.0, -gsd],
        "gsd_m": [gsd, gsd],
        "co_registration_px": 0,
        "source": {"generator": "sarloc.sim.scenes", "seed": seed, "version": _FORMAT_VERSION},
        "license": "generated; CC0",
    }
    _atomic_write(out_dir / "scene.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return out_dir
