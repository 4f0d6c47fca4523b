"""Memory-bank update rules against autograd, column selection and the bank's state."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgessl.method.bank import (
    BANK_STEP,
    MemoryBank,
    auto_bank_lr,
    grad_bank_update,
    momentum_bank_update,
    select_columns,
)
from edgessl.method.instance import InstanceDiscrimination
from edgessl.method.losses import cutmix_targets, instance_ce, similarities


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("soft", [False, True])
def test_grad_update_is_negative_autograd_gradient_of_ce(soft):
    """v_k <- normalize(v_k + eta sum_b (y_bk - p_bk) z_b) == normalize(v_k - eta B tau dL_ce/dv_k)."""
    b, k, d, tau, eta = 5, 9, 6, 0.2, 0.7
    z = unit(b, d, seed=1)
    cols = unit(k, d, seed=2).requires_grad_(True)
    targets = torch.tensor([0, 3, 3, 8, 5])
    if soft:
        targets = cutmix_targets(targets, torch.tensor([1, 2, 3, 4, 0]), torch.full((b,), 0.6), k).double()
    sim = similarities(z, cols)
    (grad,) = torch.autograd.grad(instance_ce(sim, targets, tau), cols)
    p = torch.softmax(sim.detach() / tau, dim=1)
    got = grad_bank_update(cols.detach(), z, p, targets, eta)
    expected = F.normalize(cols.detach() - eta * b * tau * grad, dim=1)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(got.norm(dim=1), torch.ones(k, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.1, 0.2, 0.5])
def test_auto_bank_lr_takes_the_same_gradient_step_at_every_temperature(tau):
    """eta = 0.1 / tau: the update is normalize(v - 0.1 B dL_ce/dv) at any tau (eta 1 at 0.1, 0.5 at 0.2)."""
    b, k, d = 4, 7, 5
    z, cols = unit(b, d, seed=3), unit(k, d, seed=4).requires_grad_(True)
    targets = torch.tensor([1, 0, 6, 2])
    sim = similarities(z, cols)
    (grad,) = torch.autograd.grad(instance_ce(sim, targets, tau), cols)
    got = grad_bank_update(cols.detach(), z, torch.softmax(sim.detach() / tau, dim=1), targets, auto_bank_lr(tau))
    assert torch.allclose(got, F.normalize(cols.detach() - BANK_STEP * b * grad, dim=1), atol=1e-12)
    assert (BANK_STEP, auto_bank_lr(0.1), auto_bank_lr(0.2)) == (0.1, 1.0, 0.5)


Z2 = [[1.0, 0.0], [0.6, 0.8]]  # (B=2, d=2) unit features
V3 = [[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]  # (K=3, d=2) unit columns


def softmax_rows(sim, tau):
    """Hand softmax (math.exp) of each row of a list of lists."""
    out = []
    for row in sim:
        e = [math.exp(s / tau) for s in row]
        out.append([x / sum(e) for x in e])
    return out


def grad_update_by_hand(v, z, y, tau, lr):
    """p, and v_k <- normalize(v_k + lr sum_b (y_bk - p_bk) z_b) with explicit loops; v (K, d), z (B, d), y (B, K)."""
    sim = [[sum(a * c for a, c in zip(zb, vk, strict=True)) for vk in v] for zb in z]
    p = softmax_rows(sim, tau)
    new = []
    for k, vk in enumerate(v):
        u = [vk[i] + lr * sum((y[b][k] - p[b][k]) * z[b][i] for b in range(len(z))) for i in range(len(vk))]
        norm = math.sqrt(sum(x * x for x in u))
        new.append([x / norm for x in u])
    return p, new


@pytest.mark.parametrize("soft", [False, True])
def test_grad_update_matches_explicit_loops(soft):
    """normalize(v + lr (y - p)^T z) on a 2x3 example computed with loops (hard targets [0, 2], or soft)."""
    tau, lr = 0.5, 0.7
    y = [[0.6, 0.0, 0.4], [0.0, 0.3, 0.7]] if soft else [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    p_hand, expected = grad_update_by_hand(V3, Z2, y, tau, lr)
    z, cols = torch.tensor(Z2, dtype=torch.float64), torch.tensor(V3, dtype=torch.float64)
    p = torch.softmax(similarities(z, cols) / tau, dim=1)
    assert torch.allclose(p, torch.tensor(p_hand, dtype=torch.float64), atol=1e-14)
    targets = torch.tensor(y, dtype=torch.float64) if soft else torch.tensor([0, 2])
    got = grad_bank_update(cols, z, p, targets, lr)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-14)


def test_momentum_update_matches_explicit_loops():
    """normalize(m v + (1 - m) z) with m = 0.8 (m = 0.5 cannot tell m from 1 - m); other bank rows untouched."""
    m, v, z = 0.8, [[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-0.6, 0.8]]
    expected = []
    for vb, zb in zip(v, z, strict=True):
        u = [m * a + (1 - m) * c for a, c in zip(vb, zb, strict=True)]
        expected.append([x / math.sqrt(sum(w * w for w in u)) for x in u])
    got = momentum_bank_update(torch.tensor(v, dtype=torch.float64), torch.tensor(z, dtype=torch.float64), m)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-14)
    bank = MemoryBank(4, 2)
    bank.weight.copy_(torch.tensor([[0.0, -1.0]] + v + [[1.0, 0.0]]))
    before = bank.weight.clone()
    bank.update_momentum(torch.tensor([1, 2]), torch.tensor(z), m)
    assert torch.allclose(bank.weight[1:3], torch.tensor(expected), atol=1e-7)
    assert torch.equal(bank.weight[[0, 3]], before[[0, 3]])


def test_select_columns_whole_bank_when_small():
    idx = torch.tensor([4, 1])
    cols, targets = select_columns(idx, num_rows=10, negatives=10)
    assert cols is None and torch.equal(targets, idx)


def check_columns(cols, targets, idx, num_rows):
    assert cols.dtype == torch.long and targets.dtype == torch.long
    assert torch.equal(cols, torch.unique(cols))  # sorted, no duplicate columns
    assert torch.equal(cols[targets], idx)  # each sample's own row sits at its target position
    assert 0 <= cols.min() and cols.max() < num_rows


@pytest.mark.parametrize("num_rows,negatives", [(16385, 16000), (100_000, 16384)])
def test_select_columns_draws_exactly_negatives_distinct_other_rows(num_rows, negatives):
    """Without replacement: K = B + negatives exactly (with replacement: about 10,200 + B and 15,100 + B)."""
    b = 256
    idx = torch.randperm(num_rows, generator=torch.Generator().manual_seed(1))[:b]
    cols, targets = select_columns(idx, num_rows, negatives, generator=torch.Generator().manual_seed(0))
    assert len(cols) == b + negatives
    check_columns(cols, targets, idx, num_rows)
    # the caller's host copy of the index (a GPU's would be read back every step): the same draw
    again = select_columns(idx, num_rows, negatives, torch.Generator().manual_seed(0), host=idx.clone())
    assert torch.equal(again[0], cols) and torch.equal(again[1], targets)


@pytest.mark.parametrize("num_rows", [16384, 16385, 16639, 16640, 16641, 16700, 40000])
def test_select_columns_count_is_min_of_bank_and_batch_plus_negatives(num_rows):
    """K = min(N, B_unique + negatives), continuous in N: the whole bank (None) while N <= B_unique + negatives."""
    b, negatives = 256, 16384
    idx = torch.randperm(num_rows, generator=torch.Generator().manual_seed(1))[:b]
    cols, targets = select_columns(idx, num_rows, negatives, generator=torch.Generator().manual_seed(0))
    if num_rows <= b + negatives:
        assert cols is None and torch.equal(targets, idx)
    else:
        assert len(cols) == b + negatives
        check_columns(cols, targets, idx, num_rows)


def test_select_columns_counts_duplicate_batch_rows_once():
    idx = torch.tensor([5, 9, 5, 0, 9])
    cols, targets = select_columns(idx, num_rows=100, negatives=20, generator=torch.Generator().manual_seed(0))
    assert len(cols) == 3 + 20
    check_columns(cols, targets, idx, 100)


def test_select_columns_same_generator_seed_same_columns():
    idx = torch.tensor([17, 3, 99, 1234])
    torch.manual_seed(0)
    a = select_columns(idx, 100_000, 500, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)  # the global RNG plays no part
    b = select_columns(idx, 100_000, 500, generator=torch.Generator().manual_seed(7))
    c = select_columns(idx, 100_000, 500, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("num_rows", [24, 60])  # 14 rows needed: more than half the bank, then less than half
def test_select_columns_negatives_are_uniform_over_the_other_rows(num_rows):
    """Each non-batch row is a negative with probability negatives / (N - B): chi-square over 3000 draws."""
    idx, negatives, draws = torch.tensor([0, 7, 11, 23]), 10, 3000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(num_rows)
    for _ in range(draws):
        cols, _ = select_columns(idx, num_rows, negatives, generator=g)
        counts[cols] += 1
    assert torch.equal(counts[idx], torch.full((4,), float(draws)))
    others = counts[torch.isin(torch.arange(num_rows), idx, invert=True)]
    assert others.sum() == draws * negatives
    prob = negatives / (num_rows - 4)
    chi2 = ((others - draws * prob) ** 2 / (draws * prob * (1 - prob))).sum().item()
    df = num_rows - 4 - 1
    assert chi2 < df + 5 * math.sqrt(2 * df)


def test_update_grad_of_sampled_columns_changes_exactly_those_rows():
    """N > B + negatives: the rows in cols take the closed form, every other row stays bit-identical."""
    bank = MemoryBank(50, 2, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([31, 4])
    cols, targets = select_columns(idx, 50, 10, generator=torch.Generator().manual_seed(1))
    z = torch.tensor(Z2)
    tau, lr = 0.1, 0.9
    p = torch.softmax(similarities(z, bank.columns(cols)) / tau, dim=1)
    before = bank.weight.clone()
    bank.update_grad(cols, z, p, targets, lr)
    y = F.one_hot(targets, len(cols)).tolist()
    _, expected = grad_update_by_hand(before[cols].double().tolist(), Z2, y, tau, lr)
    assert torch.allclose(bank.weight[cols], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    changed = (bank.weight != before).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, cols) and len(cols) == 12


def test_bank_is_in_state_dict_and_updates_only_after_step():
    method = InstanceDiscrimination(num_rows=8, dim=4, negatives=100, generator=torch.Generator().manual_seed(0))
    assert "bank.weight" in method.state_dict()
    before = method.bank.weight.clone()
    z = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    out = method(z, torch.tensor([0, 5, 7]))
    out.loss.backward()
    assert torch.equal(method.bank.weight, before)  # forward/backward never change state
    method.update_bank(out)
    assert not torch.equal(method.bank.weight, before)
    assert torch.allclose(method.bank.weight.norm(dim=1), torch.ones(8))


def test_npid_momentum_bank_moves_only_own_rows():
    method = InstanceDiscrimination(8, 4, bank_update="momentum", sd_weight=0.0,
                                    generator=torch.Generator().manual_seed(0))
    before = method.bank.weight.clone()
    out = method(F.normalize(torch.randn(2, 4), dim=1), torch.tensor([1, 6]))
    method.update_bank(out)
    changed = (method.bank.weight - before).norm(dim=1) > 0
    assert changed.tolist() == [False, True, False, False, False, False, True, False]


def test_memory_bank_rows_are_unit():
    bank = MemoryBank(50, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bank.weight.norm(dim=1), torch.ones(50))
