"""The one training loop: data -> single-crop augmentation -> encoder -> method -> optimiser step -> bank update."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from edgessl.config import PretrainConfig, replace, save_config
from edgessl.data.augment import AugmentConfig, augment_batch, cutmix, keyed_uniform, test_transform
from edgessl.data.folder import ImageSet, load_image_folder, scan_images, write_skipped
from edgessl.data.signature import describe_difference, folder_signature
from edgessl.errors import Interrupted, TrainingDiverged, UserError
from edgessl.fileio import atomic_save_tensors, atomic_write_text
from edgessl.rundir import RunDir, absolute, check_out, claim, default_run_dir, plural, resume_problem
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import knn_top1
from edgessl.method.instance import InstanceDiscrimination
from edgessl.method.losses import active_widths, slimmable_loss, soft_cross_entropy, width_loss_weights
from edgessl.models.backbone import create_backbone, output_dim, save_encoder, want_small_input
from edgessl.models.head import Encoder, ProjectionHead
from edgessl.report.plots import plot_curves
from edgessl.report.progress import training_progress
from edgessl.train import distributed
from edgessl.seeding import keyed_generator
from edgessl.train.checkpoint import CHECKPOINT, atomic_save, load_checkpoint, rng_state, set_rng_state
from edgessl.train.optim import build_optimizer, warmup_cosine
from edgessl.runtime import autocast, pick_device, pick_precision, use_threads

MAX_NONFINITE = 10
BANK_BATCH_DIVISOR = 10  # a step's batch covers at most this fraction of the bank (see bank_batch_cap)
DATA_RECORD = "data.json"  # the training folder's signature (edgessl.data.signature), compared by --resume
COLLAPSE_FRACTION = 0.25  # warn when the bank's per-dimension std falls below this fraction of 1/sqrt(d)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class StepInfo:
    """What an `on_step` callback sees after each optimiser step."""

    epoch: int
    step: int
    loss: float
    model: torch.nn.Module  # the unwrapped model (never the DDP wrapper)
    method: InstanceDiscrimination
    rank: int = 0  # this process's rank under torchrun, 0 otherwise


@dataclass
class WarmStart:
    """Start from given weights instead of a fresh network (`edgessl prune`'s recovery pretraining).

    encoder: an Encoder (backbone + head), e.g. physically pruned; meta: extra encoder.json keys (how to rebuild
    it); teacher: a frozen Encoder whose distribution over the bank columns the student also matches (soft
    cross-entropy, weight `distill`, own loss weight 1 - distill); bank: (N, d) initial bank rows (None: forward
    pass of `encoder`)."""

    encoder: torch.nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    teacher: torch.nn.Module | None = None
    bank: torch.Tensor | None = None
    distill: float = 0.5


@dataclass
class PretrainResult:
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    report: list[dict[str, Any]] | None = None  # widths.json entries (`edgessl prune`)
    data: Path | None = None  # the training folder
    labelled: bool = False  # its subfolders were used as labels (the demo, --labels-from-folders)
    already_complete: bool = False  # a --resume that found every epoch done (nothing was trained or written)

    @property
    def encoder(self) -> Path:
        return self.run_dir / "encoder.json"


# ---------------------------------------------------------------- small helpers
def bank_batch_cap(n: int, multiple: int = 8) -> int:
    """Largest batch for a bank of n rows: n / BANK_BATCH_DIVISOR rounded down to a multiple of `multiple`, and never
    below `multiple`. Measured on the bundled demo (360 images): at batch 128 (36% of the bank per step) L_ce climbs
    above log N and kNN falls below the untrained network's; at batch 32 (9%) both improve every epoch."""
    return max(multiple, n // BANK_BATCH_DIVISOR // multiple * multiple)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order images are visited in an epoch, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=keyed_generator(seed, epoch, 0x5EED))


def demo_folder() -> Path:
    from edgessl.demo import demo_images

    return demo_images()


@torch.no_grad()
def forward_init_bank(
    model, method, images: ImageSet, device, precision, mean, std, batch_size: int, d: distributed.Dist | None = None
) -> None:
    """Fill every bank row with the untrained network's feature of its image.

    Transform: the test transform (the cached resize, no augmentation). BatchNorm: train mode, i.e. batch
    statistics as in the training forward pass, with the running statistics restored afterwards, so the
    initialisation leaves the network exactly as it was.
    d: under torchrun, each chunk of `batch_size` rows is split over the processes and the features are gathered,
    so every process fills the same bank (with SyncBatchNorm the rows equal one process's)."""
    d = d or distributed.Dist()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    n = len(images)
    for idx in torch.arange(n).tensor_split(max(1, math.ceil(n / batch_size))):
        mine = idx.tensor_split(d.world)[d.rank]
        x = test_transform(images.get(mine).to(device), mean, std)
        with autocast(device, precision):
            z = model(x)
        z = distributed.all_gather_cat(F.normalize(z.float(), dim=1), d, distributed.split_sizes(len(idx), d.world))
        method.bank.fill(idx.to(device), z)
    model.load_state_dict(saved)


class Monitor:
    """Online kNN (k = 20 and 200, t = 0.1) on backbone features when labels are available."""

    def __init__(self, train: ImageSet | None, val: ImageSet | None):
        self.memory = None
        if train is None:
            return
        if val is not None and train.labels is not None:
            missing = sorted(set(val.classes) - set(train.classes))
            if missing:
                raise UserError(f"--val has classes that the training folders lack: {', '.join(missing[:5])}.")
            self.memory, self.query, self.loo = train, val, False
            remap = torch.tensor([train.classes.index(c) for c in val.classes])
            self.query_labels = remap[val.labels]
        elif val is not None:
            self.memory, self.query, self.loo = val, val, True
            self.query_labels = val.labels
        elif train.labels is not None:
            self.memory, self.query, self.loo = train, train, True
            self.query_labels = train.labels
        if self.memory is not None:
            self.num_classes = len(self.memory.classes)

    @property
    def active(self) -> bool:
        return self.memory is not None

    def describe(self) -> str:
        if self.memory is None:
            return "off (no labels)"
        if self.loo:
            return f"leave-one-out on {len(self.query)} labelled images"
        return f"{len(self.query)} --val images against {len(self.memory)} training images"

    def __call__(self, backbone, device, mean, std) -> dict[str, float]:
        mem = extract_features(backbone, self.memory, mean, std, device)
        qry = mem if self.loo else extract_features(backbone, self.query, mean, std, device)
        out = {}
        for k, key in ((20, "knn_top1"), (200, "knn_top1_k200")):
            out[key] = knn_top1(qry, self.query_labels, mem, self.memory.labels, self.num_classes, k, 0.1, self.loo)
        return out


# ---------------------------------------------------------------- the loop
def pretrain(
    cfg: PretrainConfig,
    resume: str | Path | None = None,
    console: Console | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    warm: WarmStart | None = None,
    overwrite: bool = False,
) -> PretrainResult:
    """Pretrain an encoder with the single-branch method. See docs/method.md for every option.

    With cfg.widths the encoder is a SlimmableEncoder trained at every width (slow start, online distillation,
    loss re-weighting); the bank follows the full width. warm: start from given weights (see WarmStart).

    resume: a run directory to continue after its last completed epoch (cfg should be its config.yaml).
    overwrite: a non-empty cfg.out is moved aside (edgessl.rundir) instead of refused.
    on_step(StepInfo): called after every optimiser step (custom logging, tests), on every process.

    Every check (options, data, the resumed checkpoint) passes before anything is written into the run directory.
    Under torchrun (WORLD_SIZE > 1) each process trains on its slice of every global batch with DDP and the same
    memory bank; only rank 0 prints and writes files (see docs/distributed.md). Without torchrun no
    process group is created.
    """
    distributed.check_global_batch(cfg.batch_size, distributed.env_world())
    d, device = distributed.setup(pick_device(cfg.device))
    finished = False
    try:
        result = _pretrain(cfg, resume, console or Console(), on_step, d, device, warm, overwrite)
        finished = True
        return result
    except KeyboardInterrupt:
        raise Interrupted("Interrupted before training started: nothing was written.") from None
    finally:
        distributed.teardown(d, clean=finished)


def _target(cfg: PretrainConfig, resume: str | Path | None, overwrite: bool, d: distributed.Dist):
    """(run directory, checkpoint dict or None): checks only, nothing is written."""
    if resume:
        run_dir = Path(resume)
        problem = resume_problem(run_dir)
        if problem:
            raise UserError(problem)
        return run_dir, load_checkpoint(run_dir, map_location="cpu")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.backbone)
    run_dir = Path(distributed.broadcast_object(str(run_dir), d))  # rank 0's time stamp
    if d.main:  # only rank 0 writes (and it may claim the folder before another process gets here)
        check_out(run_dir, overwrite)
    return run_dir, None


def _load_data(cfg: PretrainConfig, resumed: Path | None, say: Callable[[str], None] | None, d: distributed.Dist):
    """(training ImageSet, --val ImageSet or None, the training folder's signature). resumed: the run directory
    of a resume, whose recorded data must be the same files (refused before any decoding otherwise)."""
    data_root, labels = cfg.data, cfg.labels_from_folders
    if data_root is None:
        data_root, labels = str(demo_folder()), True
        if say:
            say(f"No --data given: training on the bundled demo images ({data_root}).")
    elif resumed is not None and not Path(data_root).exists():
        raise UserError(
            f"Cannot resume '{resumed}': its data folder '{data_root}' does not exist any more. If it moved, pass "
            "--data with its new location (the files are checked against the run's record)."
        )
    paths = scan_images(data_root)
    signature = folder_signature(data_root, paths)
    if resumed is not None:
        _check_same_data(resumed, signature)
    images = load_image_folder(data_root, cfg.image_size, labels=labels, cache_mb=cfg.cache_mb, workers=cfg.workers,
                               paths=paths)
    val = None
    if cfg.val and d.main:  # the kNN monitor runs on rank 0 only
        val = load_image_folder(cfg.val, cfg.image_size, labels=True, cache_mb=cfg.cache_mb, workers=cfg.workers,
                                what="--val")
    return images, val, signature


def _check_same_data(run_dir: Path, signature: dict[str, Any]) -> None:
    """Refuse to resume on other files than the run recorded in data.json (runs without it: the image count is
    compared after decoding)."""
    record = run_dir / DATA_RECORD
    if not record.is_file():
        return
    old = json.loads(record.read_text())["data"]
    diff = describe_difference(old, signature)
    if diff:
        raise UserError(
            f"Cannot resume '{run_dir}': '{signature['root']}' does not hold the images it was trained on "
            f"(from '{old['root']}'): {diff}. Pass --data with the original files, or start a new run."
        )


def _batch_size(cfg: PretrainConfig, n: int, d: distributed.Dist, warn: Callable[[str], None]) -> int:
    batch = cfg.batch_size
    if n < batch:
        batch = n - n % d.world
        if batch == 0:
            raise UserError(f"only {n} images for {d.world} processes: every process needs at least one per step.")
        warn(f"only {n} images, fewer than --batch-size {cfg.batch_size}: the batch shrinks to {batch}.")
    cap = bank_batch_cap(n, 8 * d.world)
    if batch > cap:
        warn(
            f"--batch-size {batch} would cover {batch / n:.0%} of the {n} images per step; the batch shrinks to {cap} "
            f"(at most 1/{BANK_BATCH_DIVISOR} of the data set: larger batches destabilise the memory bank on small data)."
        )
        batch = cap
    return batch


def _restore(ckpt: dict[str, Any], run_dir: Path, n: int, *parts) -> tuple[int, list[dict[str, Any]], int]:
    """Load a checkpoint into (model, method, optimizer, scheduler, scaler); UserError when it does not fit.
    Returns (epochs completed, history, non-finite step count)."""
    if ckpt["num_images"] != n:
        raise UserError(f"Cannot resume '{run_dir}': it was trained on {ckpt['num_images']} images, the data now has {n}.")
    try:
        for part, key in zip(parts, ("model", "method", "optimizer", "scheduler", "scaler")):
            part.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"Cannot resume '{run_dir}': its checkpoint does not fit the model these options build ({first[:200]}). "
            "Resume without changing model options."
        ) from None
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["history"], ckpt["nonfinite"]


