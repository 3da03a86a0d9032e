"""Search over map packs: blocks vs one matmul, prior radius vs restricted exact, NMS, grid index, IVF, FAISS."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sarloc.core.errors import SarlocError
from sarloc.mappack import GridIndex, MapPack, PackSearcher, exact_topk, nms_metres
from sarloc.mappack.ann import IvfIndex, recall_at_k
from sarloc.mappack.search import BlockScorer
from sarloc.sim.packs import synthetic_pack, synthetic_queries


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthpack") / "pack"
    synthetic_pack(d, 2500, dim=48, seed=0, stride_m=80.0, tile_m=640.0)
    return MapPack(d, verify=True)


def _one_matmul_topk(emb, q, k, rows=None):
    e = np.asarray(emb, np.float32)
    sims = q @ e.T
    if rows is not None:
        mask = np.full(sims.shape[1], -np.inf, np.float32)
        mask[rows] = 0.0
        sims = sims + mask
    order = np.lexsort((np.broadcast_to(np.arange(sims.shape[1]), sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), order


@pytest.mark.parametrize("block_rows", [1, 7, 256, 100_000])
def test_blocks_give_the_same_topk_as_one_matmul(pack, block_rows):
    q, _ = synthetic_queries(pack.embeddings, 5, noise=0.3, seed=2)
    s, i = exact_topk(pack.embeddings, q, 20, block_rows=block_rows)
    s1, i1 = _one_matmul_topk(pack.embeddings, q, 20)
    np.testing.assert_array_equal(i, i1)
    np.testing.assert_allclose(s, s1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_rows", [5, 1000])
def test_onnxruntime_scorer_matches_numpy(pack, block_rows):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    scorer = BlockScorer(pack.dim, "ort", sub_rows=64)
    assert scorer.backend == "ort"
    q, _ = synthetic_queries(pack.embeddings, 4, noise=0.3, seed=2)
    np.testing.assert_allclose(scorer(pack.embeddings[:300], q), q @ np.asarray(pack.embeddings[:300], np.float32).T,
                               atol=1e-5)  # fmt: skip
    s, i = exact_topk(pack.embeddings, q, 20, block_rows=block_rows, scorer=scorer)
    s1, i1 = _one_matmul_topk(pack.embeddings, q, 20)
    np.testing.assert_allclose(s, s1, atol=1e-5)
    assert np.mean(i == i1) > 0.95  # float32 summation order may swap near-ties
    assert BlockScorer(pack.dim, "numpy").backend == "numpy"


def test_blocks_over_a_row_subset_and_k_larger_than_n(pack):
    rows = np.sort(np.random.default_rng(0).choice(len(pack), 30, replace=False))
    q, _ = synthetic_queries(pack.embeddings, 3, seed=3)
    _s, i = exact_topk(pack.embeddings, q, 50, block_rows=8, rows=rows)
    assert i.shape == (3, 30) and set(i[0].tolist()) == set(rows.tolist())
    _s1, i1 = _one_matmul_topk(pack.embeddings, q, 30, rows=rows)
    np.testing.assert_array_equal(i, i1)


def test_query_shape_is_checked(pack):
    with pytest.raises(SarlocError, match=r"\(Q, 48\)"):
        exact_topk(pack.embeddings, np.zeros((2, 5), np.float32), 3)


def test_grid_index_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 5000, (3000, 2))
    gi = GridIndex(xy, cell_m=300.0)
    for _ in range(20):
        c, r = rng.uniform(-500, 5500, 2), rng.uniform(0, 1500)
        want = np.flatnonzero(np.hypot(*(xy - c).T) <= r)
        np.testing.assert_array_equal(gi.within(c[0], c[1], r), want)
    assert len(gi.within(-1e6, -1e6, 10.0)) == 0


@pytest.mark.parametrize("nms", [0.0, None])
def test_prior_radius_search_equals_exact_search_restricted_to_the_radius(pack, nms):
    searcher = PackSearcher(pack, block_rows=64, nms_radius_m=nms)
    xy = pack.centres_m()
    q, rows = synthetic_queries(pack.embeddings, 4, noise=0.5, seed=5)
    for j in range(len(q)):
        prior = xy[rows[j]] + (150.0, -90.0)
        radius = 900.0
        res = searcher.search(q[j], k=10, prior_xy_m=tuple(prior), prior_radius_m=radius)[0]
        inside = np.flatnonzero(np.hypot(*(xy - prior).T) <= radius)
        assert res.candidates == len(inside)
        assert np.all(np.hypot(*(res.xy_m - prior).T) <= radius)
        # reference: the whole-pack exact scan with every tile outside the disc removed, then the same NMS
        s1, i1 = _one_matmul_topk(pack.embeddings, q[j : j + 1], searcher._pool(10), rows=inside)
        keep = nms_metres(s1[0], i1[0], xy, 10, searcher.nms_radius_m)
        np.testing.assert_array_equal(res.rows, i1[0][keep])


def test_nms_keeps_peaks_apart_and_the_best_first(pack):
    searcher = PackSearcher(pack)  # radius: half a tile = 320 m, stride 80 m
    q, rows = synthetic_queries(pack.embeddings, 3, noise=0.2, seed=6)
    for j, res in enumerate(searcher.search(q, k=10)):
        assert len(res.rows) == 10 and np.all(np.diff(res.scores) <= 0)
        d = np.abs(res.xy_m[:, None] - res.xy_m[None]).max(-1) + np.eye(10) * 1e9
        assert d.min() > searcher.nms_radius_m
        assert res.rows[0] == rows[j]  # a low-noise copy finds its own tile first


def test_ivf_recall_and_exhaustive_probe_equals_exact(pack):
    index = IvfIndex.build(pack.embeddings, nlist=50, nprobe=8)
    q, _ = synthetic_queries(pack.embeddings, 20, noise=0.5, seed=7)
    _, ex = exact_topk(pack.embeddings, q, 10)
    full = [index.search(pack.embeddings, qi, 10, nprobe=50)[1] for qi in q]
    assert recall_at_k(ex, full, 10) == 1.0
    approx = [index.search(pack.embeddings, qi, 10)[1] for qi in q]
    assert recall_at_k(ex, approx, 10) >= 0.9
    assert index.offsets[-1] == len(pack) and sorted(index.order.tolist()) == list(range(len(pack)))


def test_faiss_flat_agrees_with_exact(pack):
    faiss = pytest.importorskip("faiss")
    e = np.ascontiguousarray(np.asarray(pack.embeddings, np.float32))
    index = faiss.IndexFlatIP(e.shape[1])
    index.add(e)
    q, _ = synthetic_queries(pack.embeddings, 5, seed=8)
    fs, fi = index.search(q, 10)
    s, i = exact_topk(pack.embeddings, q, 10)
    np.testing.assert_allclose(s, fs, atol=1e-5)
    assert recall_at_k(i, fi, 10) >= 0.98  # ties may order differently


def test_mappack_imports_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        import sarloc.mappack, sarloc.mappack.build, sarloc.mappack.pack, sarloc.mappack.search
        import sarloc.mappack.ann, sarloc.mappack.basemap, sarloc.eval.mappack, sarloc.sim.packs
        for heavy in ("torch", "rasterio", "onnxruntime", "faiss"):
            assert sys.modules.get(heavy) is None, heavy
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_grid_peaks_search_matches_nms_search_and_respects_the_prior(tmp_path):
    """PackSearcher.peaks (grid local maxima) agrees with the exact top-K + NMS search on a real pack layout."""
    synthetic_pack(tmp_path / "p", 2000, dim=32, seed=3, stride_m=80.0, tile_m=640.0)
    pack = MapPack(tmp_path / "p")
    s = PackSearcher(pack)
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = np.asarray(pack.embeddings[rng.integers(len(pack))], np.float32) + rng.normal(0, 0.05, pack.dim)
        q = (q / np.linalg.norm(q)).astype(np.float32)
        a = s.search(q, 5)[0]
        b = s.peaks(q, 5)
        assert b.rows[0] == a.rows[0]
        assert len(set(a.rows.tolist()) & set(b.rows.tolist())) >= 4
        xy = pack.centres_m()[a.rows[0]]
        c = s.peaks(q, 5, prior_xy_m=tuple(xy), prior_radius_m=3 * pack.tile_m)
        assert c.rows[0] == a.rows[0]
        assert np.all(np.hypot(*(pack.centres_m()[c.rows] - xy).T) <= 3 * pack.tile_m + 1e-6)


def _native():
    """The compiled kernel; its absence fails the test where a C compiler exists (the install should have built it)."""
    import shutil

    try:
        from sarloc import _scan
    except ImportError:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("sarloc._scan was not built although a C compiler exists: reinstall with pip install -e .")
        pytest.skip("sarloc._scan not built (no C compiler at install time)")
    return _scan


@pytest.mark.parametrize("level", [0, 1, 2])  # portable C, AVX2, AVX-512 (capped at what this CPU has)
@pytest.mark.parametrize("d", [1, 7, 8, 31, 48, 64, 100, 704])
@pytest.mark.parametrize("nq", [1, 2, 5])
def test_native_kernel_matches_a_float64_reference(d, nq, level):
    scan = _native()
    rng = np.random.default_rng(d * 10 + nq)
    e = rng.standard_normal((37, d)).astype(np.float16)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    out = np.full((nq, 37), np.nan, np.float32)
    scan.dot_f16(e, q, out, 37, d, nq, level)
    ref = q.astype(np.float64) @ e.astype(np.float64).T
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.sqrt(d) * 4)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_native_kernel_converts_every_half_exactly(level):
    """All 65,536 half bit patterns (subnormals, zeros, inf, NaN) through a one-hot query equal numpy's cast."""
    scan = _native()
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    e = np.zeros((65536, 8), np.uint16)
    e[:, 3] = bits
    e = e.view(np.float16)
    q = np.zeros((1, 8), np.float32)
    q[0, 3] = 1.0
    out = np.empty((1, 65536), np.float32)
    scan.dot_f16(e, q, out, 65536, 8, 1, level)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(out[0, finite], want[finite])
    np.testing.assert_array_equal(np.isnan(out[0]), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(out[0]), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(out[0]), np.isneginf(want))


