"""`edgessl eval` and `edgessl finetune`, registered on the main typer app by `register(app)`.

Each command parses options and calls the Python API (edgessl.api), nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgessl import api
from edgessl.commands.common import console, friendly

EVAL_HELP = """Few-label evaluation of a run's frozen encoder: weighted kNN and a linear probe at a few labels per class.

Labelled data: one subfolder per class (ImageFolder layout), as --train and --test folders, or one --train folder
split by --test-fraction (stratified, seeded by --split-seed). For every labels-per-class value and seed a
stratified subset of --train is labelled; kNN (cosine, k = 20 and 200, temperature 0.1) and a logistic-regression
probe (L2 strength cross-validated on the labelled subset only) are scored on the test images.

**Examples**

    edgessl eval runs/mobilenetv3_small-20261123-120000 --train ./labeled/train --test ./labeled/test
    edgessl eval runs/my-run --train ./labeled/train --test ./labeled/test --labels-per-class 1,5,10,all --seeds 3 --baseline random
    edgessl eval runs/my-run --train ./labeled --test-fraction 0.2 --labels-per-class 5,all

Writes eval.json (one row per encoder, protocol, k, labels per class and seed, plus mean/std) and eval.png into
the run directory; features are cached in its `features/` folder.
"""

FINETUNE_HELP = """Fine-tune a run's encoder into a classifier on a few labels per class.

A new linear layer on the encoder; full fine-tuning (backbone at --lr x --backbone-lr-scale) or --freeze-backbone;
milder pretraining augmentation, label smoothing, cosine schedule, early stopping on a held-out part
(--val-fraction) of the labelled images.

**Examples**

    edgessl finetune runs/my-run --train ./labeled/train --test ./labeled/test --labels-per-class 10
    edgessl finetune runs/my-run --train ./labeled/train --test ./labeled/test --labels-per-class all --epochs 50
    edgessl finetune runs/my-run --train ./labeled --test-fraction 0.2 --labels-per-class 10 --freeze-backbone

Writes `finetune-TAG/` in the run directory (TAG: lpc10, all, ... plus -frozen): classifier.safetensors + classifier.json,
metrics.json, confusion.png. Load it with `edgessl.load_classifier(folder)`.
"""


def register(app) -> None:
    """Add `eval` and `finetune` to the typer app."""
    @app.command("eval", help=EVAL_HELP)
    @friendly
    def eval_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory of `edgessl pretrain` (encoder.safetensors + encoder.json)."),
        train: Path = typer.Option(..., help="Labelled training images: one subfolder per class."),
        test: Optional[Path] = typer.Option(None, help="Labelled test images, the same class names as --train."),
        test_fraction: Optional[float] = typer.Option(None, help="Instead of --test: hold out this fraction of every --train class."),
        labels_per_class: Optional[str] = typer.Option(None, help="Comma-separated labels per class; 'all' = every label. [default: 1,5,10,all, leaving out values that no class reaches]"),
        seeds: int = typer.Option(3, help="Subsets drawn per labels-per-class value (seeds 0..N-1); mean ± std over them."),
        baseline: str = typer.Option("none", help="random: also evaluate a randomly initialised encoder of the same architecture."),
        split_seed: int = typer.Option(0, help="Seed of the --test-fraction split."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | mps (auto: cuda, else mps, else cpu)."),
        cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse features cached in the run directory's features/ folder."),
        workers: str = typer.Option("auto", help="Decoding threads: auto (one per available core, at most 8) or a number."),
        cache_dir: str = typer.Option("auto", help="Decoded-image cache: auto (EDGESSL_CACHE_DIR, else ~/.cache/edgessl), a folder, or none."),
        threads: str = typer.Option("auto", help="CPU threads: auto (all cores when the machine is idle, fewer when other jobs keep them busy) or a number."),
        quiet: bool = typer.Option(False, "--quiet", help="No table or log lines (eval.json and eval.png are still written)."),
    ):
        api.evaluate_encoder(
            run_dir, train, test, test_fraction, labels_per_class, seeds, baseline, console=console,
            split_seed=split_seed, device=device, cache=cache, workers=workers, cache_dir=cache_dir, quiet=quiet, threads=threads,
        )

    @app.command("finetune", help=FINETUNE_HELP)
    @friendly
    def finetune_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory of `edgessl pretrain` (encoder.safetensors + encoder.json)."),
        train: Path = typer.Option(..., help="Labelled training images: one subfolder per class."),
        test: Optional[Path] = typer.Option(None, help="Labelled test images, the same class names as --train."),
        test_fraction: Optional[float] = typer.Option(None, help="Instead of --test: hold out this fraction of every --train class."),
        labels_per_class: str = typer.Option("10", help="Labels per class (a number or 'all'); the held-out images come out of them."),
        epochs: int = typer.Option(30, help="Maximum epochs (early stopping may end sooner)."),
        freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train only the new linear layer."),
        init: Optional[str] = typer.Option(None, help="Start the encoder (the run's architecture) from other weights instead of the run's: timm (its pretrained weights; downloads), a .safetensors/.pth file or another run, e.g. an ImageNet baseline. Output: finetune-TAG-init-..."),
        batch_size: int = typer.Option(64, help="Images per step."),
        lr: float = typer.Option(1e-3, help="AdamW learning rate of the new layer."),
        backbone_lr_scale: float = typer.Option(0.1, help="Backbone learning rate = --lr x this."),
        weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
        label_smoothing: float = typer.Option(0.1, help="Label smoothing of the cross-entropy."),
        val_fraction: float = typer.Option(0.2, help="Part of each class's labelled images held out for early stopping."),
        patience: int = typer.Option(10, help="Stop after this many epochs without a lower held-out loss."),
        seed: int = typer.Option(0, help="Seed of the labelled subset, the held-out part, the new layer and the augmentation."),
        split_seed: int = typer.Option(0, help="Seed of the --test-fraction split."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | mps (auto: cuda, else mps, else cpu)."),
        out: Optional[Path] = typer.Option(None, help="Output folder. [default: finetune-TAG in the run directory]"),
        workers: str = typer.Option("auto", help="Decoding threads: auto (one per available core, at most 8) or a number."),
        cache_dir: str = typer.Option("auto", help="Decoded-image cache: auto (EDGESSL_CACHE_DIR, else ~/.cache/edgessl), a folder, or none."),
        threads: str = typer.Option("auto", help="CPU threads: auto or a number (see `edgessl pretrain --help`)."),
        quiet: bool = typer.Option(False, "--quiet", help="No log lines."),
    ):
        api.finetune(
            run_dir, train, test, test_fraction, labels_per_class, epochs, freeze_backbone, console=console,
            batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale, weight_decay=weight_decay,
            label_smoothing=label_smoothing, val_fraction=val_fraction, patience=patience, seed=seed,
            split_seed=split_seed, device=device, out=out, workers=workers, cache_dir=cache_dir, quiet=quiet, init=init, threads=threads,
        )