def _write_run_files(run_dir: Path, resumed: bool, overwrite: bool, cfg: PretrainConfig, images: ImageSet,
                     signature: dict[str, Any], warn: Callable[[str], None]) -> RunDir:
    """Every check has passed: claim the folder (a new run) and write config.yaml, data.json, skipped_files.txt."""
    run = RunDir(run_dir) if resumed else claim(run_dir, overwrite)
    if run.moved_to is not None:
        warn(f"--overwrite: the previous contents of {run_dir} are now in {run.moved_to}.")
    if images.skipped:
        first = ", ".join(str(p) for p, _ in images.skipped[:3])
        warn(f"skipped {len(images.skipped)} unreadable file(s) (first: {first}); "
             f"all are listed in {run_dir / 'skipped_files.txt'}.")
        run.written.append(write_skipped(images.skipped, run_dir / "skipped_files.txt"))
    run.written.append(save_config(cfg, run_dir / "config.yaml"))
    run.written.append(atomic_write_text(run_dir / DATA_RECORD, json.dumps({"data": signature, "val": cfg.val}) + "\n"))
    return run


def _interrupted(run: RunDir | None, run_dir: Path) -> Interrupted:
    """The Ctrl-C message: what is kept, and how to continue (a run with no completed epoch is removed)."""
    if run is not None and not run.has_checkpoint():
        run.abandon()
        gone = f" ({run_dir} was removed)" if not run_dir.exists() else ""
        return Interrupted(f"Interrupted before the first epoch completed: there is nothing to resume{gone}.")
    epochs_done = load_checkpoint(run_dir)["epoch"]
    return Interrupted(
        f"Interrupted. {plural(epochs_done, 'completed epoch')} checkpointed in {run_dir}: continue with "
        f"edgessl pretrain --resume {run_dir}"
    )