def test_native_topk_is_one_pass_best_first_with_ties_by_lower_index():
    scan = _native()
    rng = np.random.default_rng(0)
    for n, k in ((1, 1), (5, 10), (1000, 10), (1000, 1000), (4096, 37)):
        s = rng.integers(0, 50, n).astype(np.float32)  # many ties
        out = np.empty(k, np.int64)
        m = scan.topk(s, n, k, out)
        assert m == min(k, n)
        np.testing.assert_array_equal(out[:m], np.lexsort((np.arange(n), -s))[:m])
    s = np.array([1, np.nan, 3, 3, -np.inf], np.float32)
    out = np.empty(5, np.int64)
    assert scan.topk(s, 5, 5, out) == 5
    assert list(out[:3]) == [2, 3, 0]  # NaN ranks with -inf, after every finite score
    with pytest.raises(ValueError, match="too small"):
        scan.topk(s, 6, 2, out)


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize(("n", "d", "k"), [(1, 8, 10), (9000, 48, 10), (5000, 100, 1000), (4097, 704, 7)])
def test_native_fused_search_equals_the_sorted_scores(n, d, k, level):
    scan = _native()
    rng = np.random.default_rng(n + d)
    e = rng.standard_normal((n, d)).astype(np.float16)
    e[n // 2] = e[n // 3]  # an exact tie: the lower row first
    q = rng.standard_normal(d).astype(np.float32)
    s, i = np.empty(k, np.float32), np.empty(k, np.int64)
    m = scan.search_f16(e, q, n, d, k, s, i, level)
    ref = e.astype(np.float32) @ q
    want = np.lexsort((np.arange(n), -ref))[: min(k, n)]
    assert m == min(k, n)
    np.testing.assert_allclose(s[:m], ref[i[:m]], atol=2e-5)
    assert np.mean(i[:m] == want) > 0.98  # float32 summation order may swap near-ties
    assert list(i[:m]) == sorted(i[:m], key=lambda r: (-s[list(i[:m]).index(r)], r))


def test_exact_topk_one_query_fused_path_equals_the_block_path(pack):
    _native()
    q, _ = synthetic_queries(pack.embeddings, 1, noise=0.3, seed=5)
    s, i = exact_topk(pack.embeddings, q, 25)  # one query, whole memmap: the fused C search
    s2, i2 = exact_topk(pack.embeddings, q, 25, block_rows=100, scorer=BlockScorer(pack.dim, "native", threads=2))
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2, atol=1e-6)
    s1, _ = _one_matmul_topk(pack.embeddings, q, 25)
    np.testing.assert_allclose(s, s1, atol=1e-5)


