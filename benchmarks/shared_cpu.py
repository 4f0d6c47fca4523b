"""Shared-CPU suite: images/s of `edgessl pretrain` (demo) and seconds of `edgessl eval`, on an idle machine and
beside one competing 2-thread PyTorch training process, with today's thread policy vs the old behaviour.

Settings (each workload runs as its own `edgessl` process, so the OpenMP wait policy takes effect):
  old      --threads = all cores (torch's default before the policy), OpenMP's default waiting (spin, then sleep)
  passive  the same with OMP_WAIT_POLICY=PASSIVE (threads sleep at once: no spinning)
  new      the default, --threads auto (the cores other work leaves free when the command starts)
The competitor trains timm's mobilenetv3_small (64 px, batch 64, 2 threads, default OpenMP policy) in a loop and
reports its own steps/s, so a setting that wins by starving the other job shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import run_line
from edgessl.demo import demo_images

SETTINGS = {
    "old": ({}, ["--threads", str(os.cpu_count() or 2)]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", str(os.cpu_count() or 2)]),
    "new": ({}, []),
}

COMPETITOR = """
import os, sys, time, torch, timm
torch.set_num_threads(int(sys.argv[2]))
m = timm.create_model("mobilenetv3_small_100", num_classes=10)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
stop, steps, t0 = sys.argv[1], 0, None
open(stop + ".ready", "w").close()
while not os.path.exists(stop) or steps < 2:
    if steps == 1:
        t0 = time.time()
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step(); steps += 1
    with open(stop + ".tmp", "w") as f:
        f.write(f"{steps} {time.time()}")
    os.replace(stop + ".tmp", stop + ".progress")
print((steps - 1) / (time.time() - t0))
"""


class Competitor:
    """One 2-thread PyTorch training loop in its own process, until stop() (--tiny: one thread, so the smoke run
    does not crowd the other test worker)."""

    def __init__(self, work: Path, warm_up: float = 3.0, threads: int = 2):
        self.stop_file = work / "stop"
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(self.stop_file), str(threads)], env=env,
                                     stdout=subprocess.PIPE, text=True)
        while not Path(str(self.stop_file) + ".ready").exists():
            time.sleep(0.1)
        time.sleep(warm_up)  # past its warm-up

    def stop(self) -> float:
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=120)
        for suffix in (".ready", ".progress", ""):
            Path(str(self.stop_file) + suffix).unlink(missing_ok=True)
        return float(out.strip().splitlines()[-1])

    def mark(self, after: tuple[int, float] | None = None) -> tuple[int, float]:
        """(steps done, when) at its latest step (the first one after `after`): rate() of two marks is its steps/s in
        between (wait() for its first step first)."""
        while True:
            steps, when = (Path(str(self.stop_file) + ".progress").read_text().split())
            if after is None or int(steps) > after[0]:
                return int(steps), float(when)
            self._alive()

    def wait(self) -> None:
        while not Path(str(self.stop_file) + ".progress").exists():
            self._alive()

    def _alive(self) -> None:
        """Sleep a moment; raise if the competitor has died (a wait for its next step would never end)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the competitor process exited with code {self.proc.returncode}")
        time.sleep(0.05)


def rate(first: tuple[int, float], last: tuple[int, float]) -> float:
    return (last[0] - first[0]) / max(last[1] - first[1], 1e-9)


def _edgessl(args: list[str], env: dict[str, str], cwd: Path) -> float:
    """Run one edgessl command; returns its wall seconds."""
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "edgessl", *args], env={**full, **env}, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.time() - t0


def run_pretrain(setting: str, work: Path, epochs: int, size: int, data: Path) -> dict[str, Any]:
    env, flags = SETTINGS[setting]
    out = work / f"pretrain-{setting}-{time.time_ns()}"
    seconds = _edgessl(["pretrain", "--data", str(data), "--epochs", str(epochs), "--image-size", str(size), "--out",
                        str(out), "--eval-every", "0", "--quiet", *flags], env, work)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # epoch 1 includes the first-step warm-up
    return {"images_per_s": sum(r["images_per_s"] for r in timed) / len(timed), "seconds": seconds,
            "threads": rows[-1]["threads"]}


