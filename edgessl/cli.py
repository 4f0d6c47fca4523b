"""The `edgessl` command line. Each command parses options and calls the Python API, nothing else."""

from __future__ import annotations

import functools
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.console import Console

from edgessl._version import __version__
from edgessl.errors import Interrupted, TrainingDiverged, UserError


def _flag_type(original):
    """typer >= 0.2x prints `<bool>` after flags that take no value (--quiet <bool>); show nothing there."""

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and not self.metavar else original(self, ctx)

    return display_type_rich


typer.core.TyperOption.display_type_rich = _flag_type(typer.core.TyperOption.display_type_rich)


def make_console(stderr: bool = False) -> Console:
    """A rich console; when the output is not a terminal (a log file, a pipe) lines are not wrapped at 80
    columns, so grep finds whole lines."""
    con = Console(stderr=stderr)
    if con.is_terminal or os.environ.get("COLUMNS"):
        return con
    return Console(stderr=stderr, soft_wrap=True, width=max(con.width, 200))


app = typer.Typer(
    name="edgessl",
    help="Single-branch self-supervised pretraining of small timm encoders for edge devices.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = make_console()
err_console = make_console(stderr=True)


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


def friendly(fn):
    """Run a command: user errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _error(f"[red]error:[/red] {e}")
            raise typer.Exit(e.exit_code) from None
        except TrainingDiverged as e:
            _error(f"[red]error:[/red] {e}")
            raise typer.Exit(e.exit_code) from None
        except Interrupted as e:
            _error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _error("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _error(message: str) -> None:
    """One line on stderr. Under torchrun every process usually fails alike: the first process of each node prints at
    once; the others wait 3 s (torchrun normally stops them in between, so the line shows once per node) and
    then print theirs too, tagged with the rank, so an error of one process alone is never lost."""
    rank, local_rank = os.environ.get("RANK", "0") or "0", os.environ.get("LOCAL_RANK", "0") or "0"
    if local_rank != "0":
        time.sleep(3.0)
    tag = "" if rank == "0" else rf"\[rank {rank}] "
    err_console.print(f"{tag}{message}", highlight=False, soft_wrap=True)


PRETRAIN_HELP = """Pretrain an encoder on a folder of unlabeled images (single crop, one network branch).

**Examples**

    edgessl pretrain --backbone mobilenetv3_small                      # bundled demo images, ~1 min on 2 CPU cores
    edgessl pretrain --backbone mobilenetv3_small --data ./my_images --epochs 50
    edgessl pretrain --recipe resnet18_cifar --data ./cifar_train --val ./cifar_test
    edgessl pretrain --resume runs/mobilenetv3_small-20261123-120000
    torchrun --nproc-per-node 4 -m edgessl pretrain --data ./my_images --batch-size 512 --sync-bn   # 4 GPUs, DDP

Writes config.yaml, metrics.jsonl, checkpoint.pt, encoder.safetensors + encoder.json and curves.png to the run
directory (--out, default runs/BACKBONE-TIME).
"""


@app.command(help=PRETRAIN_HELP)
@friendly
def pretrain(
    backbone: Optional[str] = typer.Option(None, help="timm model name or alias (mobilenetv3_small, mobilenetv3_large, resnet18, ...). [default: mobilenetv3_small]"),
    data: Optional[Path] = typer.Option(None, help="Folder of images, searched recursively. [default: the bundled demo images]"),
    out: Optional[Path] = typer.Option(None, help="Run directory. [default: runs/BACKBONE-TIME]"),
    recipe: Optional[str] = typer.Option(None, help="Recipe name (recipes/*.yaml) or YAML path; flags override it."),
    config: Optional[Path] = typer.Option(None, help="A resolved config.yaml to reload; flags override it."),
    epochs: Optional[int] = typer.Option(None, help="Epochs. [default: 20]"),
    batch_size: Optional[int] = typer.Option(None, help="Images per step; under torchrun the global batch over all processes. [default: 128]"),
    image_size: Optional[int] = typer.Option(None, help="Training resolution in pixels. [default: 64]"),
    lr: Optional[float] = typer.Option(None, help="Learning rate per 256 images (scaled by batch-size/256). [default: 0.2]"),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adamw | lars. [default: sgd]"),
    weight_decay: Optional[float] = typer.Option(None, help="[default: 5e-4]"),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warm-up before the cosine decay. [default: 1]"),
    seed: Optional[int] = typer.Option(None, help="[default: 0]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda. [default: auto]"),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (auto: bf16 or fp16 on GPU, fp32 on CPU)."),
    method: Optional[str] = typer.Option(None, help="edgessl (the full method) | npid (random init, momentum update, tau 0.1, no L_sd)."),
    bank_init: Optional[str] = typer.Option(None, help="forward (one pass of the untrained network) | random. [default: forward]"),
    bank_update: Optional[str] = typer.Option(None, help="grad (every column in use moves) | momentum (NPID). [default: grad]"),
    bank_lr: Optional[float] = typer.Option(None, help="eta of the gradient bank update. [default: 1.0]"),
    bank_momentum: Optional[float] = typer.Option(None, help="m of the momentum bank update. [default: 0.5]"),
    sd_weight: Optional[float] = typer.Option(None, help="lambda of the self-distillation loss; 0 turns it off. [default: 5]"),
    sd_temperature: Optional[float] = typer.Option(None, help="tau_sd of the self-distillation loss. [default: 1.0]"),
    temperature: Optional[float] = typer.Option(None, help="tau of the instance loss. [default: 0.1]"),
    negatives: Optional[int] = typer.Option(None, help="Whole bank up to batch rows + this many rows, else batch rows + this many distinct sampled rows. [default: 16384]"),
    cutmix: Optional[float] = typer.Option(None, help="CutMix Beta(alpha, alpha) inside the batch; 0 = off. [default: 0]"),
    blur: Optional[float] = typer.Option(None, help="Probability of a Gaussian blur. [default: 0]"),
    head: Optional[str] = typer.Option(None, help="Projection head: linear | mlp. [default: linear]"),
    head_hidden: Optional[int] = typer.Option(None, help="Hidden units of the MLP head. [default: 2048]"),
    feature_dim: Optional[int] = typer.Option(None, help="Output dimension d of the head (bank width). [default: 128]"),
    widths: Optional[str] = typer.Option(None, help="Train one weight-sharing network at several widths, e.g. 1.0,0.75,0.5,0.25 (SlimCLR); pick one later with `edgessl slim`."),
    slow_start: Optional[float] = typer.Option(None, help="With --widths: fraction of the epochs trained at full width only before the sub-widths join. [default: 0.5]"),
    width_distill: Optional[float] = typer.Option(None, help="With --widths: weight of each sub-width's distillation from the full width (0 = off). [default: 0.5]"),
    no_width_reweight: Optional[bool] = typer.Option(None, "--no-width-reweight", help="With --widths: every width's loss weighs 1 (default: the full width weighs 1 + sum of the sub-widths)."),
    small_input: Optional[str] = typer.Option(None, help="auto | on | off: stride-1 stem for small images (auto: on at <= 32 px)."),
    val: Optional[Path] = typer.Option(None, help="Labelled folder (one subfolder per class) for the online kNN monitor."),
    labels_from_folders: Optional[bool] = typer.Option(None, "--labels-from-folders", help="Use --data's subfolders as labels for the kNN monitor."),
    eval_every: Optional[int] = typer.Option(None, help="kNN monitor every N epochs (0 = off). [default: 1]"),
    cache_mb: Optional[float] = typer.Option(None, help="Decoded-image cache bound in MiB; above it images stream from disk. [default: 4096]"),
    workers: Optional[int] = typer.Option(None, help="Decoding threads. [default: 2]"),
    threads: Optional[str] = typer.Option(None, help="CPU threads for the network: auto (all cores when the machine is idle, fewer when other jobs keep them busy) or a number. [default: auto]"),
    resume: Optional[Path] = typer.Option(None, help="Continue a run directory after its last completed epoch (on the same files; --data may point at a moved copy)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Start a new run in a non-empty --out: the old contents are moved aside to OUT.old-TIME (nothing is deleted)."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic", help="Deterministic algorithms (bit-exact resume on CPU)."),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn", help="Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm). No effect on one process."),
    quiet: Optional[bool] = typer.Option(None, "--quiet", help="No progress bar; log lines only."),
):
    from edgessl import api

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
    from edgessl.config import list_recipes, load_recipe, recipes_dir

    for name in list_recipes():
        import yaml

        desc = (yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()) or {}).get("description", "")
        load_recipe(name)
        console.print(f"[bold]{name}[/bold]  {desc}", highlight=False)


from edgessl.commands import deploy as _deploy_commands  # noqa: E402
from edgessl.commands import evaluate as _evaluate_commands  # noqa: E402
from edgessl.commands import prune as _prune_commands  # noqa: E402
from edgessl.commands import slim as _slim_commands  # noqa: E402

_evaluate_commands.register(app)
_deploy_commands.register(app)
_slim_commands.register(app)
_prune_commands.register(app)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
