"""The consumer-GPU claim in one command: `python -m benchmarks.run gpu [--device auto|cuda|cpu] [--tiny]
[--minutes M] [--only data,steps,cifar]`.

Three parts, each timed against its estimate (printed before anything starts, kept in gpu.json):
  data   images/s of the data path (memory-mapped rows, pinned and copied without blocking, augmented on the device)
         against the model-only step rate, mobilenetv3_small and resnet18 at 224 px (batch 256), fp16 and bf16,
         channels_last on and off; goal: data >= 0.95 x model. Peak GPU memory per configuration.
  steps  step time of edgessl vs lightly's SimCLR vs a supervised step, same backbone and batch, augmentation on the
         device included: resnet18 at 32 px (the CIFAR recipe) and mobilenetv3_small at 224 px.
  cifar  a time-boxed CIFAR-10 pretraining (all 50,000 training images, resnet18, recipes/resnet18_cifar.yaml) that
         measures kNN (k = 200) on the 5,000 test images after every epoch until its minutes are used, so its curve
         can be set against lightly's ResNet-18 table (SimCLR kNN 0.847 after 200 epochs in 97.7 min, RTX A6000).
The whole suite fits `--minutes` (default 8): data and steps are fixed work, cifar gets what is left. --tiny: a few
images at 32 px, two steps per measurement (seconds on a CPU: the test tier runs it so the command cannot rot).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgessl.runtime import autocast, pick_device

PARTS = ("data", "steps", "cifar")
START_S = 20.0  # start-up of one part: imports, the first CUDA context, decoding into the cache (estimate)
TINY_CPU_START_S = 2.0  # the same in the CPU smoke run: everything is imported, no CUDA context, a few images


@dataclass(frozen=True)
class Plan:
    """What each part measures; sizes differ between the real run and --tiny."""

    size: int  # the data path's and the 224-px configurations' input size
    batch: int
    warm: int  # untimed steps before each measurement
    timed: int  # timed steps per measurement
    data_per_class: int | None  # NEU-DET training images per class for the data part (None: all 1,440)
    cifar_per_class: tuple[int, int] | None  # CIFAR-10 train / test images per class (None: all)
    precisions: tuple[str, ...]
    step_guess_s: float  # the guessed time of one training step at `batch` and `size`, for the estimates
    start_s: float = START_S  # the start-up of one part, for the estimates

    @property
    def data_configs(self) -> list[tuple[str, str, bool]]:
        return [(b, p, cl) for b in ("mobilenetv3_small", "resnet18") for p in self.precisions for cl in (True, False)]

    @property
    def step_configs(self) -> list[tuple[str, int, str]]:
        small = 32
        return [(b, s, m) for b, s in (("resnet18", small), ("mobilenetv3_small", self.size))
                for m in ("edgessl", "simclr", "supervised")]


def make_plan(tiny: bool, device: torch.device) -> Plan:
    if tiny:  # on a CPU in fp32 only: fp16 and bf16 autocast run there, but at a fraction of the speed
        cpu = device.type == "cpu"
        return Plan(32, 4, 1, 1, 2, (4, 2), ("fp32",) if cpu else ("fp16", "bf16"), 0.15 if cpu else 0.02,
                    TINY_CPU_START_S if cpu else START_S)
    guess = 0.12 if device.type == "cuda" else 6.0  # resnet18, 224 px, batch 256: an H100-class GPU vs 2 CPU cores
    return Plan(224, 256, 5, 20, None, None, ("fp16", "bf16"), guess)


def estimates(plan: Plan, minutes: float, only: tuple[str, ...]) -> dict[str, float]:
    """Seconds each selected part is expected to take; cifar gets what the budget leaves (at least a minute; --tiny:
    its 2 fixed epochs, 15 s)."""
    per_measure = (plan.warm + plan.timed) * plan.step_guess_s
    est = {"data": plan.start_s + len(plan.data_configs) * 2 * per_measure,  # the data path and the model, each
           "steps": plan.start_s + len(plan.step_configs) * 1.5 * per_measure}  # SimCLR's two views cost more
    est = {k: v for k, v in est.items() if k in only}
    if "cifar" in only:  # --tiny trains a fixed 2 epochs on a few images: its floor, not what the budget leaves
        est["cifar"] = 15.0 if plan.cifar_per_class else max(60.0, minutes * 60 - sum(est.values()))
    return est


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), capability=f"{p.major}.{p.minor}")
    return info


def rate(fn: Callable[[], Any], warm: int, timed: int, images: int) -> float:
    """images/s of `fn` (one batch of `images` per call) after `warm` untimed calls (benchmarks.throughput.timed:
    CUDA synchronised around the timed calls)."""
    from benchmarks.throughput import timed as seconds

    return timed * images / seconds(fn, timed, warm)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- part 1: the data path against the model
def _model_step(backbone: str, size: int, precision: str, channels_last: bool, device: torch.device, batch: int):
    """A closure: one forward + backward + SGD step of backbone + a linear layer on a fixed batch on the device
    (fp16 with its gradient scaler), the floor every method pays."""
    from edgessl.models.backbone import create_backbone, output_dim, want_small_input

    torch.manual_seed(0)
    net, _ = create_backbone(backbone, small_input=want_small_input("auto", size))
    model = torch.nn.Sequential(net, torch.nn.Linear(output_dim(net, size), 128)).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 128, (batch,), device=device)

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _data_path(images, device: torch.device, batch: int, channels_last: bool):
    """A closure: the next batch as training gets it: rows gathered from the memory map into pinned memory (CUDA),
    copied without blocking, augmented on the device."""
    from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch
    from edgessl.data.loader import gather

    aug, n, state = AugmentConfig(), len(images), {"i": 0}

    def step():
        i = state["i"] = state["i"] + 1
        idx = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(i))
        raw = gather(images, idx, device.type == "cuda").to(device, non_blocking=True)
        x = augment_batch(raw, idx, 0, 0, aug, IMAGENET_MEAN, IMAGENET_STD)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return step


def part_data(plan: Plan, device: torch.device, say) -> list[dict[str, Any]]:
    from benchmarks.datasets import neu_det, stratified_subset
    from edgessl.data.folder import load_image_folder

    train, _ = neu_det()
    if plan.data_per_class:
        train = stratified_subset(train, plan.data_per_class, 0, f"neu-det-train-{plan.data_per_class}pc")
    images = load_image_folder(train, plan.size)
    rows = []
    for backbone, precision, channels_last in plan.data_configs:
        reset_peak(device)
        model = rate(_model_step(backbone, plan.size, precision, channels_last, device, plan.batch), plan.warm,
                     plan.timed, plan.batch)
        data = rate(_data_path(images, device, plan.batch, channels_last), plan.warm, plan.timed, plan.batch)
        rows.append({"part": "data", "backbone": backbone, "precision": precision, "channels_last": channels_last,
                     "image_size": plan.size, "batch_size": plan.batch, "model_images_per_s": model,
                     "data_images_per_s": data, "data_over_model": data / model, "peak_gpu_bytes": peak_memory(device)})
        say(f"data {backbone} {precision} channels_last={channels_last}: model {model:.0f} img/s, data path "
            f"{data:.0f} img/s ({data / model:.2f}x)")
    return rows


# ---------------------------------------------------------------- part 2: a step of each method
BANK_ROWS = 50_000  # the memory bank of the steps part: CIFAR-10's training set


def _method_step(method: str, images, backbone: str, device: torch.device, batch: int, precision: str):
    """A closure: one training step of a peer (benchmarks/peers.py: edgessl, lightly's SimCLR, supervised) on a
    uint8 batch already on the device, its augmentation (two views for SimCLR) included."""
    from benchmarks.peers import build
    from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch

    # a CIFAR-10-sized bank (50,000 rows): the step draws its --negatives columns as training does (a bank of the
    # few hundred images held here had scored every row, without the draw: a cheaper step than a real run's)
    model, _ = build(method, backbone, images.size, 10, max(len(images), BANK_ROWS))
    model = model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    idx = torch.arange(batch) % len(images)
    raw = images.get(idx).to(device)
    labels = (images.labels[idx] if images.labels is not None else torch.zeros(batch, dtype=torch.long)).to(device)
    aug, state = AugmentConfig(), {"i": 0}

    def step():
        state["i"] += 1
        x1 = augment_batch(raw, idx, 0, state["i"], aug, IMAGENET_MEAN, IMAGENET_STD)
        x2 = augment_batch(raw, idx, 0, -state["i"], aug, IMAGENET_MEAN, IMAGENET_STD) if method == "simclr" else None
        with autocast(device, precision):
            loss = model.loss(x1, x2, labels, idx.to(device), 0.0)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.after_step()

    return step


def part_steps(plan: Plan, device: torch.device, say) -> list[dict[str, Any]]:
    from benchmarks.datasets import cifar10, neu_det, stratified_subset
    from edgessl.data.folder import load_image_folder
    from edgessl.runtime import pick_precision

    precision = pick_precision("auto", device)
    configs = plan.step_configs
    try:
        import lightly  # noqa: F401
    except ImportError:
        configs = [c for c in configs if c[2] != "simclr"]
        say("steps: lightly is not installed, SimCLR rows skipped (pip install 'edgessl[bench]')")
    cifar_train = stratified_subset(cifar10()[0], max(1, plan.batch // 10 + 1), 0, f"cifar10-train-gpu-{plan.batch}")
    neu_train = stratified_subset(neu_det()[0], max(1, plan.batch // 6 + 1), 0, f"neu-det-train-gpu-{plan.batch}")
    rows = []
    for backbone, size, method in configs:
        images = load_image_folder(cifar_train if size == 32 else neu_train, size, labels=True)
        reset_peak(device)
        ips = rate(_method_step(method, images, backbone, device, plan.batch, precision), plan.warm, plan.timed,
                   plan.batch)
        step_s = plan.batch / ips
        rows.append({"part": "steps", "backbone": backbone, "image_size": size, "method": method,
                     "precision": precision, "batch_size": plan.batch, "step_s": step_s, "images_per_s": ips,
                     "peak_gpu_bytes": peak_memory(device)})
        say(f"steps {backbone} {size} px {method}: {step_s * 1000:.1f} ms/step ({ips:.0f} img/s)")
    for r in rows:
        sup = next(x["step_s"] for x in rows if x["method"] == "supervised" and x["backbone"] == r["backbone"]
                   and x["image_size"] == r["image_size"])
        r["step_over_supervised"] = r["step_s"] / sup
    return rows


# ---------------------------------------------------------------- part 3: a time-boxed CIFAR-10 run
class TimeUp(KeyboardInterrupt):
    """Raised from on_step when the part's minutes are used: the loop saves what is complete, as on Ctrl-C."""


def _knn_at_epoch_ends(train_set, test_set, steps: int, epochs: int, deadline: float, curve: list,
                       device: torch.device, t0: float):
    """on_step: after the last step of every epoch, kNN (k = 200) of the test images against the training images,
    with the backbone's features; TimeUp once the deadline passed (checked after every step but the run's last)."""
    from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from edgessl.evaluate.features import extract_features
    from edgessl.evaluate.knn import knn_top1

    def on_step(info) -> None:
        if info.step == steps - 1:
            train_s = time.time() - t0 - sum(c["knn_seconds"] for c in curve)
            k0 = time.time()
            backbone = info.model.backbone
            mem = extract_features(backbone, train_set, IMAGENET_MEAN, IMAGENET_STD, device, keep_on_device=True)
            qry = extract_features(backbone, test_set, IMAGENET_MEAN, IMAGENET_STD, device, keep_on_device=True)
            top1 = knn_top1(F.normalize(qry, dim=1), test_set.labels.to(device), F.normalize(mem, dim=1),
                            train_set.labels.to(device), len(train_set.classes))
            curve.append({"epoch": info.epoch + 1, "knn_top1": top1, "train_minutes": train_s / 60,
                          "knn_seconds": time.time() - k0})
            print(f"cifar epoch {info.epoch + 1}: kNN {top1:.3f} after {train_s / 60:.1f} training minutes",
                  flush=True)
        if time.time() > deadline and (info.epoch, info.step) != (epochs - 1, steps - 1):
            raise TimeUp

    return on_step


def part_cifar(plan: Plan, device: torch.device, seconds: float, epoch_guess_s: float, say) -> list[dict[str, Any]]:
    """edgessl pretrain with recipes/resnet18_cifar.yaml for as many epochs as `seconds` should hold (the cosine
    schedule ends there), stopped when they are used; one row per epoch (kNN, training minutes) and a summary."""
    import tempfile

    import edgessl
    from benchmarks.datasets import cifar10, stratified_subset
    from edgessl.data.folder import load_image_folder
    from edgessl.errors import Interrupted
    from edgessl.train.prepare import bank_batch_cap

    start = time.time()  # extracting and decoding CIFAR-10 count against the part's seconds
    train, test = cifar10()
    if plan.cifar_per_class:
        train = stratified_subset(train, plan.cifar_per_class[0], 0, f"cifar10-train-{plan.cifar_per_class[0]}pc-s0")
        test = stratified_subset(test, plan.cifar_per_class[1], 0, f"cifar10-test-{plan.cifar_per_class[1]}pc-s0")
    train_set, test_set = load_image_folder(train, 32, labels=True), load_image_folder(test, 32, labels=True)
    n, batch = len(train_set), 512
    steps = n // min(batch, n, bank_batch_cap(n, 8))
    left = start + seconds - time.time()
    epochs = 2 if plan.cifar_per_class else max(1, int(left / epoch_guess_s))
    say(f"cifar: {n} training images, {epochs} planned epochs in the {left / 60:.1f} min left")
    curve: list[dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="edgessl-gpu-") as tmp:
        stopped = False
        try:
            edgessl.pretrain(data=str(train), recipe="resnet18_cifar", epochs=epochs, batch_size=batch,
                             out=str(Path(tmp) / "run"), device=device.type, eval_every=0, quiet=True,
                             on_step=_knn_at_epoch_ends(train_set, test_set, steps, epochs, start + seconds, curve,
                                                        device, t0))
        except Interrupted:
            stopped = True
    rows = [{"part": "cifar", **c} for c in curve]
    rows.append({"part": "cifar", "summary": True, "planned_epochs": epochs, "epochs_done": len(curve),
                 "stopped_by_time": stopped, "minutes": (time.time() - t0) / 60, "steps_per_epoch": steps,
                 "best_knn_top1": max((c["knn_top1"] for c in curve), default=None), "images": n,
                 "peak_gpu_bytes": peak_memory(device)})
    return rows


# ---------------------------------------------------------------- the suite
def suite_gpu(args) -> list[dict[str, Any]]:
    """Estimates first, then each selected part; rows of every part plus one "plan" row (estimates vs actual
    seconds per part, the device)."""
    device = pick_device(getattr(args, "device", "auto"))
    plan = make_plan(args.tiny, device)
    unknown = [p for p in (args.only or ()) if p not in PARTS]
    if unknown:
        raise SystemExit(f"gpu: --only takes parts of {', '.join(PARTS)}, not {','.join(unknown)}")
    only = tuple(args.only or PARTS)
    minutes = args.minutes if args.minutes is not None else (1.0 if args.tiny else 8.0)
    est = estimates(plan, minutes, only)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"gpu suite on {device.type}: " + ", ".join(f"{p} ~{s:.0f} s" for p, s in est.items())
        + f" (total ~{sum(est.values()) / 60:.1f} of {minutes:g} min)")
    rows, actual = [], {}
    for part in only:
        t0 = time.time()
        if part == "data":
            rows += part_data(plan, device, say)
        elif part == "steps":
            rows += part_steps(plan, device, say)
        else:
            guess = _epoch_guess(rows, plan)
            rows += part_cifar(plan, device, est["cifar"], guess, say)
        actual[part] = time.time() - t0
    rows.append({"part": "plan", **device_info(device), "minutes": minutes, "estimate_s": est, "actual_s": actual,
                 "tiny": args.tiny})
    return rows


