"""The CUDA paths (issue #29): fp16 with the gradient scaler (a real step, and an overflow that skips the optimiser step
and leaves the bank alone), bf16 autocast, channels_last against NCHW, the prefetcher's pinned non-blocking copies,
--deterministic twice, and a one-process torchrun with NCCL.

`pytest -m cuda` runs them on a GPU; without CUDA they skip with the reason. Every check is a function of the device
and also runs on the CPU (GradScaler("cpu"), bf16/fp16 autocast on the CPU, no pinning, gloo instead of NCCL), so
the logic of each test is exercised on any machine and only its "cuda" case needs a GPU.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_run

import edgessl
from edgessl.config import resolve
from edgessl.data.loader import Prefetcher
from edgessl.runtime import pick_precision
from edgessl.train import distributed
from edgessl.train.build import build_model
from edgessl.train.checkpoint import load_checkpoint
from edgessl.train.crops import make_crops
from edgessl.train.loop import _rows_of, epoch_order, train_step
from edgessl.train.meter import EpochMeter

skip_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="needs a CUDA GPU: torch.cuda.is_available() is False")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, skip_no_cuda])
DEVICES = ["cpu", CUDA]
# the network of the fp16 / bf16 steps: on CUDA the default mobilenetv3_small (stride-1 stem at 32 px); on the CPU,
# where float16 and bfloat16 convolutions run emulated here (1 s a step for mobilenetv3_small), timm's 0.4 M-parameter
# test_resnet, the network of test_distributed.py
MIXED = {"cpu": dict(backbone="test_resnet", small_input="off"), "cuda": {}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small steps on a CPU shared with other jobs


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def momentum_buffers(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]]


def first_conv_dtype(model: torch.nn.Module) -> list[torch.dtype]:
    """A list that receives the output dtype of the model's first convolution at every forward pass."""
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


