"""Simulated SAR strip flights over a scene (torch-free): the replay input of the runtime and its ground truth.

:func:`simulate_flight` plans a track inside the scene, cuts strips from ``scene.sar_gray`` with the exact strip
geometry of :mod:`sarloc.runtime.types` and writes a folder that ``dir://`` reads::

    strip_0000.npy + strip_0000.json, strip_0001.npy + ..., truth.json

Strip pixel ``(i, j)`` (array index; continuous centre ``(i + .5, j + .5)``) holds the scene SAR, bilinearly
interpolated, at ``ground(i + .5, j + .5)`` converted to scene pixels through ``scene.frame`` (any affine
geotransform, rotated or with non-square pixels; geographic CRSs by Newton iteration on the frame's projection).
No anti-alias filter is applied: pick ``gsd_m`` >= the scene's to avoid aliasing. Pixels are stored as float32 on
the scene's log scale (sidecar ``scale = "db"``), so a file source yields exactly what was cut.

Tracks (all strips straight; the vehicle flies at ``speed_mps``, ``row_rate_hz = speed_mps / gsd_m``):

* ``straight``: consecutive strips on one line at ``heading_deg``.
* ``lawnmower``: parallel legs of equal strip count, alternating ``heading_deg`` / ``heading_deg + 180``, legs
  ``leg_spacing_m`` apart (default: the swath width), joined by half-circle turns (no strips during turns).
* ``curve``: consecutive strips, the heading changing between strips by a constant turn (direction and start
  heading from the seed, each turn jittered by +-20 %), the smallest turn for which the track fits.

The whole track is placed at a seeded random position where every strip footprint stays at least 2 px inside
the image. Everything is deterministic given ``seed`` (plan, speckle and prior use separate random streams).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarloc.core.artifacts import atomic_path, atomic_write_json
from sarloc.core.errors import ConfigError, SarlocError
from sarloc.core.geo import metric_to_pixel, pixel_metric_affine, sample_metric
from sarloc.core.scene import Scene, load_scene
from sarloc.runtime.types import heading_vectors

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_T_START_S",
    "TRACKS",
    "TRUTH_SCHEMA",
    "simulate_flight",
]

TRACKS = ("straight", "lawnmower", "curve")
DEFAULT_T_START_S = 1_700_000_000.0
TRUTH_SCHEMA = 1
_MARGIN_PX = 2.0
_MAX_STRIPS = 100_000


# =============================================================================================================
# planning


@dataclass(frozen=True)
class _Planned:
    heading_deg: float
    start_m: np.ndarray  # vehicle at row 0, relative to the track origin (metres, east/north)
    t_rel_s: float


@dataclass(frozen=True)
class _Geometry:
    length_m: float  # along-track length of a strip
    width_m: float  # swath width
    offset_m: float  # across_offset_m
    speed_mps: float


def _corners(plan: list[_Planned], g: _Geometry) -> np.ndarray:
    out = []
    for p in plan:
        fwd, right = heading_vectors(p.heading_deg)
        for a in (0.0, g.length_m):
            for b in (g.offset_m - g.width_m / 2, g.offset_m + g.width_m / 2):
                out.append(p.start_m + a * fwd + b * right)
    return np.array(out).reshape(-1, 2)


def _bbox_px(plan: list[_Planned], g: _Geometry, minv: np.ndarray) -> np.ndarray:
    px = _corners(plan, g) @ minv.T
    return np.array([px[:, 0].min(), px[:, 0].max(), px[:, 1].min(), px[:, 1].max()])


def _straight(n: int, psi: float, g: _Geometry) -> list[_Planned]:
    fwd, _ = heading_vectors(psi)
    return [_Planned(psi % 360.0, k * g.length_m * fwd, k * g.length_m / g.speed_mps) for k in range(n)]


def _lawnmower(m: int, legs: int, psi: float, spacing_m: float, g: _Geometry) -> list[_Planned]:
    fwd, right = heading_vectors(psi)
    turn_s = math.pi * spacing_m / 2.0 / g.speed_mps
    leg_s = m * g.length_m / g.speed_mps
    out = []
    for leg in range(legs):
        side = leg * spacing_m * right
        t_leg = leg * (leg_s + turn_s)
        for i in range(m):
            t = t_leg + i * g.length_m / g.speed_mps
            if leg % 2 == 0:
                out.append(_Planned(psi % 360.0, side + i * g.length_m * fwd, t))
            else:
                out.append(_Planned((psi + 180.0) % 360.0, side + (m - i) * g.length_m * fwd, t))
    return out


def _curve(n: int, psi0: float, turns_deg: np.ndarray, g: _Geometry) -> list[_Planned]:
    out = []
    pos = np.zeros(2)
    psi = psi0
    for k in range(n):
        out.append(_Planned(psi % 360.0, pos.copy(), k * g.length_m / g.speed_mps))
        pos = pos + g.length_m * heading_vectors(psi)[0]
        psi += float(turns_deg[k])
    return out


def _max_fit(fits, hi: int = _MAX_STRIPS) -> int:
    """Largest n in [0, hi] with fits(n) for a monotone predicate (fits(0) assumed true)."""
    if not fits(1):
        return 0
    lo, n = 1, 2
    while n <= hi and fits(n):
        lo, n = n, 2 * n
    n = min(n, hi + 1)
    while n - lo > 1:
        mid = (lo + n) // 2
        if fits(mid):
            lo = mid
        else:
            n = mid
    return lo


def _plan(
    track: str,
    n_strips: int | None,
    psi: float,
    g: _Geometry,
    room_px: tuple[float, float],
    minv: np.ndarray,
    rng: np.random.Generator,
    leg_spacing_m: float | None,
) -> list[_Planned]:
    def fits(plan: list[_Planned]) -> bool:
        b = _bbox_px(plan, g, minv)
        return b[1] - b[0] <= room_px[0] and b[3] - b[2] <= room_px[1]

    too_big = (
        f"simulate: a {track} track of {n_strips or 'any number of'} strips of {g.width_m:.0f} x {g.length_m:.0f} m "
        f"does not fit in the scene; use fewer strips, a smaller strip_width_px/strip_rows or a larger gsd_m"
    )
    if track == "straight":
        n_max = _max_fit(lambda n: fits(_straight(n, psi, g)))
        n = n_strips if n_strips is not None else n_max
        if n_max == 0 or n > n_max:
            raise SarlocError(too_big)
        return _straight(n, psi, g)
    if track == "lawnmower":
        spacing = g.width_m if leg_spacing_m is None else float(leg_spacing_m)
        m_max = _max_fit(lambda m: fits(_lawnmower(m, 1, psi, spacing, g)))
        if m_max == 0:
            raise SarlocError(too_big)
        if n_strips is not None:
            for m in range(min(m_max, max(1, math.ceil(n_strips / 2))), 0, -1):
                legs = math.ceil(n_strips / m)
                if fits(_lawnmower(m, legs, psi, spacing, g)):
                    return _lawnmower(m, legs, psi, spacing, g)[:n_strips]
            raise SarlocError(too_big)
        for m in range(m_max, 0, -1):
            legs = _max_fit(lambda k, m=m: fits(_lawnmower(m, k, psi, spacing, g)), hi=_MAX_STRIPS // m)
            if legs >= 2:
                return _lawnmower(m, legs, psi, spacing, g)
        raise SarlocError(f"simulate: no room for two lawnmower legs {spacing:.0f} m apart; {too_big.split('; ')[1]}")
    # curve
    sign = 1.0 if rng.random() < 0.5 else -1.0
    jitter = rng.uniform(0.8, 1.2, size=max(n_strips or 0, 32))
    for dpsi in np.arange(15.0, 121.0, 5.0):
        n = n_strips if n_strips is not None else math.ceil(360.0 / dpsi)
        plan = _curve(n, psi, sign * dpsi * jitter[:n], g)
        if fits(plan):
            return plan
    raise SarlocError(too_big)


# =============================================================================================================
# the flight


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"simulate: {name}={v!r} must be an integer >= {lo}")
    return int(v)


def _check_pos(name: str, v: Any, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"simulate: {name}={v!r} must be a positive number")
    return float(v)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _check_args(
    track: str,
    strip_width_px: int,
    strip_rows: int,
    n_strips: int | None,
    seed: int,
    speed_mps: float,
    speckle_looks: float | None,
    prior_sigma_m: float | None,
    finite: dict[str, Any],
) -> tuple[int, int, int | None, int, float | None, float | None, float | None]:
    """Checked ``(width, rows, n_strips, seed, speed, looks, prior_sigma)``; ``finite`` holds the values that must
    be finite numbers when set (``across_offset_m``, ``t_start_s``, ``heading_deg``).

    Raises:
        ConfigError: a parameter is out of range.
    """
    if track not in TRACKS:
        raise ConfigError(f"simulate: unknown track {track!r}; use one of {', '.join(TRACKS)}")
    width = _check_int("strip_width_px", strip_width_px, 2)
    rows = _check_int("strip_rows", strip_rows, 2)
    if n_strips is not None:
        n_strips = _check_int("n_strips", n_strips, 1)
    seed = _check_int("seed", seed, 0)
    speed = _check_pos("speed_mps", speed_mps)
    looks = _check_pos("speckle_looks", speckle_looks, optional=True)
    prior_sigma = _check_pos("prior_sigma_m", prior_sigma_m, optional=True)
    for name, v in finite.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"simulate: {name}={v!r} must be a finite number")
    return width, rows, n_strips, seed, speed, looks, prior_sigma


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse an unusable output folder; with ``force``, remove the strips and truth of a previous flight.

    Raises:
        SarlocError: ``out`` is a file, or a non-empty folder without ``force``.
    """
    if out.exists() and not out.is_dir():
        raise SarlocError(f"simulate: {out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SarlocError(f"simulate: output folder {out} is not empty; choose an empty folder or pass --force")
        for p in [*out.glob("strip_*.npy"), *out.glob("strip_*.json"), out / "truth.json"]:
            p.unlink(missing_ok=True)


def _place(
    plan: list[_Planned],
    g: _Geometry,
    room: tuple[float, float],
    sc: Scene,
    affine: tuple[np.ndarray, Any],
    plan_rng: np.random.Generator,
) -> np.ndarray:
    """The track origin (metres): its pixel bounding box at a seeded random spot inside the margins.

    Raises:
        SarlocError: the placed track leaves the scene.
    """
    frame = sc.frame
    a, _ = affine
    minv = np.linalg.inv(a[:, :2])
    box = _bbox_px(plan, g, minv)
    shift = (
        plan_rng.uniform(0.0, max(room[0] - (box[1] - box[0]), 0.0)),
        plan_rng.uniform(0.0, max(room[1] - (box[3] - box[2]), 0.0)),
    )
    origin_px = np.array([_MARGIN_PX + shift[0] - box[0], _MARGIN_PX + shift[1] - box[2], 1.0])
    origin_m = a @ origin_px
    corners = _corners(plan, g) + origin_m
    cc, cr = metric_to_pixel(frame, corners[:, 0], corners[:, 1], affine)
    if cc.min() < 1 or cr.min() < 1 or cc.max() > frame.width_px - 1 or cr.max() > frame.height_px - 1:
        raise SarlocError(f"simulate: the planned track leaves scene {sc.name!r}; use shorter or narrower strips")
    return origin_m


@dataclass(frozen=True)
class _Cut:
    """How the strips are cut and described: pixels, timing, noise."""

    width: int
    rows: int
    gsd: float
    row_rate: float
    looks: float | None
    prior_sigma: float | None
    t_start_s: float


def _sidecar(sid: str, p: _Planned, t0: float, c: _Cut, g: _Geometry) -> dict[str, Any]:
    return {
        "schema": 1,
        "strip_id": sid,
        "gsd_m": c.gsd,
        "heading_deg": float(p.heading_deg),
        "t0_s": t0,
        "row_rate_hz": c.row_rate,
        "across_offset_m": g.offset_m,
        "scale": "db",
    }


def _add_prior(side: dict[str, Any], start: np.ndarray, sigma: float, frame, affine, rng: np.random.Generator) -> None:
    """A noisy INS prior around the vehicle at row 0 in the sidecar (with lon/lat on geo-referenced scenes)."""
    prior = start + rng.normal(0.0, sigma, 2)
    side["prior_xy_m"] = [float(prior[0]), float(prior[1])]
    side["prior_sigma_m"] = sigma
    if frame.georeferenced:
        pc, pr = metric_to_pixel(frame, prior[0], prior[1], affine)
        lon, lat = frame.pixel_to_lonlat(pc, pr)
        side["prior_lonlat_deg"] = [float(lon), float(lat)]


def _write_strips(
    out: Path,
    sc: Scene,
    plan: list[_Planned],
    origin_m: np.ndarray,
    g: _Geometry,
    c: _Cut,
    affine,
    rngs: tuple[np.random.Generator, np.random.Generator],
    pace_s: float,
) -> list[dict[str, Any]]:
    """Cut, write (image first, sidecar last) and describe each planned strip; returns the truth of each.

    Args:
        rngs: the speckle and prior random streams.
    """
    frame = sc.frame
    img = np.asarray(sc.sar_gray, np.float32)
    speckle_rng, prior_rng = rngs
    i = np.arange(c.width) + 0.5
    j = np.arange(c.rows) + 0.5
    across = (i - c.width / 2.0) * c.gsd + g.offset_m
    truth_strips = []
    for k, p in enumerate(plan):
        sid = f"strip_{k:04d}"
        fwd, right = heading_vectors(p.heading_deg)
        start = origin_m + p.start_m
        gx = start[0] + j[:, None] * c.gsd * fwd[0] + across[None, :] * right[0]
        gy = start[1] + j[:, None] * c.gsd * fwd[1] + across[None, :] * right[1]
        pix = sample_metric(img, frame, gx, gy, affine)
        if c.looks is not None:
            pix = pix + 10.0 * np.log10(speckle_rng.gamma(c.looks, 1.0 / c.looks, size=pix.shape))
        t0 = float(c.t_start_s) + p.t_rel_s
        side = _sidecar(sid, p, t0, c, g)
        if c.prior_sigma is not None:
            _add_prior(side, start, c.prior_sigma, frame, affine, prior_rng)
        _save_npy(out / f"{sid}.npy", pix.astype(np.float32))  # image first ...
        atomic_write_json(out / f"{sid}.json", side)  # ... sidecar last: dir:// sees complete strips only
        end = start + c.rows * c.gsd * fwd
        truth_strips.append(
            {
                "strip_id": sid,
                "image": f"{sid}.npy",
                "heading_deg": side["heading_deg"],
                "t0_s": t0,
                "t_end_s": t0 + c.rows / c.row_rate,
                "row_rate_hz": c.row_rate,
                "rows": c.rows,
                "width_px": c.width,
                "gsd_m": c.gsd,
                "across_offset_m": g.offset_m,
                "vehicle_start_xy_m": [float(start[0]), float(start[1])],
                "vehicle_end_xy_m": [float(end[0]), float(end[1])],
            }
        )
        if pace_s > 0:
            time.sleep(pace_s)
    return truth_strips


def _flight_truth(
    sc: Scene,
    affine,
    track: str,
    seed: int,
    speed: float,
    g: _Geometry,
    c: _Cut,
    truth_strips: list[dict[str, Any]],
) -> dict[str, Any]:
    """The content of ``truth.json``: the scene frame, the flight's parameters and every strip's truth."""
    frame = sc.frame
    return {
        "schema": TRUTH_SCHEMA,
        "kind": "sarloc.flight_truth",
        "scene": sc.name,
        "scene_path": str(sc.path),
        "frame": {
            "crs": frame.crs,
            "metric_crs": frame.metric_crs,
            "geotransform": list(frame.geotransform) if frame.geotransform else None,
            "width_px": frame.width_px,
            "height_px": frame.height_px,
            "gsd_m": list(frame.gsd_m),
            "pixel_to_metric": affine[0].tolist(),
            "pixel_to_metric_exact": affine[1],
        },
        "track": track,
        "seed": seed,
        "speed_mps": speed,
        "gsd_m": c.gsd,
        "strip_width_px": c.width,
        "strip_rows": c.rows,
        "across_offset_m": g.offset_m,
        "speckle_looks": c.looks,
        "prior_sigma_m": c.prior_sigma,
        "strips": truth_strips,
    }


def simulate_flight(
    scene: str | Path | Scene,
    out_dir: str | Path,
    track: str = "straight",
    heading_deg: float | None = None,
    strip_width_px: int = 160,
    strip_rows: int = 256,
    n_strips: int | None = None,
    gsd_m: float | None = None,
    speed_mps: float = 30.0,
    seed: int = 0,
    speckle_looks: float | None = None,
    prior_sigma_m: float | None = None,
    across_offset_m: float = 0.0,
    t_start_s: float = DEFAULT_T_START_S,
    leg_spacing_m: float | None = None,
    pace_s: float = 0.0,
    force: bool = False,
) -> Path:
    """Simulate a strip flight over a scene and write its strips and truth (see the module docstring).

    Args:
        scene: a scene folder or a loaded :class:`Scene` (its ``sar_gray`` and ``frame`` are used).
        out_dir: output folder (created; must be empty unless ``force``).
        track: ``straight``, ``lawnmower`` or ``curve``.
        heading_deg: heading of the first strip, degrees clockwise from grid north; None = drawn from the seed.
        strip_width_px, strip_rows: size of each strip, pixels.
        n_strips: number of strips; None = as many as fit (curve: one full turn).
        gsd_m: strip metres per pixel; None = the scene's mean gsd.
        speed_mps: ground speed, m/s (``row_rate_hz = speed_mps / gsd_m``).
        seed: random seed (placement, default heading, turn direction, speckle, prior).
        speckle_looks: multiplicative Gamma speckle with this many looks (added in dB); None = none.
        prior_sigma_m: when set, sidecars carry a noisy INS prior ``prior_xy_m`` (vehicle at row 0 + N(0, sigma)
            per axis), ``prior_sigma_m`` and, for geo-referenced scenes, ``prior_lonlat_deg``.
        across_offset_m: strip centre line offset from the track, metres, positive right.
        t_start_s: time of the first strip's row 0 (default a UNIX time, so GPS time works).
        leg_spacing_m: lawnmower leg spacing; None = the swath width.
        pace_s: pause after each strip (live replay into a ``dir://`` follower).
        force: overwrite the strips and truth of an existing non-empty folder.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: a parameter is out of range.
        SarlocError: the track does not fit in the scene, or ``out_dir`` is not empty.
    """
    finite = {"across_offset_m": across_offset_m, "t_start_s": t_start_s, "heading_deg": heading_deg}
    width, rows, n_strips, seed, speed, looks, prior_sigma = _check_args(
        track, strip_width_px, strip_rows, n_strips, seed, speed_mps, speckle_looks, prior_sigma_m, finite
    )
    out = Path(out_dir)
    _prepare_out(out, force)

    sc = scene if isinstance(scene, Scene) else load_scene(scene)
    frame = sc.frame
    gsd = _check_pos("gsd_m", gsd_m if gsd_m is not None else float(frame.mean_gsd_m))
    affine = pixel_metric_affine(frame)
    minv = np.linalg.inv(affine[0][:, :2])

    plan_rng, speckle_rng, prior_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    psi = float(heading_deg) if heading_deg is not None else float(plan_rng.uniform(0.0, 360.0))
    g = _Geometry(rows * gsd, width * gsd, float(across_offset_m), speed)
    room = (frame.width_px - 2 * _MARGIN_PX, frame.height_px - 2 * _MARGIN_PX)
    plan = _plan(track, n_strips, psi, g, room, minv, plan_rng, leg_spacing_m)
    origin_m = _place(plan, g, room, sc, affine, plan_rng)

    cut = _Cut(width, rows, gsd, speed / gsd, looks, prior_sigma, t_start_s)
    out.mkdir(parents=True, exist_ok=True)
    truth_strips = _write_strips(out, sc, plan, origin_m, g, cut, affine, (speckle_rng, prior_rng), pace_s)
    truth = _flight_truth(sc, affine, track, seed, speed, g, cut, truth_strips)
    atomic_write_json(out / "truth.json", truth)
    logger.info("simulate: %d %s strips over %s written to %s", len(plan), track, sc.name, out)
    return out
