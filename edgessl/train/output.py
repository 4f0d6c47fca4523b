"""What a run writes and prints: the files after each epoch, the banner, the progress line and the epoch line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from edgessl.fileio import atomic_save_tensors
from edgessl.models.backbone import save_encoder
from edgessl.report.plots import plot_curves
from edgessl.rundir import plural
from edgessl.train.prepare import (
    write_history,
)
from edgessl.train.state import TrainState
from edgessl.train.types import Run

PLOT_SECONDS = 30.0  # curves.png is redrawn after an invocation's first epoch, its last, and at most this often


def save_run(run: Run, state: TrainState, last: bool) -> None:
    """After an epoch (rank 0): encoder.safetensors + .json, widths.safetensors, metrics.jsonl, then checkpoint.pt,
    and curves.png when PLOT_SECONDS have passed since it was drawn or the epoch is the `last` (drawing it takes about
    0.8 s on 2 CPU cores: a fifth of a demo epoch). The checkpoint comes last: a run stopped between these files
    resumes from the epoch before and writes them again (with the checkpoint first, a Ctrl-C after it had left the
    last epoch's encoder and metrics unwritten, and the resume had found nothing to do)."""
    save_encoder(state.model.backbone, run.run_dir, {**run.meta, "epochs_trained": state.epoch})
    if "widths" in run.meta:
        save_private_bn(state.model, run.run_dir)
    write_history(run.run_dir, state.history)
    state.save(run.run_dir, len(run.images), run.cfg.to_dict(), run.d.world)
    if last or time.time() - run.last_plot >= PLOT_SECONDS:
        draw_curves(run, state)


def draw_curves(run: Run, state: TrainState) -> None:
    """curves.png of every epoch so far (also when a run stops early: see train_epochs)."""
    plot_curves(state.history, run.run_dir / "curves.png", title=f"{run.meta['timm_name']}\n{run.run_dir.name}")
    run.last_plot, run.plotted = time.time(), state.epoch


def save_private_bn(model, run_dir: Path) -> None:
    """widths.safetensors: every sub-width's private BatchNorm of the backbone (`edgessl slim` reads it)."""
    atomic_save_tensors(model.private_bn_state(), run_dir / "widths.safetensors")


def banner(run: Run, state: TrainState, precision: str, arch: dict[str, Any]) -> None:
    cfg, d = run.cfg, run.d
    procs = f" | {d.world} processes x {state.batch // d.world} images{' (SyncBatchNorm)' if cfg.sync_bn else ''}"
    run.say(
        f"[bold]edgessl pretrain[/bold] {arch['timm_name']}{' (small-input stem)' if arch['stem'] else ''} | "
        f"{len(run.images)} images at {cfg.image_size}px | batch {state.batch}{procs if d.active else ''} | "
        f"{plural(cfg.epochs, 'epoch')} | {run.device.type} {precision} | {run.threads.describe()} | "
        f"kNN monitor: {run.monitor.describe()} | run dir {run.run_dir}"
    )
    line = method_line(cfg)
    if line:
        run.say(escape(line))
    init = run.meta.get("init")
    if init and not run.first_row.get("resumed"):  # where the weights came from, said once, when the run starts
        head = f"; head {init['head']}" if init.get("head") else ""
        whole = ": its architecture comes with them, stem included" if init.get("kind") == "run" else ""
        run.say(escape(f"Init: weights of {init.get('source', init.get('kind'))} ({init.get('kind')}{head}){whole}."))


def method_line(cfg) -> str | None:
    """The banner's line for a method other than the default one or an option that changes what a step does (the
    bank update, the self-distillation, CutMix, blur, --widths); None for the default method as it is."""
    changes = [f"a momentum bank update (m {cfg.bank_momentum:g})"] if cfg.bank_update == "momentum" else []
    changes += ["no self-distillation"] if cfg.sd_weight == 0 else []
    changes += [f"CutMix (alpha {cfg.cutmix:g}, lambda {cfg.cutmix_lam})"] if cfg.cutmix > 0 else []
    changes += [f"Gaussian blur (p {cfg.blur:g})"] if cfg.blur > 0 else []
    if cfg.widths:
        changes.append(f"widths {cfg.widths}, the full width alone for the first {cfg.slow_start:.0%} of the epochs, "
                       f"each sub-width distilled from it at {cfg.width_distill:g}")
    if cfg.method == "edgessl" and not changes:
        return None
    return f"Method: {cfg.method}" + (f" with {'; '.join(changes)}" if changes else "") + "."


def log_epoch(console: Console, row: dict[str, Any], epochs: int, progress) -> None:
    knn = f"  kNN@20 {row['knn_top1']:.3f}  kNN@200 {row['knn_top1_k200']:.3f}" if "knn_top1" in row else ""
    widths = "".join(f", ce@{k[len('loss_ce_w'):]} {v:.3f}" for k, v in row.items() if k.startswith("loss_ce_w"))
    widths += f", teacher {row['loss_teacher']:.4f}" if "loss_teacher" in row else ""
    line = (
        f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f} "
        f"(ce {row['loss_ce']:.3f}{widths}, sd {row['loss_sd']:.4f})"
        f"  lr {row['lr']:.4f}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s{knn}"
    )
    (progress.console if progress is not None else console).print(line, highlight=False)
