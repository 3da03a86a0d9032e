"""benchmarks/embedding_parts.py: recall of the whole embedding, its learned part and its layout part."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "embedding_parts.py"


def _load():
    spec = importlib.util.spec_from_file_location("_bench_embedding_parts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parts_recall_separates_the_two_parts():
    """On a 40 x 40 gallery every 8 px, the learned part identifies each query's place and the layout part is
    pure noise: the learned part alone and the whole embedding find every place, the layout part almost none."""
    from sarloc.eval.refine import PoolData

    mod = _load()
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:40, 0:40]
    centres = np.stack([xs.ravel() * 8 + 32.0, ys.ravel() * 8 + 32.0], 1)
    n, dl, dy = len(centres), 16, 24
    learned = rng.standard_normal((n, dl))
    layout = rng.standard_normal((n, dy))
    gal = np.concatenate([learned, 0.3 * layout], 1)
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    truth_idx = rng.choice(n, 30, replace=False)
    q = np.concatenate([learned[truth_idx], 0.3 * rng.standard_normal((30, dy))], 1)  # layout of another place
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    pool = PoolData(
        q.astype(np.float32),
        np.zeros((30, 1), np.int64),
        np.zeros((30, 1), np.float32),
        np.zeros((30, 1)),
        np.zeros((30, 1, 2)),
        np.ones((30, 1), bool),
        centres[truth_idx] + rng.uniform(-3, 3, (30, 2)),
        64,
        {"embed": 0.0, "search": 0.0, "shortlist": 0.0},
    )
    r = mod.parts_recall(gal.astype(np.float32), centres, pool, dl, 64)
    assert r["learned"]["recall@1"] == 1.0 and r["whole"]["recall@1"] == 1.0
    assert r["layout"]["recall@1"] < 0.2  # chance: the 9 x 9 cells around a peak of 1600
    assert r["layout"]["recall@10"] <= r["layout"]["pool_recall@200"]


def test_plot_writes_a_png(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    mod = _load()
    part = {"recall@1": 0.5, "recall@10": 0.7, "pool_recall@200": 0.9}
    res = {"a": {"whole": part, "learned": part, "layout": part}, "b": {"whole": part, "learned": part, "layout": part}}
    out = mod.plot(res, tmp_path / "f" / "parts.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
