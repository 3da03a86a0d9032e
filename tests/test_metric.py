"""Metric refinement: local CFOG registration around candidates."""

from __future__ import annotations

import numpy as np
import pytest

from sarloc.core.cfog import DenseMatcher, cfog, cfog_norm_mean
from sarloc.core.errors import SarlocError
from sarloc.core.registration import LocalRegistrar, RegistrationConfig
from sarloc.core.scene import load_scene


@pytest.fixture(scope="module")
def scene(synth_scene):
    return load_scene(synth_scene)


def test_crop_descriptor_equals_whole_map_descriptor(scene):
    m = cfog_norm_mean(scene.optical_gray, strip_rows=64)
    full = cfog(scene.optical_gray)
    assert m > 0
    reg = LocalRegistrar(scene.optical_gray, norm_mean=m)
    crop = reg._crop_descriptor(60, 140, 70, 150)
    np.testing.assert_allclose(crop, full[:, 60:140, 70:150], atol=1e-4)


def test_score_equals_classical_score_at_the_same_placement(scene):
    dm = DenseMatcher(scene.optical_gray, max_window_px=64)
    reg = LocalRegistrar(scene.optical_gray)
    win = scene.sar_gray[80:144, 100:164]
    r = reg.register(win, np.array([[100 + 32 + 4.0, 80 + 32 - 3.0]]))
    sm = dm.score_map(win)
    x0, y0 = round(float(r.xy_px[0, 0]) - 32), round(float(r.xy_px[0, 1]) - 32)
    assert r.score[0] == pytest.approx(float(sm[y0, x0]), abs=1e-4)


@pytest.mark.parametrize("offset", [(7, -5), (-9, 8), (0, 0), (3, 9)])
def test_recovers_known_subtile_offset(scene, offset):
    """The window's true centre is found from a candidate `offset` pixels away, to about a pixel."""
    x0, y0 = 96, 110
    win = scene.sar_gray[y0 : y0 + 64, x0 : x0 + 64]
    truth = np.array([x0 + 32.0, y0 + 32.0])
    reg = LocalRegistrar(scene.optical_gray, RegistrationConfig(search_px=12))
    r = reg.register(win, (truth + offset)[None])
    assert np.abs(r.xy_px[0] - truth).max() <= 1.5
    assert not r.at_border[0]
    assert r.score[0] > r.second[0]


def test_wrong_candidate_scores_lower_and_peak_at_border_is_flagged(scene):
    x0, y0 = 96, 110
    win = scene.sar_gray[y0 : y0 + 64, x0 : x0 + 64]
    reg = LocalRegistrar(scene.optical_gray)
    r = reg.register(win, np.array([[x0 + 32.0, y0 + 32.0], [x0 + 32.0 + 40, y0 + 32.0 + 30]]))
    assert r.best() == 0
    assert r.score[0] > r.score[1] + 0.1


def test_featureless_window_and_bad_config(scene):
    reg = LocalRegistrar(scene.optical_gray)
    r = reg.register(np.zeros((64, 64), np.float32), np.array([[128.0, 128.0]]))
    assert r.score[0] == -1.0
    with pytest.raises(SarlocError, match="search_px"):
        LocalRegistrar(scene.optical_gray, RegistrationConfig(search_px=0))
    with pytest.raises(SarlocError, match="larger than the optical map"):
        reg.register(np.ones((300, 300), np.float32), np.array([[128.0, 128.0]]))


def test_shortlist_registrar_ranks_the_true_candidate_first(scene):
    from sarloc.core.registration import ShortlistRegistrar

    x0, y0 = 96, 110
    win = scene.sar_gray[y0 : y0 + 64, x0 : x0 + 64]
    truth = np.array([x0 + 32.0, y0 + 32.0])
    cands = np.array([[60.0, 60.0], [200.0, 190.0], [truth[0] + 14, truth[1] - 20], [190.0, 60.0]])
    sr = ShortlistRegistrar(scene.optical_gray.astype(np.float16), scale=2, search_px=32)
    score, xy = sr.scores(win, cands)
    assert int(np.argmax(score)) == 2
    assert np.abs(xy[2] - truth).max() <= 3.0
    with pytest.raises(SarlocError, match="scale"):
        ShortlistRegistrar(scene.optical_gray, scale=0)


def test_narrow_rescore_keeps_half_the_shortlist_and_promotes_the_true_candidate(scene):
    """The truth ranked 7th by the shortlist (outside K=4) comes into the K after the narrow full-resolution look;
    the shortlist's first K // 2 stay in front; the order is a permutation of the pool."""
    from sarloc.core.registration import ShortlistRegistrar, narrow_rescore

    x0, y0 = 96, 110
    win = scene.sar_gray[y0 : y0 + 64, x0 : x0 + 64]
    truth = np.array([x0 + 32.0, y0 + 32.0])
    rng = np.random.default_rng(0)
    wrong = rng.uniform(40, 200, (9, 2))
    wrong = wrong[np.abs(wrong - truth).max(1) > 40][:8]
    cands = np.vstack([wrong[:6], truth + np.array([5.0, -6.0]), wrong[6:]])  # the truth is candidate 6
    low_xy = ShortlistRegistrar(scene.optical_gray, scale=2, search_px=32).scores(win, cands)[1]
    order = np.arange(len(cands))
    reg = LocalRegistrar(scene.optical_gray)
    valid = np.ones(len(cands), bool)
    out = narrow_rescore(win, low_xy, order, valid, k=4, rescore=len(cands), registrar=reg)
    assert sorted(out.tolist()) == order.tolist()
    assert out[:2].tolist() == [0, 1]
    assert 6 in out[:4].tolist()
    # without the truth in the looked-at part, nothing changes that far down; fewer valid than K: unchanged
    assert 6 not in narrow_rescore(win, low_xy, order, valid, k=4, rescore=5, registrar=reg)[:4].tolist()
    few = np.zeros(len(cands), bool)
    few[:3] = True
    np.testing.assert_array_equal(narrow_rescore(win, low_xy, order, few, 4, 9, reg), order)
