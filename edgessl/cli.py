"""The `edgessl` command line. Each command parses options and calls the Python API, nothing else."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from edgessl import api
from edgessl._version import __version__
from edgessl.commands import cache as _cache_commands
from edgessl.commands import deploy as _deploy_commands
from edgessl.commands import embed as _embed_commands
from edgessl.commands import evaluate as _evaluate_commands
from edgessl.commands import prune as _prune_commands
from edgessl.commands import slim as _slim_commands
from edgessl.commands.common import console, err_console, friendly, make_console  # noqa: F401 (re-exported)
from edgessl.config import flag_help, list_recipes, load_recipe, recipes_dir

app = typer.Typer(
    name="edgessl",
    help="Single-branch self-supervised pretraining of small timm encoders for edge devices.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        print(f"edgessl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
):
    """Single-branch self-supervised pretraining of small timm encoders for edge devices."""


PRETRAIN_HELP = """Pretrain an encoder on a folder of unlabeled images (single crop, one network branch).

**Examples**

    edgessl pretrain --backbone mobilenetv3_small                      # bundled demo images, ~1 min on 2 CPU cores
    edgessl pretrain --backbone mobilenetv3_small --data ./my_images --epochs 50
    edgessl pretrain --recipe resnet18_cifar --data ./cifar_train --val ./cifar_test
    edgessl pretrain --resume runs/mobilenetv3_small-20261123-120000
    torchrun --nproc-per-node 4 -m edgessl pretrain --data ./my_images --batch-size 512 --sync-bn   # 4 GPUs, DDP
    edgessl pretrain --data ./my_images --logger tensorboard,mlflow   # also log to TensorBoard and MLflow
    edgessl pretrain --data ./my_images --device mps                 # Apple silicon GPU (auto picks it too)
    edgessl pretrain --data ./my_images --teacher runs/big_resnet     # distil a teacher run once over the images

