"""Window consensus: within a strip, across strips (by the vehicle's displacement), and the sliding set."""

from __future__ import annotations

import numpy as np

from sarloc.runtime.fusion import Corroboration, FusionConfig, SlidingWindows, strip_consensus
from sarloc.runtime.types import WindowFix


def _win(i, t, xy, conf=0.9, trusted=True, sigma=15.0):
    return WindowFix("s", i, (0.0, 0.0), t, xy, xy, 0.3, conf, sigma, trusted)


def _strip(truth0, v, ts, bad=(), rng=None):
    rng = rng or np.random.default_rng(0)
    out = []
    for i, t in enumerate(ts):
        p = np.asarray(truth0) + np.asarray(v) * t + rng.normal(0, 5, 2)
        if i in bad:
            p = p + rng.uniform(500, 3000, 2)
        out.append(_win(i, t, (float(p[0]), float(p[1]))))
    return out


def test_one_bad_window_cannot_move_the_fix():
    v = np.array([30.0, 0.0])
    ts = np.linspace(0, 8, 12)
    wins = _strip((1000.0, 2000.0), v, ts, bad=(3,))
    f = strip_consensus(wins, 4.0, v)
    truth = np.array([1000.0, 2000.0]) + v * 4.0
    assert f.trusted
    assert f.n_inliers == 11
    assert np.linalg.norm(np.asarray(f.xy_m) - truth) < 5.0
    # a very confident outlier is still outvoted
    wins[3] = _win(3, ts[3], (9000.0, 9000.0), conf=0.99)
    f2 = strip_consensus(wins, 4.0, v)
    assert np.linalg.norm(np.asarray(f2.xy_m) - truth) < 5.0


def test_no_agreement_is_untrusted_and_nothing_is_nan_trusted():
    wins = [_win(i, 0.0, (i * 1000.0, 0.0), conf=0.6) for i in range(5)]  # five windows, five places
    f = strip_consensus(wins, 0.0, None)
    assert not f.trusted
    f0 = strip_consensus([], 0.0, None)
    assert not f0.trusted and f0.n_windows == 0
    low = [_win(i, 0.0, (0.0, 0.0), conf=0.05, trusted=False) for i in range(4)]
    assert not strip_consensus(low, 0.0, None).trusted


def test_lone_confident_window():
    f = strip_consensus([_win(0, 0.0, (5.0, 5.0), conf=0.95)], 0.0, None)
    assert f.trusted and f.n_inliers == 1
    f = strip_consensus([_win(0, 0.0, (5.0, 5.0), conf=0.7)], 0.0, None)
    assert not f.trusted


def test_consensus_across_strips_with_a_turn():
    """Windows of two strips with a turn between them vote together when moved by the vehicle's displacement."""

    # leg 1 east at 20 m/s for t in [0, 30), then north at 20 m/s
    def truth(t):
        return np.array([20.0 * min(t, 30.0), 20.0 * max(t - 30.0, 0.0)])

    def moved(t0, t1):
        return truth(t1) - truth(t0)

    ts = [5.0, 15.0, 40.0, 50.0]
    wins = [_win(i, t, tuple(truth(t) + 3.0)) for i, t in enumerate(ts)]
    wins.append(_win(9, 45.0, (5000.0, -4000.0)))
    f = strip_consensus(wins, 50.0, None, displacement=moved)
    assert f.trusted and f.n_inliers == 4
    assert np.allclose(f.xy_m, truth(50.0) + 3.0, atol=1e-6)
    # a constant velocity cannot explain the turn: the two legs split
    assert strip_consensus(wins, 50.0, np.array([20.0, 0.0])).n_inliers == 2


def test_sliding_windows_keep_the_recent_usable_ones():
    sw = SlidingWindows(FusionConfig(horizon_s=30.0, max_windows=3))
    sw.add([_win(0, 0.0, (0.0, 0.0)), _win(1, 10.0, (0.0, 0.0), conf=0.05)])
    assert [w.index for w in sw.windows] == [0]  # below the confidence floor
    sw.add([_win(2, 20.0, (0.0, 0.0)), _win(3, 35.0, (0.0, 0.0))])
    assert [w.index for w in sw.windows] == [2, 3]  # t=0 is beyond the horizon
    sw.add([_win(4, 36.0, (0.0, 0.0)), _win(5, 37.0, (0.0, 0.0))])
    assert [w.index for w in sw.windows] == [3, 4, 5]


def test_overlapping_windows_are_not_independent_evidence():
    """Two half-overlapping windows agreeing on a place do not make a trusted fix; two separate windows do."""
    a = WindowFix("s", 0, (0.0, 0.0), 0.0, (1000.0, 1000.0), (1000.0, 1000.0), 0.3, 0.8, 15.0, True)
    b = WindowFix("s", 1, (32.0, 0.0), 0.0, (1320.0, 1000.0), (1005.0, 1000.0), 0.3, 0.8, 15.0, True)
    assert strip_consensus([a, b], 0.0, None).trusted  # no separation rule: 2 agree
    assert not strip_consensus([a, b], 0.0, None, min_separation_m=640.0).trusted  # 320 m apart < 640 m tiles
    c = WindowFix("s", 2, (64.0, 0.0), 0.0, (1700.0, 1000.0), (1003.0, 1000.0), 0.3, 0.8, 15.0, True)
    f = strip_consensus([a, b, c], 0.0, None, min_separation_m=640.0)
    assert f.trusted and f.n_inliers == 3  # a and c are 700 m apart: independent


def _moving(v):
    return lambda t0, t1: np.asarray(v) * (t1 - t0)


def test_corroboration_holds_an_isolated_outlier_and_passes_agreeing_windows():
    v = np.array([20.0, 0.0])
    c = Corroboration(agree_m=25.0, window_s=20.0)
    good = [_win(i, 7.0 * i, (float(20.0 * 7.0 * i + 3.0 * (-1) ** i), 0.0)) for i in range(4)]
    outlier = _win(9, 10.0, (200.0 + 45.0, 0.0))  # 45 m off a track its neighbours agree on within 6 m
    assert c.push(good[0], _moving(v)) == []  # nothing to agree with yet: held
    assert c.push(outlier, _moving(v)) == []
    out = c.push(good[1], _moving(v))
    assert good[1] in out and good[0] in out and outlier not in out  # the held first window is released
    assert c.push(good[2], _moving(v)) == [good[2]]
    c.push(good[3], _moving(v))
    c.push(_win(10, 60.0, (1200.0, 0.0)), _moving(v))  # 50 s later: the outlier expires unapplied
    assert c.stats["expired"] >= 1


def test_corroboration_uses_the_displacement_between_acquisition_times():
    c = Corroboration(agree_m=10.0, window_s=20.0)
    a, b = _win(0, 0.0, (0.0, 0.0)), _win(1, 10.0, (300.0, 0.0))
    c.push(a, _moving((0.0, 0.0)))
    assert c.push(b, _moving((0.0, 0.0))) == []  # a vehicle at rest would not have moved 300 m
    c2 = Corroboration(agree_m=10.0, window_s=20.0)
    c2.push(a, _moving((30.0, 0.0)))
    got = c2.push(b, _moving((30.0, 0.0)))
    assert len(got) == 2 and a in got and b in got
    c3 = Corroboration(agree_m=10.0, window_s=5.0)  # too far apart in time to vouch for each other
    c3.push(a, _moving((30.0, 0.0)))
    assert c3.push(b, _moving((30.0, 0.0))) == []
