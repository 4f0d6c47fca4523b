"""Hyper-parameter sweep on a CIFAR-10 subset (kNN of the online monitor), recorded as JSON.

    python -m benchmarks.sweep --per-class 500 --epochs 15 --name base "temperature=0.1 sd_weight=1 head=linear" ...
Each positional argument is one configuration: space-separated key=value PretrainConfig overrides.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

import edgessl
from benchmarks.datasets import cifar10

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--name", default="sweep_cifar5k")
    ap.add_argument("--eval-every", type=int, default=5)
    args = ap.parse_args()
    train, test = cifar10(args.per_class)
    out_file = RESULTS / f"{args.name}.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else []
    for spec in args.configs:
        overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in spec.split())}
        base = dict(backbone="mobilenetv3_small", image_size=32, batch_size=128, epochs=args.epochs, lr=0.2,
                    eval_every=args.eval_every, quiet=True, seed=0, labels_from_folders=True)
        opts = {**base, **overrides}
        t0 = time.time()
        run = edgessl.pretrain(data=str(train), val=str(test), out=f"/tmp/sweep/{args.name}/{len(results)}", **opts)
        last = run.history[-1]
        row = {"config": spec, "options": opts,
               "knn_top1": last.get("knn_top1"), "knn_top1_k200": last.get("knn_top1_k200"),
               "s_per_epoch": sum(h["seconds"] for h in run.history) / len(run.history),
               "wall_s": time.time() - t0, "history": run.history}
        results.append(row)
        out_file.write_text(json.dumps(results, indent=1))
        print(f"{spec:60s} kNN@20 {row['knn_top1']:.3f} kNN@200 {row['knn_top1_k200']:.3f} "
              f"{row['s_per_epoch']:.1f} s/epoch", flush=True)


if __name__ == "__main__":
    main()
