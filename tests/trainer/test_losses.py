import math

import pytest

torch = pytest.importorskip("torch")

from sarloc.trainer.losses import (  # noqa: E402
    Critic,
    InfoNCELoss,
    ModalityClassifier,
    TripletLoss,
    batch_hard_triplet,
    critic_loss,
    gradient_penalty,
    info_nce,
    modality_adversarial_loss,
    wasserstein_estimate,
)


def _unit(x):
    return torch.nn.functional.normalize(x, dim=1)


def test_info_nce_known_values():
    # orthogonal one-hot embeddings, perfect match: loss = log(1 + (B-1) e^{-1/T})
    q = torch.eye(3)
    t = torch.eye(3)
    expected = math.log(1 + 2 * math.exp(-1 / 0.5))
    assert info_nce(q, q, t, temperature=0.5).item() == pytest.approx(expected, rel=1e-5)
    # identical embeddings everywhere: uniform softmax -> log(B)
    same = _unit(torch.ones(4, 8))
    assert info_nce(same, same, torch.eye(4), temperature=0.1).item() == pytest.approx(math.log(4), rel=1e-5)


def test_info_nce_soft_targets_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    q = _unit(torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    k = _unit(torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = torch.eye(4, dtype=torch.float64)
    t[0, 1] = 0.5
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, t, 0.2), (q, k))
    with pytest.raises(ValueError, match="targets"):
        info_nce(q, k, torch.eye(3))
    assert InfoNCELoss(0.1)(q, k, t).item() > 0


def test_batch_hard_triplet_values_and_grad():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.eye(2, dtype=torch.bool)
    # d_pos = 0, d_neg = 1 -> relu(0 - 1 + 0.3) = 0
    assert batch_hard_triplet(q, gal, pos, margin=0.3).item() == pytest.approx(0.0)
    # swapped gallery: d_pos = 1, d_neg = 0 -> 1.3
    assert batch_hard_triplet(q, gal.flip(0), pos, margin=0.3).item() == pytest.approx(1.3)
    qq = _unit(torch.randn(5, 4, dtype=torch.float64)).requires_grad_(True)
    gg = _unit(torch.randn(5, 4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a: batch_hard_triplet(a, gg, torch.eye(5, dtype=torch.bool), 2.0), (qq,))
    assert TripletLoss(0.3)(q, gal, pos).item() == pytest.approx(0.0)


def test_critic_estimates_distribution_shift():
    torch.manual_seed(0)
    critic = Critic(8, hidden=32)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.5, 0.9))
    a = torch.randn(256, 8) + 2.0
    b = torch.randn(256, 8)
    for _ in range(150):
        loss = critic_loss(critic, a, b, gp_weight=10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = wasserstein_estimate(critic, a, b).item()
    # true W1 between N(2,I) and N(0,I) in 8-D is ||mu|| = 2*sqrt(8) ~ 5.66
    assert 3.5 < w < 9.0  # finite-sample estimate; well above the same-distribution value below
    same = wasserstein_estimate(critic, torch.randn(256, 8), torch.randn(256, 8)).item()
    assert abs(same) < 1.0


def test_gradient_penalty_zero_for_unit_lipschitz_linear():
    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    gp = gradient_penalty(lambda z: lin(z).squeeze(-1), torch.randn(10, 4), torch.randn(10, 4))
    assert gp.item() == pytest.approx(0.0, abs=1e-10)


def test_encoder_minimising_w1_moves_features_together():
    torch.manual_seed(1)
    critic = Critic(4, hidden=32)
    c_opt = torch.optim.Adam(critic.parameters(), lr=5e-3, betas=(0.5, 0.9))
    shift = torch.zeros(4, requires_grad=True)
    e_opt = torch.optim.SGD([shift], lr=0.1)
    base = torch.randn(64, 4)
    opt_feats = torch.randn(64, 4) + 3.0
    for _ in range(120):
        sar = base + shift
        for _ in range(2):
            cl = critic_loss(critic, opt_feats, sar)
            c_opt.zero_grad()
            cl.backward()
            c_opt.step()
        w1 = wasserstein_estimate(critic, opt_feats, base + shift)
        e_opt.zero_grad()
        w1.backward()
        e_opt.step()
    assert shift.detach().mean().item() > 2.0  # the SAR features were pulled toward the optical ones


def test_gradient_reversal_classifier():
    clf = ModalityClassifier(4, hidden=8)
    z = torch.randn(6, 4, requires_grad=True)
    loss = modality_adversarial_loss(clf, z[:3], z[3:], lam=1.0)
    loss.backward()
    g_rev = z.grad.clone()
    z.grad = None
    logits = torch.cat([clf.net(z[:3]), clf.net(z[3:])]).squeeze(-1)
    labels = torch.tensor([1.0, 1, 1, 0, 0, 0])
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    assert torch.allclose(g_rev, -z.grad, atol=1e-6)
