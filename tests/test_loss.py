"""fasttrdpo.loss.preference_loss / kto_loss / sequence_logprobs against the DESIGN.md §4 formulas in float64.

The formulas are written out here independently (float64, overflow-free log-sigmoid); the library runs
the same math in the inputs' dtype, so on float64 inputs the only difference is rounding order:
relative error ≤ 1e-6 is ~1e9 ulps of float64, i.e. anything but a formula slip passes, and any
slip (a sign, a missing ε term, a length) is O(1).
"""
import math
import zlib

import pytest
import torch

import fasttrdpo.loss as L

RTOL = 1e-6


def _logsigmoid64(x):
    # log σ(x) = min(x, 0) − log1p(e^{−|x|}): no overflow for large |x|
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def ref_preference_losses(pc, pr, rc, rr, beta, loss_type, eps=0.0, len_c=None, len_r=None):
    """DESIGN.md §4 per-pair losses in float64 (also used by tests/test_trdpo_loss.py)."""
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsigmoid64(beta * delta) - eps * _logsigmoid64(-beta * delta)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * delta, min=0.0)
    if loss_type == "ipo":
        lc, lr = len_c.double().clamp(min=1.0), len_r.double().clamp(min=1.0)
        return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * _logsigmoid64(beta * delta) + eps * _logsigmoid64(-beta * delta)) / (1 - 2 * eps)
    raise ValueError(loss_type)


def _random_logps(B, seed, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    # summed completion log-probs: negative, tens to hundreds; reference near the policy
    pc = -scale * torch.rand(B, generator=g, dtype=torch.float64) * 10
    pr = -scale * torch.rand(B, generator=g, dtype=torch.float64) * 10
    rc = pc + torch.randn(B, generator=g, dtype=torch.float64) * scale / 3
    rr = pr + torch.randn(B, generator=g, dtype=torch.float64) * scale / 3
    len_c = torch.randint(0, 300, (B,), generator=g)
    len_r = torch.randint(0, 300, (B,), generator=g)
    return pc, pr, rc, rr, len_c, len_r


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.0), ("ipo", 0.0),
         ("robust", 0.0), ("robust", 0.2), ("robust", 0.45)]


@pytest.mark.parametrize("loss_type,eps", CASES)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_preference_loss_matches_formula(loss_type, eps, beta):
    pc, pr, rc, rr, len_c, len_r = _random_logps(64, seed=zlib.crc32(repr((loss_type, eps, beta)).encode()) % 1000)
    losses, cr, rj = L.preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                       chosen_lengths=len_c, rejected_lengths=len_r)
    expected = ref_preference_losses(pc, pr, rc, rr, beta, loss_type, eps, len_c, len_r)
    assert losses.dtype == torch.float64 and losses.shape == (64,)
    torch.testing.assert_close(losses, expected, rtol=RTOL, atol=1e-300)
    torch.testing.assert_close(cr, beta * (pc - rc), rtol=RTOL, atol=0)
    torch.testing.assert_close(rj, beta * (pr - rr), rtol=RTOL, atol=0)
    assert not cr.requires_grad


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_preference_loss_gradient_matches_formula(loss_type, eps):
    beta = 0.2
    pc, pr, rc, rr, len_c, len_r = _random_logps(32, seed=7)
    a = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    got = L.preference_loss(*a, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                            chosen_lengths=len_c, rejected_lengths=len_r)[0].sum()
    exp = ref_preference_losses(*b, rc, rr, beta, loss_type, eps, len_c, len_r).sum()
    for x, y in zip(torch.autograd.grad(got, a), torch.autograd.grad(exp, b)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-12)


def test_sigmoid_without_smoothing_is_dpo():
    # ε = 0 is TRL's sigmoid loss: −logσ(β·Δ), checked at values where log σ is easy to state.
    z = torch.zeros(1, dtype=torch.float64)
    losses, _, _ = L.preference_loss(z + 2.0, z, z, z, beta=0.5)  # Δ = 2, βΔ = 1
    assert math.isclose(losses.item(), math.log1p(math.exp(-1.0)), rel_tol=1e-12)


def test_preference_loss_extreme_margins_are_finite():
    big = torch.tensor([1e4, -1e4], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    for lt, eps in CASES:
        losses = L.preference_loss(big, z, z, z, beta=1.0, loss_type=lt, label_smoothing=eps,
                                   chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))[0]
        assert torch.isfinite(losses).all(), lt


