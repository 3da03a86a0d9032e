"""Land-cover layout of a synthetic scene (field patchwork, forest, hedges, roads, water, towns, farmsteads) and
the changes between the optical and the SAR date (see :mod:`sarloc.sim.scenes`)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from sarloc.sim.scenes.common import (
    _IS_FIELD,
    _REF_SIDE,
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
    SynthConfig,
    _blob_poly,
    _Building,
    _clip_halfplane,
    _fill,
    _Layout,
    _polyline,
    _pts,
    _rect,
    _smooth_noise,
)

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


def _fields(
    rng: np.random.Generator, h: int, w: int, k: float
) -> tuple[np.ndarray, np.ndarray, list[float], list[tuple[np.ndarray, int]]]:
    """Step 1, the field patchwork: field-id map, land cover drawn per field, field axes and patchwork cuts."""
    polys, axes, cuts = _patchwork(rng, h, w, k)
    field_id = np.zeros((h, w), np.int32)
    for i, poly in enumerate(polys):
        _fill(field_id, poly, i)
    n_fields = len(polys)
    cls_p = np.array([0.18, 0.18, 0.16, 0.14, 0.13, 0.15, 0.05])
    cls_of = np.array([GRASS, CROP_A, CROP_B, CROP_C, CROP_D, BARE, FOREST], np.uint8)
    field_cls = cls_of[rng.choice(len(cls_of), size=n_fields, p=cls_p / cls_p.sum())]
    labels = field_cls[field_id]
    return field_id, labels, axes, cuts


def _forest_and_hedges(rng: np.random.Generator, labels: np.ndarray, field_id: np.ndarray, k: float) -> None:
    """Steps 2 and 3 (in place on ``labels``): forest blobs, hedgerows on field boundaries."""
    h, w = labels.shape
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


def _roads(
    rng: np.random.Generator, h: int, w: int, k: float, cuts: list[tuple[np.ndarray, int]], area_ratio: float
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Step 4: main roads (wandering), field-edge roads and tracks (along patchwork cuts).

    Returns:
        The main road paths, the road mask and the track mask (uint8).
    """
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
    return main_paths, roads, tracks


def _water(rng: np.random.Generator, labels: np.ndarray, no_lake: np.ndarray, k: float, area_ratio: float) -> None:
    """Step 5 (in place on ``labels``): a meandering river (most scenes) with riparian trees, lakes, ponds."""
    h, w = labels.shape
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


def _town_sites(
    rng: np.random.Generator, main_paths: list[np.ndarray], n_towns: int, h: int, w: int
) -> list[tuple[np.ndarray, float]]:
    """(centre, street heading) of each town: a point of a main road away from the border, or anywhere."""
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
    return town_sites


def _settlements(
    rng: np.random.Generator,
    labels: np.ndarray,
    field_id: np.ndarray,
    n_fields: int,
    network: tuple[list[np.ndarray], np.ndarray, np.ndarray],
    k: float,
    area_ratio: float,
) -> list[_Building]:
    """Step 6 (in place on ``labels``): roads and tracks drawn in, towns on the main roads (street grids drawn
    inside :func:`_town`), farmsteads; returns the buildings.

    Args:
        network: main road paths, road mask and track mask from :func:`_roads`.
    """
    h, w = labels.shape
    main_paths, roads, tracks = network
    buildings: list[_Building] = []
    n_towns = max(1, int(rng.poisson(1.8 * area_ratio)))
    cnt = np.bincount(field_id.ravel(), minlength=n_fields).astype(np.float64)
    yy, xx = np.indices((h, w), dtype=np.float64)
    fcx = np.bincount(field_id.ravel(), xx.ravel(), n_fields) / np.maximum(cnt, 1)
    fcy = np.bincount(field_id.ravel(), yy.ravel(), n_fields) / np.maximum(cnt, 1)
    town_sites = _town_sites(rng, main_paths, n_towns, h, w)
    labels[(tracks > 0) & (labels != WATER)] = TRACK
    labels[roads > 0] = ROAD  # roads cross water on bridges
    for centre, heading in town_sites:
        _town(rng, labels, centre, heading, k, buildings, (field_id, cnt, fcx, fcy))
    labels[roads > 0] = ROAD  # main roads run through towns
    _farmsteads(rng, labels, roads, int(rng.poisson(9 * area_ratio)), k, buildings)
    return buildings


def _make_layout(cfg: SynthConfig, rng: np.random.Generator) -> _Layout:
    """The land cover of the optical date, drawn in six steps (every random draw in a fixed order)."""
    h, w = int(cfg.height_px), int(cfg.width_px)
    k = 10.0 / float(cfg.gsd_m)
    area_ratio = (h * w) / (k * k) / (_REF_SIDE * _REF_SIDE)  # physical area vs a 768 px, 10 m scene

    field_id, labels, axes, cuts = _fields(rng, h, w, k)
    _forest_and_hedges(rng, labels, field_id, k)
    main_paths, roads, tracks = _roads(rng, h, w, k, cuts, area_ratio)
    no_lake = cv2.dilate(roads | tracks, np.ones((5, 5), np.uint8)) > 0
    _water(rng, labels, no_lake, k, area_ratio)
    buildings = _settlements(rng, labels, field_id, len(axes), (main_paths, roads, tracks), k, area_ratio)

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
