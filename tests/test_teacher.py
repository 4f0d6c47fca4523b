"""--teacher: teacher-bank distillation (edgessl.models.teacher, edgessl.method.teacher, edgessl.train.teacher).

The maths against hand computations and autograd; the runs on 24 demo images with a 1-epoch run as the teacher."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.config import resolve
from edgessl.errors import UserError
from edgessl.method.bank import project_rows
from edgessl.method.instance import InstanceDiscrimination
from edgessl.method.losses import mix_probs, relational_kl, slimmable_loss, teacher_probs, width_loss_weights
from edgessl.method.teacher import TeacherBank
from edgessl.models.backbone import load_encoder
from edgessl.models.teacher import load_teacher
from edgessl.options import Decode
from edgessl.train import teacher as teacher_module
from edgessl.train.objective import Objective

TINY = dict(image_size=32, batch_size=8, head_hidden=64, feature_dim=16, eval_every=0, quiet=True, workers=1,
            epochs=1, negatives=10, seed=4, deterministic=True)


# ---------------------------------------------------------------- the maths
def test_relational_kl_equals_a_hand_computation():
    sim = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4]])
    t = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    cols = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]), dim=1)
    tau_s, tau_t = 0.1, 0.05
    q = teacher_probs(t, cols, tau_t)
    total = 0.0
    for b in range(2):
        tq = [math.exp(float(t[b] @ cols[k]) / tau_t) for k in range(3)]
        tq = [v / sum(tq) for v in tq]
        sp = [math.exp(float(sim[b, k]) / tau_s) for k in range(3)]
        sp = [v / sum(sp) for v in sp]
        assert q[b].tolist() == pytest.approx(tq, rel=1e-5)
        total += sum(tq[k] * math.log(tq[k] / sp[k]) for k in range(3))
    assert float(relational_kl(sim, q, tau_s)) == pytest.approx(total / 2, rel=1e-5)


def test_relational_kl_gradient_is_p_minus_q_over_b_tau():
    torch.manual_seed(0)
    sim = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 7, dtype=torch.float64), dim=1)
    relational_kl(sim, q, 0.2).backward()
    p = torch.softmax(sim.detach() / 0.2, dim=1)
    assert torch.allclose(sim.grad, (p - q) / (5 * 0.2), atol=1e-12)
    assert float(relational_kl(sim.detach(), p, 0.2)) == pytest.approx(0.0, abs=1e-12)  # KL(p || p) = 0


def test_mix_probs_is_the_convex_combination_with_the_partner():
    q = torch.softmax(torch.randn(3, 4), dim=1)
    perm, lam = torch.tensor([2, 0, 1]), torch.tensor([0.7, 0.5, 1.0])
    want = torch.stack([0.7 * q[0] + 0.3 * q[2], 0.5 * q[1] + 0.5 * q[0], q[2]])
    assert torch.allclose(mix_probs(q, perm, lam), want)


def test_project_rows_keeps_dot_products_when_the_rank_fits():
    torch.manual_seed(1)
    rows = F.normalize(torch.randn(30, 3) @ torch.randn(3, 12), dim=1)  # rank 3 in 12 dimensions
    low = project_rows(rows, 5)
    assert low.shape == (30, 5) and torch.allclose(low.norm(dim=1), torch.ones(30), atol=1e-5)
    assert torch.allclose(low @ low.t(), rows @ rows.t(), atol=1e-5)
    assert torch.equal(project_rows(rows, 12), rows)
    # each singular vector's sign is fixed (largest entry positive): the same map for nearby rows
    nearby = F.normalize(rows + 1e-7 * torch.randn(30, 12), dim=1)
    assert torch.allclose(project_rows(rows, 2), project_rows(nearby, 2), atol=1e-4)


def _objective(bank: torch.Tensor, tau: float, teacher: TeacherBank | None, widths=(1.0,)):
    method = InstanceDiscrimination(bank.shape[0], bank.shape[1], temperature=tau, negatives=100, sd_weight=0.0)
    method.bank.weight.copy_(bank)
    return Objective(method, seed=0, epochs=1, device=torch.device("cpu"), precision="fp32", widths=widths,
                     slow_start=0.0, teacher_bank=teacher)


def test_a_teacher_that_is_the_students_own_initial_network_adds_no_information():
    """T = V (the teacher's features are the student's initial bank, tau_t = tau) and z_b = v_index_b: the
    teacher's distribution is the student's, so L_t = 0 and its gradient (p - q) / (B tau) vanishes: the step's
    gradient is the method's alone."""
    torch.manual_seed(2)
    bank = F.normalize(torch.randn(12, 6), dim=1)
    index = torch.tensor([3, 7, 0, 11])
    grads = {}
    for name, teacher in (("none", None), ("own", TeacherBank(bank.clone(), weight=0.8, temperature=0.1))):
        x = bank[index].clone().requires_grad_(True)
        res = _objective(bank, 0.1, teacher)(torch.nn.Identity(), x, index, epoch=0, step=0)
        res.loss.backward()
        grads[name] = x.grad
        if teacher is not None:
            assert float(res.logged["teacher"]) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(grads["own"], grads["none"], atol=1e-6)