# ---------------------------------------------------------------- fp16 + GradScaler
@pytest.mark.parametrize("overflow", ["scale", "inf_grad"])
@pytest.mark.parametrize("device", DEVICES)
def test_fp16_step_with_the_gradient_scaler_and_an_overflow_that_skips_it_and_keeps_the_bank(tiny_data, device,
                                                                                             overflow):
    """A real fp16 step moves the weights and the bank. Then an overflow: the loss scaled by 2^100 (its gradients
    overflow float16: what the scaler is there to catch), or a gradient made inf; the scaler skips the optimiser step
    and halves its scale, and the weights, the momentum buffers and the bank stay as they were (the schedule
    advances, the epoch's mean loss counts the trained step only)."""
    run, state, objective = make_run(tiny_data, "fp16", device, **MIXED[device])
    assert state.scaler.is_enabled() and not state.on_device  # fp16: the scaler decides on the host
    # the default initial scale (2^16) may overflow a first step by itself: start lower so this one trains
    state.scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    dtypes = first_conv_dtype(state.model)
    idx = torch.arange(8) * 3
    before, bank = params(state.model), state.method.bank.weight.clone()
    values = train_step(run, state, objective, state.model, idx, 0, 0)
    meter = EpochMeter()  # as the loop counts it: `moved` is a host tensor here, the values on the device
    meter.add(values.named(), 8, values.moved)
    assert dtypes == [torch.float16]  # autocast ran the forward in float16
    assert bool(values.moved) and state.scaler.get_scale() == 2.0**10
    loss = values.as_floats()
    assert torch.isfinite(torch.tensor(list(loss.values()))).all() and loss["loss"] > 0
    after = params(state.model)
    first = next(iter(after))  # the first convolution's weight: the gradient came through the whole network
    assert not torch.equal(after[first], before[first]) and any(not torch.equal(v, before[k]) for k, v in after.items())
    assert not torch.equal(state.method.bank.weight, bank)
    assert state.method.bank.weight.dtype == torch.float32 and all(v.dtype == torch.float32 for v in before.values())

    before, bank = params(state.model), state.method.bank.weight.clone()
    buffers, lr_step = momentum_buffers(state.optimizer), state.scheduler.last_epoch
    if overflow == "scale":
        state.scaler.update(new_scale=2.0**100)
    else:
        hook = next(state.model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    values = train_step(run, state, objective, state.model, idx, 0, 1)
    if overflow == "inf_grad":
        hook.remove()
    assert not bool(values.moved)
    meter.add(values.named(), 8, values.moved)
    assert meter.means()["loss"] == pytest.approx(loss["loss"]) and (meter.images, meter.seen) == (8, 16)
    assert state.scaler.get_scale() == (2.0**99 if overflow == "scale" else 2.0**9)  # it saw inf and backed off
    assert torch.isfinite(values.values).all()  # the loss itself was finite: the gradients overflowed
    assert torch.equal(state.method.bank.weight, bank)
    assert all(torch.equal(v, before[k]) for k, v in params(state.model).items())  # (BN running stats move)
    assert all(torch.equal(a, b) for a, b in zip(momentum_buffers(state.optimizer), buffers, strict=True))
    assert state.scheduler.last_epoch == lr_step + 1


# ---------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_runs_with_a_finite_loss(tiny_data, device):
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    if device == "cpu" or torch.cuda.get_device_capability()[0] >= 8:  # native bfloat16 from Ampere on
        assert pick_precision("auto", torch.device(device)) == ("bf16" if device == "cuda" else "fp32")
    run, state, objective = make_run(tiny_data, "bf16", device, **MIXED[device])
    assert not state.scaler.is_enabled() and state.on_device  # no scaler: decided on the device, no host sync
    dtypes = first_conv_dtype(state.model)
    before, bank = params(state.model), state.method.bank.weight.clone()
    for step in range(2):
        values = train_step(run, state, objective, state.model, torch.arange(8) * 3 + step, 0, step)
        assert bool(values.moved)
        loss = values.as_floats()
        assert torch.isfinite(torch.tensor(list(loss.values()))).all() and loss["loss"] > 0, loss
    assert dtypes == [torch.bfloat16] * 2
    assert not torch.equal(state.method.bank.weight, bank) and state.method.bank.weight.dtype == torch.float32
    after = params(state.model)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(v, before[k]) for k, v in after.items())


