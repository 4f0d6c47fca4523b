"""Where and how the work runs: device, precision, and the number of CPU threads.

Thread policy (measured in benchmarks/README.md, "shared-cpu"): `--threads auto` uses the cores that other
processes leave free, measured over 0.2 s from /proc/stat when the command starts: all of them on an idle machine,
one when another job keeps the cores busy (two threads then fight the other job for the cores, and each OpenMP
barrier waits for a thread that is not running). `--threads N` or OMP_NUM_THREADS override it. OpenMP's wait policy
is left at its default: passive waiting cost 42 % of the demo's images/s and made `eval` 2.5x slower on an idle machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgessl.errors import UserError

_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before anything here changes it


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # e.g. "auto: machine idle", "--threads 1", "OMP_NUM_THREADS=1"

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason})"


def _cpu_times(cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over `cpus` from /proc/stat, or None where there is no /proc/stat."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        v = [float(x) for x in values[:8]]
        idle = v[3] + v[4]  # idle + iowait
        total += sum(v)
        busy += sum(v) - idle
    return (busy, total) if total > 0 else None


def busy_cores(interval: float = 0.2) -> float | None:
    """Cores kept busy by all processes over the next `interval` seconds (this one sleeps meanwhile), among
    the cores this process may use; None when it cannot be measured (no /proc/stat)."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    a = _cpu_times(cpus)
    time.sleep(interval)
    b = _cpu_times(cpus)
    if a is None or b is None or b[1] <= a[1]:
        return None
    n = len(cpus) if cpus else os.cpu_count() or 1
    return n * (b[0] - a[0]) / (b[1] - a[1])


