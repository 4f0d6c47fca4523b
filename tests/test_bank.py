"""Memory-bank update rules against autograd, column selection and the bank's state."""

import pytest
import torch
import torch.nn.functional as F

from edgessl.method.bank import MemoryBank, grad_bank_update, momentum_bank_update, select_columns
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


def test_grad_update_moves_every_column_that_took_mass():
    z = unit(2, 4, seed=3)
    cols = unit(6, 4, seed=4)
    p = torch.softmax(similarities(z, cols) / 0.2, dim=1)
    new = grad_bank_update(cols, z, p, torch.tensor([0, 1]), 1.0)
    moved = (new - cols).norm(dim=1)
    assert (moved > 1e-6).all()  # negatives move too, not only the own rows (NPID would move 2 of 6)


def test_momentum_update_closed_form():
    rows, z = unit(3, 4, seed=5), unit(3, 4, seed=6)
    got = momentum_bank_update(rows, z, 0.5)
    assert torch.allclose(got, F.normalize(rows + z, dim=1), atol=1e-12)


def test_select_columns_whole_bank_when_small():
    idx = torch.tensor([4, 1])
    cols, targets = select_columns(idx, num_rows=10, negatives=10)
    assert cols is None and torch.equal(targets, idx)


def test_select_columns_samples_negatives_and_points_to_own_rows():
    idx = torch.tensor([17, 3, 99])
    cols, targets = select_columns(idx, num_rows=100, negatives=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cols[targets], idx)
    assert torch.equal(cols, torch.unique(cols))  # no duplicate columns
    assert 3 < len(cols) <= 23


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
    method = InstanceDiscrimination(8, 4, bank_update="momentum", sd_weight=0.0, generator=torch.Generator().manual_seed(0))
    before = method.bank.weight.clone()
    out = method(F.normalize(torch.randn(2, 4), dim=1), torch.tensor([1, 6]))
    method.update_bank(out)
    changed = (method.bank.weight - before).norm(dim=1) > 0
    assert changed.tolist() == [False, True, False, False, False, False, True, False]


def test_memory_bank_rows_are_unit():
    bank = MemoryBank(50, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bank.weight.norm(dim=1), torch.ones(50))