def test_native_kernel_refuses_short_buffers():
    scan = _native()
    e = np.zeros((4, 8), np.float16)
    q = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="too small"):
        scan.dot_f16(e, q, np.empty((1, 3), np.float32), 4, 8, 1)
    with pytest.raises(ValueError, match="too small"):
        scan.dot_f16(e, q, np.empty((1, 4), np.float32), 5, 8, 1)
    with pytest.raises(TypeError):
        scan.dot_f16(e, q, np.empty((1, 4), np.float32).tobytes(), 4, 8, 1)  # read-only output


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block_rows", [7, 100_000])
def test_native_scorer_gives_the_topk_of_one_matmul(pack, threads, block_rows):
    _native()
    scorer = BlockScorer(pack.dim, "native", threads=threads)
    scorer.thread_min_rows = 16  # split even small blocks over the threads
    assert scorer.backend == "native" and scorer.kernel.startswith("native:")
    assert BlockScorer(pack.dim).backend == "native"  # auto prefers it
    for nq in (1, 4):
        q, _ = synthetic_queries(pack.embeddings, nq, noise=0.3, seed=nq)
        sims = scorer(pack.embeddings[:], q)
        np.testing.assert_allclose(sims, q @ np.asarray(pack.embeddings, np.float32).T, atol=1e-5)
        s, i = exact_topk(pack.embeddings, q, 20, block_rows=block_rows, scorer=scorer)
        s1, i1 = _one_matmul_topk(pack.embeddings, q, 20)
        np.testing.assert_allclose(s, s1, atol=1e-5)
        assert np.mean(i == i1) > 0.95  # float32 summation order may swap near-ties
        rows = np.arange(3, len(pack), 5)
        s, i = exact_topk(pack.embeddings, q, 20, block_rows=block_rows, rows=rows, scorer=scorer)
        s1, i1 = _one_matmul_topk(pack.embeddings, q, 20, rows=rows)
        np.testing.assert_allclose(s, s1, atol=1e-5)
        assert set(i.ravel()) <= set(rows)


def test_native_scorer_missing_is_a_clear_error(monkeypatch):
    import sarloc.mappack.search as search

    monkeypatch.setattr(search, "_native_scan", lambda: None)
    with pytest.raises(SarlocError, match="native scorer was not built"):
        BlockScorer(16, "native")
    assert BlockScorer(16, "auto").backend in ("ort", "numpy")