def test_every_width_is_distilled_with_the_teacher_weight():
    torch.manual_seed(3)
    bank = F.normalize(torch.randn(10, 4), dim=1)
    teacher = F.normalize(torch.randn(10, 5), dim=1)
    index = torch.tensor([1, 4, 6])
    zs = [F.normalize(torch.randn(3, 4), dim=1) for _ in range(2)]

    class TwoWidths(torch.nn.Module):
        def forward(self, x, widths):
            return zs[: len(widths)]

    obj = _objective(bank, 0.1, TeacherBank(teacher, weight=0.3, temperature=0.05), widths=(1.0, 0.5))
    res = obj(TwoWidths(), torch.zeros(3, 1), index, epoch=0, step=0)
    q = teacher_probs(teacher[index], teacher, 0.05)
    outs = [obj.method(z, index) for z in zs]
    kls = [relational_kl(o.sim, q, 0.1) for o in outs]
    want = slimmable_loss(outs[0].loss + 0.3 * kls[0], [outs[1].loss + 0.3 * kls[1]], [outs[1].sim / 0.1],
                          outs[0].p, width_loss_weights([1.0, 0.5]), 0.5)
    assert torch.allclose(res.loss, want) and torch.allclose(res.logged["teacher"], kls[0])


# ---------------------------------------------------------------- sources
def test_teacher_sources_and_their_one_line_errors(demo_run, tmp_path, monkeypatch):
    model, spec = load_teacher(str(demo_run))
    assert (spec.kind, spec.timm_name, spec.image_size) == ("run", "mobilenetv3_small_100", 32)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in load_encoder(demo_run).state_dict().items()}, str(weights))
    with pytest.raises(UserError, match="is a weights file: name its timm architecture with --teacher-backbone"):
        load_teacher(str(weights))
    with pytest.raises(UserError, match=r"Is it the same --teacher-backbone\?"):
        load_teacher(str(weights), "resnet18")
    with pytest.raises(UserError, match="does not exist: pass an edgessl run directory, timm:<name>"):
        load_teacher(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="--teacher-backbone needs --teacher"):
        resolve(dict(TINY, teacher_backbone="resnet18"))
    with pytest.raises(UserError, match="--bank-init teacher needs --teacher"):
        resolve(dict(TINY, bank_init="teacher"))
    for name, value in (("teacher_weight", 2.0), ("teacher_temperature", 0.5)):  # were accepted and did nothing
        with pytest.raises(UserError, match=f"^--{name.replace('_', '-')} needs --teacher "):
            resolve(dict(TINY, **{name: value}))


