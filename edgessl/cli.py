"""The `edgessl` command line: the typer app and one module per command group (edgessl.commands). Every command
parses options generated from their one definition (edgessl.config, edgessl.options) and calls edgessl.api,
nothing else."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from edgessl._version import __version__
from edgessl.commands import cache, deploy, embed, evaluate, pretrain, prune, slim

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


for _group in (pretrain, evaluate, deploy, slim, prune, cache, embed):
    _group.register(app)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
