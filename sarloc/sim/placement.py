"""Synthetic geo-reference for un-georeferenced scenes (torch-free): :func:`geo_place_scene`.

Real pairs often come with only ``gsd_m_estimate``; placing them at a chosen (lat, lon) in the WGS84 UTM zone there
lets the daemon and the map pack produce lat/lon (e.g. for the closed loop with an autopilot,
:mod:`sarloc.sim.closed_loop`). The pixel grid is kept; images are symlinked, never copied.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sarloc.core.artifacts import atomic_write_json
from sarloc.core.config import finite_number
from sarloc.core.errors import ConfigError, SarlocError
from sarloc.core.geo import GeoFrame, utm_epsg_for
from sarloc.core.scene import Scene, load_scene

logger = logging.getLogger(__name__)

__all__ = ["geo_place_scene"]


def _check_lat_lon(lat_deg: float, lon_deg: float) -> tuple[float, float]:
    """(lat, lon) as floats, in the UTM range.

    Raises:
        ConfigError: lat/lon out of range or not a number.
    """
    lat = finite_number(lat_deg)
    if lat is None or not -80.0 <= lat <= 84.0:
        raise ConfigError(f"geo_place_scene: lat_deg={lat_deg!r:.40} must be a number in [-80, 84] (UTM range)")
    lon = finite_number(lon_deg)
    if lon is None or not -180.0 <= lon <= 180.0:
        raise ConfigError(f"geo_place_scene: lon_deg={lon_deg!r:.40} must be a number in [-180, 180]")
    return lat, lon


def _check_output(sc: Scene, out: Path, force: bool) -> None:
    """Refuse a scene that already has a CRS, and an output folder that is not usable.

    Raises:
        SarlocError: the scene already has a CRS, or ``out`` is a file, a non-empty folder (without ``force``)
            or the scene itself.
    """
    if sc.frame.georeferenced:
        raise SarlocError(
            f"geo_place_scene: scene {sc.name!r} ({sc.path}) already has a CRS ({sc.frame.crs}); use it as it is"
        )
    if out.exists() and not out.is_dir():
        raise SarlocError(f"geo_place_scene: {out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SarlocError(f"geo_place_scene: output folder {out} is not empty; choose an empty folder (or force=True)")
    if out.resolve() == sc.path.resolve():
        raise SarlocError(f"geo_place_scene: output folder {out} is the scene itself; choose another folder")


def _utm_geotransform(sc: Scene, lat: float, lon: float) -> tuple[str, list[float]]:
    """The UTM CRS of (lon, lat) and a north-up geotransform with the image centre there (pixel size kept).

    Raises:
        SarlocError: the CRS is unusable (checked before anything is written).
    """
    import pyproj

    epsg = utm_epsg_for(lon, lat)
    crs = f"EPSG:{epsg}"
    east, north = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    gx, gy = (float(g) for g in sc.frame.gsd_m)
    w, h = sc.frame.width_px, sc.frame.height_px
    x0, y0 = float(east) - w / 2.0 * gx, float(north) + h / 2.0 * gy
    gt = [x0, gx, 0.0, y0, 0.0, -gy]
    GeoFrame(w, h, crs=crs, geotransform=tuple(gt))  # a bad CRS fails here, before anything is written
    return crs, gt


def _image_links(meta: dict[str, Any], sc: Scene, out: Path) -> list[tuple[Path, Path]]:
    """(link in ``out``, absolute target) of each image of the scene.

    Raises:
        SarlocError: an image path leaves the scene folder.
    """
    links: list[tuple[Path, Path]] = []
    for key in ("optical", "sar", "change_mask"):
        entry = meta.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            continue
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts:
            raise SarlocError(f"geo_place_scene: scene {sc.name!r}: {key}.file {entry['file']!r} leaves the folder")
        links.append((out / rel, (sc.path / rel).resolve()))
    return links


def geo_place_scene(
    scene_dir: str | Path,
    out_dir: str | Path,
    *,
    lat_deg: float,
    lon_deg: float,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Give an un-georeferenced scene a synthetic position: a UTM CRS with its image centre at (lat, lon).

    The scene's metric frame without CRS is ``(col * gsd_x, -row * gsd_y)`` (x east, y north, origin at the
    top-left corner; see :mod:`sarloc.core.geo`). The new ``scene.json`` keeps that orientation and pixel size and adds
    a north-up geotransform ``[x0, gsd_x, 0, y0, 0, -gsd_y]`` in the WGS84 UTM zone of (lon, lat), so that metric
    positions shift by ``(x0, y0)`` (recorded as ``placement.offset_m``) and pixels keep their meaning. Images are
    symlinked to the originals (absolute targets; never copied), so their sha256 entries still hold.

    Scenes that already have a CRS are refused (re-placing a real geo-reference would silently lie).

    Args:
        scene_dir: scene folder without ``crs``/``geotransform`` (``gsd_m`` or ``gsd_m_estimate`` set).
        out_dir: new scene folder (created; must be empty unless ``force``).
        lat_deg, lon_deg: WGS84 position of the image centre (UTM range: -80 <= lat <= 84).
        name: scene name; default ``<name>_placed``.
        force: overwrite ``scene.json`` and the image links in an existing non-empty folder.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: lat/lon out of range.
        SarlocError: the scene already has a CRS, or ``out_dir`` is not usable.
        SceneError: the scene does not load.
    """
    lat, lon = _check_lat_lon(lat_deg, lon_deg)
    sc = load_scene(scene_dir)
    out = Path(out_dir)
    _check_output(sc, out, force)
    crs, gt = _utm_geotransform(sc, lat, lon)
    meta = dict(sc.meta)
    links = _image_links(meta, sc, out)
    meta.update(
        name=name if name is not None else f"{sc.name}_placed",
        crs=crs,
        geotransform=gt,
        gsd_m=[gt[1], -gt[5]],  # the pixel size, kept
        placement={
            "source_scene": str(sc.path.resolve()),
            "lat_deg": lat,
            "lon_deg": lon,
            "offset_m": [gt[0], gt[3]],
            "note": "synthetic geo-reference (sarloc.sim.live_strips.geo_place_scene): not a surveyed position",
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    for link, target in links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    atomic_write_json(out / "scene.json", meta)  # last: a reader never sees a scene.json without its images
    logger.info("geo_place_scene: %s placed at lat %.6f lon %.6f (%s) in %s", sc.name, lat, lon, crs, out)
    return out