def test_an_offline_timm_teacher_is_one_line(timm_offline, tiny_data, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--teacher",
                                   "timm:resnet18", "--epochs", "1", "--quiet"])
    assert res.exit_code == 2
    msg = res.output.strip()
    assert msg == ("error: --teacher timm:resnet18: timm could not get the pretrained weights (OSError; offline?). "
                   "Where you are online, timm.create_model('resnet18', pretrained=True) caches them; or pass a local "
                   "file: --teacher path/to/weights.safetensors --teacher-backbone resnet18.")
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------- runs
@pytest.mark.slow
def test_teacher_weight_zero_is_bit_identical_to_no_teacher(demo_run, tiny_data, tmp_path):
    runs = {}
    for name, extra in (("none", {}), ("zero", dict(teacher=str(demo_run), teacher_weight=0.0))):
        losses = []
        edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / name), threads="1",  # the same sums in both
                         on_step=lambda i, out=losses: out.append(i.loss), **{**TINY, "epochs": 2}, **extra)
        runs[name] = (losses, load_file(str(tmp_path / name / "encoder.safetensors")))
    assert runs["none"][0] == runs["zero"][0]
    assert all(torch.equal(v, runs["zero"][1][k]) for k, v in runs["none"][1].items())
    assert (tmp_path / "zero" / "teacher.safetensors").is_file()