def _epoch_guess(rows: list[dict[str, Any]], plan: Plan) -> float:
    """Seconds per CIFAR-10 epoch (50,000 images): from the steps part's resnet18 32-px edgessl rate when it ran
    (x 1.5 for the recipe's larger batch and negatives, and the kNN after each epoch), else from the plan's guess."""
    measured = [r["images_per_s"] for r in rows if r.get("part") == "steps" and r["backbone"] == "resnet18"
                and r["image_size"] == 32 and r["method"] == "edgessl"]
    if measured:
        return 1.5 * 50_000 / measured[0]
    return 50_000 / plan.batch * plan.step_guess_s / 4  # a 32-px step is about 4x cheaper than a 224-px one


# ---------------------------------------------------------------- benchmarks/README.md
FORMAT = (
    "`python -m benchmarks.run gpu` (one GPU, about 8 minutes from a cold start, nothing installed beyond the "
    "project; see docs/gpu.md) writes benchmarks/results/gpu.json: `rows` with `part` = `data` (backbone, precision, "
    "channels_last, image_size, batch_size, model_images_per_s, data_images_per_s, data_over_model, peak_gpu_bytes), "
    "`steps` (backbone, image_size, method, precision, batch_size, step_s, images_per_s, step_over_supervised, "
    "peak_gpu_bytes), `cifar` (one row per epoch: epoch, knn_top1, train_minutes, knn_seconds; then a summary row: "
    "planned_epochs, epochs_done, stopped_by_time, minutes, best_knn_top1) and one `plan` row (device, gpu, "
    "gpu_memory_gib, torch, cuda, cudnn, estimate_s and actual_s per part). `--minutes M` gives the whole suite M "
    "minutes (the CIFAR-10 run takes what the other parts leave), `--only data,steps` runs some parts, `--device cpu "
    "--tiny` runs every part in seconds (the slow test tier does, so the command cannot rot).\n")


