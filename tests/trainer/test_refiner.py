"""Graph refiner: graph construction, permutation behaviour, shapes/gradients, training and ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sarloc.core.errors import ArtifactError
from sarloc.eval.rerank import rerank
from sarloc.runtime.refine import Candidates, OnnxRefiner, candidate_scores
from sarloc.trainer.models.refiner import GraphRefiner, RefinerConfig, fourier_position, knn_mask, listwise_loss
from sarloc.trainer.refiner_train import export_refiner, train_refiner


def test_knn_mask_hand_made_case():
    # four candidates: three close together on the ground, one far away
    offs = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]]])
    m = knn_mask(offs, edges=1)[0]
    assert m.diagonal().all()
    assert m[0].tolist() == [True, True, False, False]  # nearest of 0 is 1
    assert m[1].tolist() == [True, True, False, False]
    assert m[2].tolist() == [True, False, True, False]  # nearest of 2 is 0 (distance 2 < sqrt 5)
    assert m[3].tolist() == [False, False, True, True]  # nearest of 3 is 2 (|(10,8)| < |(9,10)|)
    assert knn_mask(offs, edges=10)[0].all()


def _expected_knn(offs: torch.Tensor, edges: int) -> torch.Tensor:
    """Reference: each node keeps itself, then its nearest by (squared distance, index), ``edges + 1`` in all."""
    k = offs.shape[0]
    d = ((offs[:, None] - offs[None]) ** 2).sum(-1).tolist()
    m = torch.zeros(k, k, dtype=torch.bool)
    for i in range(k):
        for j in sorted(range(k), key=lambda j: (j != i, d[i][j], j))[: min(edges + 1, k)]:
            m[i, j] = True
    return m


def test_knn_mask_keeps_exactly_edges_neighbours_on_a_lattice():
    # a 5 x 4 lattice of unit spacing: up to 4 neighbours at distance 1, 4 more at sqrt 2, ... (ties everywhere)
    yy, xx = torch.meshgrid(torch.arange(5.0), torch.arange(4.0), indexing="ij")
    offs = torch.stack([xx, yy], -1).reshape(1, 20, 2)
    for edges in (1, 2, 3, 4, 5, 7, 19, 30):
        m = knn_mask(offs, edges)[0]
        assert m.diagonal().all()
        assert (m.sum(1) == min(edges + 1, 20)).all(), (edges, m.sum(1).tolist())
        assert torch.equal(m, _expected_knn(offs[0], edges)), edges
    # duplicates (padding repeats a candidate): each node still keeps itself, then the lowest index
    dup = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 0.0]]])
    m = knn_mask(dup, edges=1)[0]
    assert m.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, False, False, True],
    ]


def test_position_embedding_shape():
    f = fourier_position(torch.zeros(2, 5, 2), 6)
    assert f.shape == (2, 5, 26)


def _batch(b=3, k=10, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(b, k, d, generator=g), dim=-1)
    o = torch.randn(b, k, 2, generator=g) * 2
    return q, c, o


def test_permutation_equivariance_shapes_and_gradients():
    cfg = RefinerConfig(k=10, embed_dim=32, extra_features=2)
    model = GraphRefiner(cfg)
    q, c, o = _batch()
    e = torch.randn(3, 10, 2)
    y = model(q, c, o, e)
    assert y.shape == (3, 10)
    perm = torch.randperm(10)
    y2 = model(q, c[:, perm], o[:, perm], e[:, perm])
    torch.testing.assert_close(y2, y[:, perm], atol=1e-5, rtol=1e-5)
    loss = listwise_loss(y, torch.rand(3, 10) > 0.7)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    # an untrained head is a no-op: the coarse order is kept
    fresh = GraphRefiner(RefinerConfig(k=10, embed_dim=32))
    sims = torch.einsum("bd,bkd->bk", q, c)
    assert torch.equal(fresh(q, c, o).argsort(dim=1), sims.argsort(dim=1))


def test_listwise_loss_ignores_queries_without_positive():
    logits = torch.zeros(2, 4, requires_grad=True)
    pos = torch.tensor([[False] * 4, [True, False, False, False]])
    loss = listwise_loss(logits, pos)
    assert float(loss) == pytest.approx(np.log(4))
    assert float(listwise_loss(logits, torch.zeros(2, 4, dtype=torch.bool))) == 0.0


def _toy_lists(n=300, k=10, d=32, seed=0):
    """Lists whose true candidate is the one with a close neighbour on the ground (similarity is noise)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    emb = rng.normal(size=(n, k, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    xy = rng.uniform(-20, 20, size=(n, k, 2))
    t = rng.integers(0, k - 1, n)
    buddy = (t + 1) % k
    xy[np.arange(n), buddy] = xy[np.arange(n), t] + 0.3
    sims = np.einsum("qd,qkd->qk", q, emb)
    pos = np.zeros((n, k), bool)
    pos[np.arange(n), t] = True
    pos[np.arange(n), buddy] = True
    return Candidates(q, emb, sims, xy, np.ones((n, k), bool)), pos


def test_training_learns_a_spatial_rule_and_exports_with_parity(tmp_path):
    cands, pos = _toy_lists()
    model = train_refiner([(cands, pos)], RefinerConfig(k=10, embed_dim=32), steps=200, lr=3e-3)
    test, tpos = _toy_lists(200, seed=1)
    with torch.no_grad():
        y = model(torch.from_numpy(test.query), torch.from_numpy(test.emb), torch.from_numpy(test.offsets())).numpy()
    r1 = np.mean(tpos[np.arange(200), y.argmax(1)])
    base = np.mean(tpos[np.arange(200), test.sims.argmax(1)])
    assert r1 > base + 0.3, (r1, base)
    path = export_refiner(model, tmp_path / "refiner.onnx", parent_sha256="enc")
    ref = OnnxRefiner(path)
    s = rerank(test, "gnn", ref)
    np.testing.assert_allclose(s, y, atol=1e-4)
    assert ref.encoder_sha256 == "enc"
    # tampered file refused
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        OnnxRefiner(path)


@pytest.fixture(scope="module")
def small_refiner(tmp_path_factory):
    """A small refiner with a random (not a no-op) head, in PyTorch and exported to ONNX: K=8, D=16, 3 edges."""
    torch.manual_seed(0)
    model = GraphRefiner(RefinerConfig(k=8, embed_dim=16, edges=3, hidden=32)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=2.0)
    path = export_refiner(model, tmp_path_factory.mktemp("ref") / "refiner.onnx", parent_sha256="enc")
    return model, OnnxRefiner(path)


def _padded_lists(ns, k=8, d=16, seed=0, pad="repeat"):
    """One list per entry of ``ns``: ``n`` valid candidates, then padding (``repeat``: copies of the last valid
    one, as the localizer pads; ``zeros``: zero embeddings at the origin)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(len(ns), d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    emb = rng.normal(size=(len(ns), k, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    xy = rng.uniform(-4, 4, size=(len(ns), k, 2))
    valid = np.arange(k)[None] < np.asarray(ns)[:, None]
    for i, n in enumerate(ns):
        if pad == "repeat":
            emb[i, n:], xy[i, n:] = emb[i, n - 1], xy[i, n - 1]
        else:
            emb[i, n:], xy[i, n:] = 0.0, 0.0
    sims = np.einsum("qd,qkd->qk", q, emb).astype(np.float32)
    return Candidates(q, emb, sims, xy, valid)


def test_padding_does_not_change_the_scores_of_the_valid_candidates(small_refiner):
    model, ref = small_refiner
    ns = [8, 7, 6, 5, 4]  # more valid candidates than edges: the graph of the valid ones alone is well defined
    for pad in ("repeat", "zeros"):
        c = _padded_lists(ns, pad=pad)
        got = candidate_scores(c, ref)
        for i, n in enumerate(ns):
            with torch.no_grad():  # the same list without padding (PyTorch takes any K)
                want = model(
                    torch.from_numpy(c.query[i : i + 1]),
                    torch.from_numpy(c.emb[i : i + 1, :n]),
                    torch.from_numpy(c.offsets()[i : i + 1, :n]),
                ).numpy()[0]
            np.testing.assert_allclose(got[i, :n], want, atol=1e-4, rtol=1e-4, err_msg=f"{pad} n={n}")
            assert np.isneginf(got[i, n:]).all()


def test_too_few_candidates_for_the_graph_fall_back_to_the_coarse_order(small_refiner):
    _, ref = small_refiner
    c = _padded_lists([3, 2, 1])  # at most ``edges`` valid: each would have to attend to padding
    got = candidate_scores(c, ref)
    np.testing.assert_allclose(got[c.valid], 20.0 * c.sims[c.valid].astype(np.float64), rtol=1e-6)
    assert np.isneginf(got[~c.valid]).all()
    assert np.array_equal(candidate_scores(_padded_lists([3, 2, 1], pad="zeros"), ref)[c.valid], got[c.valid])