@pytest.mark.slow
def test_the_teacher_bank_is_computed_once_and_reused_on_resume(demo_run, tiny_data, tmp_path, monkeypatch):
    calls = []
    real = teacher_module.teacher_features
    monkeypatch.setattr(teacher_module, "teacher_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    teacher = tmp_path / "teacher"
    shutil.copytree(demo_run, teacher)
    opts = dict(TINY, data=str(tiny_data), teacher=str(teacher), teacher_weight=0.5,
                cache_dir=str(tmp_path / "cache"))
    straight = edgessl.pretrain(out=str(tmp_path / "straight"), **{**opts, "epochs": 2})
    assert len(calls) == 1 and straight.history[0]["teacher_pass_seconds"] > 0
    assert "loss_teacher" in straight.history[1] and straight.history[1]["teacher_ms_per_step"] > 0
    stored = load_file(str(tmp_path / "straight" / "teacher.safetensors"))["features"]
    assert stored.dtype == torch.float16 and stored.shape == (24, 1024)
    assert torch.allclose(stored.float().norm(dim=1), torch.ones(24), atol=2e-3)
    record = json.loads((tmp_path / "straight" / "teacher.json").read_text())
    assert (record["kind"], record["rows"], record["image_size"]) == ("run", 24, 32) and record["seconds"] > 0

    edgessl.pretrain(out=str(tmp_path / "cut"), **opts)  # 1 epoch: the pass comes from the cache's folder now
    assert len(calls) == 1
    shutil.rmtree(teacher)  # the teacher is gone: a resume needs only the run's teacher.safetensors
    resumed = edgessl.pretrain(resume=str(tmp_path / "cut"), epochs=2)
    assert len(calls) == 1 and resumed.history[1]["teacher_pass_seconds"] == 0
    assert torch.equal(load_file(str(tmp_path / "cut" / "teacher.safetensors"))["features"], stored)
    a = load_file(str(tmp_path / "straight" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "cut" / "encoder.safetensors"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())  # interrupted + resumed = straight through

    runner, store = CliRunner(), str(tmp_path / "cache")
    res = runner.invoke(app, ["cache", "list", "--cache-dir", store], env={"COLUMNS": "300"})
    assert "32 px (--teacher mobilenetv3_small_100 features)" in res.output
    assert "in 1 entry of 1 folder and 1 teacher bank" in res.output
    res = runner.invoke(app, ["cache", "clear", str(tiny_data), "--cache-dir", store])
    assert res.exit_code == 0 and not list((tmp_path / "cache" / "teachers").iterdir())


@pytest.mark.slow
def test_teacher_bank_init_and_widths_and_per_step_run(demo_run, tiny_data, tmp_path):
    opts = dict(TINY, data=str(tiny_data), teacher=str(demo_run))
    run = edgessl.pretrain(out=str(tmp_path / "init"), bank_init="teacher", **opts)
    bank = torch.load(tmp_path / "init" / "checkpoint.pt", weights_only=False)
    assert run.history[0]["loss_teacher"] > 0 and bank is not None
    slim = edgessl.pretrain(out=str(tmp_path / "slim"), widths="1.0,0.5", slow_start=0.0, **opts)
    assert {"loss_teacher", "loss_ce_w0.5"} <= set(slim.history[0])
    step = edgessl.pretrain(out=str(tmp_path / "step"), teacher_per_step=True, **opts)
    assert step.history[0]["loss_teacher"] > 0


def test_teacher_features_are_unit_rows_in_row_order_in_eval_mode(demo_run, tiny_data, monkeypatch):
    from edgessl.data.augment import test_transform
    from edgessl.data.folder import load_image_folder

    model, spec = load_teacher(str(demo_run))
    images = load_image_folder(tiny_data, 32, decode=Decode(workers=1))
    cpu = torch.device("cpu")
    fast = teacher_module.teacher_features(model, images, cpu, "fp32", spec.mean, spec.std, batch_size=10)
    monkeypatch.setattr(teacher_module, "inference_precision", lambda device, precision: precision)
    t = teacher_module.teacher_features(model.train(), images, cpu, "fp32", spec.mean, spec.std, batch_size=10)
    with torch.no_grad():
        want = F.normalize(model.eval()(test_transform(images.images, spec.mean, spec.std)), dim=1)
    assert torch.allclose(t, want, atol=1e-4) and not model.training  # row order, eval-mode BatchNorm
    assert torch.equal(t, t.half().float())  # rounded as stored: a resumed run reads back the same values
    # bf16 on a CPU that has it (runtime.inference_precision): every row within 1 % of the float32 one
    assert float((fast * want).sum(dim=1).min()) > 0.99


@pytest.mark.slow
def test_cosine_to_rows_and_the_predictor_variant(demo_run, tiny_data, tmp_path):
    from edgessl.method.losses import cosine_to_rows

    pred, rows = torch.tensor([[3.0, 4.0], [0.0, -2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(cosine_to_rows(pred, rows)) == pytest.approx(((1 - 0.6) + (1 + 1)) / 2)
    opts = dict(TINY, data=str(tiny_data), teacher=str(demo_run), teacher_predictor=2.0)
    run = edgessl.pretrain(out=str(tmp_path / "pred"), **opts)
    assert 0 < run.history[0]["loss_teacher_pred"] <= 2
    ckpt = torch.load(tmp_path / "pred" / "checkpoint.pt", weights_only=False)
    assert ckpt["model"]["teacher_predictor.3.weight"].shape == (1024, 512)
    assert not any(k.startswith("teacher_predictor") for k in load_file(str(tmp_path / "pred" /
                                                                             "encoder.safetensors")))
    resumed = edgessl.pretrain(resume=str(tmp_path / "pred"), epochs=2)  # the predictor comes back with the model
    assert resumed.history[-1]["epoch"] == 2 and "loss_teacher_pred" in resumed.history[-1]


def test_a_teacher_weight_of_zero_that_leaves_the_teacher_unused_is_said(tmp_path):
    """--teacher-weight 0 had computed and stored the teacher's features without a word that nothing reads them."""
    from edgessl.config import PretrainConfig
    from edgessl.errors import UserError
    from edgessl.train.teacher import open_teacher

    said = []
    for extra in ({}, {"teacher_weight": 0.5}, {"bank_init": "teacher"}, {"teacher_predictor": 1.0}):
        cfg = PretrainConfig(teacher=str(tmp_path / "gone"), **{"teacher_weight": 0.0, **extra})
        with pytest.raises(UserError):  # no such teacher: the line comes before it is opened
            open_teacher(cfg, None, said.append)
    assert said == ["--teacher-weight 0: the teacher's features are computed and stored but enter neither the loss "
                    "nor the bank (an ablation); leave out --teacher to skip them."]
