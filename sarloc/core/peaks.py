"""Non-maximum suppression on dense score grids (torch-free): the peak rule of the search, the shortlist and the
evaluations."""

from __future__ import annotations

import numpy as np

__all__ = ["GalleryGrid", "grid_peaks"]


def grid_peaks(grid: np.ndarray, k: int, radius_cells: int) -> np.ndarray:
    """Best ``k`` peaks of a 2-D score grid, at least ``radius_cells`` apart (Chebyshev), best first.

    Local maxima within the radius (one ``cv2.dilate``) are taken greedily in decreasing score, each suppressing
    the others within the radius: the classical baseline's peak rule, and fast on dense galleries (no Python loop
    over all positions). Missing cells are ``-inf``.

    Returns:
        Flat indices into ``grid`` (row-major).
    """
    import cv2

    g = np.asarray(grid, np.float32)
    r = int(radius_cells)
    if r > 0:
        kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
        dil = cv2.dilate(g, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=float("-inf"))
        cand = np.flatnonzero((g >= dil).ravel() & np.isfinite(g).ravel())
    else:
        cand = np.flatnonzero(np.isfinite(g).ravel())
    order = cand[np.argsort(-g.ravel()[cand], kind="stable")]
    ys, xs = np.divmod(order, g.shape[1])
    kept: list[int] = []
    while len(order) and len(kept) < k:
        kept.append(int(order[0]))
        far = np.maximum(np.abs(ys - ys[0]), np.abs(xs - xs[0])) > r
        order, ys, xs = order[far], ys[far], xs[far]
    return np.asarray(kept, dtype=np.int64)


class GalleryGrid:
    """Maps a dense gallery on a regular grid (centres (N, 2)) to a 2-D score grid and back (for :func:`grid_peaks`)."""

    def __init__(self, centres_px: np.ndarray) -> None:
        c = np.asarray(centres_px, np.float64)
        steps = [np.diff(np.unique(c[:, j])) for j in (0, 1)]
        step = min((float(d.min()) for d in steps if len(d)), default=1.0)
        ci = np.rint((c[:, 0] - c[:, 0].min()) / step).astype(np.int64)
        ri = np.rint((c[:, 1] - c[:, 1].min()) / step).astype(np.int64)
        self.shape = (int(ri.max()) + 1, int(ci.max()) + 1)
        self.flat = ri * self.shape[1] + ci
        self.inverse = np.full(self.shape[0] * self.shape[1], -1, np.int64)
        self.inverse[self.flat] = np.arange(len(c))
        self.step_px = step

    def peaks(self, scores: np.ndarray, k: int, radius_px: float) -> np.ndarray:
        """Gallery indices of the top-``k`` peaks of ``scores`` (N,), suppressed within ``radius_px``."""
        g = np.full(self.shape[0] * self.shape[1], -np.inf, np.float32)
        g[self.flat] = scores
        return self.inverse[grid_peaks(g.reshape(self.shape), k, int(radius_px // self.step_px))]
