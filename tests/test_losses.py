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


@pytest.mark.parametrize("k", [2, 7, 360])
def test_instance_ce_all_features_equal_is_log_k(k):
    z = unit(1, 16).repeat(5, 1)
    bank = z[:1].repeat(k, 1)  # every column equals every feature: all similarities are 1
    loss = instance_ce(similarities(z, bank), torch.tensor([0, 1, 1, 0, k - 1]), tau=0.2)
    assert loss.item() == pytest.approx(math.log(k), abs=1e-12)


def test_instance_ce_matches_hand_computation():
    sim = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    tau = 0.5
    # sample 0 -> column 0, sample 1 -> column 2
    l0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-2.0)))
    l1 = -(0.0 - math.log(2 * math.exp(1.0) + math.exp(0.0)))
    got = instance_ce(sim, torch.tensor([0, 2]), tau)
    assert got.item() == pytest.approx((l0 + l1) / 2, abs=1e-12)
    # soft one-hot targets give the same value as hard targets
    assert instance_ce(sim, soft_targets(torch.tensor([0, 2]), 3, torch.float64), tau).item() == pytest.approx(got.item())


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
