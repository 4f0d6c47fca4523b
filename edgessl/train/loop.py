"""The one training loop: data -> single-crop augmentation -> encoder -> objective -> optimiser step -> bank update.

Read top to bottom: `pretrain` prepares (edgessl.train.prepare: every check before any write), builds the model and
the TrainState, then `train_epochs` runs `train_step` for every batch and `end_epoch` after each epoch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from edgessl.config import PretrainConfig, replace
from edgessl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    augment_batch,
    cutmix,
    keyed_uniform,
)
from edgessl.data.folder import ImageSet
from edgessl.data.loader import Prefetcher, gather
from edgessl.errors import Interrupted, TrainingDiverged, UserError
from edgessl.fileio import atomic_save_tensors
from edgessl.loggers import Loggers, check_installed, parse_loggers
from edgessl.method.bank import project_rows
from edgessl.method.instance import InstanceDiscrimination
from edgessl.method.teacher import teacher_predictor
from edgessl.models.backbone import output_dim, save_encoder
from edgessl.models.channels import parse_widths
from edgessl.models.head import build_encoder
from edgessl.models.slimmable import SlimmableEncoder
from edgessl.report.plots import plot_curves
from edgessl.report.progress import training_progress
from edgessl.rundir import absolute, plural
from edgessl.runtime import ThreadChoice, pick_device, pick_precision, use_threads
from edgessl.seeding import keyed_generator
from edgessl.train import distributed
from edgessl.train.objective import Objective, Teacher
from edgessl.train.optim import build_optimizer, warmup_cosine
from edgessl.train.prepare import (
    bank_batch_cap,
    demo_folder,
    forward_init_bank,
    interrupted,
    load_data,
    resolve_batch,
    target_dir,
    write_history,
    write_run_files,
)
from edgessl.train.state import MAX_NONFINITE, TrainState
from edgessl.train.teacher import open_teacher, teacher_bank

__all__ = ["pretrain", "PretrainResult", "WarmStart", "StepInfo", "epoch_order", "bank_batch_cap",
           "forward_init_bank", "demo_folder", "IMAGENET_MEAN", "IMAGENET_STD"]

COLLAPSE_FRACTION = 0.25  # warn when the bank's per-dimension std falls below this fraction of 1/sqrt(d)


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



def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order images are visited in an epoch, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=keyed_generator(seed, epoch, 0x5EED))


class NoMonitor:
    """No kNN monitor (no labels, or none given): the stand-in the loop asks."""
    active = False

    def describe(self) -> str:
        return "off"


@dataclass
class Evaluation:
    """What the loop measures besides training, handed in by the caller (edgessl.api) so that train/ imports no
    later layer. monitor(train ImageSet or None, --val ImageSet or None, max queries, seed) -> a monitor (`active`,
    `describe()`, `__call__(backbone, device, mean, std) -> metrics`), e.g. edgessl.evaluate.monitor.Monitor;
    widths_report(run_dir, widths, labelled ImageSet or None, val, device, console) after a --widths run."""
    monitor: Callable[..., Any] | None = None
    widths_report: Callable[..., Any] | None = None


@dataclass
class Run:
    """What stays fixed while a run trains: its options, processes, device, folder, data, monitor and display."""
    cfg: PretrainConfig
    d: distributed.Dist
    device: torch.device
    run_dir: Path
    images: ImageSet
    rows: slice  # this process's rows of every global batch (all of them with one process)
    monitor: Any  # see Evaluation
    meta: dict[str, Any]  # encoder.json
    threads: ThreadChoice
    console: Console
    quiet: bool
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    progress: Any = None
    task: Any = None
    last_read: float = 0.0  # when the loop last read values back from the device (see _show_step)
    loggers: Loggers = field(default_factory=Loggers)  # --logger (rank 0; Loggers() logs nothing)
    first_row: dict[str, Any] = field(default_factory=dict)  # merged into this invocation's first metrics row
    every_row: dict[str, Any] = field(default_factory=dict)  # merged into every metrics row

    def say(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, highlight=False)

    def warn(self, msg: str) -> None:
        _warner(self.console, self.d)(msg)


def _warner(console: Console, d: distributed.Dist) -> Callable[[str], None]:
    """A warning line on rank 0 (the others stay silent)."""
    def warn(msg: str) -> None:
        if d.main:
            console.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False)  # its brackets are text

    return warn


# ---------------------------------------------------------------- the loop
def pretrain(
    cfg: PretrainConfig,
    resume: str | Path | None = None,
    console: Console | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    warm: WarmStart | None = None,
    overwrite: bool = False,
    evaluation: Evaluation | None = None,
) -> PretrainResult:
    """Pretrain an encoder with the single-branch method. See docs/method.md for every option.

    With cfg.widths the encoder is a SlimmableEncoder trained at every width (slow start, online distillation,
    loss re-weighting); the bank follows the full width. warm: start from given weights (see WarmStart).

    resume: a run directory to continue after its last completed epoch (cfg should be its config.yaml).
    overwrite: a non-empty cfg.out is moved aside (edgessl.rundir) instead of refused.
    on_step(StepInfo): called after every optimiser step (custom logging, tests), on every process.
    evaluation: the kNN monitor and the per-width report (see Evaluation; None: neither).

    Every check (options, data, the resumed checkpoint) passes before anything is written into the run directory.
    Under torchrun (WORLD_SIZE > 1) each process trains on its slice of every global batch with DDP and the same
    memory bank; only rank 0 prints and writes files (see docs/distributed.md). Without torchrun no
    process group is created.
    """
    distributed.check_global_batch(cfg.batch_size, distributed.env_world())
    d, device = distributed.setup(pick_device(cfg.device))
    finished = False
    try:
        result = _pretrain(cfg, resume, console or Console(), on_step, d, device, warm, overwrite,
                           evaluation or Evaluation())
        finished = True
        return result
    except KeyboardInterrupt:
        raise Interrupted("Interrupted before training started: nothing was written.") from None
    finally:
        distributed.teardown(d, clean=finished)


def _pretrain(cfg: PretrainConfig, resume: str | Path | None, console: Console, on_step, d: distributed.Dist,
              device: torch.device, warm: WarmStart | None, overwrite: bool, evaluation: Evaluation) -> PretrainResult:
    check_installed(parse_loggers(cfg.logger))  # a missing logger package fails before anything is written
    threads = use_threads(cfg.threads)
    set_determinism(cfg.deterministic, device)
    precision = pick_precision(cfg.precision, device)
    # a wrong backbone fails before any data is read
    model, arch, feat_dim, widths, teacher = build_model(cfg, warm, d, device, _warner(console, d))
    run_dir, ckpt = target_dir(cfg, resume, overwrite, d)  # checks only
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        return _already_complete(cfg, run_dir, ckpt, console, d)
    quiet = cfg.quiet or not d.main
    warn = _warner(console, d)
    pending = open_teacher(cfg, run_dir if ckpt is not None else None, warn)  # a wrong --teacher fails here
    predictor = add_predictor(cfg, model, pending, d, device)
    images, val, signature = load_data(cfg, run_dir if resume else None, None if quiet else console, d, warn)
    batch = resolve_batch(cfg, len(images), d, warn, ckpt.get("batch") if ckpt else None)
    state = new_state(cfg, model, len(images), batch, device, precision)
    if ckpt is not None:  # every process reads it: any number of processes continues any run
        state.restore(ckpt, run_dir, len(images))
    monitor = NoMonitor() if evaluation.monitor is None else evaluation.monitor(
        images if cfg.eval_every > 0 and d.main else None, val, cfg.monitor_queries, cfg.seed)
    cfg = replace(cfg, data=absolute(cfg.data), val=absolute(cfg.val), out=absolute(run_dir))
    meta = encoder_meta(cfg, arch, feat_dim, widths, warm)
    run = Run(cfg, d, device, run_dir, images, distributed.local_rows(batch, d.rank, d.world), monitor, meta, threads,
              console, quiet, AugmentConfig(blur_p=cfg.blur))
    # ---- every check has passed: from here on the run directory is written
    files = write_run_files(run_dir, ckpt is not None, overwrite, cfg, images, signature, warn) if d.main else None
    run.loggers = Loggers(parse_loggers(cfg.logger), run_dir, cfg.to_dict(), warn) if d.main else Loggers()
    try:
        tbank = None
        if pending is not None:
            tbank, run.first_row = teacher_bank(cfg, pending, run_dir, images, signature, device, precision, d,
                                                state.batch, run.say, warn)
            run.every_row = {"teacher_ms_per_step": run.first_row["teacher_ms_per_step"]}
            del pending  # the teacher network is freed unless the per-step ablation holds it
        objective = Objective(state.method, cfg.seed, cfg.epochs, device, precision, widths, cfg.slow_start,
                              cfg.width_distill, cfg.width_reweight, teacher, tbank, predictor, cfg.teacher_predictor)
        init_bank(run, state, warm, ckpt is not None, precision, tbank)
        if files is not None:
            files.written.append(write_history(run_dir, state.history))
        net = distributed.wrap_model(model, d, device, find_unused=objective.slim)  # `model` stays the unwrapped one
        _banner(run, state, precision, arch)
        train_epochs(run, state, objective, net, on_step)
        if objective.slim and d.main and evaluation.widths_report is not None:
            evaluation.widths_report(run_dir, widths, images if images.labels is not None else None, val, device,
                                     None if quiet else console)
        run.say(f"Done. Encoder: {run_dir / 'encoder.safetensors'} (+ encoder.json). Curves: {run_dir / 'curves.png'}")
        return PretrainResult(run_dir, state.history, data=images.root, labelled=images.labels is not None)
    except KeyboardInterrupt:
        raise interrupted(files, run_dir) from None


def train_epochs(run: Run, state: TrainState, objective: Objective, net: torch.nn.Module,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
    """Every remaining epoch: a seeded order, one train_step per global batch, end_epoch."""
    n, batch = len(run.images), state.batch
    run.progress = None if run.quiet else training_progress(run.console)
    if run.progress is not None:
        run.progress.start()
        run.task = run.progress.add_task("training", total=run.cfg.epochs * (n // batch),
                                         completed=state.epoch * (n // batch), info="")
    try:
        for epoch in range(state.epoch, run.cfg.epochs):
            state.model.train()
            order = epoch_order(run.cfg.seed, epoch, n)
            meter = EpochMeter()
            batches = order[: n // batch * batch].view(-1, batch)  # (steps, B): the global batch of each step
            with Prefetcher(_rows_of(run, batches), len(batches)) as rows:
                for step, raw in enumerate(rows):  # raw: this process's uint8 rows, assembled in the background
                    values = train_step(run, state, objective, net, batches[step], epoch, step, raw)
                    meter.add(values.named(), batch, values.moved)
                    _show_step(run, state, meter, epoch, step, values, on_step is not None)
                    if on_step is not None and bool(values.moved):  # a callback reads the loss: one sync per step
                        on_step(StepInfo(epoch, step, values.loss(), state.model, state.method, run.d.rank))
            end_epoch(run, state, epoch, meter)
    finally:
        run.loggers.close(ok=state.epoch == run.cfg.epochs)
        if run.progress is not None:
            run.progress.stop()


def _rows_of(run: Run, batches: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """step -> this process's uint8 rows of global batch batches[step] (pinned for the GPU copy on CUDA)."""
    return lambda step: gather(run.images, batches[step][run.rows], run.device.type == "cuda")


