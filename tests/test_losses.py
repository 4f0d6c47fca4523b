"""Closed-form and autograd checks of the method's losses (edgessl/method/losses.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgessl.method.losses import (
    cutmix_targets,
    feature_std,
    instance_ce,
    similarities,
    soft_targets,
    sqrt_self_distillation,
)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


SIM = [[0.9, 0.1, -0.3], [0.2, 0.7, -0.8]]  # (B=2, K=3) non-uniform similarities
SOFT = [[0.6, 0.0, 0.4], [0.0, 0.3, 0.7]]  # CutMix-style soft targets, rows sum to 1


def softmax_by_hand(sim, tau):
    out = []
    for row in sim:
        e = [math.exp(x / tau) for x in row]
        out.append([x / sum(e) for x in e])
    return out


def test_instance_ce_soft_targets_match_hand_computation():
    """L = -(1/B) sum_b sum_k y_bk log p_bk on non-uniform similarities, p by hand with math.exp."""
    tau = 0.25
    p = softmax_by_hand(SIM, tau)
    expected = -sum(SOFT[b][k] * math.log(p[b][k]) for b in range(2) for k in range(3) if SOFT[b][k]) / 2
    got = instance_ce(torch.tensor(SIM, dtype=torch.float64), torch.tensor(SOFT, dtype=torch.float64), tau)
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_instance_ce_gradient_closed_form(soft):
    """dL_ce/ds_bk = (p_bk - y_bk) / (tau B), p by hand."""
    tau, b = 0.25, 2
    y = SOFT if soft else [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    targets = torch.tensor(SOFT, dtype=torch.float64) if soft else torch.tensor([0, 2])
    sim = torch.tensor(SIM, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(instance_ce(sim, targets, tau), sim)
    p = softmax_by_hand(SIM, tau)
    expected = [[(p[i][k] - y[i][k]) / (tau * b) for k in range(3)] for i in range(b)]
    assert torch.allclose(grad, torch.tensor(expected, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("soft", [False, True])
def test_instance_ce_gradcheck(soft):
    sim = similarities(unit(4, 8, seed=7), unit(6, 8, seed=8)).requires_grad_(True)
    targets = torch.tensor([0, 5, 2, 2])
    if soft:
        targets = cutmix_targets(targets, torch.tensor([1, 2, 3, 0]), torch.tensor([0.6, 0.8, 0.5, 1.0]), 6).double()
    assert torch.autograd.gradcheck(lambda s: instance_ce(s, targets, 0.3), (sim,))


def test_instance_ce_matches_hand_computation():
    sim = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    tau = 0.5
    # sample 0 -> column 0, sample 1 -> column 2
    l0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-2.0)))
    l1 = -(0.0 - math.log(2 * math.exp(1.0) + math.exp(0.0)))
    got = instance_ce(sim, torch.tensor([0, 2]), tau)
    assert got.item() == pytest.approx((l0 + l1) / 2, abs=1e-12)
    # soft one-hot targets give the same value as hard targets
    soft = soft_targets(torch.tensor([0, 2]), 3, torch.float64)
    assert instance_ce(sim, soft, tau).item() == pytest.approx(got.item())


def test_sd_target_is_softmax_at_double_temperature():
    """u_b = q_b^alpha / sum q_b^alpha equals softmax(s_b / (2 tau_sd)) for alpha = 1/2."""
    sim = similarities(unit(4, 8, seed=1), unit(10, 8, seed=2))
    tau_sd = 1.0
    q = torch.softmax(sim / tau_sd, dim=1)
    u = q.sqrt() / q.sqrt().sum(dim=1, keepdim=True)
    assert torch.allclose(u, torch.softmax(sim / (2 * tau_sd), dim=1), atol=1e-12)
    # and the loss is KL(q || u), computed by hand
    expected = (q * (q.log() - u.log())).sum(dim=1).mean()
    assert sqrt_self_distillation(sim, tau_sd, 0.5).item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("alpha,tau_sd", [(0.5, 1.0), (0.5, 0.3), (0.25, 1.0)])
def test_sd_gradient_equals_scaled_negative_entropy_gradient(alpha, tau_sd):
    """d L_sd / d s == d [-(1 - alpha) H(q)] / d s, with the target under stop-gradient."""
    sim = similarities(unit(6, 8, seed=3), unit(12, 8, seed=4)).requires_grad_(True)
    (g_sd,) = torch.autograd.grad(sqrt_self_distillation(sim, tau_sd, alpha), sim)
    sim2 = sim.detach().clone().requires_grad_(True)
    q = torch.softmax(sim2 / tau_sd, dim=1)
    neg_entropy = (q * torch.log_softmax(sim2 / tau_sd, dim=1)).sum(dim=1).mean()
    (g_h,) = torch.autograd.grad((1 - alpha) * neg_entropy, sim2)
    assert torch.allclose(g_sd, g_h, atol=1e-12)


def kl_to_frozen_target(sim, log_u0, tau_sd):
    """(1/B) sum_b KL(q_b(s) || u0_b) with u0 held fixed: the function whose derivative L_sd's gradient is."""
    log_q = torch.log_softmax(sim / tau_sd, dim=1)
    return (log_q.exp() * (log_q - log_u0)).sum(dim=1).mean()