Writes config.yaml, metrics.jsonl, checkpoint.pt, encoder.safetensors + encoder.json and curves.png to the run
directory (--out, default runs/BACKBONE-TIME).
"""


@app.command(help=PRETRAIN_HELP)
@friendly
def pretrain(
    backbone: Optional[str] = typer.Option(None, help=flag_help("backbone")),
    init: Optional[str] = typer.Option(None, help=flag_help("init")),
    data: Optional[Path] = typer.Option(None, help=flag_help("data")),
    out: Optional[Path] = typer.Option(None, help=flag_help("out")),
    recipe: Optional[str] = typer.Option(None, help="Recipe name (recipes/*.yaml) or YAML path; flags override it."),
    config: Optional[Path] = typer.Option(None, help="A resolved config.yaml to reload; flags override it."),
    epochs: Optional[int] = typer.Option(None, help=flag_help("epochs")),
    batch_size: Optional[int] = typer.Option(None, help=flag_help("batch_size")),
    image_size: Optional[int] = typer.Option(None, help=flag_help("image_size")),
    lr: Optional[float] = typer.Option(None, help=flag_help("lr")),
    optimizer: Optional[str] = typer.Option(None, help=flag_help("optimizer")),
    weight_decay: Optional[float] = typer.Option(None, help=flag_help("weight_decay")),
    warmup_epochs: Optional[float] = typer.Option(None, help=flag_help("warmup_epochs")),
    seed: Optional[int] = typer.Option(None, help=flag_help("seed")),
    device: Optional[str] = typer.Option(None, help=flag_help("device")),
    precision: Optional[str] = typer.Option(None, help=flag_help("precision")),
    method: Optional[str] = typer.Option(None, help=flag_help("method")),
    bank_init: Optional[str] = typer.Option(None, help=flag_help("bank_init")),
    bank_update: Optional[str] = typer.Option(None, help=flag_help("bank_update")),
    bank_lr: Optional[float] = typer.Option(None, help=flag_help("bank_lr")),
    bank_momentum: Optional[float] = typer.Option(None, help=flag_help("bank_momentum")),
    sd_weight: Optional[float] = typer.Option(None, help=flag_help("sd_weight")),
    sd_temperature: Optional[float] = typer.Option(None, help=flag_help("sd_temperature")),
    temperature: Optional[float] = typer.Option(None, help=flag_help("temperature")),
    negatives: Optional[int] = typer.Option(None, help=flag_help("negatives")),
    cutmix: Optional[float] = typer.Option(None, help=flag_help("cutmix")),
    cutmix_lam: Optional[str] = typer.Option(None, help=flag_help("cutmix_lam")),
    blur: Optional[float] = typer.Option(None, help=flag_help("blur")),
    head: Optional[str] = typer.Option(None, help=flag_help("head")),
    head_hidden: Optional[int] = typer.Option(None, help=flag_help("head_hidden")),
    feature_dim: Optional[int] = typer.Option(None, help=flag_help("feature_dim")),
    widths: Optional[str] = typer.Option(None, help=flag_help("widths")),
    slow_start: Optional[float] = typer.Option(None, help=flag_help("slow_start")),
    width_distill: Optional[float] = typer.Option(None, help=flag_help("width_distill")),
    teacher: Optional[str] = typer.Option(None, help=flag_help("teacher")),
    teacher_backbone: Optional[str] = typer.Option(None, help=flag_help("teacher_backbone")),
    teacher_image_size: Optional[int] = typer.Option(None, help=flag_help("teacher_image_size")),
    teacher_weight: Optional[float] = typer.Option(None, help=flag_help("teacher_weight")),
    teacher_temperature: Optional[float] = typer.Option(None, help=flag_help("teacher_temperature")),
    teacher_predictor: Optional[float] = typer.Option(None, help=flag_help("teacher_predictor")),
    teacher_per_step: Optional[bool] = typer.Option(None, "--teacher-per-step", help=flag_help("teacher_per_step")),
    no_width_reweight: Optional[bool] = typer.Option(None, "--no-width-reweight", help="With --widths: every width's loss weighs 1 (default: the full width weighs 1 + sum of the sub-widths)."),
    small_input: Optional[str] = typer.Option(None, help=flag_help("small_input")),
    val: Optional[Path] = typer.Option(None, help=flag_help("val")),
    labels_from_folders: Optional[bool] = typer.Option(None, "--labels-from-folders", help=flag_help("labels_from_folders")),
    eval_every: Optional[int] = typer.Option(None, help=flag_help("eval_every")),
    cache_mb: Optional[float] = typer.Option(None, help=flag_help("cache_mb")),
    cache_dir: Optional[str] = typer.Option(None, help=flag_help("cache_dir")),
    workers: Optional[str] = typer.Option(None, help=flag_help("workers")),
    monitor_queries: Optional[int] = typer.Option(None, help=flag_help("monitor_queries")),
    threads: Optional[str] = typer.Option(None, help=flag_help("threads")),
    logger: Optional[str] = typer.Option(None, help=flag_help("logger")),
    resume: Optional[Path] = typer.Option(None, help="Continue a run directory after its last completed epoch (on the same files; --data may point at a moved copy)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Start a new run in a non-empty --out: the old contents are moved aside to OUT.old-TIME (nothing is deleted)."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic", help=flag_help("deterministic")),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn", help=flag_help("sync_bn")),
    quiet: Optional[bool] = typer.Option(None, "--quiet", help=flag_help("quiet")),
):
    options = {k: v for k, v in locals().items() if k not in ("recipe", "config", "resume", "api", "overwrite")}
    options["width_reweight"] = False if options.pop("no_width_reweight") else None
    for key in ("data", "out", "val"):
        if options[key] is not None:
            options[key] = str(options[key])
    result = api.pretrain(recipe=recipe, config=config, resume=resume, console=console, overwrite=bool(overwrite),
                          **options)
    if not quiet and os.environ.get("RANK", "0") in ("", "0"):
        console.print(f"Run directory: {result.run_dir}", highlight=False)
        for line in next_commands(result):
            console.print(line, highlight=False, markup=False)


def next_commands(result) -> list[str]:
    """What to run after a pretraining, with the real run path (and data folder when it has class folders)."""
    run = shlex.quote(str(result.run_dir))
    train = shlex.quote(str(result.data)) if result.labelled and result.data else "LABELLED_TRAIN --test LABELLED_TEST"
    split = " --test-fraction 0.2" if result.labelled and result.data else ""
    return [
        "Next:",
        f"  edgessl eval {run} --train {train}{split}   # few-label kNN + linear probe",
        f"  edgessl export {run}   # ONNX + parity check; then edgessl check {run}/export/encoder.onnx",
    ]


@app.command("recipes")
@friendly
def recipes_cmd():
    """List the bundled recipes.

    **Example**: `edgessl recipes`"""
    for name in list_recipes():
        desc = (yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()) or {}).get("description", "")
        load_recipe(name)
        console.print(f"[bold]{name}[/bold]  {desc}", highlight=False)


_evaluate_commands.register(app)
_deploy_commands.register(app)
_slim_commands.register(app)
_prune_commands.register(app)
_cache_commands.register(app)
_embed_commands.register(app)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
