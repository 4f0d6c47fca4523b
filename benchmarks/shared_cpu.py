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

from edgessl.demo import demo_images

SETTINGS = {
    "old": ({}, ["--threads", str(os.cpu_count() or 2)]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", str(os.cpu_count() or 2)]),
    "new": ({}, []),
}

COMPETITOR = """
import os, sys, time, torch, timm
torch.set_num_threads(2)
m = timm.create_model("mobilenetv3_small_100", num_classes=10)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
stop, steps, t0 = sys.argv[1], 0, None
open(stop + ".ready", "w").close()
while not os.path.exists(stop) or steps < 2:
    if steps == 1:
        t0 = time.time()
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step(); steps += 1
print((steps - 1) / (time.time() - t0))
"""


class Competitor:
    """One 2-thread PyTorch training loop in its own process, until stop()."""

    def __init__(self, work: Path, warm_up: float = 3.0):
        self.stop_file = work / "stop"
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(self.stop_file)], env=env,
                                     stdout=subprocess.PIPE, text=True)
        while not Path(str(self.stop_file) + ".ready").exists():
            time.sleep(0.1)
        time.sleep(warm_up)  # past its warm-up

    def stop(self) -> float:
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=120)
        Path(str(self.stop_file) + ".ready").unlink()
        self.stop_file.unlink()
        return float(out.strip().splitlines()[-1])


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
    tiny = args.tiny
    epochs, size, seeds = (1, 32, 1) if tiny else (5, 64, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _tiny_demo(work / "demo") if tiny else demo_images()
        base = work / "eval-run"
        _edgessl(["pretrain", "--data", str(data), "--epochs", "1", "--image-size", str(size), "--out", str(base),
                  "--quiet", "--eval-every", "0"], {}, work)
        comp = Competitor(work, 0.5 if tiny else 3.0)
        time.sleep(1.0 if tiny else 10.0)
        rows.append({"workload": "competitor alone", "load": "competitor", "setting": "-",
                     "competitor_steps_per_s": comp.stop(), "load_average_1min": os.getloadavg()[0]})
        for load in ("competitor",) if tiny else ("idle", "competitor"):
            for setting in ("new",) if tiny else SETTINGS:
                for workload in ("pretrain", "eval"):
                    comp = Competitor(work, 0.5 if tiny else 3.0) if load == "competitor" else None
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
