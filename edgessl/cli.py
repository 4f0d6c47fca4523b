"""The `edgessl` command line: the typer app and one module per command group (edgessl.commands). Every command
parses options generated from their one definition (edgessl.config, edgessl.options) and calls edgessl.api,
nothing else."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from edgessl._version import __version__
from edgessl.commands import cache, deploy, embed, evaluate, pretrain, prune, slim
from edgessl.commands.common import first_process


class OneLineErrors(TyperGroup):
    """typer's group with usage errors (an unknown or mistyped flag, a missing argument, a bad value) printed as every
    other edgessl error is: one line on stderr, `error: ...`, exit code 2, where typer draws a box under two lines of
    usage. No arguments at all still prints the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as e:  # click's exceptions, by what they offer: typer 0.29 vendors its own click
            if type(e).__name__ == "Abort":
                print("Aborted.", file=sys.stderr)
                sys.exit(1)
            if not (callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)):
                raise
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
                print(ctx.get_help())
            else:
                message = e.format_message().rstrip()
                message += "" if message.endswith((".", "!", "?")) else "."
                hint = f" See '{ctx.command_path} --help'." if ctx is not None else ""
                if first_process():  # under torchrun every process parses alike: said once
                    print(f"error: {message}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
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