def test_ipo_lengths_clamped_to_one():
    z = torch.zeros(2, dtype=torch.float64)
    pc = torch.tensor([-3.0, -3.0], dtype=torch.float64)
    zero_len = torch.tensor([0, 1])
    losses = L.preference_loss(pc, z, z, z, beta=0.5, loss_type="ipo", chosen_lengths=zero_len,
                               rejected_lengths=torch.tensor([1, 1]))[0]
    # both rows divide by 1: (−3 − 1)² = 16
    torch.testing.assert_close(losses, torch.full((2,), 16.0, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="kto"), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=0.6), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="ipo"), "lengths"),
])
def test_preference_loss_bad_args(kwargs, match):
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=match):
        L.preference_loss(x, x, x, x, **kwargs)


def test_preference_loss_bad_shapes_and_types():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        L.preference_loss(x, torch.zeros(5), x, x)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        L.preference_loss(x, x, torch.zeros(4, 1), x)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        L.preference_loss(torch.zeros(2, 2), x, x, x)
    with pytest.raises(TypeError, match="ref_rejected_logps"):
        L.preference_loss(x, x, x, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.preference_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(4))
    with pytest.raises(TypeError, match="beta"):
        L.preference_loss(x, x, x, x, beta="0.1")


def _ref_kto(pl, rl, des, pkl, rkl, beta, wd, wu):
    z = max(float((pkl.double() - rkl.double()).mean()), 0.0)
    r = pl.double() - rl.double()
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    return torch.where(des, wd * (1 - sig(beta * (r - z))), wu * (1 - sig(beta * (z - r)))), z


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("kl_shift", [-5.0, 3.0])  # negative mean KL is clamped to 0
def test_kto_loss_matches_formula(beta, kl_shift):
    g = torch.Generator().manual_seed(3)
    B = 40
    pl = -100 * torch.rand(B, generator=g, dtype=torch.float64)
    rl = pl + 5 * torch.randn(B, generator=g, dtype=torch.float64)
    des = torch.rand(B, generator=g) < 0.5
    pkl = -100 * torch.rand(B, generator=g, dtype=torch.float64)
    rkl = pkl - kl_shift + torch.randn(B, generator=g, dtype=torch.float64)
    losses, rewards, kl = L.kto_loss(pl, rl, des, pkl, rkl, beta=beta, desirable_weight=1.3, undesirable_weight=0.7)
    expected, z = _ref_kto(pl, rl, des, pkl, rkl, beta, 1.3, 0.7)
    torch.testing.assert_close(losses, expected, rtol=RTOL, atol=1e-300)
    torch.testing.assert_close(rewards, beta * (pl - rl), rtol=RTOL, atol=0)
    assert math.isclose(float(kl), z, rel_tol=RTOL, abs_tol=0.0)
    if kl_shift < 0:
        assert float(kl) == 0.0


def test_kto_kl_is_detached():
    pl = torch.randn(6, dtype=torch.float64, requires_grad=True)
    pkl = torch.randn(6, dtype=torch.float64, requires_grad=True)
    losses, _, kl = L.kto_loss(pl, torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.bool),
                               pkl + 10.0, torch.zeros(6, dtype=torch.float64))
    assert not kl.requires_grad
    losses.sum().backward()
    assert pkl.grad is None and pl.grad is not None


def test_kto_bad_args():
    x = torch.zeros(4)
    des = torch.ones(4, dtype=torch.bool)
    with pytest.raises(TypeError, match="desirable"):
        L.kto_loss(x, x, torch.ones(4), x, x)
    with pytest.raises(ValueError, match="desirable"):
        L.kto_loss(x, x, torch.ones(3, dtype=torch.bool), x, x)
    with pytest.raises(ValueError, match="ref_logps"):
        L.kto_loss(x, torch.zeros(3), des, x, x)
    with pytest.raises(ValueError, match="ref_kl_logps"):
        L.kto_loss(x, x, des, x, torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        L.kto_loss(x, x, des, x, x, beta=0.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        L.kto_loss(x, x, des, x, x, desirable_weight=-1.0)


def test_sequence_logprobs_masks_and_counts():
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (3, 5, 7), generator=g)
    labels[0, 0, :3] = -100
    labels[1, 2, :] = -100
    tok[labels == -100] = float("nan")  # garbage where ignored must not leak into the sums
    sums, lengths = L.sequence_logprobs(tok, labels)
    mask = labels != -100
    expected = torch.tensor([[sum(float(tok[i, j, k]) for k in range(7) if mask[i, j, k]) for j in range(5)]
                             for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=1e-12, atol=1e-12)
    assert lengths.dtype == torch.int64
    assert torch.equal(lengths, mask.sum(-1))
    assert float(sums[1, 2]) == 0.0 and int(lengths[1, 2]) == 0


def test_sequence_logprobs_bad_args():
    with pytest.raises(ValueError, match="labels"):
        L.sequence_logprobs(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels"):
        L.sequence_logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="token_logps"):
        L.sequence_logprobs(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
