"""Thread policy, the smoothed ETA and console wrapping (edgessl.runtime, edgessl.report.progress)."""

import os
import time
from pathlib import Path

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


class _Machine:
    """Scripted load for ThreadGovernor: each look advances the clock by `dt` seconds; `others` (cores other work
    keeps busy) and `own` (this process's cores) hold until changed."""

    def __init__(self, cores=2, dt=5.0):
        self.cores, self.dt, self.t, self.busy, self.total, self.cpu = cores, dt, 0.0, 0.0, 0.0, 0.0
        self.others, self.own, self.applied = 0.0, 2.0, []

    def clock(self):
        self.t += self.dt
        self.busy += min(self.cores, self.others + self.own) * self.dt * 100  # jiffies at 100 Hz
        self.total += self.cores * self.dt * 100
        self.cpu += self.own * self.dt
        return self.t

    def governor(self, choice, active=True):
        return runtime.ThreadGovernor(choice, active, base=2, cores=self.cores,
                                      counters=lambda: (self.busy, self.total), own_cpu=lambda: self.cpu,
                                      clock=self.clock, apply=self.applied.append)


def test_the_governor_follows_injected_load_between_steps():
    m = _Machine()
    g = m.governor(ThreadChoice(2, "auto: machine idle"))
    assert g.tick(0, 0) is None  # the first look only records
    assert g.tick(0, 1) is None and m.applied == []  # 5 s later: not due (RECHECK_SECONDS = 10)
    assert g.tick(0, 2) is None  # 10 s, idle: stays at 2
    m.others, m.own = 1.0, 1.0  # a competitor takes a core; this run gets the other one
    g.tick(0, 3)
    new = g.tick(0, 4)
    assert new == ThreadChoice(1, "auto: 1.0 of 2 cores busy with other work") and m.applied == [1]
    assert g.changes == [{"epoch": 1, "step": 5, "threads": 1, "other_cores": 1.0}]
    m.others = 0.0  # the competitor leaves: this run (1 thread, 1 core) is the only load
    g.tick(1, 0)
    assert g.tick(1, 1) == ThreadChoice(2, "auto: machine idle") and m.applied == [1, 2]
    assert g.changes[-1] == {"epoch": 2, "step": 2, "threads": 2, "other_cores": 0.0}


def test_the_governor_stays_off_unless_auto_chose():
    m = _Machine()
    m.others, m.own = 2.0, 0.5
    for choice, deterministic in ((ThreadChoice(2, "--threads 2"), False), (ThreadChoice(1, "OMP_NUM_THREADS=1"),
                                  False), (ThreadChoice(2, "auto: machine idle"), True),
                                  (ThreadChoice(2, "auto: load not measurable"), False)):
        g = runtime.thread_governor(choice, deterministic)
        assert not g.active
    g = m.governor(ThreadChoice(2, "--threads 2"), active=False)
    assert all(g.tick(0, k) is None for k in range(10)) and m.applied == [] and m.t == 0.0  # never even looks
    assert runtime.thread_governor(ThreadChoice(2, "auto: machine idle")).active


def test_config_validates_threads():
    from edgessl.config import resolve

    assert resolve({"threads": 2}).threads == "2"
    assert resolve({}).threads == "auto"
    with pytest.raises(UserError, match="--threads must be auto or a positive number, not 'many'"):
        resolve({"threads": "many"})
    from edgessl.runtime import choose_threads

    with pytest.raises(UserError, match="^--threads must be a positive number or auto, not 'abc'.$"):
        choose_threads("abc")  # `prune --threads abc` had ended in int()'s ValueError


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
    with pytest.raises(UserError) as e:
        runtime.pick_device("cuda:1")
    assert str(e.value) == ("--device must be one of auto, cpu, cuda, mps, not 'cuda:1'. To pick GPU 1, run with "
                            "CUDA_VISIBLE_DEVICES=1 and --device cuda.")
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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_busy_child_counts_as_this_runs_cpu_not_another_jobs():
    """DataLoader workers are children: their CPU is this run's own, so the governor does not shed threads for them."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:  # 2 s of the child's loop: on a loaded 2-core machine (load 4) 1 s had given it less than 0.5 s of CPU
        time.sleep(0.5)
        before, own_before = runtime.family_cpu_seconds(), time.process_time()
        time.sleep(2.0)
        grew, own_grew = runtime.family_cpu_seconds() - before, time.process_time() - own_before
    finally:
        child.kill()
        child.wait()
    assert grew > 0.5 and own_grew < 0.2


def test_auto_precision_on_cuda_takes_bf16_only_where_it_is_native(monkeypatch):
    """bf16 on Ampere or newer; fp16 (with its scaler) on older GPUs, which report bf16 as supported by emulation."""
    cuda = torch.device("cuda")
    asked = []

    def native(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an older GPU: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native)
    assert runtime.pick_precision("auto", cuda) == "fp16" and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.pick_precision("auto", cuda) == "bf16"


def test_fp16_on_the_cpu_is_warned_about_and_nothing_else_is():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.precision_caution("fp16", cpu) == (
        "--precision fp16 on the CPU: float16 has no fast CPU kernels, so each step takes several times as long as "
        "fp32 (8x measured on a 2-core x86 machine); fp32 is the CPU default.")
    assert [runtime.precision_caution(p, d) for p, d in (("fp32", cpu), ("bf16", cpu), ("fp16", cuda))] == [None] * 3


def test_ctrl_c_while_the_command_line_loads_is_one_line_and_exit_130(monkeypatch, capsys):
    """A Ctrl-C during the seconds torch takes to import had printed a traceback from inside an import."""
    import importlib.abc
    import sys

    from edgessl import _entry

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "edgessl.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "edgessl.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        _entry.main()
    assert e.value.code == 130
    assert capsys.readouterr().err == "Interrupted while loading; nothing was run.\n"


def test_import_edgessl_loads_no_torch_until_the_api_is_used():
    """Nor does the command line until a command runs: --help and a mistyped flag had waited 5-15 s for torch, timm
    and torchvision."""
    import subprocess
    import sys

    code = ("import sys, edgessl, edgessl.cli; before = 'torch' in sys.modules; f = edgessl.pretrain; "
            "import edgessl.api; "
            "print(before, 'torch' in sys.modules, f is edgessl.api.pretrain, 'pretrain' in dir(edgessl))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True", "True"]


def test_edgessl_offers_every_name_of_the_api():
    """A notebook's `edgessl.run_device_check` or `edgessl.ExportOptions` had been an AttributeError although
    edgessl.api, which the docs call the API, exports them."""
    import edgessl
    import edgessl.api

    assert set(edgessl.__all__) - {"__version__"} == set(edgessl.api.__all__)
    assert all(getattr(edgessl, name) is getattr(edgessl.api, name) for name in edgessl.api.__all__)
    with pytest.raises(AttributeError, match="module 'edgessl' has no attribute 'pretrian'"):
        edgessl.pretrian  # noqa: B018


def test_sigterm_stops_a_command_with_its_line_and_exit_143(capsys):
    """eval, finetune and export had exited 143 on SIGTERM without a word (only pretraining handled it)."""
    import os
    import signal

    import typer

    from edgessl.commands.common import friendly

    before = signal.getsignal(signal.SIGTERM)

    @friendly
    def command():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises first

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 143 and capsys.readouterr().err.strip().endswith("Stopped by SIGTERM.")
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the command
