"""The track graph over the candidates of a strip's windows: graphs from records, the network, the comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sarloc.eval.track_graph import (
    NODE_FEATURES,
    StripGraph,
    graph_fix,
    graphs_from_run,
    paired,
    score,
    window_graphs_from_run,
)
from sarloc.runtime.fusion import strip_consensus
from sarloc.runtime.types import WindowFix
from sarloc.trainer.track_graph import TrackGraph, TrackGraphConfig, _batch, predict, study, train

SPEED = 30.0  # m/s east
ACROSS = 200.0  # window centre 200 m right (south) of the vehicle


def _flight(rng, n_strips=6, n_win=7, k=6, wrong_chosen=0.6, t0=1000.0):
    """Window and fix records (the real strip consensus) and a truth of a straight flight east at 30 m/s.

    Every window holds the right place among its candidates; its chosen candidate (highest verifier probability) is
    a look-alike elsewhere in ``wrong_chosen`` of the windows, at a different place in each window.
    """
    recs, strips = [], []
    for s in range(n_strips):
        ts, te = t0 + 100.0 * s, t0 + 100.0 * s + 60.0
        start = np.array([SPEED * (ts - t0), 0.0])
        strips.append(
            {
                "t0_s": ts,
                "t_end_s": te,
                "vehicle_start_xy_m": start.tolist(),
                "vehicle_end_xy_m": (start + np.array([SPEED * 60.0, 0.0])).tolist(),
            }
        )
        wins = []
        for i in range(n_win):
            t = ts + 5.0 + 7.0 * i
            veh = np.array([SPEED * (t - t0), 0.0])
            centre = veh + np.array([0.0, -ACROSS])
            cand = centre + rng.uniform(-5000, 5000, (k, 2))
            cand[0] = centre + rng.normal(0, 5, 2)
            p = rng.uniform(0.01, 0.4, k)
            p[0] = rng.uniform(0.3, 0.7)
            if rng.random() < wrong_chosen:
                p[1 + rng.integers(k - 1)] = rng.uniform(0.75, 0.99)
            else:
                p[0] = rng.uniform(0.75, 0.99)
            pick = int(np.argmax(p))
            alts = [
                [float(cand[j, 0]), float(cand[j, 1]), float(p[j]), float(3 * p[j]), float(0.2 + 0.1 * p[j]), 0.1]
                for j in range(k)
            ]
            xy = cand[pick]
            wins.append(
                WindowFix(
                    f"s{s}",
                    i,
                    (80.0, 40.0 + 16 * i),
                    t,
                    (float(xy[0]), float(xy[1])),
                    (float(xy[0]), float(xy[1] + ACROSS)),
                    0.2,
                    float(p[pick]),
                    15.0,
                    p[pick] >= 0.5,
                )
            )
            recs.append(
                {
                    "type": "window",
                    "strip_id": f"s{s}",
                    "index": i,
                    "t_s": t,
                    "xy_m": list(xy),
                    "vehicle_xy_m": [float(xy[0]), float(xy[1] + ACROSS)],
                    "alternatives": alts,
                    "trusted": bool(p[pick] >= 0.5),
                    "nav": "applied" if p[pick] >= 0.5 else "untrusted",
                }
            )
        t_ref = float(np.mean([w.t_s for w in wins]))
        fix = strip_consensus(wins, t_ref, np.array([SPEED, 0.0]), strip_id=f"s{s}", min_separation_m=0.0)
        recs.append(
            {
                "type": "fix",
                "t_s": fix.t_s,
                "xy_m": list(fix.xy_m),
                "vel_mps": list(fix.vel_mps),
                "trusted": fix.trusted,
                "strip_id": f"s{s}",
            }
        )
    return recs, {"strips": strips}


def _write(root, scene, run, rng, **kw):
    recs, truth = _flight(rng, **kw)
    (root / scene / f"run_{run}").mkdir(parents=True)
    (root / scene / f"flight_{run}").mkdir(parents=True)
    (root / scene / f"run_{run}" / "records.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (root / scene / f"flight_{run}" / "truth.json").write_text(json.dumps(truth))
    (root / scene / f"run_{run}" / "done").write_text("{}")  # a finished run (load_scene_graphs skips others)


def test_graphs_from_records_move_candidates_to_the_strip_time_and_count_support(tmp_path):
    _write(tmp_path, "a", "f0", np.random.default_rng(0))
    gs = graphs_from_run(tmp_path / "a" / "run_f0", tmp_path / "a" / "flight_f0" / "truth.json", "a/f0")
    assert len(gs) == 6
    for g in gs:
        assert g.feats.shape == (7 * 6, len(NODE_FEATURES)) and g.right.sum() == 7
        # the right candidates of all seven windows land on the truth at the strip's time (5 m noise each)
        assert np.linalg.norm(g.xy_m[g.right] - g.truth_xy_m, axis=1).max() < 40.0
        support = g.feats[:, NODE_FEATURES.index("support")]
        assert support[g.right].min() > 0.6 and np.median(support[~g.right]) == 0.0
        chosen = g.feats[:, NODE_FEATURES.index("chosen")]
        assert chosen.sum() == 7


def test_graph_fix_and_paired_comparison():
    g = StripGraph(
        "k",
        0.0,
        np.array([[0.0, 0.0], [10.0, 0.0], [900.0, 0.0]]),
        np.array([0, 1, 2]),
        np.zeros((3, len(NODE_FEATURES)), np.float32),
        np.array([True, True, False]),
        np.zeros(2),
        {},
    )
    fix = graph_fix(g, np.array([0.9, 0.6, 0.3]), threshold=0.8)
    assert fix["trusted"] and 0.0 < fix["xy_m"][0] < 10.0  # the best node and its agreeing neighbour
    assert not graph_fix(g, np.array([0.2, 0.1, 0.7]), threshold=0.8)["trusted"]
    wrong = graph_fix(g, np.array([0.1, 0.1, 0.95]), threshold=0.8)
    assert score([g], [wrong])["false"] == 1 and score([g], [fix])["trusted_right"] == 1
    pr = paired([g, g, g], [fix, wrong, fix], [fix, fix, fix])
    assert (pr["wins"], pr["losses"]) == (1, 0) and pr["mcnemar_p"] == 1.0 and pr["diff"] == pytest.approx(1 / 3)


def test_network_is_equivariant_to_the_order_of_the_nodes(tmp_path):
    _write(tmp_path, "a", "f0", np.random.default_rng(1))
    g = graphs_from_run(tmp_path / "a" / "run_f0", tmp_path / "a" / "flight_f0" / "truth.json", "a/f0")[0]
    model = TrackGraph(TrackGraphConfig()).eval()
    perm = np.random.default_rng(2).permutation(len(g.xy_m))
    h = type(g)(g.key, g.t_ref_s, g.xy_m[perm], g.window[perm], g.feats[perm], g.right[perm], g.truth_xy_m, {})
    p, q = predict(model, [g])[0], predict(model, [h])[0]
    np.testing.assert_allclose(p[perm], q, atol=1e-5)
    _, nb, _, mask, _, _ = _batch([g], model.cfg)
    assert bool(mask[0, :, 0].all()) and bool((nb[0, :, 0] == torch.arange(len(g.xy_m))).all())  # itself first


def test_trained_graph_finds_the_track_where_the_chosen_candidates_scatter(tmp_path):
    """Most windows choose a look-alike: the consensus of chosen candidates rarely trusts a strip; the network,
    trained on two other 'scenes', finds the place that the windows' other candidates agree on."""
    rng = np.random.default_rng(3)
    for scene in ("a", "b", "c"):
        for f in range(3):
            _write(tmp_path, scene, f"f{f}", rng, wrong_chosen=0.75)
    res = study(tmp_path, ["a", "b", "c"], TrackGraphConfig(epochs=60))
    pooled = res["pooled"]
    assert pooled["graph"]["false"] == 0, pooled
    assert pooled["graph"]["trusted_right"] > pooled["consensus"]["trusted_right"] + 10, pooled
    assert pooled["paired"]["wins"] > pooled["paired"]["losses"]
    assert {f["scene"] for f in res["folds"]} == {"a", "b", "c"}


