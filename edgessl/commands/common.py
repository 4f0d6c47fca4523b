"""What every command shares: the consoles, the one-line error handling (`friendly`), and clean flag help."""

from __future__ import annotations

import functools
import os
import time

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

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


console = make_console()
err_console = make_console(stderr=True)


def friendly(fn):
    """Run a command: user errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _error(f"[red]error:[/red] {escape(str(e))}")  # a message's own brackets ([mlflow]) are text
            raise typer.Exit(e.exit_code) from None
        except TrainingDiverged as e:
            _error(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(e.exit_code) from None
        except Interrupted as e:
            _error(escape(str(e)))
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
