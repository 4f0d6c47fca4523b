"""`edgessl eval` and `edgessl finetune`, registered on the main typer app by `register(app)`.

Each command parses options and calls the Python API (edgessl.api), nothing else."""

from __future__ import annotations

from pathlib import Path

from edgessl.commands.common import api, argument, console, friendly, given, options_command
from edgessl.options import EvalOptions, FinetuneOptions

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


RUN_DIR = "Run directory of `edgessl pretrain` (encoder.safetensors + encoder.json)."


def eval_cmd(run_dir: Path, **values) -> None:
    api.evaluate_encoder(run_dir, console=console, **given(values))


def finetune_cmd(run_dir: Path, **values) -> None:
    api.finetune(run_dir, console=console, **given(values))


def register(app) -> None:
    """Add `eval` and `finetune` to the typer app."""
    lead = [argument("run_dir", Path, RUN_DIR)]
    app.command("eval", help=EVAL_HELP)(friendly(options_command(eval_cmd, EvalOptions, leading=lead)))
    app.command("finetune", help=FINETUNE_HELP)(friendly(options_command(finetune_cmd, FinetuneOptions,
                                                                         leading=lead)))