def _gib(b: int | None) -> str:
    return f"{b / 2**30:.1f}" if b else "-"


def _data_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| data path | precision | channels_last | model img/s | data img/s | data / model (goal >= 0.95) | "
           "peak GiB |", "|---|---|---|---|---|---|---|"]
    return out + [f"| {r['backbone']} {r['image_size']} px, batch {r['batch_size']} | {r['precision']} | "
                  f"{'on' if r['channels_last'] else 'off'} | {r['model_images_per_s']:.0f} | "
                  f"{r['data_images_per_s']:.0f} | {r['data_over_model']:.2f} | {_gib(r['peak_gpu_bytes'])} |"
                  for r in rows] + [""]


def _steps_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| step | method | precision | ms/step | img/s | x supervised | peak GiB |",
           "|---|---|---|---|---|---|---|"]
    return out + [f"| {r['backbone']} {r['image_size']} px, batch {r['batch_size']} | {r['method']} | "
                  f"{r['precision']} | {r['step_s'] * 1000:.1f} | {r['images_per_s']:.0f} | "
                  f"{r['step_over_supervised']:.2f} | {_gib(r['peak_gpu_bytes'])} |" for r in rows] + [""]


def _cifar_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    out = [f"CIFAR-10 ({summary['images']} training images), resnet18, recipes/resnet18_cifar.yaml: "
           f"{summary['epochs_done']} of {summary['planned_epochs']} planned epochs in {summary['minutes']:.1f} min"
           f"{' (stopped by its time box)' if summary['stopped_by_time'] else ''}; lightly's table: SimCLR kNN 0.847 "
           "after 200 epochs in 97.7 min (RTX A6000).\n", "| epoch | training minutes | kNN top-1 |", "|---|---|---|"]
    return out + [f"| {r['epoch']} | {r['train_minutes']:.1f} | {r['knn_top1']:.3f} |" for r in rows]


def gpu_section(rec: dict[str, Any]) -> str:
    rows, m = rec["rows"], rec["machine"]
    plan = next(r for r in rows if r["part"] == "plan")
    parts = ", ".join(f"{p} {plan['estimate_s'][p]:.0f} / {plan['actual_s'].get(p, 0):.0f}" for p in plan["estimate_s"])
    out = ["## GPU\n", FORMAT,
           f"{plan.get('gpu') or plan['device']}, torch {plan['torch']}, CUDA {plan.get('cuda')}, edgessl "
           f"{m.get('edgessl')}, {m.get('date')}; `{rec['command']}`"
           + (" (--tiny: a smoke run, not a measurement)" if rec["tiny"] else "")
           + f". Seconds per part, estimated before the start / actual: {parts}.\n"]
    for name, table in (("data", _data_table), ("steps", _steps_table)):
        part = [r for r in rows if r["part"] == name]
        out += table(part) if part else []
    summary = next((r for r in rows if r["part"] == "cifar" and r.get("summary")), None)
    if summary:
        out += _cifar_table([r for r in rows if r["part"] == "cifar" and not r.get("summary")], summary)
    return "\n".join(out) + "\n"
