"""The README's walkthrough on generated data (examples/walkthrough.sh), run end to end at tiny sizes, so that the
path a new user follows cannot rot: every command, with the folder names the commands use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_walkthrough_runs_from_nothing_to_a_scored_flight(tmp_path):
    pytest.importorskip("torch")
    sarloc = shutil.which("sarloc") or str(Path(sys.executable).parent / "sarloc")
    assert Path(sarloc).exists(), "the sarloc command is not installed in this environment"
    env = {
        **os.environ,
        "PATH": f"{Path(sarloc).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "SARLOC_WALK_PX": "256",
        "SARLOC_WALK_PRESET": "smoke",
        "SARLOC_WALK_STEPS": "2",
        "SARLOC_WALK_QUERIES": "20",
        "SARLOC_WALK_REFINER_STEPS": "20",
        "SARLOC_WALK_STRIPS": "3",
        "SARLOC_WALK_STRIP_PX": "64",
        "SARLOC_WALK_STRIP_ROWS": "64",
    }
    w = tmp_path / "walk"
    r = subprocess.run(
        ["bash", str(ROOT / "examples" / "walkthrough.sh"), str(w)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("train/checkpoint.pt", "export/sar_encoder.onnx", "export/refiner.onnx", "export/verifier.json",
              "export/sar_encoder.int8.onnx", "pack/pack.json", "flight/truth.json", "run/records.jsonl",
              "run/track.png", "run/report.json", "run/fixes.geojson", "run/fixes.csv",
              "pack_footprint.geojson"):  # fmt: skip
        assert (w / f).is_file(), f
    rep = json.loads((w / "run" / "report.json").read_text())
    assert rep["n_records"] == 3 and rep["n_no_truth"] == 0, rep  # one fix per strip, each scored
