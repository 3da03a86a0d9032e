"""Helpers shared by the tests (importable as ``helpers``: pytest's ``pythonpath`` holds ``tests``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_scene(name: str) -> Path:
    """Path of a real scene, or skip the test with a message when ../shared/data is absent."""
    p = SHARED_DATA / name
    if not (p / "scene.json").is_file():
        pytest.skip(f"real scene {name} not available ({SHARED_DATA} missing); skipping")
    return p


def write_plain_scene(
    folder: Path,
    optical: np.ndarray,
    sar: np.ndarray,
    meta_extra: dict | None = None,
    sar_scale: str = "linear_0_1",
    opt_scale: str = "display8",
) -> Path:
    """Write a minimal scene folder from arrays (tif via tifffile, png via cv2)."""
    import cv2
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    if optical.ndim == 3:
        cv2.imwrite(str(folder / "optical.png"), optical[..., ::-1])
    else:
        cv2.imwrite(str(folder / "optical.png"), optical)
    tifffile.imwrite(folder / "sar.tif", sar)
    meta = {
        "name": folder.name,
        "optical": {
            "file": "optical.png",
            "bands": ["R", "G", "B"] if optical.ndim == 3 else ["gray"],
            "scale": opt_scale,
        },
        "sar": {
            "file": "sar.tif",
            "bands": ["VV"] if sar.ndim == 2 else [f"b{i}" for i in range(sar.shape[2])],
            "scale": sar_scale,
        },
        "crs": None,
        "geotransform": None,
        "gsd_m": None,
        "gsd_m_estimate": 5.0,
    }
    meta.update(meta_extra or {})
    (folder / "scene.json").write_text(json.dumps(meta))
    return folder


def demo_flight(root: Path, scene_seed: int, heading_deg: float, flight_seed: int, n_strips: int = 3) -> Path:
    """A generated 512 x 512 scene, its map pack (shipped demo model) and a straight simulated flight under
    ``root`` (``scene/``, ``pack/``, ``strips/``); returns ``root``."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR
    from sarloc.backends.layout import DEMO_MODEL_FILES as MODEL_FILES
    from sarloc.mappack.build import MapPackConfig, build_map_pack
    from sarloc.sim.flight import simulate_flight
    from sarloc.sim.scenes import SynthConfig, write_scene

    missing = [f for f in MODEL_FILES if not (MODEL_DIR / f).is_file()]
    assert not missing, f"the shipped demo model lacks {missing}; run `sarloc demo --make-model`"
    scene = write_scene(root / "scene", SynthConfig(width_px=512, height_px=512, seed=scene_seed))
    build_map_pack(scene, MODEL_DIR / "optical_encoder.onnx", root / "pack", MapPackConfig(), progress=False)
    simulate_flight(
        scene,
        root / "strips",
        track="straight",
        heading_deg=heading_deg,
        n_strips=n_strips,
        strip_width_px=160,
        strip_rows=160,
        seed=flight_seed,
    )
    return root


def run_args(flight: Path, out: Path, *extra: str, pack: Path | None = None) -> list[str]:
    """`sarloc run` arguments for a :func:`demo_flight` folder with the shipped demo model, plus ``extra``."""
    from sarloc.backends.layout import DEMO_MODEL_DIR as MODEL_DIR

    src = f"dir://{flight / 'strips'}"
    return ["run", "--source", src, "--export", str(MODEL_DIR), "--pack", str(pack or flight / "pack"),
            "--out", str(out), *extra]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """Environment for running `python -m sarloc.cli` in a child process from the repository."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def fast_train_config(dir: Path) -> Path:
    """A training config that keeps precise BN short (for tests that train a few steps)."""
    p = dir / "fast.json"
    p.write_text(json.dumps({"bn_recalib_batches": 2}))
    return p


def train_argv(scene: Path, out: Path, config: Path, *extra: str) -> list[str]:
    """``sarloc train`` arguments for a smoke-preset run on ``scene`` (add ``extra``)."""
    return ["train", "--scenes", str(scene), "--out", str(out), "--preset", "smoke", "--config", str(config),
            "--no-progress", *extra]  # fmt: skip