def run_eval(setting: str, work: Path, run_dir: Path, seeds: int, data: Path) -> dict[str, Any]:
    env, flags = SETTINGS[setting]
    lpc = "10,all" if seeds > 1 else "1,all"
    seconds = _edgessl(["eval", str(run_dir), "--train", str(data), "--test-fraction", "0.2", "--labels-per-class",
                        lpc, "--seeds", str(seeds), "--no-cache", "--quiet", *flags], env, work)
    report = json.loads((run_dir / "eval.json").read_text())
    n = report["n_train"] + report["n_test"]
    return {"seconds": seconds, "images_per_s": n / seconds, "threads": report.get("threads")}


def _tiny_demo(folder: Path, per_class: int = 5) -> Path:
    """The first `per_class` demo images of every category: the smoke run's data."""
    import shutil

    for cls in sorted(p for p in demo_images().iterdir() if p.is_dir()):
        (folder / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.png"))[:per_class]:
            shutil.copy(f, folder / cls.name / f.name)
    return folder


def suite_shared_cpu(args) -> list[dict[str, Any]]:
    if args.tiny:
        return _tiny_shared_cpu()
    epochs, size, seeds = 5, 64, 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = demo_images()
        base = work / "eval-run"
        _edgessl(["pretrain", "--data", str(data), "--epochs", "1", "--image-size", str(size), "--out", str(base),
                  "--quiet", "--eval-every", "0"], {}, work)
        comp = Competitor(work, 3.0)
        time.sleep(10.0)
        rows.append({"workload": "competitor alone", "load": "competitor", "setting": "-",
                     "competitor_steps_per_s": comp.stop(), "load_average_1min": os.getloadavg()[0]})
        for load in ("idle", "competitor"):
            for setting in SETTINGS:
                for workload in ("pretrain", "eval"):
                    comp = Competitor(work, 3.0) if load == "competitor" else None
                    load_before = os.getloadavg()[0]
                    try:
                        r = (run_pretrain(setting, work, epochs, size, data) if workload == "pretrain"
                             else run_eval(setting, work, base, seeds, data))
                    finally:
                        comp_rate = comp.stop() if comp else None
                    rows.append({"workload": workload, "load": load, "setting": setting, **r,
                                 "competitor_steps_per_s": comp_rate, "load_average_1min": load_before})
                    print(f"shared-cpu {workload} {load} {setting}: {r}", flush=True)
    return rows


def _tiny_shared_cpu() -> list[dict[str, Any]]:
    """The smoke run (every code path, in seconds): one competitor for all rows, its steps/s per row's window; a
    1-epoch 32 px pretraining on 5 demo images per category beside it, then eval of that run."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _tiny_demo(work / "demo")
        comp = Competitor(work, 0.0, threads=1)
        comp.wait()
        try:
            first = comp.mark()
            time.sleep(1.0)
            rows = [{"workload": "competitor alone", "load": "competitor", "setting": "-",
                     "competitor_steps_per_s": rate(first, comp.mark(first)), "load_average_1min": os.getloadavg()[0]}]
            for workload in ("pretrain", "eval"):
                load_before, first = os.getloadavg()[0], comp.mark()
                if workload == "pretrain":
                    r = run_pretrain("new", work, 1, 32, data)
                else:
                    r = run_eval("new", work, next(work.glob("pretrain-new-*")), 1, data)
                rows.append({"workload": workload, "load": "competitor", "setting": "new", **r,
                             "competitor_steps_per_s": rate(first, comp.mark(first)), "load_average_1min": load_before})
                print(f"shared-cpu {workload} competitor new: {r}", flush=True)
        finally:
            comp.stop()
    return rows


# ---------------------------------------------------------------- a competitor that arrives and leaves mid-run
MIDWAY = {"follows the load (auto, the default)": [], "fixed at the start's choice (--threads 2)": ["--threads", "2"]}


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_midway(flags: list[str], work: Path, data: Path, epochs: int, size: int, phases: tuple[int, int],
               tiny: bool) -> dict[str, Any]:
    """One pretraining (idle at its start) beside a competitor that starts once `phases[0]` epochs are done and stops
    once `phases[1]` are: per-phase mean images/s (each phase's first epoch left out: it straddles the change)."""
    out = work / f"midway-{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    proc = subprocess.Popen([sys.executable, "-m", "edgessl", "pretrain", "--data", str(data), "--epochs", str(epochs),
                             "--image-size", str(size), "--out", str(out), "--eval-every", "0", "--quiet", *flags],
                            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    comp, comp_rate = None, None
    while proc.poll() is None:
        done = _epochs_done(out)
        if comp is None and comp_rate is None and done >= phases[0]:
            comp = Competitor(work, 0.0, threads=1 if tiny else 2)
        if comp is not None and done >= phases[1]:
            comp_rate, comp = comp.stop(), None
        time.sleep(0.05 if tiny else 0.2)
    if comp is not None:
        comp_rate = comp.stop()
    if proc.returncode:
        raise RuntimeError(proc.stderr.read())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def rate(lo: int, hi: int) -> float:
        part = rows[lo + 1 : hi] or rows[lo:hi]
        return sum(r["images_per_s"] for r in part) / len(part)

    idle, busy, after = rate(0, phases[0]), rate(phases[0], phases[1]), rate(phases[1], epochs)
    return {"idle_images_per_s": idle, "competitor_images_per_s": busy, "after_images_per_s": after,
            "busy_over_idle": busy / idle, "after_over_idle": after / idle, "competitor_steps_per_s": comp_rate,
            "threads_per_epoch": [r["threads"] for r in rows],
            "thread_changes": [c for r in rows for c in r.get("thread_changes", [])]}


def suite_midway(args) -> list[dict[str, Any]]:
    """The demo pretraining at 64 px for 18 epochs (tiny: 5 tiny epochs): idle for 4, a competitor for 5, idle
    again for 9 (an epoch takes about 3 s idle: the governor looks every 10 s, and the first look after the
    competitor left still straddles it); with the threads following the load vs fixed at the start's choice (tiny:
    the first only)."""
    epochs, size, phases = (5, 32, (1, 3)) if args.tiny else (18, 64, (4, 9))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _tiny_demo(work / "demo") if args.tiny else demo_images()
        for setting, flags in list(MIDWAY.items())[: 1 if args.tiny else None]:
            load = os.getloadavg()[0]
            r = run_midway(flags, work, data, epochs, size, phases, args.tiny)
            rows.append({"setting": setting, "epochs": epochs, "competitor_epochs": list(phases),
                         "load_average_1min": load, **r})
            print(f"midway {setting}: busy/idle {r['busy_over_idle']:.2f}, after/idle {r['after_over_idle']:.2f}, "
                  f"threads {r['threads_per_epoch']}", flush=True)
    return rows


def midway_section(rec: dict[str, Any]) -> str:
    first = rec["rows"][0]
    start, stop = first["competitor_epochs"]
    out = ["## Shared CPU, a competitor midway: threads that follow the load\n",
           f"{run_line(rec)}. "
           f"The demo pretraining (64 px, {first['epochs']} epochs) starts on an idle machine; the competitor above "
           f"(a 2-thread PyTorch training loop) starts when {start} epochs are done and stops when {stop} are. Mean "
           "images/s per phase, each phase's first epoch left out (it straddles the change). Goal: >= 0.4 x the idle "
           "rate beside the competitor, >= 0.9 x after it leaves.\n",
           "| setting | idle images/s | with competitor (x idle) | after it left (x idle) | threads per epoch | "
           "competitor steps/s |", "|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        out.append(f"| {r['setting']} | {r['idle_images_per_s']:.0f} | {r['competitor_images_per_s']:.0f} "
                   f"({r['busy_over_idle']:.2f}) | {r['after_images_per_s']:.0f} ({r['after_over_idle']:.2f}) | "
                   f"{' '.join(str(t) for t in r['threads_per_epoch'])} | {r['competitor_steps_per_s'] or 0:.2f} |")
    return "\n".join(out) + "\n"
