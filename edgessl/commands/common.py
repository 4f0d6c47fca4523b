"""What every command shares: the consoles, the one-line error handling (`friendly`), and clean flag help."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import signal
import threading
import time
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from edgessl.errors import Interrupted, Terminated, TrainingDiverged, UserError, stop_words
from edgessl.options import cli_type, flag_name, help_text, specs


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


class LazyApi:
    """edgessl.api, imported when a command runs: the API pulls in torch, timm and torchvision (5-15 s on 2 cores),
    which `--help`, a mistyped flag or `edgessl recipes` never need. The option classes come from edgessl.options."""

    def __getattr__(self, name: str):
        from edgessl import api as module

        return getattr(module, name)


api = LazyApi()
console = make_console()
err_console = make_console(stderr=True)


def friendly(fn):
    """Run a command: user errors become one line on stderr and exit code 2, never a traceback; Ctrl-C is exit 130
    and SIGTERM exit 143, each with its line (pretraining turns SIGTERM into a checkpointed stop of its own)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except UserError as e:
            _error(f"[red]error:[/red] {escape(str(e))}")  # a message's own brackets ([mlflow]) are text
            raise typer.Exit(e.exit_code) from None
        except TrainingDiverged as e:
            _error(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(e.exit_code) from None
        except Interrupted as e:
            if first_process():  # every process stops alike under torchrun: the line once, not once per process
                _error(escape(str(e)))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:  # eval, finetune, export had exited 143 on SIGTERM without a word
            code, what = stop_words(e)
            if first_process():
                _error(f"{what}.")
            raise typer.Exit(code) from None
        except RuntimeError as e:  # another process ended the run (its error is above): no traceback of gloo's
            if first_process() or not _peer_gone(e):
                raise
            _error("stopped: another process of this run ended it (its message is above).")
            raise typer.Exit(1) from None
        except OSError as e:  # the machine's, not the code's: a read-only or full disk, a folder it may not write
            if e.errno not in PLACE_ERRORS:
                raise
            _error(f"[red]error:[/red] {escape(place_error(e))}")
            raise typer.Exit(2) from None

    return wrapper


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises Terminated (a KeyboardInterrupt) while a command runs, in the main thread; the previous
    handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


PLACE_ERRORS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.ENOENT)  # EEXIST, ENOENT: a folder made where a broken link lies, or below /proc


def place_error(e: OSError) -> str:
    """One line for an OSError about a place on disk (PLACE_ERRORS): what the system said, where, and what to do."""
    where = f": '{e.filename}'" if e.filename else ""
    what = e.strerror or str(e)
    if e.filename and os.path.islink(e.filename) and not os.path.exists(e.filename):
        what = f"Broken symbolic link (to {os.readlink(e.filename)})"  # mkdir had said "File exists"
    return (f"{what}{where}. edgessl could not write or read there: choose another --out (or --cache-dir "
            "for the decoded-image cache; none keeps no cache), or check the path and its permissions.")


def first_process() -> bool:
    """Rank 0 under torchrun (or no torchrun)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _peer_gone(e: RuntimeError) -> bool:
    """A collective failed because another process closed its connection (gloo / NCCL after a peer's exit)."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was "
                                   "aborted", "Broken pipe"))


def _error(message: str) -> None:
    """One line on stderr. Under torchrun every process usually fails alike: the first process of each node prints at
    once; the others wait 3 s (torchrun normally stops them in between, so the line shows once per node) and
    then print theirs too, tagged with the rank, so an error of one process alone is never lost."""
    rank, local_rank = os.environ.get("RANK", "0") or "0", os.environ.get("LOCAL_RANK", "0") or "0"
    if local_rank != "0":
        time.sleep(3.0)
    tag = "" if rank == "0" else rf"\[rank {rank}] "
    err_console.print(f"{tag}{message}", highlight=False, soft_wrap=True)


def cli_parameters(cls: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per option of the options dataclass `cls` (edgessl.options), in field order: its flag, type
    and --help (with the default) from the one definition. Every flag defaults to None, "not given", so that a
    recipe, a config.yaml or the options class itself supplies the default."""
    params = []
    for f, spec in specs(cls):
        if not spec.cli or f.name in skip:
            continue
        kind = cli_type(cls, f.name)
        decls = [spec.flag] if spec.flag else ([flag_name(f.name)] if kind is bool else [])
        default = typer.Option(... if spec.required else None, *decls, help=help_text(f, spec), show_default=False)
        annotation = kind if spec.required else Optional[kind]  # noqa: UP045 - typer reads Optional
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return params


def options_command(run, *classes: type, leading: list[inspect.Parameter] = (), skip: tuple[str, ...] = ()):
    """A function typer can register: `leading` parameters (the command's arguments) then the options of each
    options dataclass in `classes`; it calls run(**values) with every parameter (None: an option not given)."""

    off = [f.name for cls in classes for f, spec in specs(cls) if spec.turns_off]

    def command(**values):
        for name in off:  # a "--no-x" switch given means x = False; not given, None (the default)
            values[name] = False if values.get(name) else None
        return run(**values)

    params = [*leading, *(p for cls in classes for p in cli_parameters(cls, skip))]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = run.__doc__
    return command


def argument(name: str, kind: type, help: str) -> inspect.Parameter:
    """A required positional argument of a generated command (e.g. the run directory)."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=typer.Argument(..., help=help),
                             annotation=kind)


def given(values: dict) -> dict:
    """The options given on the command line (None = not given)."""
    return {k: v for k, v in values.items() if v is not None}
