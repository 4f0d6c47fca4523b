"""Does data-parallel pretraining scale? Training images/s with 1 and 2 processes at the same global batch.

    python -m benchmarks.distributed [--backbone mobilenetv3_small --image-size 32 --batch-size 64 --epochs 2]

Runs `edgessl pretrain` end to end (cache lookup, augmentation, forward, loss, backward, DDP gradient all-reduce,
optimiser step, gathered bank update) on the bundled demo images (or --data), CPU only:
  1 process x 1 thread, 1 process x N threads (N = --threads, default: all cores), and
  2 processes x 1 thread (torchrun, gloo on loopback), with and without --sync-bn.
images/s is the last epoch's `images_per_s` from metrics.jsonl (global images per second; the first epoch includes
warm-up). Writes benchmarks/results/distributed.json (appends one record per call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "distributed.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, threads: int, sync_bn: bool, args, out: Path) -> dict:
    opts = ["--backbone", args.backbone, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--eval-every", "0", "--device", "cpu", "--workers", "1", "--quiet",
            "--out", str(out)]
    if args.data:
        opts += ["--data", args.data]
    if sync_bn:
        opts.append("--sync-bn")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    if procs == 1:
        cmd = [sys.executable, "-m", "edgessl", "pretrain", *opts]
    else:
        if Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "edgessl", "pretrain", *opts]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "processes": procs, "threads_per_process": threads, "sync_bn": sync_bn,
        "images_per_s": rows[-1]["images_per_s"], "epoch_seconds": rows[-1]["seconds"],
        "images_per_s_per_epoch": [r["images_per_s"] for r in rows], "wall_s_incl_startup": time.time() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenetv3_small")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch, the same for every configuration")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the multi-thread 1-process run")
    ap.add_argument("--data", default=None, help="image folder (default: the bundled demo images)")
    args = ap.parse_args()
    load = os.getloadavg()
    configs = [(1, 1, False), (1, args.threads, False), (2, 1, False), (2, 1, True)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (procs, threads, sync_bn) in enumerate(configs):
            r = run(procs, threads, sync_bn, args, Path(tmp) / f"run{i}")
            print(f"{procs} process(es) x {threads} thread(s){' sync-bn' if sync_bn else ''}: "
                  f"{r['images_per_s']:.1f} images/s", flush=True)
            results.append(r)
    rec = {
        "backbone": args.backbone, "image_size": args.image_size, "global_batch": args.batch_size,
        "epochs": args.epochs, "data": args.data or "bundled demo images (360)", "device": "cpu",
        "cpu_count": os.cpu_count(), "load_average_before": load,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + [rec], indent=1) + "\n")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