def _pretrain(
    cfg: PretrainConfig,
    resume: str | Path | None,
    console: Console,
    on_step: Callable[[StepInfo], None] | None,
    d: distributed.Dist,
    device: torch.device,
    warm: WarmStart | None = None,
    overwrite: bool = False,
) -> PretrainResult:
    quiet = cfg.quiet or not d.main
    say = console.print

    def warn(msg: str) -> None:
        if d.main:
            console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)

    threads = use_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    precision = pick_precision(cfg.precision, device)

    # ---- model (first: a wrong backbone name fails before any data is read)
    torch.manual_seed(cfg.seed)
    small = want_small_input(cfg.small_input, cfg.image_size)
    backbone, arch = create_backbone(cfg.backbone, small_input=small)
    feat_dim = output_dim(backbone, cfg.image_size)
    head = ProjectionHead(feat_dim, cfg.feature_dim, cfg.head_hidden, cfg.head)
    model = Encoder(backbone, head)
    if warm is not None:
        model = warm.encoder
        feat_dim = output_dim(model.backbone, cfg.image_size)
    widths = [1.0]
    if cfg.widths:
        from edgessl.slim.channels import parse_widths
        from edgessl.slim.slimmable import SlimmableEncoder

        widths = parse_widths(cfg.widths)
        model = SlimmableEncoder(model, widths, torch.zeros(2, 3, cfg.image_size, cfg.image_size))
    slim = len(widths) > 1
    teacher = None
    if warm is not None and warm.teacher is not None:
        teacher = warm.teacher.to(device).eval().requires_grad_(False)
    if cfg.sync_bn and d.active:
        model = distributed.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    encoder = model.encoder if slim else model  # the full-width Encoder

    # ---- where the run goes, and what it resumes: checks only, nothing is written yet
    run_dir, ckpt = _target(cfg, resume, overwrite, d)
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        if d.main:  # even with --quiet: it is the command's whole answer
            say(f"Nothing to resume: {run_dir} has completed all {plural(cfg.epochs, 'epoch')} (encoder: "
                f"{run_dir / 'encoder.safetensors'}).", highlight=False)
        data = Path(cfg.data) if cfg.data else demo_folder()
        return PretrainResult(run_dir, ckpt["history"], data=data, labelled=cfg.labels_from_folders or not cfg.data,
                              already_complete=True)

    # ---- data (every process caches every image: the global batch's rows change owner every epoch)
    images, val, signature = _load_data(cfg, run_dir if resume else None, None if quiet else say, d)
    n = len(images)
    batch = _batch_size(cfg, n, d, warn)
    steps_per_epoch = n // batch
    rows = distributed.local_rows(batch, d.rank, d.world)  # this process's rows of every global batch
    local = rows if d.active else None

    # ---- method
    method = InstanceDiscrimination(
        n, cfg.feature_dim, cfg.temperature, cfg.negatives, cfg.bank_update, cfg.bank_lr, cfg.bank_momentum,
        cfg.sd_weight, cfg.sd_temperature, cfg.sd_alpha, generator=keyed_generator(cfg.seed, 0xBA4C),
    ).to(device)
    lr = cfg.lr * batch / 256
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr, cfg.momentum, cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    aug = AugmentConfig(blur_p=cfg.blur)
    monitor = Monitor(images if cfg.eval_every > 0 and d.main else None, val)
    meta = {
        **arch,
        "input_size": [3, cfg.image_size, cfg.image_size],
        "image_size": cfg.image_size,
        "resize": "shorter side to image_size (bicubic), center crop; RGBA/P composited on white",
        "mean": list(mean),
        "std": list(std),
        "feature_dim": feat_dim,
        "method": cfg.method,
        **(warm.meta if warm is not None else {}),
    }
    if slim:
        meta["widths"] = widths
    loss_weights = width_loss_weights(widths, cfg.width_reweight)

    history: list[dict[str, Any]] = []
    start_epoch, nonfinite = 0, 0
    if ckpt is not None:
        # Every process reads the checkpoint (the run directory must be reachable on every node). It holds the
        # unwrapped model's state, so any number of processes continues any run.
        start_epoch, history, nonfinite = _restore(ckpt, run_dir, n, model, method, optimizer, scheduler, scaler)

    # ---- every check has passed: now the run directory is written (absolute paths in config.yaml)
    cfg = replace(cfg, data=absolute(cfg.data), val=absolute(cfg.val), out=absolute(run_dir))
    run = _write_run_files(run_dir, ckpt is not None, overwrite, cfg, images, signature, warn) if d.main else None
    try:
        if ckpt is not None:
            if not quiet:
                say(f"Resuming {run_dir} after epoch {start_epoch}/{cfg.epochs}.")
        elif warm is not None and warm.bank is not None:
            method.bank.fill(torch.arange(n, device=device), warm.bank.to(device))
        elif cfg.bank_init == "forward":
            t0 = time.time()
            forward_init_bank(encoder, method, images, device, precision, mean, std, 256, d)
            if not quiet:
                say(f"Memory bank: {n} rows filled by a forward pass of the untrained network ({time.time() - t0:.1f} s).")
        if run is not None:
            run.written.append(_write_history(run_dir, history))
        net = distributed.wrap_model(model, d, device, find_unused=slim)  # DDP; `model` stays the unwrapped module everything else uses

        if not quiet:
            procs = f" | {d.world} processes x {batch // d.world} images{' (SyncBatchNorm)' if cfg.sync_bn else ''}"
            say(
                f"[bold]edgessl pretrain[/bold] {arch['timm_name']}{' (small-input stem)' if arch['stem'] else ''} | "
                f"{n} images at {cfg.image_size}px | batch {batch}{procs if d.active else ''} | {plural(cfg.epochs, 'epoch')} | "
                f"{device.type} {precision} | {threads.describe()} | kNN monitor: {monitor.describe()} | run dir {run_dir}",
                highlight=False,
            )

        progress = None if quiet else training_progress(console)
        task = None
        if progress is not None:
            progress.start()
            task = progress.add_task("training", total=total_steps, completed=start_epoch * steps_per_epoch, info="")
        try:
            for epoch in range(start_epoch, cfg.epochs):
                model.train()
                order = epoch_order(cfg.seed, epoch, n)
                sums = {"loss": 0.0, "ce": 0.0, "sd": 0.0}
                done = 0
                t0 = time.time()
                for step in range(steps_per_epoch):
                    idx = order[step * batch : (step + 1) * batch]  # (B,) the global batch, the same on every process
                    mine = idx[rows]  # (B_r,) this process's rows of it (all of it with one process)

                    def crops(index: torch.Tensor) -> torch.Tensor:
                        return augment_batch(images.get(index).to(device, non_blocking=True), index, epoch, cfg.seed,
                                             aug, mean, std)

                    x = crops(mine)
                    mix = None
                    if cfg.cutmix > 0:
                        u = keyed_uniform(cfg.seed, epoch, [n + step], 3)[0]
                        g = keyed_generator(cfg.seed, epoch, step, 0xC07)
                        lam = _beta(g, cfg.cutmix)
                        perm = torch.randperm(len(idx), generator=g)
                        x, lam = _cutmix_rows(x, idx, rows, perm, lam, (float(u[0]), float(u[1])), crops)
                        mix = (perm.to(device), lam)
                    if device.type == "cuda":
                        x = x.contiguous(memory_format=torch.channels_last)
                    idx_dev = idx.to(device)
                    trained = active_widths(widths, epoch, cfg.epochs, cfg.slow_start)
                    with autocast(device, precision):
                        zs = net(x, trained) if slim else [net(x)]
                    # every width meets the same bank columns (same generator key)
                    outs = [method(F.normalize(z.float(), dim=1), idx_dev, keyed_generator(cfg.seed, epoch, step), mix, local)
                            for z in zs]
                    out = outs[0]
                    loss = out.loss
                    if len(outs) > 1:
                        loss = slimmable_loss(out.loss, [o.loss for o in outs[1:]], [o.sim / cfg.temperature for o in outs[1:]],
                                              out.p, loss_weights[: len(outs)], cfg.width_distill)
                    if teacher is not None:
                        with torch.no_grad(), autocast(device, precision):
                            zt = F.normalize(teacher(x).float(), dim=1)
                        pt = torch.softmax(zt @ method.bank.columns(out.cols).t() / cfg.temperature, dim=1)
                        loss = (1 - warm.distill) * loss + warm.distill * soft_cross_entropy(out.sim / cfg.temperature, pt)
                    # the global batch's mean loss (mean of equal-sized slices' means), identical on every process
                    step_loss, step_ce, step_sd = distributed.mean_over_ranks(
                        torch.stack([loss.detach().float(), out.ce.float(), out.sd.float()]), d
                    ).tolist()
                    optimizer.zero_grad(set_to_none=True)
                    if not math.isfinite(step_loss):
                        nonfinite += 1
                        scheduler.step()
                        if nonfinite >= MAX_NONFINITE:
                            raise TrainingDiverged(
                                f"Training diverged: {MAX_NONFINITE} non-finite losses in a row (epoch {epoch + 1}, "
                                f"step {step + 1}). The last good checkpoint is kept in {run_dir}. "
                                "Lower --lr or --bank-lr, or use --precision fp32."
                            )
                        continue
                    nonfinite = 0
                    scaler.scale(loss).backward()  # DDP averages the gradients over processes
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    method.update_bank(out, distributed.all_gather_cat(out.z, d) if d.active else None)
                    done += len(idx)
                    sums["loss"] += step_loss * len(idx)
                    sums["ce"] += step_ce * len(idx)
                    sums["sd"] += step_sd * len(idx)
                    if len(outs) > 1:  # each sub-width's own L_ce (the full width's is loss_ce)
                        sub_ce = distributed.mean_over_ranks(torch.stack([o.ce.float() for o in outs[1:]]), d).tolist()
                        for w, value in zip(trained[1:], sub_ce):
                            sums[f"ce_w{w:g}"] = sums.get(f"ce_w{w:g}", 0.0) + value * len(idx)
                    if progress is not None:
                        rate = done / max(time.time() - t0, 1e-9)
                        progress.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {step_loss:.3f} {rate:.0f} img/s")
                    if on_step is not None:
                        on_step(StepInfo(epoch, step, step_loss, model, method, d.rank))
                seconds = time.time() - t0
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise TrainingDiverged(
                        f"Training diverged: non-finite weights after epoch {epoch + 1}. The last good checkpoint is "
                        f"kept in {run_dir}. Lower --lr or --bank-lr."
                    )
                # Every process computed the same bank; rank 0's copy (the one checkpointed) is made exact everywhere so
                # no rounding difference between machines can accumulate.
                distributed.broadcast_(method.bank.weight, d)
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "loss": sums["loss"] / max(done, 1),
                    "loss_ce": sums["ce"] / max(done, 1),
                    "loss_sd": sums["sd"] / max(done, 1),
                    **{f"loss_{k}": v / max(done, 1) for k, v in sums.items() if k.startswith("ce_w")},
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": done / max(seconds, 1e-9),
                    "seconds": seconds,
                    "bank_feature_std": float(method.bank.weight.std(dim=0).mean()),
                    "threads": threads.threads,
                }
                if monitor.active and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    row.update(monitor(model.backbone, device, mean, std))
                healthy = 1 / math.sqrt(cfg.feature_dim)
                if row["bank_feature_std"] < COLLAPSE_FRACTION * healthy:
                    warn(
                        f"the memory bank is collapsing: feature std {row['bank_feature_std']:.4f}, well below "
                        f"{healthy:.4f} (1/sqrt(d)) for well-spread features. Lower --bank-lr or --lr."
                    )
                history.append(row)
                if d.main:
                    atomic_save(
                        {
                            "epoch": epoch + 1,
                            "model": model.state_dict(),
                            "method": method.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "rng": rng_state(),
                            "nonfinite": nonfinite,
                            "history": history,
                            "num_images": n,
                            "config": cfg.to_dict(),
                            "world_size": d.world,
                        },
                        run_dir / CHECKPOINT,
                    )
                    save_encoder(model.backbone, run_dir, {**meta, "epochs_trained": epoch + 1})
                    if slim:
                        save_private_bn(model, run_dir)
                    _write_history(run_dir, history)
                    plot_curves(history, run_dir / "curves.png", title=f"{arch['timm_name']}\n{run_dir.name}")
                    _log_epoch(console, row, cfg.epochs, progress)
                distributed.barrier(d)  # the others wait for rank 0's checkpoint and monitor
        finally:
            if progress is not None:
                progress.stop()
        if slim and d.main:  # per-width params, MACs, latency, accuracy -> widths.json + widths.png (slimmed: width-<w>/)
            from edgessl.slim.api import report_table, width_report

            report = width_report(run_dir, widths, labelled=images if images.labels is not None else None, test=val,
                                  device=device, console=None if quiet else console)
            if not quiet:
                say(report_table(report))
        if not quiet:
            say(f"Done. Encoder: {run_dir / 'encoder.safetensors'} (+ encoder.json). Curves: {run_dir / 'curves.png'}")
        return PretrainResult(run_dir, history, data=images.root, labelled=images.labels is not None)
    except KeyboardInterrupt:
        raise _interrupted(run, run_dir) from None


