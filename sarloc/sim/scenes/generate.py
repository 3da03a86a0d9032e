"""Scene generation from a config, the preview image and the scene folder writer (see :mod:`sarloc.sim.scenes`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np

from sarloc.core.errors import SarlocError
from sarloc.sim.scenes.common import _DEFAULT_CFG, _FORMAT_VERSION, SynthConfig, _validate
from sarloc.sim.scenes.layout import _apply_changes, _make_layout
from sarloc.sim.scenes.render import _render_optical, _render_sar


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