# ---------------------------------------------------------------- channels_last
@pytest.mark.parametrize("backbone", ["mobilenetv3_small", "resnet18"])
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_forward_equals_nchw(device, backbone, monkeypatch):
    """The encoder pretrain() builds (channels_last on CUDA), in eval mode: its channels_last copy with a
    channels_last batch (what make_crops feeds on CUDA) gives the features of its NCHW copy, same weights, in
    float32 (TF32 off, so only the layout differs)."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = resolve({**TINY, "backbone": backbone})
    model = build_model(cfg, None, distributed.Dist(), torch.device(device))[0].eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (device == "cuda")  # build_model's layout
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert all(m.weight.is_contiguous() for m in nchw.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[2:] != (1, 1))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous() and torch.equal(x_cl, x)
    with torch.no_grad():
        feats = [m.backbone(v) for m, v in ((nchw, x), (nhwc, x_cl))]  # the pooled backbone features
        outs = [m.head(f) for m, f in zip((nchw, nhwc), feats, strict=True)]  # the encoder's output (Encoder.forward)
    for a, b in (feats, outs):
        assert a.shape == b.shape and torch.isfinite(a).all()
        scale = a.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_step_crops_are_channels_last_except_deterministic_on_the_cpu(tiny_data, device):
    """make_crops hands the step channels_last crops on CUDA and on the CPU (its convolutions run in that layout:
    1.5x on a CPU), NCHW on the CPU with --deterministic; the values are the same crops either way."""
    run, _, _ = make_run(tiny_data, device=device, batch_size=4)
    exact, _, _ = make_run(tiny_data, device=device, batch_size=4, deterministic=True)
    idx = torch.arange(4)
    x, x_exact = make_crops(run, idx, 0, 0)[0], make_crops(exact, idx, 0, 0)[0]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert x_exact.is_contiguous() == (device == "cpu")
    assert torch.equal(x, x_exact)


# ---------------------------------------------------------------- prefetcher, pinned memory
@pytest.mark.parametrize("device", DEVICES)
def test_prefetched_pinned_non_blocking_batches_equal_a_synchronous_gather(tiny_data, device):
    """The loop's gathering (_rows_of: pinned on CUDA) through the Prefetcher, 6 batches, 3 ahead; each copied to the
    device non_blocking, before any synchronisation, and cropped by make_crops from the prefetched rows: the same
    uint8 rows as run.images.get in the step, and the same crops bit for bit as make_crops gathering them itself."""
    run, _, _ = make_run(tiny_data, device=device, batch_size=4)
    n, b = len(run.images), 4
    batches = epoch_order(run.cfg.seed, 0, n)[: n // b * b].view(-1, b)
    assert len(batches) == 6
    got = []
    with Prefetcher(_rows_of(run, batches), len(batches)) as rows:
        for step, raw in enumerate(rows):
            assert raw.device.type == "cpu" and raw.dtype == torch.uint8
            assert raw.is_pinned() == (device == "cuda")  # page-locked for an asynchronous copy on CUDA only
            got.append((raw.to(device, non_blocking=True), make_crops(run, batches[step], 0, step, raw)[0]))
    if device == "cuda":
        torch.cuda.synchronize()
    for step, (rows_on_device, crops) in enumerate(got):
        assert rows_on_device.device.type == device
        assert torch.equal(rows_on_device.cpu(), run.images.get(batches[step]))
        assert torch.equal(crops, make_crops(run, batches[step], 0, step)[0])


# ---------------------------------------------------------------- --deterministic
@pytest.fixture
def restore_global_state():
    """pretrain(deterministic=True, threads=1) switches process-wide settings; put them back afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.set_num_threads(saved[3])
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_runs_give_identical_weights(tiny_data, tmp_path, device, restore_global_state):
    """Two 2-epoch pretrain() runs with deterministic=True (the device's default precision: bf16 autocast on CUDA):
    the checkpoints' weights, BatchNorm statistics and bank and the saved encoders are equal bit for bit."""
    from safetensors.torch import load_file

    opts = dict(TINY, epochs=2, deterministic=True, device=device, threads=1, seed=5, negatives=10, cutmix=0.5)
    first = []

    def keep_first(info):
        if not first:
            first.append({k: v.detach().clone() for k, v in info.model.state_dict().items()})

    a = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "a"), on_step=keep_first, **opts)
    b = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "b"), **opts)
    ca, cb = load_checkpoint(a.run_dir), load_checkpoint(b.run_dir)
    assert ca["epoch"] == cb["epoch"] == 2 and ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert torch.equal(ca["method"]["bank.weight"], cb["method"]["bank.weight"])
    ea, eb = load_file(str(a.run_dir / "encoder.safetensors")), load_file(str(b.run_dir / "encoder.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(v, eb[k]) for k, v in ea.items())
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    # not vacuous: the weights moved after the first step (so two diverging runs would differ)
    assert any(not torch.equal(v.cpu(), first[0][k].cpu()) for k, v in ca["model"].items() if v.is_floating_point())


# ---------------------------------------------------------------- one-process torchrun (NCCL)
WORKER = r'''
"""torchrun worker, one process: the caller's process group (`backend`), the data-parallel path forced on although
the world is 1 (Dist.active: world >= 1), so DDP, the all-gathers, all-reduces, broadcasts and barriers of a
multi-GPU run go through the backend; records what ran."""
import collections, json, sys
import torch
import torch.distributed as dist
import edgessl
from edgessl.train import distributed

data, out, result_file, backend, opts = sys.argv[1:5] + [json.loads(sys.argv[5])]
device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
dist.init_process_group(backend, **({"device_id": device} if backend == "nccl" else {}))
distributed.Dist.active = property(lambda self: self.world >= 1)

calls, devices = collections.Counter(), set()
def counted(name):
    real = getattr(distributed, name)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        devices.update(a.device.type for a in args if torch.is_tensor(a))
        result = real(*args, **kwargs)
        if name == "wrap_model":
            calls["wrapped:" + type(result).__name__] += 1
        return result
    setattr(distributed, name, wrapper)
for name in ("all_gather_cat", "mean_over_ranks", "broadcast_", "barrier", "wrap_model"):
    counted(name)

norms = set()
def on_step(info):
    norms.update(type(m).__name__ for m in info.model.modules() if "Norm" in type(m).__name__)

edgessl.pretrain(data=data, out=out, on_step=on_step, **opts)
d = distributed.Dist(dist.get_rank(), dist.get_world_size())
flags = [distributed.any_rank(True, d), distributed.any_rank(False, d)]
distributed.barrier(d)
json.dump(dict(backend=dist.get_backend(), world=dist.get_world_size(), calls=calls, devices=sorted(devices),
               norms=sorted(norms), any_rank=flags), open(result_file, "w"))
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), pytest.param("cuda", "nccl", marks=CUDA.marks)])
def test_one_process_torchrun_runs_the_data_parallel_path_and_ends_where_a_plain_run_ends(tiny_data, tmp_path, device,
                                                                                          backend,
                                                                                          restore_global_state):
    """torchrun --nproc-per-node 1 on `backend` (NCCL on CUDA, gloo on CPU) with the data-parallel path forced on
    (one GPU cannot hold two NCCL ranks): DDP, SyncBatchNorm, the all-gathers of features and all-reduces of losses
    on the device, the epoch-end broadcast and barriers all run, and the run ends where a plain one-process run ends
    (bit for bit on the CPU, within 5e-5 on CUDA, where the two processes may pick other kernels)."""
    opts = dict(TINY, epochs=2, backbone="test_resnet", small_input="off", negatives=10, cutmix=0.5, seed=3,
                deterministic=True, lr=0.05, sync_bn=True, device=device, precision="fp32", threads=1)
    worker, result_file = tmp_path / "worker.py", tmp_path / "result.json"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", COLUMNS="200")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        if Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(worker), str(tiny_data), str(tmp_path / "torchrun"), str(result_file), backend, json.dumps(opts)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    plain = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "plain"), **opts)  # meanwhile, in this process
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]

    res = json.loads(result_file.read_text())
    assert res["backend"] == backend and res["world"] == 1 and res["any_rank"] == [True, False]
    calls = res["calls"]
    assert calls["wrapped:DistributedDataParallel"] == 1
    assert calls["mean_over_ranks"] == 6 and calls["all_gather_cat"] >= 6  # every step (+ the bank initialisation)
    assert calls["broadcast_"] == 2 and calls["barrier"] >= 2  # every epoch end
    assert res["devices"] == [device]  # the collectives ran on the training device
    assert any(n.startswith("SyncBatchNorm" if device == "cuda" else "GlooSyncBatchNorm") for n in res["norms"])

    a, s = load_checkpoint(tmp_path / "torchrun"), load_checkpoint(plain.run_dir)
    assert a["epoch"] == s["epoch"] == 2 and a["model"].keys() == s["model"].keys()  # no "module." prefix
    atol = 0.0 if device == "cpu" else 5e-5
    assert torch.allclose(a["method"]["bank.weight"], s["method"]["bank.weight"], rtol=0, atol=atol)
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), s["model"][k].float(), rtol=0, atol=atol), k
    assert [r["loss"] for r in a["history"]] == pytest.approx([r["loss"] for r in s["history"]], rel=0, abs=atol)
