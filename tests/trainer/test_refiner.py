"""Graph refiner: graph construction, permutation behaviour, shapes/gradients, training and ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sarloc.core.errors import ArtifactError
from sarloc.eval.rerank import rerank
from sarloc.runtime.refine import Candidates, OnnxRefiner
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
