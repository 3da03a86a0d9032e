"""Tests for the classical CFOG + FFT template-matching baseline (synthetic data only)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sarloc.core.cfog import CFOGConfig, DenseMatcher, cfog, to_gray
from sarloc.core.errors import SarlocError


def _textured(size: int = 300, seed: int = 0) -> np.ndarray:
    """Smoothed noise plus many high-contrast rectangles (field/building-like), in [1, 255] float32.

    The rectangles' contrast (several dB after the SAR-like transform) is what survives 4-look
    speckle, as strong edges do in real scenes.
    """
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.5)
    img = (img - img.min()) / (img.max() - img.min()) * 120.0 + 40.0
    for _ in range(80 * size * size // 90000):
        y0, x0 = rng.integers(0, size - 20, 2)
        hh, ww = rng.integers(8, 50, 2)
        img[y0 : y0 + hh, x0 : x0 + ww] += float(rng.uniform(-90.0, 90.0))
    return np.clip(img, 1.0, 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return _textured()


@pytest.fixture(scope="module")
def matcher(scene: np.ndarray) -> DenseMatcher:
    return DenseMatcher(scene)


def test_cfog_shape_finite_unit_norm(scene: np.ndarray) -> None:
    cfg = CFOGConfig(eps_rel=0.0)  # plain CFOG: unit norm wherever there is a gradient
    d = cfog(scene, cfg)
    assert d.shape == (cfg.n_orient, *scene.shape)
    assert d.dtype == np.float32
    assert np.isfinite(d).all()
    assert (d >= 0).all()
    norm = np.sqrt((d.astype(np.float64) ** 2).sum(axis=0))
    gx = cv2.Sobel(scene, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(scene, cv2.CV_32F, 0, 1, ksize=3)
    textured = np.hypot(gx, gy) > 1e-2
    assert textured.mean() > 0.9
    np.testing.assert_allclose(norm[textured], 1.0, atol=1e-4)
    assert norm.max() <= 1.0 + 1e-5
    # default soft normalisation: norms in [0, 1), increasing with the raw gradient strength
    soft = np.sqrt((cfog(scene).astype(np.float64) ** 2).sum(axis=0))
    assert soft.max() < 1.0 and soft.min() >= 0.0 and np.median(soft) > 0.5
    assert np.isfinite(cfog(scene, CFOGConfig(gradient_ksize=1, sigma=0.0, orient_smooth=False))).all()


def test_cfog_flat_image_is_zero_and_input_is_robust() -> None:
    d = cfog(np.full((20, 30), 7.0, np.float32))
    assert d.shape == (9, 20, 30) and np.abs(d).max() < 1e-6
    rgb = np.dstack([_textured(40, 1)] * 3)
    rgb[3, 4, :] = np.nan
    rgb[5, 6, 1] = np.inf
    g = to_gray(rgb)
    assert g.shape == (40, 40) and np.isfinite(g).all()
    assert np.isfinite(cfog(rgb)).all()


def test_cfog_invariant_to_intensity_inversion(scene: np.ndarray) -> None:
    a = cfog(scene)
    b = cfog(255.0 - scene)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _sar_like(patch: np.ndarray, seed: int) -> np.ndarray:
    """Non-linear modality change: inversion, gamma, 4-look Gamma speckle, then dB."""
    rng = np.random.default_rng(seed)
    inten = ((255.0 - patch) / 255.0) ** 1.8 + 0.02
    speckle = rng.gamma(shape=4.0, scale=1.0 / 4.0, size=patch.shape)
    return (10.0 * np.log10(inten * speckle)).astype(np.float32)


@pytest.mark.parametrize(("x0", "y0"), [(37, 121), (200, 15), (120, 230)])
def test_match_finds_transformed_crop(scene: np.ndarray, matcher: DenseMatcher, x0: int, y0: int) -> None:
    win = _sar_like(scene[y0 : y0 + 64, x0 : x0 + 64], seed=x0 + y0)
    peaks = matcher.match(win, top_k=3)
    x, y, score = peaks[0]
    assert abs(x - (x0 + 32.0)) <= 1.0 and abs(y - (y0 + 32.0)) <= 1.0
    assert -1.0 <= score <= 1.0 + 1e-4
    assert all(score >= p[2] for p in peaks[1:])


def test_plain_score_also_matches_exact_crop(scene: np.ndarray) -> None:
    plain = DenseMatcher(scene, normalise=False)
    win = 255.0 - scene[50:98, 140:188]
    sm = plain.score_map(win)
    assert sm.shape == (300 - 48 + 1, 300 - 48 + 1)
    assert np.unravel_index(np.argmax(sm), sm.shape) == (50, 140)
    x, y, _ = plain.match(win, top_k=1)[0]
    assert abs(x - 164.0) < 0.1 and abs(y - 74.0) < 0.1  # centre = top-left + size / 2


def test_score_map_matches_direct_correlation(scene: np.ndarray) -> None:
    small = scene[:80, :90]
    dm = DenseMatcher(small)
    win = 255.0 - small[10:26, 30:50] + 3.0
    sm = dm.score_map(win)
    dmap, dwin = cfog(small), cfog(win)
    dwin = dwin - dwin.mean(axis=(1, 2), keepdims=True)
    y, x = 7, 41
    patch = dmap[:, y : y + 16, x : x + 20]
    patch = patch - patch.mean(axis=(1, 2), keepdims=True)
    expected = (dwin * patch).sum() / np.sqrt((dwin**2).sum() * (patch**2).sum())
    assert sm[y, x] == pytest.approx(expected, abs=1e-4)


def test_top_k_peaks_are_nms_separated(scene: np.ndarray, matcher: DenseMatcher) -> None:
    win = _sar_like(scene[100:164, 100:164], seed=3)
    for nms in (None, 10):
        peaks = matcher.match(win, top_k=8, nms_px=nms)
        r = 32 if nms is None else nms
        assert 1 < len(peaks) <= 8
        scores = [p[2] for p in peaks]
        assert scores == sorted(scores, reverse=True)
        for i, (xa, ya, _) in enumerate(peaks):
            for xb, yb, _ in peaks[i + 1 :]:
                # integer peaks are > r apart; sub-pixel refinement moves each by <= 0.5 px
                assert max(abs(xa - xb), abs(ya - yb)) >= r


def test_errors(matcher: DenseMatcher) -> None:
    with pytest.raises(SarlocError, match="larger than the optical map"):
        matcher.score_map(np.zeros((301, 10), np.float32))
    with pytest.raises(SarlocError, match="larger than the optical map"):
        matcher.match(np.zeros((10, 400), np.float32))
    with pytest.raises(SarlocError, match="empty"):
        matcher.match(np.zeros((0, 5), np.float32))
    with pytest.raises(SarlocError):
        DenseMatcher(np.zeros((0, 0), np.float32))
    with pytest.raises(SarlocError, match="optical map"):
        DenseMatcher(np.zeros((4, 4, 2, 2), np.float32))
    with pytest.raises(SarlocError, match="max_window_px"):
        DenseMatcher(np.zeros((300, 300), np.float32), max_window_px=32).score_map(np.ones((40, 40)))


def test_flat_window_and_flat_map_regions_stay_bounded(scene: np.ndarray) -> None:
    padded = np.zeros((200, 260), np.float32)
    padded[:, :130] = scene[:200, :130]  # right half is no-data (constant)
    dm = DenseMatcher(padded)
    sm = dm.score_map(255.0 - scene[20:52, 40:72])
    assert np.isfinite(sm).all() and np.abs(sm).max() <= 1.0 + 1e-3
    assert np.unravel_index(np.argmax(sm), sm.shape) == (20, 40)
    assert np.abs(dm.score_map(np.ones((16, 16), np.float32))).max() == 0.0
