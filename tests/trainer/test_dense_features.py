"""Learned dense block beside CFOG: shapes, CFOG equivalence at zero weight, training, mining, selector, seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sarloc.core.cfog import DenseMatcher
from sarloc.sim.scenes import SynthConfig, generate_scene
from sarloc.trainer.dense_features import (
    DenseFCN,
    FCNConfig,
    FeatureMatcher,
    dense_inputs,
    map_features,
    peak_stats,
    window_features,
    zncc_map,
)
from sarloc.trainer.dense_features_select import (
    Selector,
    fit_logistic,
    mcnemar_p,
    paired_bootstrap_ci,
    predict_logistic,
    selector_features,
)
from sarloc.trainer.dense_features_train import (
    DenseTrainConfig,
    load_dense,
    mine_hard_negatives,
    prepare_scene,
    train_dense,
    train_step,
)

W = 32  # template side in these tests (small scenes, fast)


def _scene(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    s = generate_scene(SynthConfig(width_px=size, height_px=size, seed=seed))
    opt = s["optical"].astype(np.float32).mean(2) / 255.0
    sar = (10.0 * np.log10(s["sar"] + 1e-4)).astype(np.float32)
    return opt, sar


@pytest.fixture(scope="module")
def scenes():
    return [_scene(1), _scene(2)]


def _cfg(**kw) -> DenseTrainConfig:
    base = DenseTrainConfig(
        steps=3, window_px=W, region_px=96, templates_per_step=2, k_hard=3, k_rand=2, pool_per_scene=4, rot_deg=0.0
    )
    return dataclasses.replace(base, fcn=FCNConfig(hidden=4, out_ch=4, layers=2, kernel=3, dropout=0.0), **kw)


def _prepared(scenes, cfg):
    return [prepare_scene(f"s{i}", o, s, cfg) for i, (o, s) in enumerate(scenes)]


def test_shapes(scenes):
    opt, sar = scenes[0]
    assert dense_inputs(opt, "optical").shape == (11, 128, 128)
    model = DenseFCN(FCNConfig(hidden=4, out_ch=5))
    y = model(torch.from_numpy(dense_inputs(sar[:W, :W], "sar")[None]))
    assert y.shape == (1, 5, W, W) and float((y * y).sum(1).max().detach()) < 1.0
    assert map_features(model, opt, "concat").shape == (14, 128, 128)
    assert map_features(model, opt, "learned").shape == (5, 128, 128)
    assert window_features(model, sar[:W, :W], "cfog").shape == (9, W, W)


def test_zero_weight_keeps_cfog_score(scenes):
    opt, sar = scenes[0]
    model = DenseFCN(FCNConfig(hidden=4, out_ch=4))
    with torch.no_grad():
        model.log_w.fill_(-1e4)  # w = 0
    win = sar[40 : 40 + W, 50 : 50 + W]
    ref = DenseMatcher(opt, max_window_px=W).score_map(win)
    mt = FeatureMatcher(map_features(model, opt, "concat"), max_window_px=W)
    got = mt.score_features(window_features(model, win, "concat"))
    np.testing.assert_allclose(got, ref, atol=2e-4)
    # the differentiable training scorer agrees with the matcher
    t = torch.from_numpy(window_features(model, win, "concat"))
    m = torch.from_numpy(map_features(model, opt, "concat"))
    np.testing.assert_allclose(zncc_map(t, m).detach().numpy(), ref, atol=2e-3)


def test_training_steps_reduce_loss_on_fixed_batch(scenes):
    cfg = _cfg()
    torch.manual_seed(0)
    sc = _prepared(scenes, cfg)
    model = DenseFCN(cfg.fcn)
    pool = np.array([[0, 20, 30], [0, 60, 50], [1, 10, 70], [1, 80, 20]])
    bank = mine_hard_negatives(model, sc, pool, cfg.k_hard, W)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = train_step(model, sc, bank, pool, cfg, np.random.default_rng(5))  # the same batch every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_mined_negatives_are_away_from_truth(scenes):
    cfg = _cfg()
    sc = _prepared(scenes, cfg)
    pool = np.array([[0, 20, 30], [1, 60, 40]])
    bank = mine_hard_negatives(DenseFCN(cfg.fcn), sc, pool, 4, W)
    for ti, (si, x0, y0) in enumerate(pool):
        rows = bank[ti]
        assert len(rows) == 8 and {int(r[0]) for r in rows} <= {0, 1}
        own = rows[rows[:, 0] == si]
        assert np.all(np.maximum(np.abs(own[:, 1] - x0), np.abs(own[:, 2] - y0)) > W // 2)


def test_selector_features_and_statistics():
    stats = np.array([[0.5, 0.1, 0.8, 0.2], [0.4, 0.0, 1.0, 0.1]])
    top_a = np.array([[[10, 10], [50, 50]], [[10, 10], [50, 50]]])
    top_b = np.array([[[12, 9], [90, 90]], [[80, 80], [11, 11]]])
    x = selector_features(stats, stats, top_a, top_b)
    assert x.shape == (2, 10)
    assert x[:, 8].tolist() == [1.0, 0.0] and x[:, 9].tolist() == [0.0, 1.0]
    scores = np.zeros((20, 20), np.float32)
    scores[5, 5], scores[15, 15] = 1.0, 0.5
    ps = peak_stats(scores, [(5.5, 5.5, 1.0), (15.5, 15.5, 0.5)])
    assert ps[:3].tolist() == [1.0, 0.5, 0.5] and ps[3] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(400, 2))
    y = (xs[:, 0] + 0.3 * rng.normal(size=400) > 0).astype(float)
    p = predict_logistic(fit_logistic(xs, y), xs)
    assert np.mean((p > 0.5) == (y > 0.5)) > 0.85
    sel = Selector().fit(xs, xs[:, 0] > 0, xs[:, 0] <= 0)
    assert np.mean(sel.choose_concat(xs) == (xs[:, 0] <= 0)) > 0.95
    a = np.array([True] * 50 + [False] * 50)
    assert mcnemar_p(a, a) == 1.0 and mcnemar_p(a, np.ones(100, bool)) < 1e-10
    pt, lo, hi = paired_bootstrap_ci([(a, np.ones(100, bool))], n_boot=500)
    assert pt == 0.5 and lo <= pt <= hi


def test_training_is_deterministic_with_a_seed(scenes, tmp_path):
    cfg = _cfg(steps=2, refresh_every=2)
    sc = _prepared(scenes, cfg)
    a = load_dense(train_dense(sc, tmp_path / "a", cfg))
    b = load_dense(train_dense(sc, tmp_path / "b", cfg))
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    assert (tmp_path / "a" / "checkpoint.json").is_file()
