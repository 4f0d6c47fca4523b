"""The loop's pieces on tiny data: one train_step against its closed form, skipped steps, the fixed batch on resume,
the objective's composition, CutMix geometry, mixed precision on the CPU, and that training learns."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_run

import edgessl
from edgessl.config import resolve
from edgessl.data.augment import cutmix
from edgessl.errors import UserError
from edgessl.method.bank import grad_bank_update
from edgessl.train import distributed
from edgessl.train.crops import make_crops
from edgessl.train.loop import train_step
from edgessl.train.meter import EpochMeter
from edgessl.train.objective import Teacher
from edgessl.train.prepare import resolve_batch


def test_train_step_updates_the_bank_once_from_the_pre_step_features_and_bank(tiny_data):
    run, state, objective = make_run(tiny_data)
    idx = torch.arange(8) * 3
    before_model, before_bank = copy.deepcopy(state.model), state.method.bank.weight.clone()
    calls = []
    update = state.method.update_bank
    state.method.update_bank = lambda *a, **k: (calls.append(1), update(*a, **k))[1]
    x, _ = make_crops(run, idx, 0, 0)
    values = train_step(run, state, objective, state.model, idx, 0, 0)
    assert len(calls) == 1 and bool(values.moved)
    values = values.as_floats()
    # closed form with the network and bank as they were before the step (BatchNorm in train mode, like the loop)
    before_model.train()
    z = F.normalize(before_model(x), dim=1).detach()
    p = torch.softmax(z @ before_bank.t() / run.cfg.temperature, dim=1)
    expected = grad_bank_update(before_bank, z, p, idx, run.cfg.bank_lr)
    assert torch.allclose(state.method.bank.weight, expected, atol=1e-6)
    # the step moved the network: the post-step features would give another bank
    after = F.normalize(state.model(x), dim=1).detach()
    assert not torch.allclose(after, z, atol=1e-4)
    assert values["loss"] == pytest.approx(values["ce"] + run.cfg.sd_weight * values["sd"], rel=1e-5)


def test_an_fp16_step_the_gradient_scaler_skips_leaves_the_bank_alone(tiny_data):
    run, state, objective = make_run(tiny_data)
    state.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    weights = {k: v.detach().clone() for k, v in state.model.named_parameters()}
    bank = state.method.bank.weight.clone()
    hook = next(state.model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    assert not state.on_device  # the scaler decides on the host
    assert not train_step(run, state, objective, state.model, torch.arange(8), 0, 0).moved
    hook.remove()
    assert state.scaler.get_scale() == 2.0**9  # the scaler saw the overflow and backed off
    assert torch.equal(state.method.bank.weight, bank)
    assert all(torch.equal(v, weights[k]) for k, v in state.model.named_parameters())  # (BN running stats move)
    assert train_step(run, state, objective, state.model, torch.arange(8), 0, 1).moved  # the next one trains
    assert not torch.equal(state.method.bank.weight, bank)


def test_non_finite_loss_skips_the_step_and_counts(tiny_data):
    run, state, objective = make_run(tiny_data)
    with torch.no_grad():
        next(state.model.parameters()).fill_(float("nan"))
    bank = state.method.bank.weight.clone()
    assert state.on_device  # SGD without a scaler: decided on the device, nothing read back
    assert not train_step(run, state, objective, state.model, torch.arange(8), 0, 0).moved
    state.check_nonfinite(lambda: RuntimeError("not yet"))
    assert state.nonfinite == 1 and torch.equal(state.method.bank.weight, bank)
    meter = EpochMeter()
    meter.add(None, 8)
    assert meter.images == 0 and meter.means() == {"loss": 0.0, "loss_ce": 0.0, "loss_sd": 0.0}


def test_the_batch_is_fixed_when_the_run_starts_and_kept_by_resume():
    cfg = resolve({"batch_size": 160})
    warned = []
    one, two = distributed.Dist(), distributed.Dist(rank=0, world=2)
    assert resolve_batch(cfg, 1529, one, warned.append) == 152  # 1/10 of the data, a multiple of 8
    assert resolve_batch(cfg, 1529, two, warned.append) == 144  # a multiple of 16 with two processes
    assert resolve_batch(cfg, 1529, two, warned.append, fixed=152) == 152  # a resume keeps the run's batch
    with pytest.raises(UserError, match="Cannot resume with 3 processes: the run's global batch 152 is not divisible"):
        resolve_batch(cfg, 1529, distributed.Dist(rank=0, world=3), warned.append, fixed=152)


def test_a_batch_larger_than_the_folder_and_its_cap_gets_one_warning_with_the_batch_it_gets():
    """100 images at --batch-size 128 had warned twice (shrinks to 100, then "--batch-size 100 ... shrinks to 8")."""
    warned = []
    assert resolve_batch(resolve({"batch_size": 128}), 100, distributed.Dist(), warned.append) == 8
    assert warned == ["only 100 images, fewer than --batch-size 128: the batch shrinks to 8 (a tenth of the data set "
                      "in multiples of 8, at least 8: larger batches destabilise the memory bank on small data)."]
    warned.clear()
    assert resolve_batch(resolve({"batch_size": 128}), 5, distributed.Dist(), warned.append) == 5
    assert warned == ["only 5 images, fewer than --batch-size 128: the batch shrinks to 5."]


@pytest.mark.slow
def test_checkpoint_records_the_batch(tiny_data, tmp_path):
    from edgessl.train.checkpoint import load_checkpoint

    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "r"), epochs=1, **TINY)
    assert load_checkpoint(tmp_path / "r")["batch"] == 8


def test_teacher_weight_zero_is_the_plain_loss_and_weight_one_is_the_teacher_term(tiny_data):
    run, state, objective = make_run(tiny_data)
    x, _ = make_crops(run, torch.arange(8), 0, 0)
    teacher = copy.deepcopy(state.model)
    plain = objective(state.model, x, torch.arange(8), 0, 0).loss
    objective.teacher = Teacher(teacher, 0.0)
    assert torch.equal(objective(state.model, x, torch.arange(8), 0, 0).loss, plain)
    objective.teacher = Teacher(teacher, 1.0)
    res = objective(state.model, x, torch.arange(8), 0, 0)
    tau = run.cfg.temperature
    pt = torch.softmax(F.normalize(teacher(x), dim=1) @ state.method.bank.weight.t() / tau, dim=1)
    expected = -(pt * F.log_softmax(res.out.sim / tau, dim=1)).sum(1).mean()
    assert torch.allclose(res.loss, expected, atol=1e-6)


@pytest.mark.parametrize("lam, u", [(0.5, (0.5, 0.5)), (0.75, (0.1, 0.9)), (0.3, (0.0, 0.0)), (0.9, (0.99, 0.5))])
def test_cutmix_box_geometry(lam, u):
    h = w = 16
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, h, w).contiguous()
    perm = torch.tensor([1, 2, 3, 0])
    out, kept = cutmix(x, lam, u, perm)
    pasted = out[:, 0] != x[:, 0]  # (B, H, W): where a partner's pixels landed
    box = pasted[0]
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    area = int(box.sum())
    assert area == len(rows) * len(cols)  # one axis-aligned rectangle
    assert torch.equal(pasted, box.expand_as(pasted))  # the same box for every image
    assert kept == pytest.approx(1 - area / (h * w))  # the corrected lambda is the exact kept area
    cut = (1 - lam) ** 0.5
    assert len(rows) <= int(h * cut) and len(cols) <= int(w * cut)  # clipped at the border, never larger
    assert all(torch.all(out[b, :, box] == float(perm[b])) for b in range(4))  # from the partner perm[b]


@pytest.mark.slow
def test_bf16_autocast_trains_real_steps_on_the_cpu(tiny_data, tmp_path):
    r = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "bf16"), epochs=1, precision="bf16", **TINY)
    assert torch.isfinite(torch.tensor(r.history[0]["loss"])) and r.history[0]["loss"] > 0


def test_train_state_step_skips_non_finite_losses_and_stops_after_ten_in_a_row():
    """The one step rule of pretraining and fine-tuning (TrainState.step)."""
    from edgessl.train.state import MAX_NONFINITE, TrainState

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainState(model, None, opt, sched, torch.amp.GradScaler("cpu", enabled=False), 4)
    loss = model(torch.ones(4, 3)).sum()
    before = model.weight.detach().clone()
    assert state.step(loss, float(loss.detach()), lambda: RuntimeError("never")) is True
    assert not torch.equal(model.weight, before) and state.nonfinite == 0
    before = model.weight.detach().clone()
    for _ in range(MAX_NONFINITE - 1):
        assert state.step(loss, float("nan"), lambda: RuntimeError("stop")) is False
    assert state.nonfinite == MAX_NONFINITE - 1 and torch.equal(model.weight, before)
    assert sched.last_epoch == MAX_NONFINITE  # the schedule advanced on every skipped step
    with pytest.raises(RuntimeError, match="stop"):
        state.step(loss, float("inf"), lambda: RuntimeError("stop"))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_step_decided_on_the_device_equals_the_host_rule_bit_for_bit(name):
    """TrainState.step_on_device (no host sync) against TrainState.step on the same losses, including a skipped
    first step (the momentum buffer must not be born from it) and skips in the middle."""
    from edgessl.train.optim import build_optimizer
    from edgessl.train.state import MAX_NONFINITE, TrainState

    def run(on_device: bool, pattern: str):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
        opt = build_optimizer(name, model.parameters(), 0.1, 0.9, 5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        state = TrainState(model, None, opt, sched, torch.amp.GradScaler("cpu", enabled=False), 4)
        for i, c in enumerate(pattern):  # "." a finite step, "x" a non-finite loss
            loss = model(torch.randn(4, 5, generator=torch.Generator().manual_seed(i))).square().mean()
            if c == "x":
                loss = loss * float("nan")
            if on_device:
                assert state.on_device
                moved = state.step_on_device(loss, loss.detach())
                assert bool(moved) == (c == ".")
            else:
                assert state.step(loss, float(loss.detach()), lambda: RuntimeError("never")) == (c == ".")
        return model, state

    for pattern in ("x...", "..xx.x.."):
        (a, _), (b, _) = run(False, pattern), run(True, pattern)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), pattern
    _, state = run(True, "." + "x" * (MAX_NONFINITE - 1))
    state.check_nonfinite(lambda: RuntimeError("not yet"))
    assert state.nonfinite == MAX_NONFINITE - 1
    _, state = run(True, "." + "x" * MAX_NONFINITE + "..")  # recovered since, but ten in a row happened
    with pytest.raises(RuntimeError, match="stop"):
        state.check_nonfinite(lambda: RuntimeError("stop"))
    assert state.nonfinite == 0


def test_the_banner_names_a_method_or_step_option_other_than_the_default():
    """npid, CutMix, blur and --widths had changed every step without a word in the banner."""
    from edgessl.config import resolve
    from edgessl.train.output import method_line

    assert method_line(resolve({})) is None
    assert method_line(resolve({"method": "npid"})) == ("Method: npid with a momentum bank update (m 0.5); no "
                                                        "self-distillation.")
    assert method_line(resolve({"cutmix": 0.5, "blur": 0.2})) == ("Method: edgessl with CutMix (alpha 0.5, lambda "
                                                                  "max); Gaussian blur (p 0.2).")
    assert method_line(resolve({"widths": "1.0,0.5", "slow_start": 0.25})) == (
        "Method: edgessl with widths 1,0.5, the full width alone for the first 25% of the epochs, each sub-width "
        "distilled from it at 0.5.")