@pytest.mark.parametrize("alpha,tau_sd", [(0.5, 1.0), (0.25, 0.3)])
def test_sd_gradient_is_the_derivative_with_the_target_frozen(alpha, tau_sd):
    """Central differences of KL(q(s) || u(s0)) and the closed form (1 - alpha) q (log q - sum q log q) / (tau_sd B)
    match L_sd's autograd gradient; the full derivative (u moving with s) does not: the stop-gradient is in place."""
    sim0 = similarities(unit(3, 8, seed=9), unit(5, 8, seed=10))
    sim = sim0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sqrt_self_distillation(sim, tau_sd, alpha), sim)
    log_q0 = torch.log_softmax(sim0 / tau_sd, dim=1)
    log_u0 = torch.log_softmax(alpha * log_q0, dim=1)
    eps, numeric = 1e-6, torch.zeros_like(sim0)
    for i in range(3):
        for k in range(5):
            step = torch.zeros_like(sim0)
            step[i, k] = eps
            hi, lo = kl_to_frozen_target(sim0 + step, log_u0, tau_sd), kl_to_frozen_target(sim0 - step, log_u0, tau_sd)
            numeric[i, k] = (hi - lo) / (2 * eps)
    assert torch.allclose(grad, numeric, atol=1e-8)
    q = log_q0.exp()
    closed = (1 - alpha) * q * (log_q0 - (q * log_q0).sum(dim=1, keepdim=True)) / (tau_sd * 3)
    assert torch.allclose(grad, closed, atol=1e-14)
    full = torch.autograd.gradcheck(lambda s: sqrt_self_distillation(s, tau_sd, alpha), (sim,), raise_exception=False)
    assert not full


def test_sd_is_zero_for_uniform_distribution_and_positive_otherwise():
    assert sqrt_self_distillation(torch.zeros(3, 5)).item() == pytest.approx(0.0, abs=1e-7)
    assert sqrt_self_distillation(torch.tensor([[3.0, 0.0, -1.0]])).item() > 0


def test_cutmix_targets_rows_sum_to_one_and_weight_partners():
    t = cutmix_targets(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), torch.tensor([0.7, 0.7, 1.0]), 4)
    assert torch.allclose(t.sum(dim=1), torch.ones(3))
    assert torch.allclose(t[0], torch.tensor([0.7, 0.0, 0.3, 0.0]))
    assert torch.allclose(t[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_feature_std_collapse_and_spread():
    assert feature_std(unit(1, 32).repeat(50, 1)).item() == pytest.approx(0.0, abs=1e-7)
    spread = feature_std(unit(20000, 32, seed=5)).item()
    assert spread == pytest.approx(1 / math.sqrt(32), rel=0.05)
