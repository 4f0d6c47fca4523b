"""InstanceDiscrimination's numerics whatever its caller does (autocast), and its defaults against PretrainConfig's."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from edgessl.config import PretrainConfig
from edgessl.data.lookalike import TEMPERATURES
from edgessl.method.bank import auto_bank_lr
from edgessl.method.instance import InstanceDiscrimination

Z = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=1)
IDX = torch.tensor([3, 17, 25, 0, 39, 8])  # 6 + 10 negatives < 40 rows: sampled columns
PERM = torch.tensor([1, 2, 3, 4, 5, 0])


def forward(method, mix, autocast):
    """method(Z, IDX), under torch.autocast(bf16) or not, backward outside autocast -> (out, Z's gradient)."""
    z = Z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = method(z, IDX, torch.Generator().manual_seed(5), (PERM, 0.7) if mix else None)
    out.loss.backward()
    return out, z.grad


@pytest.mark.parametrize("sd_weight,mix", [(5.0, False), (5.0, True), (0.0, False)])
def test_forward_is_float32_inside_the_callers_autocast(sd_weight, mix):
    """Under torch.autocast(bf16): sim, p, loss, ce, sd are float32 and equal the values without autocast."""
    def make():
        return InstanceDiscrimination(40, 8, negatives=10, sd_weight=sd_weight,
                                      generator=torch.Generator().manual_seed(0))

    ref, ref_grad = forward(make(), mix, False)
    out, grad = forward(make(), mix, True)
    for name in ("sim", "p", "loss", "ce", "sd"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        assert torch.allclose(got, want, atol=1e-6, rtol=0), name
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule,mix,gathered", [("grad", False, False), ("grad", True, True), ("momentum", False, True)])
def test_update_bank_is_float32_inside_the_callers_autocast(rule, mix, gathered):
    """update_bank under torch.autocast(bf16) gives the bank of the call without autocast (gathered: z passed)."""
    banks = []
    for autocast in (False, True):
        method = InstanceDiscrimination(40, 8, negatives=10, bank_update=rule,
                                        generator=torch.Generator().manual_seed(0))
        out, _ = forward(method, mix, False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            method.update_bank(out, out.z if gathered else None)
        banks.append(method.bank.weight)
    assert banks[1].dtype == torch.float32 and torch.allclose(banks[1], banks[0], atol=1e-6, rtol=0)


def test_defaults_equal_pretrain_config_defaults():
    """PretrainConfig is the single source of defaults; edgessl.method may not import it, so its literals are
    checked."""
    config = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    params = inspect.signature(InstanceDiscrimination.__init__).parameters
    shared = [name for name, p in params.items() if p.default is not inspect.Parameter.empty and name in config]
    assert set(shared) >= {"temperature", "negatives", "bank_update", "bank_lr", "bank_momentum", "sd_weight",
                           "sd_temperature", "sd_alpha"}
    config["temperature"] = TEMPERATURES[0]  # "auto" resolves to a number before the method is built, and
    config["bank_lr"] = auto_bank_lr(TEMPERATURES[0])  # eta from it: 1 at tau 0.1
    assert PretrainConfig.temperature == PretrainConfig.bank_lr == "auto"
    assert {n: params[n].default for n in shared} == {n: config[n] for n in shared}
