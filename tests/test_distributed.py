"""Data-parallel pretraining (torchrun, DDP, gloo on CPU): sharding, the bank's global update, SyncBatchNorm, and
two processes ending where one process with the same global batch ends (also after a resume with one process).

Settings: float rounding differs between one process and two (batch-norm statistics and gradients are summed in
another order), and tiny-data training amplifies it. At 32 px on 24 images the default mobilenetv3_small is chaotic:
two single-process runs that differ only in the number of threads drift from 1e-7 to 1e-1 within five steps, so no
implementation could match it to 1e-5. timm's `test_resnet` (0.4 M parameters, small-input stem off) with
--lr 0.05 stays within ~2e-5 of the one-process run over 6 steps (the bank of seed 3 grows 8.6e-7, 1.5e-6, 2.1e-6,
9.2e-6, 1.3e-5, 1.7e-5 step by step since negatives are drawn without replacement; at --lr 0.2 some seeds reach 1e-4
by step 6, as 1- vs 2-thread runs of one process do). A wrong gradient average or bank update shows as >= 1e-3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.errors import UserError
from edgessl.method.instance import InstanceDiscrimination
from edgessl.train.checkpoint import load_checkpoint
from edgessl.train.distributed import check_global_batch, local_rows, shard, split_sizes

TINY = dict(image_size=32, batch_size=8, epochs=2, head_hidden=64, feature_dim=16, workers=1, eval_every=0,
            backbone="test_resnet", small_input="off", negatives=10, cutmix=0.5, seed=3, deterministic=True, lr=0.05)
ATOL = 5e-5


def _cli_args(opts: dict) -> list[str]:
    args = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    """2 CPU processes on loopback (gloo), one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="", COLUMNS="200")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _assert_same_state(a: dict, b: dict) -> None:
    assert torch.allclose(a["method"]["bank.weight"], b["method"]["bank.weight"], atol=ATOL)
    assert a["model"].keys() == b["model"].keys()  # no "module." prefix
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=ATOL), k


# ---------------------------------------------------------------- no processes
def test_local_rows_partition_the_global_batch():
    for batch, world in [(8, 1), (8, 2), (12, 3), (64, 4), (6, 6)]:
        idx = torch.randperm(100)[:batch]
        parts = [shard(idx, r, world) for r in range(world)]
        assert all(len(p) == batch // world for p in parts)
        assert torch.equal(torch.cat(parts), idx)  # in rank order: gathering rebuilds the global batch
        slices = [local_rows(batch, r, world) for r in range(world)]
        assert [s.start for s in slices] == [r * batch // world for r in range(world)] and slices[-1].stop == batch
    assert split_sizes(10, 4) == [3, 3, 2, 2] and sum(split_sizes(24, 2)) == 24


def test_batch_not_divisible_by_world_is_one_line_error(tiny_data, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not divisible by the number of processes"):
        check_global_batch(7, 2)
    check_global_batch(8, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check runs before any process group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    res = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_data), "--batch-size", "7", "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1
    assert lines[0].startswith("error: --batch-size 7 is not divisible by the number of processes (2)")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("rule,cutmix", [("grad", False), ("grad", True), ("momentum", False)])
def test_slices_of_a_batch_give_the_loss_gradient_and_bank_update_of_the_whole_batch(rule, cutmix):
    """What each rank computes (loss over its rows, bank update from the gathered z) against one process."""
    n, d, b, world = 24, 16, 8, 2
    z = F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(1)), dim=1)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:b]
    mix = (torch.randperm(b, generator=torch.Generator().manual_seed(3)), 0.7) if cutmix else None

    def make():
        return InstanceDiscrimination(n, d, negatives=10, bank_update=rule, generator=torch.Generator().manual_seed(0))

    one = make()
    zz = z.clone().requires_grad_()
    out = one(zz, idx, torch.Generator().manual_seed(5), mix)
    out.loss.backward()
    one.update_bank(out)

    many = make()
    zs = z.clone().requires_grad_()
    outs = [many(zs[local_rows(b, r, world)], idx, torch.Generator().manual_seed(5), mix, local_rows(b, r, world))
            for r in range(world)]
    (sum(o.loss for o in outs) / world).backward()  # DDP's gradient average
    assert torch.allclose(sum(o.loss for o in outs) / world, out.loss, atol=1e-6)
    assert torch.allclose(zs.grad, zz.grad, atol=1e-6)
    gathered = torch.cat([o.z for o in outs])
    for o in outs:  # every rank applies the same update to its own copy
        bank = make()
        bank.load_state_dict(many.state_dict())
        bank.update_bank(o, gathered)
        assert torch.allclose(bank.bank.weight, one.bank.weight, atol=1e-6)


