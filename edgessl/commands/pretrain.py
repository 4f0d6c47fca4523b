"""`edgessl pretrain` and `edgessl recipes`, registered on the main typer app by `register(app)`. Every flag comes from
edgessl.config (PretrainControl, PretrainConfig); the command calls edgessl.api and prints what to run next."""

from __future__ import annotations

import shlex

import yaml

from edgessl.commands.common import api, console, first_process, friendly, given, options_command
from edgessl.config import PretrainConfig, PretrainControl, list_recipes, load_recipe, recipes_dir
from edgessl.options import names

PRETRAIN_HELP = """Pretrain an encoder on a folder of unlabeled images (single crop, one network branch).

**Examples**

    edgessl pretrain --backbone mobilenetv3_small                      # bundled demo images, ~80 s on 2 CPU cores
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


def pretrain(**values) -> None:
    control = {name: values.pop(name) for name in names(PretrainControl)}
    options = given(values)
    result = api.pretrain(recipe=control["recipe"], config=control["config"], resume=control["resume"],
                          console=console, overwrite=bool(control["overwrite"]), **options)
    if not options.get("quiet") and first_process():
        console.print(f"Run directory: {result.run_dir}", highlight=False)
        for line in next_commands(result):
            console.print(line, highlight=False, markup=False)


def next_commands(result) -> list[str]:
    """What to run after a pretraining, with the real run path (and data folder when it has class folders)."""
    run = shell_path(result.run_dir)
    train = shell_path(result.data) if result.labelled and result.data else "LABELLED_TRAIN --test LABELLED_TEST"
    split = " --test-fraction 0.2" if result.labelled and result.data else ""
    return [
        "Next:",
        f"  edgessl eval {run} --train {train}{split}   # few-label kNN + linear probe",
        f"  edgessl export {run}   # ONNX + parity check; then edgessl check {run}/export/encoder.onnx",
    ]


def shell_path(path) -> str:
    """A path as a shell argument: quoted, and './'-prefixed when it starts with '-' (else it reads as an option)."""
    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def recipes() -> None:
    """List the bundled recipes.

    **Example**: `edgessl recipes`"""
    for name in list_recipes():
        desc = (yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()) or {}).get("description", "")
        load_recipe(name)
        console.print(f"[bold]{name}[/bold]  {desc}", highlight=False)


def register(app) -> None:
    app.command("pretrain", help=PRETRAIN_HELP)(friendly(options_command(pretrain, PretrainControl, PretrainConfig)))
    app.command("recipes")(friendly(recipes))
