import numpy as np
import pytest
from helpers import write_plain_scene

from sarloc.core.preprocess import PreprocessConfig, crop_windows, prepare_windows
from sarloc.core.scene import load_scene, make_queries
from sarloc.eval.retrieval import EvalConfig, evaluate_cfog, evaluate_embeddings


def _oracle_scene(tmp_path):
    """A scene whose SAR is an inverted, noisy copy of the optical image: a known answer exists."""
    import cv2

    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.random((256, 320)).astype(np.float32), (0, 0), 3)
    base = (base - base.min()) / (base.max() - base.min())
    opt = (base * 255).astype(np.uint8)
    sar = (1.0 - base) * 0.9 + 0.05
    return load_scene(write_plain_scene(tmp_path / "oracle", np.dstack([opt] * 3), sar.astype(np.float32)))


def _pixel_embed(x):
    """Embedding = the standardised intensity channel as a unit vector (raw pixels)."""
    b = x[:, 0]
    v = b.reshape(len(b), -1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_eval_with_known_answer(tmp_path):
    s = _oracle_scene(tmp_path)
    prep = PreprocessConfig(n_orient=0)
    q = make_queries(s, "aligned", 64)
    # SAR is the inverted optical: negate the SAR embedding so the oracle matches exactly
    res = evaluate_embeddings(s, q, lambda x: -_pixel_embed(x), _pixel_embed, prep, EvalConfig(window_px=64))
    assert res["recall@1"] == 1.0 and res["median_error_m"] == 0.0 and res["queries"] == 20
    assert res["gallery_tiles"] == 20 and res["within_50m"] == 1.0
    # a useless embedding (constant) is not rewarded
    const = lambda x: np.ones((len(x), 4), np.float32) / 2  # noqa: E731
    bad = evaluate_embeddings(s, q, const, const, prep, EvalConfig(window_px=64))
    assert bad["recall@1"] <= 0.2


def test_eval_arbitrary_positive_is_tile_containing_centre(tmp_path):
    s = _oracle_scene(tmp_path)
    prep = PreprocessConfig(n_orient=0)
    q = make_queries(s, "arbitrary", 64, n=30, seed=1)

    res = evaluate_embeddings(
        s, q, lambda x: -_pixel_embed(x), _pixel_embed, prep, EvalConfig(window_px=64, stride_px=32)
    )
    assert 0.0 <= res["recall@1"] <= res["recall@5"] <= res["recall@10"] <= 1.0
    assert res["stride_px"] == 32


def test_cfog_baseline_finds_inverted_windows(tmp_path):
    s = _oracle_scene(tmp_path)
    q = make_queries(s, "arbitrary", 64, n=10, seed=2)
    res = evaluate_cfog(s, q, EvalConfig(window_px=64))
    assert res["recall@1"] >= 0.9 and res["median_error_m"] < 5.0  # pixel-level (gsd 5 m)


def test_prepare_windows_handles_nan_and_shapes():
    w = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    w[0, 0, 0] = np.nan
    out = prepare_windows(w, PreprocessConfig())
    assert out.shape == (2, 10, 32, 32) and np.isfinite(out).all()
    with pytest.raises(Exception, match="windows must be"):
        prepare_windows(np.zeros((2, 4, 4)))
    img = np.arange(100.0).reshape(10, 10)
    c = crop_windows(img, np.array([[2, 3]]), 4)
    assert c[0, 0, 0] == 32 and c.shape == (1, 4, 4)


def test_grid_peaks_hand_made_and_gallery_grid():
    from sarloc.core.peaks import GalleryGrid, grid_peaks

    g = np.full((6, 8), -np.inf, np.float32)
    g[1, 1], g[1, 2], g[4, 6], g[5, 0] = 0.9, 0.8, 0.7, 0.95
    peaks = grid_peaks(g, 10, radius_cells=1)
    assert peaks.tolist() == [5 * 8 + 0, 1 * 8 + 1, 4 * 8 + 6]  # (1, 2) is suppressed by (1, 1)
    assert grid_peaks(g, 2, 0).tolist() == [40, 9]
    # a gallery on a regular grid with one position missing
    xs, ys = np.meshgrid(np.arange(4) * 8 + 32.0, np.arange(3) * 8 + 32.0)
    centres = np.stack([xs.ravel(), ys.ravel()], 1)[1:]
    gg = GalleryGrid(centres)
    assert gg.shape == (3, 4) and gg.step_px == 8.0
    s = np.zeros(len(centres), np.float32)
    s[5] = 1.0
    assert gg.peaks(s, 1, 32.0).tolist() == [5]