def choose_threads(option: int | str | None = "auto", busy: float | None = None) -> ThreadChoice:
    """The thread count for `option` ("auto"/None/0 or a positive number); busy: measured busy cores (tests)."""
    if option not in (None, "auto", 0, "0"):
        try:
            n = int(option)
        except (TypeError, ValueError):
            raise UserError(f"--threads must be a positive number or auto, not '{option}'.") from None
        if n < 1:
            raise UserError(f"--threads must be a positive number or auto, not {option}.")
        return ThreadChoice(n, f"--threads {n}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return ThreadChoice(int(os.environ[var]), f"{var}={os.environ[var]}")
    base = max(1, _DEFAULT_THREADS)
    if busy is None:
        busy = busy_cores()
    if busy is None:
        return ThreadChoice(base, "auto: load not measurable")
    return auto_threads(busy, base)


def auto_threads(busy: float, base: int) -> ThreadChoice:
    """The auto rule: `busy` cores taken by other work out of `base` -> all of them when (nearly) idle, else the
    free ones rounded, at least 1."""
    free = base - busy
    if free >= base - 0.5:
        return ThreadChoice(base, "auto: machine idle")
    n = max(1, min(base, round(free)))
    return ThreadChoice(n, f"auto: {busy:.1f} of {base} cores busy with other work")


def use_threads(option: int | str | None = "auto") -> ThreadChoice:
    """Choose (see choose_threads) and apply the intra-op thread count of this process."""
    choice = choose_threads(option)
    torch.set_num_threads(choice.threads)
    return choice


RECHECK_SECONDS = 10.0  # how often a run with --threads auto looks at the load again (between two steps)


def cpu_counters() -> tuple[float, float] | None:
    """(busy, total) jiffies over the cores this process may use, summed since boot (None without /proc/stat)."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return _cpu_times(cpus)


def _children_cpu(pid: int) -> float:
    """CPU seconds of the live child processes of `pid` (DataLoader workers), from /proc/<child>/stat (0 without)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return 0.0
    for entry in entries:
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid ... utime(12) stime(13)
        if int(fields[1]) == pid:
            total += (float(fields[11]) + float(fields[12])) / tick
    return total


def family_cpu_seconds() -> float:
    """CPU seconds used by this process and its children (live ones from /proc, finished ones from os.times): the
    work of this run, which the governor must not mistake for another job's."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system + _children_cpu(os.getpid())


@dataclass
class ThreadGovernor:
    """--threads auto for a whole run: between steps, every RECHECK_SECONDS, the cores that *other* processes kept
    busy since the last look (the machine's busy share from /proc/stat times its cores, minus the CPU time of this
    process and its children, the data-loading workers, over the same wall time) decide the thread count again by
    the start's rule (auto_threads). A look reads the counters and scans /proc for children (a few milliseconds,
    no sleep); 10 s notices a competitor within a fraction of an epoch and averages over
    enough steps that one slow step does not flip the count. Inactive (`active` False) with --threads N,
    OMP_NUM_THREADS, --deterministic (a run that must repeat bit for bit keeps its count) or without /proc/stat.
    `changes` lists every change: {"epoch", "step", "threads", "other_cores"}."""

    choice: ThreadChoice
    active: bool
    base: int = field(default_factory=lambda: max(1, _DEFAULT_THREADS))
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count() or 1)
    counters: Callable[[], tuple[float, float] | None] = cpu_counters
    own_cpu: Callable[[], float] = family_cpu_seconds
    clock: Callable[[], float] = time.monotonic
    apply: Callable[[int], None] = torch.set_num_threads
    changes: list = field(default_factory=list)
    _last: tuple | None = None

    def _look(self) -> tuple[float, tuple[float, float] | None, float]:
        return self.clock(), self.counters(), self.own_cpu()

    def tick(self, epoch: int, step: int) -> ThreadChoice | None:
        """Call between steps; returns the new choice when the count changed (already applied), else None."""
        if not self.active:
            return None
        now = self._look()
        if self._last is None or now[1] is None or self._last[1] is None:
            self._last = now
            return None
        if now[0] - self._last[0] < RECHECK_SECONDS:
            return None
        (t0, (b0, n0), c0), (t1, (b1, n1), c1) = self._last, now
        self._last = now
        if n1 <= n0 or t1 <= t0:
            return None
        others = max(0.0, self.cores * (b1 - b0) / (n1 - n0) - (c1 - c0) / (t1 - t0))
        new = auto_threads(others, self.base)
        if new.threads == self.choice.threads:
            return None
        self.apply(new.threads)
        self.choice = new
        self.changes.append({"epoch": epoch + 1, "step": step + 1, "threads": new.threads,
                             "other_cores": round(others, 2)})
        return new


def thread_governor(choice: ThreadChoice, deterministic: bool = False) -> ThreadGovernor:
    """The governor of a run whose start chose `choice` (active only when that was the auto rule's choice)."""
    auto = choice.reason.startswith("auto") and choice.reason != "auto: load not measurable"
    return ThreadGovernor(choice, active=auto and not deterministic)


def between_batches(governor: ThreadGovernor, say: Callable[[str], None]) -> Callable[[], None]:
    """For eval and embed (no epochs): a callback to run between two batches or fits; it lets `governor` look at
    the load (every RECHECK_SECONDS) and prints each change ("CPU: 1 thread (...) from batch 12")."""
    count = [0]

    def tick() -> None:
        count[0] += 1
        new = governor.tick(-1, count[0] - 1)
        if new is not None:
            say(f"CPU: {new.describe()} from batch {count[0]}")

    return tick


def changes_without_epoch(governor: ThreadGovernor) -> list[dict]:
    """The governor's changes as eval.json / embed list them: {"step", "threads", "other_cores"}."""
    return [{k: v for k, v in c.items() if k != "epoch"} for c in governor.changes]


DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """Whether Apple silicon's GPU (MPS, Metal Performance Shaders) is usable by this PyTorch build."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(option: str) -> torch.device:
    """auto: cuda, else mps (Apple silicon), else cpu. An unavailable cuda or mps is a one-line error."""
    if option not in DEVICES:
        index = option.partition(":")[2]
        hint = (f" To pick GPU {index}, run with CUDA_VISIBLE_DEVICES={index} and --device cuda."
                if option.startswith("cuda:") and index.isdigit() else "")
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, not '{option}'.{hint}")
    if option == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch. Use --device cpu or auto.")
    if option == "mps" and not mps_available():
        raise UserError("--device mps: no Apple-silicon GPU (MPS) is visible to PyTorch (it needs macOS 12.3+ on "
                        "Apple silicon). Use --device cpu or auto.")
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    return torch.device(option)


def pick_precision(option: str, device: torch.device) -> str:
    """auto: bf16 (or fp16 without bf16) on CUDA, fp32 on CPU and MPS. On MPS fp16 autocasts with the gradient
    scaler and bf16 needs macOS 14+ (docs/method.md, "Apple silicon")."""
    if option == "auto":
        if device.type == "cuda":
            # native bf16 only (Ampere or newer): older GPUs report bf16 "supported" by emulation, far slower than fp16
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "fp32"
    old_macos = device.type == "mps" and mps_available() and not torch.backends.mps.is_macos_or_newer(14, 0)
    if option == "bf16" and old_macos:
        raise UserError("--precision bf16 on MPS needs macOS 14 or newer. Use --precision fp32 (the MPS default) "
                        "or fp16.")
    return option  # bf16 and fp16 (with its gradient scaler) also run on the CPU: slower there, but the same code path


def precision_caution(precision: str, device: torch.device) -> str | None:
    """A warning for fp16 on the CPU: it runs there (tested), but float16 autocast has no fast CPU kernels; a
    mobilenetv3_small step at 64 px took 7.9x fp32's time on a 2-core x86 machine (bf16: 1.2x; 2026-12-07)."""
    if precision == "fp16" and device.type == "cpu":
        return ("--precision fp16 on the CPU: float16 has no fast CPU kernels, so each step takes several times as "
                "long as fp32 (8x measured on a 2-core x86 machine); fp32 is the CPU default.")
    return None


def inference_precision(device: torch.device, precision: str) -> str:
    """The precision of a frozen network's forward passes (the --teacher pass): the run's, except fp32 on a CPU with
    native bfloat16 (AVX512-BF16 / AMX, which oneDNN uses), where bf16 autocast runs a resnet18 2.5x faster (with
    channels_last; benchmarks/README.md, teacher) at about 1 % error in the features."""
    if device.type == "cpu" and precision == "fp32" and torch.backends.mkldnn.is_available() \
            and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class StopRequest:
    """SIGTERM (a scheduler stopping a job, a spot instance, `kill`) turned into a request that the training loop
    honours at the end of a step: it checkpoints what it has and stops (exit 143). Installed only in the main
    thread; the previous handler comes back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    @property
    def requested(self) -> bool:
        return self.signum is not None
