"""Thread policy, the smoothed ETA and console wrapping (edgessl.runtime, edgessl.report.progress)."""

import os

import pytest
import torch

from edgessl import runtime
from edgessl.errors import UserError
from edgessl.report.progress import smoothed_rate
from edgessl.runtime import ThreadChoice, choose_threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(runtime, "_DEFAULT_THREADS", 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)


@pytest.mark.parametrize("busy, threads", [(0.0, 2), (0.4, 2), (0.9, 1), (1.6, 1), (2.0, 1), (3.5, 1)])
def test_auto_threads_use_the_cores_other_work_leaves(two_cores, busy, threads):
    choice = choose_threads("auto", busy=busy)
    assert choice.threads == threads
    assert choice.reason == (
        "auto: machine idle" if threads == 2 else f"auto: {busy:.1f} of 2 cores busy with other work"
    )


def test_explicit_threads_and_environment_win(two_cores, monkeypatch):
    assert choose_threads("3", busy=2.0) == ThreadChoice(3, "--threads 3")
    assert choose_threads(1, busy=0.0) == ThreadChoice(1, "--threads 1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto", busy=0.0) == ThreadChoice(1, "OMP_NUM_THREADS=1")
    assert choose_threads(None, busy=None).threads == 1
    with pytest.raises(UserError, match="--threads must be a positive number or auto, not -1"):
        choose_threads(-1)


def test_busy_cores_is_measured_from_proc_stat(two_cores):
    busy = runtime.busy_cores(0.05)
    if not os.path.exists("/proc/stat"):
        assert busy is None
    else:
        assert 0.0 <= busy <= len(os.sched_getaffinity(0)) + 1e-6


def test_use_threads_applies_the_choice(two_cores):
    before = torch.get_num_threads()
    try:
        assert runtime.use_threads("1") == ThreadChoice(1, "--threads 1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_config_validates_threads():
    from edgessl.config import resolve

    assert resolve({"threads": 2}).threads == "2"
    assert resolve({}).threads == "auto"
    with pytest.raises(UserError, match="--threads must be auto or a positive number, not 'many'"):
        resolve({"threads": "many"})


def test_smoothed_rate_is_an_exponential_moving_average():
    assert smoothed_rate(None, 10, 2.0) == 5.0
    assert smoothed_rate(5.0, 10, 1.0, alpha=0.1) == pytest.approx(0.1 * 10 + 0.9 * 5)
    assert smoothed_rate(5.0, 0, 1.0) == 5.0 and smoothed_rate(5.0, 3, 0.0) == 5.0
    # one stretch three times slower moves the estimate by alpha * (1/3 - 1), not threefold
    assert smoothed_rate(9.0, 3, 1.0, alpha=0.1) == pytest.approx(8.4)


def test_deterministic_sets_the_cublas_workspace_on_cuda_only(monkeypatch):
    from edgessl.train.build import set_determinism

    calls = []
    record = lambda on, warn_only=False: calls.append((on, warn_only))  # noqa: E731
    monkeypatch.setattr(torch, "use_deterministic_algorithms", record)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_determinism(False, torch.device("cuda"))
    assert calls == [] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_determinism(True, torch.device("cpu"))
    assert calls == [(True, True)] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_determinism(True, torch.device("cuda"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_determinism(True, torch.device("cuda"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's choice stays


@pytest.fixture
def fake_mps(monkeypatch):
    """An Apple-silicon machine as PyTorch would report it (there is no Mac here): no CUDA, MPS available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major <= 14)


def test_auto_picks_mps_after_cuda_and_mps_defaults_to_fp32(fake_mps, monkeypatch):
    assert runtime.pick_device("auto") == torch.device("mps") and runtime.pick_device("mps") == torch.device("mps")
    mps = torch.device("mps")
    assert runtime.pick_precision("auto", mps) == "fp32"
    assert runtime.pick_precision("fp16", mps) == "fp16" and runtime.pick_precision("bf16", mps) == "bf16"
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major < 14)  # macOS 13
    with pytest.raises(UserError) as e:
        runtime.pick_precision("bf16", mps)
    assert str(e.value) == ("--precision bf16 on MPS needs macOS 14 or newer. Use --precision fp32 (the MPS default) "
                            "or fp16.")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.pick_device("auto") == torch.device("cuda")


def test_mps_without_a_mac_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        runtime.pick_device("mps")
    assert str(e.value) == ("--device mps: no Apple-silicon GPU (MPS) is visible to PyTorch (it needs macOS 12.3+ on "
                            "Apple silicon). Use --device cpu or auto.")
    with pytest.raises(UserError, match="--device must be one of auto, cpu, cuda, mps, not 'tpu'."):
        runtime.pick_device("tpu")
    from edgessl.config import resolve

    assert resolve({"device": "mps"}).device == "mps"  # valid config; the device is checked when the run starts


def test_parameters_off_cpu_and_cuda_take_the_unfused_optimiser_and_the_host_rule():
    """MPS parameters (here: meta, the other device this machine has) get torch's unfused SGD/AdamW, so a step
    is decided on the host (TrainState.step), not by a fused kernel's found_inf."""
    from edgessl.train.optim import build_optimizer
    from edgessl.train.state import TrainState

    for device, fused in (("cpu", True), ("meta", False)):
        for name in ("sgd", "adamw"):
            params = [torch.nn.Parameter(torch.zeros(3, 2, device=device))]
            opt = build_optimizer(name, params, 0.1, 0.9, 5e-4)
            assert bool(opt.defaults["fused"]) == fused, (device, name)
            state = TrainState(torch.nn.Linear(2, 3), None, opt, None, torch.amp.GradScaler("cpu", enabled=False), 8)
            assert state.on_device == fused, (device, name)
