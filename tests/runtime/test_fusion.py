"""Along-track fusion: strip consensus and the track filter."""

from __future__ import annotations

import numpy as np
import pytest

from sarloc.runtime.fusion import FusionConfig, TrackFilter, strip_consensus
from sarloc.runtime.types import Fix, WindowFix


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


def _fix(t, xy, v=(30.0, 0.0), trusted=True, sigma=10.0):
    return Fix(t, tuple(xy), None, v, ((sigma**2, 0.0), (0.0, sigma**2)), sigma, 2.0, 0.9, trusted, 10, 8)


def test_filter_tracks_gates_and_reinitialises():
    kf = TrackFilter(FusionConfig(reinit_after=3))
    v = np.array([30.0, 0.0])
    for k in range(6):
        ok, _ = kf.update(_fix(10.0 * k, np.array([0.0, 0.0]) + v * 10 * k))
        assert ok
    x, _ = kf.state(60.0)
    assert np.allclose(x[:2], v * 60, atol=5)
    # one wild fix is gated out
    ok, why = kf.update(_fix(60.0, (5000.0, 5000.0)))
    assert not ok and "gated" in why
    assert kf.stats["gated"] == 1
    # untrusted fixes are ignored
    assert not kf.update(_fix(61.0, (0.0, 0.0), trusted=False))[0]
    # three consistent fixes of another track re-initialise it (recovery from a wrong track)
    for k in range(3):
        ok, why = kf.update(_fix(70.0 + 10 * k, np.array([8000.0, 100.0]) + v * 10 * k))
    assert ok and "re-initialised" in why
    assert np.allclose(kf.state(90.0)[0][:2], [8000 + 600, 100], atol=20)


def test_nav_state_validity_and_staleness():
    kf = TrackFilter(FusionConfig(stale_after_s=5.0))
    assert not kf.nav_state(0.0, lambda x, y: (x, y)).valid
    kf.update(_fix(100.0, (10.0, 20.0), sigma=8.0))
    st = kf.nav_state(101.0, lambda x, y: (x / 1e5, y / 1e5))
    assert st.valid
    assert st.horiz_accuracy_m >= 8.0 * 0.99
    assert st.lat_deg == pytest.approx((20.0 + 0.0) / 1e5, abs=1e-3)
    assert st.vel_ned_mps[1] == pytest.approx(30.0, abs=1e-6)  # east velocity
    assert not kf.nav_state(106.0, lambda x, y: (x, y)).valid  # stale
    assert not kf.nav_state(101.0, None).valid  # no geo-reference: no GPS message


def test_overlapping_windows_are_not_independent_evidence():
    """Two half-overlapping windows agreeing on a place do not make a trusted fix; two separate windows do."""
    a = WindowFix("s", 0, (0.0, 0.0), 0.0, (1000.0, 1000.0), (1000.0, 1000.0), 0.3, 0.8, 15.0, True)
    b = WindowFix("s", 1, (32.0, 0.0), 0.0, (1320.0, 1000.0), (1005.0, 1000.0), 0.3, 0.8, 15.0, True)
    assert strip_consensus([a, b], 0.0, None).trusted  # no separation rule: 2 agree
    assert not strip_consensus([a, b], 0.0, None, min_separation_m=640.0).trusted  # 320 m apart < 640 m tiles
    c = WindowFix("s", 2, (64.0, 0.0), 0.0, (1700.0, 1000.0), (1003.0, 1000.0), 0.3, 0.8, 15.0, True)
    f = strip_consensus([a, b, c], 0.0, None, min_separation_m=640.0)
    assert f.trusted and f.n_inliers == 3  # a and c are 700 m apart: independent