# ---------------------------------------------------------------- two processes
WORKER = r'''
"""torchrun worker: SyncBatchNorm layer check, then a 2-process run killed after epoch 1 (caller's process group)."""
import json, os, sys
import torch
import torch.distributed as dist
import edgessl
from timm.layers import BatchNormAct2d
from edgessl.train.distributed import convert_sync_batchnorm, local_rows

data, out, steps_file, bn_file, opts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
dist.init_process_group("gloo")  # pretrain() uses a group its caller made and leaves it up
rank = dist.get_rank()

g = torch.Generator().manual_seed(0)
x2, g2 = torch.randn(8, 6, 5, 5, generator=g) * 3 + 1, torch.randn(8, 6, 5, 5, generator=g)
x1, g1 = torch.randn(8, 10, generator=g) * 2 - 1, torch.randn(8, 10, generator=g)
torch.manual_seed(0)
layers = torch.nn.ModuleList([BatchNormAct2d(6), torch.nn.BatchNorm1d(10)])
with torch.no_grad():
    for m in layers:
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
layers = convert_sync_batchnorm(layers, torch.device("cpu")).train()
rows = local_rows(8, rank, 2)
result = {}
for name, layer, x, gy in (("act2d", layers[0], x2, g2), ("bn1d", layers[1], x1, g1)):
    xi = x[rows].clone().requires_grad_()
    y = layer(xi)
    (y * gy[rows]).sum().backward()
    result[name] = dict(type=type(layer).__name__, y=y.detach(), dx=xi.grad, dw=layer.weight.grad, db=layer.bias.grad,
                        mean=layer.running_mean.clone(), var=layer.running_var.clone())
torch.save(result, bn_file.format(rank=rank))

class Killed(Exception):
    pass

seen = []
def on_step(info):
    seen.append(dict(rank=info.rank, bank=info.method.bank.weight.clone(),
                     params=torch.cat([p.detach().flatten() for p in info.model.parameters()])))
    if info.epoch == 1 and info.step == 0:
        raise Killed()

try:
    edgessl.pretrain(data=data, out=out, on_step=on_step, quiet=True, **opts)
except Killed:
    pass
torch.save(seen, steps_file.format(rank=rank))
assert dist.is_initialized()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_match_one_and_one_process_resumes_a_two_process_run(tiny_data, tmp_path):
    t0 = time.time()
    opts = dict(TINY, sync_bn=True)
    # A: the CLI under torchrun, uninterrupted. B: a worker script, killed after epoch 1. Both at once.
    run_a, run_b = tmp_path / "two", tmp_path / "two_cut"
    proc_a = _torchrun(["-m", "edgessl", "pretrain", "--data", str(tiny_data), "--out", str(run_a),
                        *_cli_args(opts)], tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    steps_file, bn_file = str(tmp_path / "steps_{rank}.pt"), str(tmp_path / "bn_{rank}.pt")
    proc_b = _torchrun([str(worker), str(tiny_data), str(run_b), steps_file, bn_file, json.dumps(opts)], tmp_path)

    # the same global batch and seed in this process (one rank: plain BatchNorm over the global batch)
    one = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "one"), quiet=True, **opts)

    out_a = _finish(proc_a)
    # only rank 0 prints: the banner and each epoch line once
    assert out_a.count("epoch   1/2") == 1 and out_a.count("epoch   2/2") == 1, out_a[-3000:]
    assert out_a.count("edgessl pretrain") == 1 and "2 processes x 4 images (SyncBatchNorm)" in " ".join(out_a.split())
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "encoder.safetensors", "encoder.json", "curves.png"):
        assert (run_a / name).is_file(), name
    a, s = load_checkpoint(run_a), load_checkpoint(one.run_dir)
    assert a["world_size"] == 2 and s["world_size"] == 1 and a["epoch"] == s["epoch"] == 2
    _assert_same_state(a, s)
    assert [r["loss"] for r in a["history"]] == pytest.approx([r["loss"] for r in s["history"]], abs=ATOL)
    assert [r["images_per_s"] > 0 for r in a["history"]] == [True, True]

    _finish(proc_b)
    # SyncBatchNorm on CPU: each rank's slice of output and input gradient, the summed parameter gradients and the
    # running statistics equal plain BatchNorm over the concatenated batch
    bn = [torch.load(bn_file.format(rank=r)) for r in range(2)]
    from timm.layers import BatchNormAct2d

    g = torch.Generator().manual_seed(0)
    x2, g2 = torch.randn(8, 6, 5, 5, generator=g) * 3 + 1, torch.randn(8, 6, 5, 5, generator=g)
    x1, g1 = torch.randn(8, 10, generator=g) * 2 - 1, torch.randn(8, 10, generator=g)
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([BatchNormAct2d(6), torch.nn.BatchNorm1d(10)])
    with torch.no_grad():
        for m in layers:
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    for name, layer, x, gy in (("act2d", layers[0], x2, g2), ("bn1d", layers[1], x1, g1)):
        x = x.clone().requires_grad_()
        y = layer.train()(x)
        (y * gy).sum().backward()
        assert bn[0][name]["type"].startswith("GlooSync")
        assert torch.allclose(torch.cat([bn[0][name]["y"], bn[1][name]["y"]]), y, atol=1e-5), name
        assert torch.allclose(torch.cat([bn[0][name]["dx"], bn[1][name]["dx"]]), x.grad, atol=1e-5), name
        assert torch.allclose(bn[0][name]["dw"] + bn[1][name]["dw"], layer.weight.grad, atol=1e-4), name
        assert torch.allclose(bn[0][name]["db"] + bn[1][name]["db"], layer.bias.grad, atol=1e-4), name
        for r in range(2):
            assert torch.allclose(bn[r][name]["mean"], layer.running_mean, atol=1e-6), name
            assert torch.allclose(bn[r][name]["var"], layer.running_var, atol=1e-5), name

    # both ranks hold the same bank and weights after every step (bit for bit on one machine)
    steps = [torch.load(steps_file.format(rank=r)) for r in range(2)]
    assert len(steps[0]) == len(steps[1]) == 4  # 3 steps of epoch 1, killed after the first of epoch 2
    assert [s["rank"] for s in steps[1]] == [1] * 4
    for s0, s1 in zip(*steps, strict=True):
        assert torch.equal(s0["bank"], s1["bank"]) and torch.equal(s0["params"], s1["params"])
    b = load_checkpoint(run_b)
    assert b["epoch"] == 1
    moved = max((b["model"][k].float() - v.float()).abs().max().item() for k, v in a["model"].items())
    assert moved > 100 * ATOL  # epoch 2 changed the weights far beyond the tolerance

    # one process continues the killed two-process run and ends where the uninterrupted two-process run ended
    resumed = edgessl.pretrain(resume=str(run_b), quiet=True)
    r = load_checkpoint(resumed.run_dir)
    assert r["epoch"] == 2 and r["world_size"] == 1
    _assert_same_state(r, a)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in a["history"]], abs=ATOL)
    print(f"two-process test: {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_widths_two_processes_match_one(tiny_data, tmp_path):
    """--widths under torchrun: every width's sliced forward, private BatchNorm (synchronised) and the shared bank
    give the one-process result."""
    pytest.importorskip("torch_pruning")
    opts = dict(TINY, sync_bn=True, widths="1.0,0.5", slow_start=0.5, cutmix=0.0)
    run_a = tmp_path / "two"
    proc = _torchrun(["-m", "edgessl", "pretrain", "--data", str(tiny_data), "--out", str(run_a), *_cli_args(opts)],
                     tmp_path)
    one = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "one"), quiet=True, **opts)
    _finish(proc)
    a, s = load_checkpoint(run_a), load_checkpoint(one.run_dir)
    assert any(k.startswith("bn.w0500.") for k in a["model"])  # the width-0.5 private BatchNorm is checkpointed
    _assert_same_state(a, s)
    assert (run_a / "widths.safetensors").is_file()


def test_teacher_targets_of_a_slice_are_the_slice_of_the_global_batch():
    from edgessl.method.teacher import TeacherBank

    t = F.normalize(torch.randn(24, 5, generator=torch.Generator().manual_seed(4)), dim=1)
    tb = TeacherBank(t, temperature=0.07)
    idx, cols = torch.tensor([3, 9, 1, 20]), torch.tensor([0, 1, 3, 7, 9, 20])
    mix = (torch.tensor([2, 3, 0, 1]), 0.6)
    whole = tb.targets(idx, cols, mix)
    for r in range(2):
        assert torch.equal(tb.targets(idx, cols, mix, local_rows(4, r, 2)), whole[local_rows(4, r, 2)])


@pytest.mark.slow
def test_teacher_two_processes_match_one(tiny_data, demo_run, tmp_path):
    """--teacher under torchrun: the teacher pass split over the processes and gathered, T replicated, the
    distillation term over each process's rows (with CutMix) give the one-process result. The bank starts from the
    forward pass here: T itself may differ by one float16 rounding step between 1 and 2 processes (batch sizes differ),
    which --bank-init teacher's projection would carry into the bank beyond this test's tolerance."""
    opts = dict(TINY, sync_bn=True, teacher=str(demo_run), teacher_weight=0.5, cache_dir="none", bank_init="forward")
    run_a = tmp_path / "two"
    proc = _torchrun(["-m", "edgessl", "pretrain", "--data", str(tiny_data), "--out", str(run_a), *_cli_args(opts)],
                     tmp_path)
    one = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "one"), quiet=True, **opts)
    _finish(proc)
    from safetensors.torch import load_file

    ta, t1 = (load_file(str(r / "teacher.safetensors"))["features"].float() for r in (run_a, one.run_dir))
    assert torch.allclose(ta, t1, atol=2e-3)  # float16 rows: one rounding step apart at most
    _assert_same_state(load_checkpoint(run_a), load_checkpoint(one.run_dir))


def test_torchrun_on_mps_is_one_line(monkeypatch):
    """gloo takes CPU tensors only: a torchrun on Apple GPUs would have failed in its first collective."""
    from edgessl.errors import UserError
    from edgessl.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"^torchrun with 2 processes on MPS: PyTorch has no process-group backend"):
        distributed.setup(torch.device("mps"))


def test_under_torchrun_a_peers_exit_and_a_stop_are_said_once(monkeypatch, capsys):
    """A refusal on rank 0 (an existing --out) had been followed by rank 1's 50-line gloo traceback; Ctrl-C and
    usage errors had printed once per process."""
    import typer

    from edgessl.commands.common import friendly
    from edgessl.errors import Interrupted

    def peer_closed():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1")

    def stopped():
        raise Interrupted("Interrupted. 8 completed epochs checkpointed in runs/x", 130)

    monkeypatch.setenv("LOCAL_RANK", "0")  # no 3-second wait in the test
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(typer.Exit) as e:
        friendly(peer_closed)()
    assert e.value.exit_code == 1
    assert capsys.readouterr().err.strip() == "[rank 1] stopped: another process of this run ended it (its message " \
                                              "is above)."
    with pytest.raises(typer.Exit) as e:
        friendly(stopped)()
    assert e.value.exit_code == 130 and capsys.readouterr().err == ""  # rank 0 says it
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # rank 0's own failure stays visible
        friendly(peer_closed)()
    with pytest.raises(typer.Exit):
        friendly(stopped)()
    assert capsys.readouterr().err.strip() == "Interrupted. 8 completed epochs checkpointed in runs/x"


def test_a_usage_error_under_torchrun_is_printed_by_rank_0_only():
    from typer.testing import CliRunner

    from edgessl.cli import app

    for rank, printed in (("1", ""), ("0", "error: No such option: --bogus")):
        res = CliRunner().invoke(app, ["pretrain", "--bogus"], env={"RANK": rank})
        assert res.exit_code == 2 and res.output.startswith(printed) and (printed or res.output == "")
