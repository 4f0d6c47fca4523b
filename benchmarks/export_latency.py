"""Batch-1 latency of exported encoders: ONNX Runtime fp32 and int8 against PyTorch eager, on this machine.

    python -m benchmarks.export_latency [--run mobilenetv3_small_100=runs/<name>] [--run resnet18=runs/<name>]
                                        [--threads 2] [--rounds 5] [--runs-per-round 20]

Backbones: mobilenetv3_small_100 at 64 px with the stride-1 stem, resnet18 at 32 px with the CIFAR stem (both
--small-input on). Without --run, each gets a 1-epoch pretraining run on the bundled demo images (latency does not
depend on the weights; int8 is calibrated on those images). Each run is exported with `edgessl.export(int8=True)`
into a temporary folder (the run's own export/ is left alone).

The three engines are timed in interleaved rounds (warm-up, then --runs-per-round runs each per round) so that a
background load on a shared machine affects them alike; p50/p90 over all runs. Same thread count for PyTorch
(torch.set_num_threads) and ONNX Runtime (intra_op_num_threads).
Writes benchmarks/results/export_latency.json and prints a markdown table. The int8 search itself (which candidate
passes after 1 and 15 epochs) is the runner's `export` suite (benchmarks/export_search.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgessl
from benchmarks.common import cpu_name
from edgessl.data.augment import test_transform
from edgessl.data.folder import decode_image
from edgessl.data.signature import scan_images
from edgessl.demo import demo_images
from edgessl.deploy.onnx import session

RESULTS = Path(__file__).parent / "results" / "export_latency.json"
CONFIGS = {"mobilenetv3_small_100": 64, "resnet18": 32}


def make_run(backbone: str, size: int, root: Path) -> Path:
    out = root / f"{backbone}-run"
    edgessl.pretrain(backbone=backbone, data=str(demo_images()), image_size=size, small_input="on", epochs=1,
                     batch_size=64, eval_every=0, quiet=True, out=str(out))
    return out


def one_image(size: int, meta: dict) -> np.ndarray:
    arr = decode_image(scan_images(demo_images())[0], size)
    x = torch.from_numpy(arr[None]).permute(0, 3, 1, 2)
    return test_transform(x, meta["mean"], meta["std"]).contiguous().numpy()


def timers(run: Path, export_dir: Path, x: np.ndarray, threads: int) -> dict:
    """name -> callable running one batch-1 inference."""
    model = edgessl.load_encoder(run)
    xt = torch.from_numpy(x)

    def torch_eager():
        with torch.inference_mode():
            model(xt)

    out = {"pytorch_eager": torch_eager}
    for name, file in (("ort_fp32", "encoder.onnx"), ("ort_int8", "encoder.int8.onnx")):
        sess = session(export_dir / file, threads=threads)
        feed = {sess.get_inputs()[0].name: x}
        out[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
    return out


def measure(fns: dict, rounds: int, per_round: int, warmup: int = 10) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
    return {name: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "runs": len(v)}
            for name, v in times.items()}


def bench(backbone: str, run: Path, root: Path, threads: int, rounds: int, per_round: int) -> dict:
    export_dir = root / f"{backbone}-export"
    result = edgessl.export(run, int8=True, out=export_dir)  # a passing int8 is written even when slower here
    meta = edgessl.load_encoder(run).edgessl_meta
    x = one_image(meta["image_size"], meta)
    lat = measure(timers(run, export_dir, x, threads), rounds, per_round)
    entries = {e["precision"]: e for e in result.models}
    return {
        "backbone": backbone, "image_size": meta["image_size"], "stem": meta.get("stem"), "run": str(run),
        "epochs_trained": meta.get("epochs_trained"), "latency_ms": lat,
        "speedup_ort_fp32_vs_pytorch": lat["pytorch_eager"]["p50"] / lat["ort_fp32"]["p50"],
        "speedup_ort_int8_vs_pytorch": lat["pytorch_eager"]["p50"] / lat["ort_int8"]["p50"],
        "speedup_int8_vs_fp32": lat["ort_fp32"]["p50"] / lat["ort_int8"]["p50"],
        "bytes": {p: e["bytes"] for p, e in entries.items()},
        "int8_min_cosine": entries["int8"]["parity"]["min_cosine"],
        "exporter": entries["fp32"]["exporter"],
    }


STEMS = {"stride1": "stride-1 stem", "resnet": "CIFAR stem", None: "timm stem"}


def table(results: list[dict]) -> str:
    lines = ["| backbone | input | PyTorch eager p50 | ORT fp32 p50 | ORT int8 p50 | fp32 vs eager | int8 vs fp32 "
             "| size fp32 / int8 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['backbone']} | {r['image_size']} px, {STEMS.get(r['stem'], r['stem'])} "
            f"| {lat['pytorch_eager']['p50']:.2f} ms | "
            f"{lat['ort_fp32']['p50']:.2f} ms | {lat['ort_int8']['p50']:.2f} ms "
            f"| x{r['speedup_ort_fp32_vs_pytorch']:.2f} | "
            f"x{r['speedup_int8_vs_fp32']:.2f} "
            f"| {r['bytes']['fp32'] / 2**20:.1f} / {r['bytes']['int8'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], help="backbone=run_dir (reuse a pretraining run)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs-per-round", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    given = dict(item.split("=", 1) for item in args.run)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.set_num_threads(args.threads)
    import onnxruntime

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for backbone, size in CONFIGS.items():
            run = Path(given[backbone]) if backbone in given else make_run(backbone, size, root)
            results.append(bench(backbone, run, root, args.threads, args.rounds, args.runs_per_round))
            print(f"{backbone}: {json.dumps(results[-1]['latency_ms'])}", flush=True)
    record = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min_at_start": load_before},
        "threads": args.threads, "batch": 1, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "edgessl": edgessl.__version__, "date": time.strftime("%Y-%m-%d"),
        "protocol": f"{args.rounds} interleaved rounds x {args.runs_per_round} runs per engine after 10 warm-up runs",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    print(f"Wrote {args.out}")


def print_table(path: Path = RESULTS) -> None:
    """The markdown table of a results file
    (python -c 'from benchmarks.export_latency import print_table; print_table()')."""
    print(table(json.loads(Path(path).read_text())["results"]))


if __name__ == "__main__":
    main()