def test_training_lowers_the_loss(tmp_path):
    _write(tmp_path, "a", "f0", np.random.default_rng(4))
    gs = graphs_from_run(tmp_path / "a" / "run_f0", tmp_path / "a" / "flight_f0" / "truth.json", "a/f0")
    before = predict(TrackGraph(TrackGraphConfig(seed=0)).eval(), gs)
    after = predict(train(gs, TrackGraphConfig(epochs=40)), gs)
    y = np.concatenate([g.right for g in gs])

    def bce(p):
        p = np.clip(np.concatenate(p), 1e-6, 1 - 1e-6)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    assert bce(after) < 0.5 * bce(before)


def test_window_graphs_are_causal_and_carry_what_the_daemon_passed_to_the_filter(tmp_path):
    _write(tmp_path, "a", "f0", np.random.default_rng(5), n_strips=2, n_win=7, k=6)
    run, truth = tmp_path / "a" / "run_f0", tmp_path / "a" / "flight_f0" / "truth.json"
    gs = window_graphs_from_run(run, truth, "a/f0", depth=4)
    assert len(gs) == 2 * 7
    recs = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    wins = [r for r in recs if r["type"] == "window"]
    for g, w in zip(gs, wins, strict=True):
        i = w["index"]
        assert len(g.xy_m) == 6 * min(i + 1, 4) and g.window.max() == g.target  # this window and up to 3 before
        assert g.consensus["trusted"] == (w["nav"] == "applied")
        assert np.allclose(g.truth_xy_m, [SPEED * (w["t_s"] - 1000.0), 0.0])  # labelled at the window's own time


def test_trained_window_graph_passes_fewer_wrong_windows_than_trusting_the_verifier(tmp_path):
    rng = np.random.default_rng(6)
    for scene in ("a", "b", "c"):
        for f in range(2):
            _write(tmp_path, scene, f"f{f}", rng, wrong_chosen=0.5)
    res = study(tmp_path, ["a", "b", "c"], TrackGraphConfig(epochs=60, layers=0), unit="window")
    pooled = res["pooled"]
    assert pooled["consensus"]["false"] > 20, pooled  # these records pass every verifier-trusted window
    assert pooled["graph"]["false"] < pooled["consensus"]["false"] // 4, pooled
    assert pooled["graph"]["trusted_right"] > 0.5 * pooled["consensus"]["trusted_right"], pooled