def save_private_bn(model, run_dir: Path) -> None:
    """widths.safetensors: every sub-width's private BatchNorm of the backbone (`edgessl slim` reads it)."""
    atomic_save_tensors(model.private_bn_state(), run_dir / "widths.safetensors")


def _cutmix_rows(
    x: torch.Tensor,
    idx: torch.Tensor,
    rows: slice,
    perm: torch.Tensor,
    lam: float,
    box_u: tuple[float, float],
    crops: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """CutMix within the global batch, computed for this process's rows only.

    x: (B_r, 3, S, S) crops of the global batch's rows `rows`; idx: (B,) the global batch; perm: (B,) CPU partner
    of each global row; crops(index (k,)) -> (k, 3, S, S) the crops of those images (keyed by image index, so a
    partner's crop equals the one its own process makes). Returns (mixed (B_r, 3, S, S), corrected lam), the
    rows `rows` of what one process CutMixing the whole batch gets."""
    b = x.shape[0]
    if b == idx.shape[0]:
        return cutmix(x, lam, box_u, perm.to(x.device))
    partners = crops(idx[perm[rows]])
    swap = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(x.device)
    mixed, lam = cutmix(torch.cat([x, partners]), lam, box_u, swap)
    return mixed[:b], lam


def _beta(g: torch.Generator, alpha: float) -> float:
    """Beta(alpha, alpha) from a seeded generator via two Gamma draws (Marsaglia-Tsang through torch._standard_gamma)."""
    a = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g)
    return float(a[0] / a.sum())


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> Path:
    return atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _log_epoch(console: Console, row: dict[str, Any], epochs: int, progress) -> None:
    knn = f"  kNN@20 {row['knn_top1']:.3f}  kNN@200 {row['knn_top1_k200']:.3f}" if "knn_top1" in row else ""
    widths = "".join(f", ce@{k[len('loss_ce_w'):]} {v:.3f}" for k, v in row.items() if k.startswith("loss_ce_w"))
    line = (
        f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f} (ce {row['loss_ce']:.3f}{widths}, sd {row['loss_sd']:.4f})"
        f"  lr {row['lr']:.4f}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s{knn}"
    )
    (progress.console if progress is not None else console).print(line, highlight=False)