@dataclass
class StepValues:
    """A step's losses averaged over processes, left on the training device (reading them is a host sync).
    names: "loss", "ce", "sd", "ce_w<w>" per sub-width; values: (K,) in that order; moved: () bool, whether the
    weights and the bank moved (False: a non-finite loss, or an fp16 step the gradient scaler skipped)."""
    names: list[str]
    values: torch.Tensor
    moved: torch.Tensor

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values, strict=True))

    def loss(self) -> float:
        return float(self.values[0])

    def as_floats(self) -> dict[str, float]:
        return dict(zip(self.names, self.values.tolist(), strict=True))


def train_step(run: Run, state: TrainState, objective: Objective, net: torch.nn.Module, idx: torch.Tensor,
               epoch: int, step: int, raw: torch.Tensor | None = None) -> StepValues:
    """One optimiser step on the global batch `idx` (B,) (raw: this process's uint8 rows of it when already
    gathered): crops, loss, backward, optimiser, then the bank update with the features and bank columns of the
    forward pass (before the step). A non-finite loss skips the step (the schedule advances; MAX_NONFINITE in a row
    stop the run, see TrainState.check_nonfinite); so does an fp16 step whose gradients overflowed (the gradient
    scaler skips it), and the bank does not move either.

    With SGD/AdamW and no gradient scaler the decision stays on the device (TrainState.step_on_device, a masked
    bank update): nothing is read back to the host, so a GPU never waits for the CPU between steps. Otherwise
    (fp16's scaler, LARS) the loss is read back and decided on the host (TrainState.step)."""
    x, mix = make_crops(run, idx, epoch, step, raw)
    res = objective(net, x, idx.to(run.device), epoch, step, mix, run.rows if run.d.active else None)
    names = ["loss", "ce", "sd", *[f"ce_w{w:g}" for w in res.widths[1:]], *res.logged]
    # the global batch's mean (mean of equal-sized slices' means), identical on every process
    stacked = torch.stack([res.loss.detach().float(), res.out.ce.float(), res.out.sd.float(), *res.sub_ce,
                           *[v.float() for v in res.logged.values()]])
    values = distributed.mean_over_ranks(stacked.float(), run.d)
    gathered = (lambda: distributed.all_gather_cat(res.out.z, run.d)) if run.d.active else (lambda: None)
    if state.on_device:
        moved = state.step_on_device(res.loss, values[0])
        state.method.update_bank(res.out, gathered(), keep=moved)
        return StepValues(names, values, moved)
    moved = state.step(res.loss, float(values[0]), _diverged(run, epoch, step))
    if moved:
        state.method.update_bank(res.out, gathered())
    return StepValues(names, values, torch.tensor(moved))


