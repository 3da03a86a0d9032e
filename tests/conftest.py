"""Shared fixtures: tiny generated scenes, and the real scenes of ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests (Hypothesis). The test command runs a fixed, reproducible sequence of generated inputs
# ("fixed", derandomised), so that a CI run judges the code, not the luck of a seed. Exploring new inputs is a
# separate, deliberate run: SARLOC_HYPOTHESIS=explore (a new seed each run; SARLOC_FUZZ_SCALE=N multiplies the
# fuzz suite's cases), see docs/reliability.md.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("SARLOC_HYPOTHESIS", "fixed"))


@pytest.fixture(scope="session")
def synth_scene(tmp_path_factory) -> Path:
    """A 256x256 generated scene folder (seed 3)."""
    from sarloc.sim.scenes import SynthConfig, write_scene

    out = tmp_path_factory.mktemp("synth") / "scene"
    return write_scene(out, SynthConfig(width_px=256, height_px=256, seed=3))


@pytest.fixture(scope="session")
def synth_scenes(tmp_path_factory) -> Path:
    """A folder holding two generated scene folders."""
    from sarloc.sim.scenes import SynthConfig, write_scene

    root = tmp_path_factory.mktemp("synths")
    for seed in (1, 2):
        write_scene(root / f"s{seed}", SynthConfig(width_px=256, height_px=256, seed=seed))
    return root


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A tiny untrained encoder exported to ONNX (one per test module, so modules cannot disturb each other)."""
    from export.tiny_export import make_tiny_export

    return make_tiny_export(tmp_path_factory)


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    """A writable copy of the tiny export (INT8 models are written beside the FP32 ones)."""
    import shutil

    d = tmp_path / "export"
    shutil.copytree(tiny_export, d)
    return d


@pytest.fixture(scope="session")
def demo_flight_dir(tmp_path_factory) -> Path:
    """A generated 512 x 512 scene (not one the demo model saw), its map pack (shipped demo model) and a 3-strip
    straight simulated flight, built once per test session (read-only: copy what a test changes)."""
    from helpers import demo_flight

    return demo_flight(tmp_path_factory.mktemp("demo_flight"), scene_seed=11, heading_deg=30.0, flight_seed=1)
