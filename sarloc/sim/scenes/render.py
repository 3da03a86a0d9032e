"""Optical and SAR rendering of a synthetic scene's layout (see :mod:`sarloc.sim.scenes`)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from sarloc.sim.scenes.common import (
    _IS_FIELD,
    _NC,
    BARE,
    BUILDING,
    CROP_A,
    CROP_B,
    CROP_C,
    CROP_D,
    FIELD_CLASSES,
    FOREST,
    GRASS,
    HEDGE,
    ROAD,
    TRACK,
    URBAN,
    WATER,
    _Building,
    _fill,
    _fine_noise,
    _Layout,
    _pts,
    _shift,
    _smooth_noise,
    _sweep,
)

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


def _optical_fields(img: np.ndarray, lay: _Layout, rng: np.random.Generator) -> None:
    """Fields (in place on ``img``): per (field, class) colour with a tint, row stripes, soil texture, margins."""
    labels, fid = lay.labels, lay.field_id
    h, w = labels.shape
    k = lay.k
    nf = len(lay.field_axis)
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


def _optical_cover(img: np.ndarray, lay: _Layout, rng: np.random.Generator) -> None:
    """Forest, hedges, water and urban ground (in place on ``img``)."""
    labels = lay.labels
    h, w = labels.shape
    k = lay.k
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


def _optical_buildings(img: np.ndarray, lay: _Layout, rng: np.random.Generator, gsd_m: float) -> None:
    """Roofs, and the cast shadows of buildings and trees from a random sun (in place on ``img``)."""
    labels = lay.labels
    h, w = labels.shape
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


def _render_optical(lay: _Layout, rng: np.random.Generator, gsd_m: float) -> np.ndarray:
    """8-bit RGB of the layout: class colours, then fields, cover, buildings and the sensor look, in this order."""
    labels = lay.labels
    h, w = labels.shape
    k = lay.k
    img = np.zeros((h, w, 3), np.float32)
    for c, rgb in _CLASS_RGB.items():
        img[labels == c] = rgb
    _optical_fields(img, lay, rng)
    _optical_cover(img, lay, rng)
    _optical_buildings(img, lay, rng, gsd_m)

    # sensor look: fine grain, slight haze, large-scale illumination, mild blur
    img *= (1.0 + 0.05 * _fine_noise(rng, h, w, 0.0) + 0.03 * _smooth_noise(rng, h, w, 250 * k))[..., None]
    img = img * rng.uniform(1.0, 1.08) + np.float32([6, 8, 12])
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# SAR rendering


def _sar_levels(rng: np.random.Generator) -> np.ndarray:
    """Per-class sigma0 levels (dB), redrawn for every scene: crop type says little about brightness."""
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
    return level


def _sar_texture(db: np.ndarray, labels: np.ndarray, lay: _Layout, rng: np.random.Generator) -> None:
    """Per-field offsets and texture, forest volume, water roughening, urban point scatterers (in place, dB)."""
    fid = lay.field_id
    h, w = labels.shape
    k = lay.k
    nf = len(lay.field_axis)
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


def _sar_forest_edges(
    db: np.ndarray, labels: np.ndarray, lay: _Layout, level: np.ndarray, theta: float, gsd_m: float
) -> None:
    """Forest edges (in place, dB): canopy layover toward the sensor (-x), radar shadow behind (+x)."""
    fmask = (labels == FOREST).astype(np.uint8)
    lf = lay.forest_height_m / math.tan(theta) / gsd_m
    sf = lay.forest_height_m * math.tan(theta) / gsd_m
    near = _sweep(fmask, max(1, round(0.5 * lf)), -1).astype(bool) & (fmask == 0)
    far = _sweep(fmask, max(1, round(sf)), +1).astype(bool) & (fmask == 0)
    db[near] = np.maximum(db[near], level[FOREST] + 2.5)
    db[far] = np.minimum(db[far], -21.0)


def _sar_buildings(
    p: np.ndarray, buildings: list[_Building], theta: float, rng: np.random.Generator, gsd_m: float
) -> np.ndarray:
    """Buildings on linear power ``p``: shadow, layover (wall + roof displaced toward -x), double bounce at the
    near wall."""
    h, w = p.shape
    shadow = np.zeros((h, w), np.uint8)
    bright = np.zeros((h, w), np.float32)
    order = sorted(range(len(buildings)), key=lambda i: -float(buildings[i].corners[:, 0].mean()))
    for i in order:
        b = buildings[i]
        c = b.corners
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
    return np.where(bright > 0, p + bright, p)


def _render_sar(
    labels: np.ndarray, lay: _Layout, buildings: list[_Building], rng: np.random.Generator, gsd_m: float
) -> np.ndarray:
    """Linear-power SAR (sensor looking toward +x), scaled to [0, 1] at the 99.5th percentile."""
    h, w = labels.shape
    level = _sar_levels(rng)
    db = level[labels]
    _sar_texture(db, labels, lay, rng)
    theta = math.radians(rng.uniform(30, 45))
    _sar_forest_edges(db, labels, lay, level, theta, gsd_m)

    p = np.power(np.float32(10.0), db / np.float32(10.0)).astype(np.float32)
    p = _sar_buildings(p, buildings, theta, rng, gsd_m)
    # impulse response: a little blur before speckle
    p = cv2.GaussianBlur(p, (0, 0), 0.5)

    # multiplicative Gamma speckle (L looks) plus thermal noise
    looks = rng.uniform(3.0, 4.0)
    p *= rng.gamma(looks, 1.0 / looks, (h, w)).astype(np.float32)
    p += np.float32(10 ** (-25 / 10)) * rng.exponential(1.0, (h, w)).astype(np.float32)
    top = float(np.percentile(p, 99.5))
    return np.clip(p / max(top, 1e-12), 0.0, 1.0).astype(np.float32)
