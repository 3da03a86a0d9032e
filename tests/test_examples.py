"""The example configurations in examples/ are valid: every key known, every value of the right type."""

from __future__ import annotations

from pathlib import Path

import pytest

from sarloc.runtime.daemon import load_run_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"onboard.toml", "dry_run.toml", "sitl.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path):
    cfg = load_run_config(path)
    assert cfg.source and cfg.export and cfg.pack and cfg.out