def _diverged(run: Run, epoch: int, step: int) -> Callable[[], TrainingDiverged]:
    return lambda: TrainingDiverged(
        f"Training diverged: {MAX_NONFINITE} non-finite losses in a row (epoch {epoch + 1}, by step {step + 1}). "
        f"The last good checkpoint is kept in {run.run_dir}. Lower --lr or --bank-lr, or use --precision fp32.")


def end_epoch(run: Run, state: TrainState, epoch: int, meter: EpochMeter) -> dict[str, Any]:
    """Check the weights, make the bank exact on every process, log a metrics row (kNN monitor when due), and on
    rank 0 write the checkpoint, encoder, metrics.jsonl and curves.png. Returns the row."""
    seconds = time.time() - meter.t0
    state.check_nonfinite(_diverged(run, epoch, len(run.images) // state.batch - 1))
    if not all(torch.isfinite(p).all() for p in state.model.parameters()):
        raise TrainingDiverged(f"Training diverged: non-finite weights after epoch {epoch + 1}. The last good "
                               f"checkpoint is kept in {run.run_dir}. Lower --lr or --bank-lr.")
    # every process computed the same bank; rank 0's copy (the one checkpointed) is made exact everywhere so no
    # rounding difference between machines can accumulate
    distributed.broadcast_(state.method.bank.weight, run.d)
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        **meter.means(),
        "lr": state.optimizer.param_groups[0]["lr"],
        "images_per_s": meter.seen / max(seconds, 1e-9),
        "seconds": seconds,
        "bank_feature_std": float(state.method.bank.weight.std(dim=0).mean()),
        "threads": run.threads.threads,
        **run.every_row,
        **run.first_row,
    }
    run.first_row = {}
    every, last = run.cfg.eval_every, epoch + 1 == run.cfg.epochs
    if run.monitor.active and every and ((epoch + 1) % every == 0 or last):
        row.update(run.monitor(state.model.backbone, run.device, IMAGENET_MEAN, IMAGENET_STD))
    healthy = 1 / math.sqrt(run.cfg.feature_dim)
    if row["bank_feature_std"] < COLLAPSE_FRACTION * healthy:
        run.warn(f"the memory bank is collapsing: feature std {row['bank_feature_std']:.4f}, well below "
                 f"{healthy:.4f} (1/sqrt(d)) for well-spread features. Lower --bank-lr or --lr.")
    state.history.append(row)
    state.epoch = epoch + 1
    if run.d.main:
        save_run(run, state)
        run.loggers.log(row, {"curves": run.run_dir / "curves.png"} if last else None)
        _log_epoch(run.console, row, run.cfg.epochs, run.progress)
    distributed.barrier(run.d)  # the others wait for rank 0's checkpoint and monitor
    return row


class EpochMeter:
    """Image-weighted means of the step losses over an epoch, and its images and start time. Values may be floats
    or 0-d tensors on the training device, summed there (no host sync until means()); `moved` (a () bool tensor)
    says whether a step counts. images: images of the steps that counted (known after means() for tensors);
    seen: every image processed (the rate)."""
    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.images = 0
        self.seen = 0
        self.counted: Any = 0
        self.t0 = time.time()

    def add(self, values: dict[str, Any] | None, images: int, moved: torch.Tensor | None = None) -> None:
        if values is None:
            return
        self.seen += images
        if moved is None:
            self.counted += images
            weighted = {k: v * images for k, v in values.items()}
        else:
            self.counted = self.counted + moved.float() * images
            weighted = {k: torch.where(moved, v, torch.zeros_like(v)) * images for k, v in values.items()}
        for k, v in weighted.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        """{"loss", "loss_ce", "loss_sd", "loss_ce_w<w>"...}: the metrics.jsonl keys."""
        self.images = int(round(float(self.counted)))
        n = max(self.images, 1)
        out = {"loss": 0.0, "loss_ce": 0.0, "loss_sd": 0.0}
        out.update({("loss" if k == "loss" else f"loss_{k}"): float(v) / n for k, v in self.sums.items()})
        return out


# ---------------------------------------------------------------- pieces of the loop
def make_crops(run: Run, idx: torch.Tensor, epoch: int, step: int,
               raw: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
    """(x (B_r, 3, S, S) this process's augmented crops of the global batch idx (B,), CutMix (perm, lam) or None).
    raw: the uint8 rows idx[run.rows] when gathered already (the prefetch thread)."""
    cfg = run.cfg

    def crops(index: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = run.images.get(index) if rows is None else rows
        return augment_batch(rows.to(run.device, non_blocking=True), index, epoch, cfg.seed, run.aug, IMAGENET_MEAN,
                             IMAGENET_STD)

    x, mix = crops(idx[run.rows], raw), None
    if cfg.cutmix > 0:
        u = keyed_uniform(cfg.seed, epoch, [len(run.images) + step], 3)[0]
        g = keyed_generator(cfg.seed, epoch, step, 0xC07)
        lam = _beta(g, cfg.cutmix)
        lam = max(lam, 1 - lam) if cfg.cutmix_lam == "max" else lam
        perm = torch.randperm(len(idx), generator=g)
        x, lam = _cutmix_rows(x, idx, run.rows, perm, lam, (float(u[0]), float(u[1])), crops)
        mix = (perm.to(run.device), lam)
    if run.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, mix


def set_determinism(on: bool, device: torch.device) -> None:
    """--deterministic: PyTorch's deterministic algorithms where it has them (an op without one warns once instead
    of stopping the run), cuDNN autotuning off and, on CUDA, a fixed cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG,
    unless set). Bit-exact resume is tested on CPU; on a GPU, ops that only warn can still differ between runs."""
    if not on:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def build_model(cfg: PretrainConfig, warm: WarmStart | None, d: distributed.Dist, device: torch.device,
                warn: Callable[[str], None] | None = None):
    """(model: the Encoder or its SlimmableEncoder on `device`, arch, backbone feature dim, widths, Teacher or None).
    Weights from torch's global RNG seeded with cfg.seed, then cfg.init's (or warm.encoder's)."""
    torch.manual_seed(cfg.seed)
    model, arch, feat_dim = build_encoder(cfg, warn)
    if warm is not None:
        model = warm.encoder
        feat_dim = output_dim(model.backbone, cfg.image_size)
    widths = [1.0]
    if cfg.widths:

        widths = parse_widths(cfg.widths)
        model = SlimmableEncoder(model, widths, torch.zeros(2, 3, cfg.image_size, cfg.image_size))
    teacher = None
    if warm is not None and warm.teacher is not None:
        teacher = Teacher(warm.teacher.to(device).eval().requires_grad_(False), warm.distill)
    if cfg.sync_bn and d.active:
        model = distributed.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, arch, feat_dim, widths, teacher


def add_predictor(cfg: PretrainConfig, model: torch.nn.Module, pending, d: distributed.Dist,
                  device: torch.device) -> torch.nn.Module | None:
    """The --teacher-predictor variant's predictor d -> d_t, added to the model as `teacher_predictor` (so the
    optimiser, the checkpoint and resume carry it; the saved encoder does not). One process only: it is used
    outside the model's forward, which DDP does not synchronise."""
    if pending is None or cfg.teacher_predictor <= 0:
        return None
    if d.active:
        raise UserError("--teacher-predictor runs in one process only; drop it under torchrun.")
    with torch.random.fork_rng(devices=[]):  # the global RNG stays as it was
        torch.manual_seed(cfg.seed + 1)
        model.add_module("teacher_predictor", teacher_predictor(cfg.feature_dim, pending.dim()).to(device))
    return model.teacher_predictor


def new_state(cfg: PretrainConfig, model: torch.nn.Module, n: int, batch: int, device: torch.device,
              precision: str) -> TrainState:
    """A fresh TrainState: the method's bank (random rows until init_bank), SGD/AdamW/LARS at lr x batch / 256,
    warm-up + cosine per step, and a gradient scaler for fp16."""
    method = InstanceDiscrimination(
        n, cfg.feature_dim, cfg.temperature, cfg.negatives, cfg.bank_update, cfg.bank_lr, cfg.bank_momentum,
        cfg.sd_weight, cfg.sd_temperature, cfg.sd_alpha, generator=keyed_generator(cfg.seed, 0xBA4C),
    ).to(device)
    steps = n // batch
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr * batch / 256, cfg.momentum, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return TrainState(model, method, optimizer, scheduler, scaler, batch)


def init_bank(run: Run, state: TrainState, warm: WarmStart | None, resumed: bool, precision: str,
              tbank=None) -> None:
    """A new run's bank: warm.bank when given, else one forward pass of the untrained network (--bank-init forward),
    the teacher bank projected to d (teacher: project_rows) or the random rows it has (random). A resumed run keeps
    its checkpoint's."""
    n = len(run.images)
    if resumed:
        run.say(f"Resuming {run.run_dir} after epoch {state.epoch}/{run.cfg.epochs}.")
    elif warm is not None and warm.bank is not None:
        state.method.bank.fill(torch.arange(n, device=run.device), warm.bank.to(run.device))
    elif run.cfg.bank_init == "teacher":
        state.method.bank.fill(torch.arange(n, device=run.device), project_rows(tbank.features, run.cfg.feature_dim))
        run.say(f"Memory bank: {n} rows from the teacher's features ({tbank.dim} -> {run.cfg.feature_dim} dimensions).")
    elif run.cfg.bank_init == "forward":
        t0 = time.time()
        encoder = getattr(state.model, "encoder", state.model)  # the full width of a SlimmableEncoder
        forward_init_bank(encoder, state.method, run.images, run.device, precision, IMAGENET_MEAN, IMAGENET_STD, 256,
                          run.d, run.cfg.seed)
        run.say(f"Memory bank: {n} rows filled by a forward pass of the untrained network ({time.time() - t0:.1f} s).")


def encoder_meta(cfg: PretrainConfig, arch: dict[str, Any], feat_dim: int, widths: list[float],
                 warm: WarmStart | None) -> dict[str, Any]:
    """encoder.json: what rebuilds the backbone and how to feed it."""
    meta = {
        **arch,
        "input_size": [3, cfg.image_size, cfg.image_size],
        "image_size": cfg.image_size,
        "resize": "shorter side to image_size (bicubic), center crop; RGBA/P composited on white",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "feature_dim": feat_dim,
        "method": cfg.method,
        **(warm.meta if warm is not None else {}),
    }
    if len(widths) > 1:
        meta["widths"] = widths
    return meta


def save_run(run: Run, state: TrainState) -> None:
    """After an epoch (rank 0): checkpoint.pt, encoder.safetensors + .json, widths.safetensors, metrics.jsonl,
    curves.png."""
    state.save(run.run_dir, len(run.images), run.cfg.to_dict(), run.d.world)
    save_encoder(state.model.backbone, run.run_dir, {**run.meta, "epochs_trained": state.epoch})
    if "widths" in run.meta:
        save_private_bn(state.model, run.run_dir)
    write_history(run.run_dir, state.history)
    plot_curves(state.history, run.run_dir / "curves.png", title=f"{run.meta['timm_name']}\n{run.run_dir.name}")


def save_private_bn(model, run_dir: Path) -> None:
    """widths.safetensors: every sub-width's private BatchNorm of the backbone (`edgessl slim` reads it)."""
    atomic_save_tensors(model.private_bn_state(), run_dir / "widths.safetensors")


def _already_complete(cfg: PretrainConfig, run_dir: Path, ckpt: dict[str, Any], console: Console,
                      d: distributed.Dist) -> PretrainResult:
    if d.main:  # even with --quiet: it is the command's whole answer
        console.print(f"Nothing to resume: {run_dir} has completed all {plural(cfg.epochs, 'epoch')} (encoder: "
                      f"{run_dir / 'encoder.safetensors'}).", highlight=False)
    data = Path(cfg.data) if cfg.data else demo_folder()
    return PretrainResult(run_dir, ckpt["history"], data=data, labelled=cfg.labels_from_folders or not cfg.data,
                          already_complete=True)


def _banner(run: Run, state: TrainState, precision: str, arch: dict[str, Any]) -> None:
    cfg, d = run.cfg, run.d
    procs = f" | {d.world} processes x {state.batch // d.world} images{' (SyncBatchNorm)' if cfg.sync_bn else ''}"
    run.say(
        f"[bold]edgessl pretrain[/bold] {arch['timm_name']}{' (small-input stem)' if arch['stem'] else ''} | "
        f"{len(run.images)} images at {cfg.image_size}px | batch {state.batch}{procs if d.active else ''} | "
        f"{plural(cfg.epochs, 'epoch')} | {run.device.type} {precision} | {run.threads.describe()} | "
        f"kNN monitor: {run.monitor.describe()} | run dir {run.run_dir}"
    )


DISPLAY_SECONDS = 0.5  # the progress line's loss (and the non-finite count) is read back at most this often


def _show_step(run: Run, state: TrainState, meter: EpochMeter, epoch: int, step: int, values: StepValues,
               synced: bool) -> None:
    """Advance the progress bar; at most every DISPLAY_SECONDS (or every step when `synced`: a callback reads the
    loss anyway) read the loss back and check the non-finite count: the loop's only host syncs besides end_epoch."""
    now = time.time()
    if not synced and now - run.last_read < DISPLAY_SECONDS:
        if run.progress is not None:
            run.progress.update(run.task, advance=1)
        return
    run.last_read = now
    state.check_nonfinite(_diverged(run, epoch, step))
    if run.progress is None:
        return
    rate = meter.seen / max(now - meter.t0, 1e-9)
    loss = f"{values.loss():.3f}" if bool(values.moved) else "skipped"
    run.progress.update(run.task, advance=1, info=f"epoch {epoch + 1}/{run.cfg.epochs} loss {loss} {rate:.0f} img/s")


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
    """Beta(alpha, alpha) from a seeded generator via two Gamma draws
    (Marsaglia-Tsang through torch._standard_gamma)."""
    a = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g)
    return float(a[0] / a.sum())


def _log_epoch(console: Console, row: dict[str, Any], epochs: int, progress) -> None:
    knn = f"  kNN@20 {row['knn_top1']:.3f}  kNN@200 {row['knn_top1_k200']:.3f}" if "knn_top1" in row else ""
    widths = "".join(f", ce@{k[len('loss_ce_w'):]} {v:.3f}" for k, v in row.items() if k.startswith("loss_ce_w"))
    widths += f", teacher {row['loss_teacher']:.4f}" if "loss_teacher" in row else ""
    line = (
        f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f} "
        f"(ce {row['loss_ce']:.3f}{widths}, sd {row['loss_sd']:.4f})"
        f"  lr {row['lr']:.4f}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s{knn}"
    )
    (progress.console if progress is not None else console).print(line, highlight=False)
