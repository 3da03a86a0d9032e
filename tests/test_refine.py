"""Re-rankers, candidate features and the verifier (torch-free parts of issue 3)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from sarloc.core.errors import ArtifactError, SarlocError
from sarloc.eval.rerank import dense_candidates, expected_calibration_error, reliability, rerank
from sarloc.runtime.refine import FEATURES, Candidates, Verifier, candidate_features


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _cands(q=3, k=6, d=16, seed=0):
    rng = np.random.default_rng(seed)
    query = _unit(rng.normal(size=(q, d)))
    emb = _unit(rng.normal(size=(q, k, d)))
    sims = np.einsum("qd,qkd->qk", query, emb)
    order = np.argsort(-sims, axis=1)
    emb = np.take_along_axis(emb, order[..., None], axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    xy = rng.uniform(-3, 3, size=(q, k, 2))
    return Candidates(query, emb, sims, xy, np.ones((q, k), bool))


def test_dense_candidates_hand_made_gallery():
    # 5 gallery places on a line, 8 px apart; the query equals place 3
    d = 4
    gal = _unit(np.eye(d)[[0, 1, 2, 3, 3]] + 0.01)
    centres = np.array([[40.0, 40.0], [48, 40], [56, 40], [200, 40], [208, 40]])
    c, px = dense_candidates(gal, centres, gal[3:4], k=3, window_px=64)
    # place 4 is suppressed by place 3 (8 px < 32 px); the others are far enough from 3 but near each other
    assert px[0, 0].tolist() == [200.0, 40.0]
    assert c.valid[0].tolist() == [True, True, False]  # 40/48/56 collapse to one peak: only 2 peaks exist
    # positions are east/north in tile units
    assert c.xy[0, 0].tolist() == pytest.approx([200 / 64, -40 / 64])
    off = c.offsets()
    assert off[0, 0].tolist() == [0.0, 0.0]


def test_rerankers_shapes_and_invalid_candidates():
    c = _cands()
    c.valid[0, -1] = False
    for m in ("none", "qe", "kreciprocal", "spatial"):
        s = rerank(c, m)
        assert s.shape == (3, 6)
        assert s[0, -1] == -np.inf
        assert np.isfinite(s[1]).all()
    np.testing.assert_allclose(rerank(c, "none")[1], c.sims[1])
    with pytest.raises(SarlocError, match="unknown re-ranker"):
        rerank(c, "magic")
    with pytest.raises(SarlocError, match="needs a trained refiner"):
        rerank(c, "gnn")


def test_kreciprocal_handles_empty_zero_and_padded_lists_without_warnings():
    """No division by zero (every element is its own reciprocal neighbour), and padding takes no part."""
    c = _cands(q=4, k=6)
    c.valid[0] = False  # no candidate at all
    c.query[1], c.emb[1], c.sims[1] = 0.0, 0.0, 0.0  # zero similarity everywhere
    c.valid[2, 2:] = False  # padded like dense_candidates: repeats of the last valid candidate
    c.emb[2, 2:], c.sims[2, 2:] = c.emb[2, 1], c.sims[2, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = rerank(c, "kreciprocal")
        short = Candidates(c.query[2:3], c.emb[2:3, :2], c.sims[2:3, :2], c.xy[2:3, :2], c.valid[2:3, :2])
        want = rerank(short, "kreciprocal")[0]
    assert np.isneginf(s[~c.valid]).all() and np.isfinite(s[c.valid]).all()
    np.testing.assert_allclose(s[2, :2], want, rtol=1e-6)  # as if the list had no padding


def test_spatial_vote_prefers_a_supported_candidate():
    """Two candidates of equal similarity: the one with similar neighbours on the ground wins the vote."""
    c = _cands(q=1, k=4)
    c.sims[:] = [[0.8, 0.8, 0.7, 0.1]]
    c.xy[0] = [[0, 0], [10, 10], [10.5, 10], [-20, 5]]
    s = rerank(c, "spatial")
    assert s[0, 1] > s[0, 0]
    assert np.argmax(s[0]) == 1


def test_query_expansion_is_identity_when_candidates_equal_query():
    c = _cands(q=1, k=3)
    c.emb[0, 0] = c.query[0]
    c.sims[0, 0] = 1.0
    s = rerank(c, "qe")
    assert np.argmax(s[0]) == 0


def _features(margin):
    q = len(margin)
    reg = np.stack([0.3 + margin, np.full(q, 0.3)], 1)
    return candidate_features(
        np.zeros((q, 2)), np.full((q, 2), 0.5), reg, reg - 0.1, np.zeros((q, 2), bool), np.ones((q, 2), bool)
    )


def test_features_names_and_margin():
    f = _features(np.array([0.2]))
    assert f.shape == (1, 2, len(FEATURES))
    assert f[0, 0, FEATURES.index("reg_margin")] == pytest.approx(0.2)
    assert f[0, 1, FEATURES.index("reg_margin")] == pytest.approx(-0.2)


def test_verifier_confidence_is_monotone_in_the_margin(tmp_path):
    rng = np.random.default_rng(0)
    margin = rng.uniform(-0.1, 0.3, 4000)
    p_true = 1 / (1 + np.exp(-(margin - 0.1) * 30))
    correct = rng.uniform(size=4000) < p_true
    f = _features(margin)[:, 0]
    v = Verifier.fit(f, correct, radius_px=16)
    grid = np.linspace(-0.1, 0.3, 50)
    p = v.prob(_features(grid)[:, 0])
    assert np.all(np.diff(p) >= -1e-12)
    assert p[0] < 0.2 and p[-1] > 0.8
    # calibrated on its own training distribution
    assert expected_calibration_error(v.prob(f), correct) < 0.05
    path = v.save(tmp_path / "v.json", parent_sha256="abc")
    v2 = Verifier.load(path)
    np.testing.assert_allclose(v2.prob(f), v.prob(f))
    m = json.loads(path.read_text())
    m["features"] = ["x"]
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"not a sarloc\.verifier"):
        Verifier.load(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"cannot read sarloc\.verifier"):
        Verifier.load(tmp_path / "bad.json")


def test_reliability_bins():
    p = np.array([0.05, 0.1, 0.9, 0.95])
    y = np.array([0, 0, 1, 1], bool)
    rows = reliability(p, y, bins=5)
    assert [r["n"] for r in rows] == [2, 2]
    assert rows[0]["observed"] == 0.0 and rows[1]["observed"] == 1.0
    assert expected_calibration_error(p, y) == pytest.approx(0.075)
