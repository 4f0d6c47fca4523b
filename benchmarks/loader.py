"""Loader suite: can the data path feed a consumer GPU? `python -m benchmarks.run loader [--tiny]`.

Data: 20,000 JPEGs (quality 90) at 256-512 px on their shorter side, made from the shared CIFAR-10 training images
(bicubic upscaling; smooth images that decode faster than real photos), built once into benchmarks/.cache.
Every measurement runs in its own process (`python -m benchmarks.loader PROBE ...`, one JSON line on stdout), so a
page cache or an allocator warmed by one does not flatter the next, and peak RSS is the probe's own:

  start      seconds from the call to the first training step (mobilenetv3_small, 64 px, batch 128): without the
             disk cache (`--cache-dir none`: the pre-cache code path: a check pass, then decoding into RAM), cold
             (the cache is built) and warm (the cache exists); the bank initialisation's own seconds apart
  cache-rss  peak RSS of building the cache of the 20,000 images at 224 px with --cache-mb 512
  loader     images/s at 224 px, batch 128, no model: rows gathered (background thread, as in training) and
             the batched augmentation, from the RAM copy, the memory map and the streaming path (decoding every
             batch from JPEG: the only path a folder larger than --cache-mb had before the cache)
  e2e        one epoch of pretraining at 64 px from the memory map (--cache-mb 1) against the same steps on one
             fixed batch already in memory (model + loss + bank only)
  monitor    seconds of the kNN monitor at N = 20,000 (64 px, leave-one-out), all queries vs --monitor-queries 5000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import peak_rss_bytes, probe

REPO = Path(__file__).resolve().parents[1]
N_FULL, N_TINY = 20_000, 48


def jpeg_folder(n: int, seed: int = 0) -> Path:
    """n JPEGs at 256-512 px (shorter side), one class folder per CIFAR-10 class, made once (under the data
    module's file lock, as its subsets are)."""
    from benchmarks.datasets import CACHE, locked

    out = CACHE / f"loader-{n}"
    if out.exists():
        return out
    with locked(f"loader-{n}"):
        if not out.exists():
            _make_jpegs(out, n, seed)
    return out


def _make_jpegs(out: Path, n: int, seed: int) -> None:
    from PIL import Image

    from benchmarks.datasets import cifar10

    train, _ = cifar10()
    files = sorted(p for p in train.rglob("*.jpg"))
    rng = random.Random(seed)
    picks = [(f, rng.randint(256, 512), rng.random() < 0.5) for f in rng.sample(files, n)]
    tmp = out.with_name(out.name + ".tmp")

    def make(item) -> None:
        f, short, wide = item
        with Image.open(f) as im:
            size = (short * 4 // 3, short) if wide else (short, short)
            big = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        (tmp / f.parent.name).mkdir(parents=True, exist_ok=True)
        big.save(tmp / f.parent.name / f.name, quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(make, picks))
    tmp.rename(out)


# ---------------------------------------------------------------- probes (each in its own process)
def probe_start(args) -> dict[str, Any]:
    import edgessl

    class FirstStep(Exception):
        pass

    def stop(_info):
        raise FirstStep

    from rich.console import Console

    console = Console(file=open(os.devnull, "w"), record=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            edgessl.pretrain(data=args.data, out=f"{tmp}/run", image_size=64, batch_size=128, epochs=1, eval_every=0,
                             cache_dir=args.cache_dir, on_step=stop, console=console)
        except FirstStep:
            pass
    seconds = time.time() - t0
    lines = console.export_text().splitlines()
    bank = next((float(x.split("(")[-1].split(" s")[0]) for x in lines if x.startswith("Memory bank:")), None)
    return {"seconds_to_first_step": seconds, "bank_init_seconds": bank, "peak_rss_bytes": peak_rss_bytes()}


def probe_cache_rss(args) -> dict[str, Any]:
    from edgessl.data.folder import load_image_folder
    from edgessl.options import Decode

    t0 = time.time()
    images = load_image_folder(args.data, 224, decode=Decode(cache_dir=args.cache_dir, cache_mb=512))
    return {"images": len(images), "seconds": time.time() - t0, "peak_rss_bytes": peak_rss_bytes(),
            "decoded_bytes": len(images) * 3 * 224 * 224, "cache_mb": 512}


def probe_loader(args) -> dict[str, Any]:
    from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch
    from edgessl.data.folder import load_image_folder
    from edgessl.data.loader import Prefetcher, gather
    from edgessl.options import Decode

    mb = {"ram": 1e9, "mmap": 1, "stream": 1}[args.path]
    images = load_image_folder(args.data, 224, decode=Decode(
        cache_dir="none" if args.path == "stream" else args.cache_dir, cache_mb=mb))
    batch, steps = (8, 3) if args.tiny else (128, args.steps)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    batches = [order[i * batch:(i + 1) * batch] for i in range(steps)]
    pin = torch.cuda.is_available()
    rates = {}
    for what in ("gather", "gather+augment"):
        t0 = time.perf_counter()
        with Prefetcher(lambda i: gather(images, batches[i], pin), steps) as rows:
            for i, raw in enumerate(rows):
                if what == "gather+augment":
                    augment_batch(raw, batches[i], 0, 0, AugmentConfig(), IMAGENET_MEAN, IMAGENET_STD)
        rates[what] = steps * batch / (time.perf_counter() - t0)
    return {"path": args.path, "images_per_s": rates["gather"], "images_per_s_with_augment": rates["gather+augment"],
            "batch_size": batch, "steps": steps, "threads": torch.get_num_threads()}


def probe_e2e(args) -> dict[str, Any]:
    """Pretraining images/s (steps 4+ of one epoch) from the memory map and from RAM on the same images, and the
    model-only rate (benchmarks.throughput: forward + backward + step on one fixed batch, plain cross-entropy)."""
    import edgessl
    from benchmarks.throughput import measure

    batch = 8 if args.tiny else 128
    steps = 3 if args.tiny else args.steps
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        sub = _subset(args.data, (steps + 4) * batch if not args.tiny else 40, tmp)
        for source, mb in (("mmap", 1), ("ram", 4096)):
            times: list[float] = []
            state = {"t": None}

            def clock(info, times=times, state=state):
                now = time.perf_counter()
                if state["t"] is not None and info.step >= 3:
                    times.append(now - state["t"])
                state["t"] = now

            edgessl.pretrain(data=str(sub), out=f"{tmp}/run-{source}", image_size=64, batch_size=batch, epochs=1,
                             eval_every=0, cache_mb=mb, cache_dir=args.cache_dir, on_step=clock, quiet=True)
            rates[source] = len(times) * batch / max(sum(times), 1e-9) if times else float("nan")
    model = measure("mobilenetv3_small", 64, batch, 3 if args.tiny else 10, None)["model_only_images_per_s"]
    return {"end_to_end_images_per_s": rates["mmap"], "end_to_end_ram_images_per_s": rates["ram"],
            "model_only_images_per_s": model, "ratio": rates["mmap"] / model,
            "ratio_mmap_over_ram": rates["mmap"] / rates["ram"], "timed_steps": steps}


def _subset(root: str, n: int, tmp: str) -> Path:
    """A folder of links to the first n images of root (sorted), so an epoch is short."""
    out = Path(tmp) / "subset"
    files = sorted(Path(root).rglob("*.jpg"))[:n]
    for f in files:
        (out / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, out / f.parent.name / f.name)
    return out


def probe_monitor(args) -> dict[str, Any]:
    from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from edgessl.data.folder import load_image_folder
    from edgessl.evaluate.monitor import Monitor
    from edgessl.models.backbone import create_backbone
    from edgessl.options import Decode

    images = load_image_folder(args.data, 64, labels=True, decode=Decode(cache_dir=args.cache_dir))
    torch.manual_seed(0)
    backbone, _ = create_backbone("mobilenetv3_small", small_input=False)
    monitor = Monitor(images, None, max_queries=args.monitor_queries, seed=0)
    t0 = time.perf_counter()
    top1 = monitor(backbone, torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)
    return {"queries": len(images) if monitor.subset is None else len(monitor.subset), "n": len(images),
            "seconds": time.perf_counter() - t0, **top1}


PROBES = {"start": probe_start, "cache-rss": probe_cache_rss, "loader": probe_loader, "e2e": probe_e2e,
          "monitor": probe_monitor}


def run_probe(name: str, data: Path, cache_dir: str, tiny: bool, **extra: Any) -> dict[str, Any]:
    argv = [name, "--data", str(data), "--cache-dir", cache_dir] + (["--tiny"] if tiny else [])
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    load, t0 = os.getloadavg()[0], time.time()
    row = {"probe": name, **extra, **probe("benchmarks.loader", argv, tiny), "process_seconds": time.time() - t0,
           "load_average_1min": load}
    print(f"loader {name} {extra}: {row}", flush=True)
    return row


def suite_loader(args) -> list[dict[str, Any]]:
    data = jpeg_folder(N_TINY if args.tiny else N_FULL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache"
        rows.append(run_probe("start", data, "none", args.tiny, mode="no disk cache"))
        rows.append(run_probe("start", data, cache, args.tiny, mode="cold"))
        rows.append(run_probe("start", data, cache, args.tiny, mode="warm"))
        rows.append(run_probe("cache-rss", data, f"{tmp}/cache224", args.tiny))
        for path in ("ram", "mmap", "stream"):
            rows.append(run_probe("loader", data, f"{tmp}/cache224", args.tiny, path=path, steps=20))
        rows.append(run_probe("e2e", data, cache, args.tiny, steps=30))
        for queries in (0, 5000):
            rows.append(run_probe("monitor", data, cache, args.tiny, monitor_queries=queries))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("probe", choices=tuple(PROBES))
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache-dir", default="auto")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--mode", default="")
    ap.add_argument("--path", default="ram")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--monitor-queries", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(PROBES[args.probe](args)))


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- the README table
# What a GPU eats: timm's own training benchmark on an RTX 3090 (AMP, channels_last, PyTorch 1.12, batch 512, 224 px;
# huggingface/pytorch-image-models, results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv).
GPU_TRAIN_RATE = {"mobilenetv3_small_100": 8035, "resnet18": 3482}


def loader_section(rec: dict[str, Any]) -> str:
    m, rows = rec["machine"], rec["rows"]
    start = {r["mode"]: r for r in rows if r["probe"] == "start"}
    load = {r["path"]: r for r in rows if r["probe"] == "loader"}
    out = ["## Loader: decode once, memory-map, prefetch\n",
           f"{m.get('cpu')}, {m.get('threads')} threads, torch {m.get('torch')}, edgessl {m.get('edgessl')}, "
           f"{m.get('date')}; `{rec['command']}`. 20,000 JPEGs at 256-512 px made from CIFAR-10 (see "
           "benchmarks/loader.py); every figure from its own process.\n",
           "**Start-up** (mobilenetv3_small, 64 px, batch 128; seconds from the `pretrain` call to the end of the "
           "first step; the process adds about 3 s of imports):\n",
           "| data path | to first step (s) | of which bank init (s) | rest (s) | peak RSS (MiB) |",
           "|---|---|---|---|---|"]
    for mode, label in (("no disk cache", "no disk cache (`--cache-dir none`, as before)"),
                        ("cold", "cache built (first run)"), ("warm", "cache exists")):
        if mode in start:
            r = start[mode]
            bank = r["bank_init_seconds"] or 0.0
            out.append(f"| {label} | {r['seconds_to_first_step']:.1f} | {bank:.1f} | "
                       f"{r['seconds_to_first_step'] - bank:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    if "cold" in start and "warm" in start:
        rest = {m: start[m]["seconds_to_first_step"] - (start[m]["bank_init_seconds"] or 0.0) for m in start}
        whole = start["warm"]["seconds_to_first_step"] / start["cold"]["seconds_to_first_step"]
        out += ["", f"Everything but the bank initialisation (a forward pass of the untrained network over all "
                f"20,000 images, which every run of the method makes) takes {rest['warm']:.1f} s with the cache "
                f"against {rest['cold']:.1f} s building it ({rest['warm'] / rest['cold']:.0%}); with the bank "
                f"initialisation the warm start is {whole:.0%} of the cold one."]
    rss = next((r for r in rows if r["probe"] == "cache-rss"), None)
    if rss:
        out += ["", f"**Building the cache** of {rss['images']:,} images at 224 px "
                f"({rss['decoded_bytes'] / 2**30:.2f} GiB decoded) with `--cache-mb 512`: {rss['seconds']:.0f} s, "
                f"peak RSS {rss['peak_rss_bytes'] / 2**30:.2f} GiB (of which about 0.7 GiB is torch itself).", ""]
    out += ["**Loader** at 224 px, batch 128, no model: rows gathered in the background thread (pinning only on "
            "CUDA), then the batched augmentation on the CPU:\n",
            "| source | images/s gathered | images/s with augmentation | vs streaming |", "|---|---|---|---|"]
    stream = load.get("stream", {}).get("images_per_s")
    for path, label in (("ram", "RAM copy"), ("mmap", "memory map"), ("stream", "streaming (decode every batch)")):
        if path in load:
            r = load[path]
            ratio = f"{r['images_per_s'] / stream:.0f}x" if stream else "-"
            out.append(f"| {label} | {r['images_per_s']:,.0f} | {r['images_per_s_with_augment']:,.0f} | {ratio} |")
    out += ["", "A GPU to feed: timm's training benchmark on an RTX 3090 (AMP, channels_last, 224 px) runs "
            f"mobilenetv3_small_100 at {GPU_TRAIN_RATE['mobilenetv3_small_100']:,} and resnet18 at "
            f"{GPU_TRAIN_RATE['resnet18']:,} images/s (results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv in "
            "huggingface/pytorch-image-models). On a GPU the augmentation runs there, so the CPU's share is the "
            "gather column.", ""]
    e2e = next((r for r in rows if r["probe"] == "e2e"), None)
    if e2e:
        out.append(f"**End to end** at 64 px (mobilenetv3_small, batch 128, pretraining steps 4+ of an epoch): "
                   f"{e2e['end_to_end_images_per_s']:.0f} images/s from the memory map (`--cache-mb 1`), "
                   f"{e2e.get('end_to_end_ram_images_per_s', float('nan')):.0f} from RAM on the same images (memory "
                   f"map / RAM {e2e.get('ratio_mmap_over_ram', float('nan')):.2f}), against "
                   f"{e2e['model_only_images_per_s']:.0f} for the model alone on one fixed batch (ratio "
                   f"{e2e['ratio']:.2f}: on a CPU the batched augmentation, the loss over 16,384 bank columns and "
                   "the bank update share the same two cores; the memory-map / RAM ratio isolates the loader).\n")
    mon = [r for r in rows if r["probe"] == "monitor"]
    if mon:
        out += ["**kNN monitor** at N = 20,000 (64 px, leave-one-out, features and search on the CPU):\n",
                "| --monitor-queries | queries | seconds | kNN@20 |", "|---|---|---|---|"]
        out += [f"| {r['monitor_queries'] or 'all (0)'} | {r['queries']:,} | {r['seconds']:.1f} | "
                f"{r['knn_top1']:.3f} |" for r in mon]
    return "\n".join(out) + "\n"
