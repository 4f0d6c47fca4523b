"""`edgessl cache list|clear`: the decoded-image cache (edgessl.data.cache), registered by `register(app)`."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edgessl.commands.common import api, console, friendly, given, options_command
from edgessl.data.budget import size_text as _size
from edgessl.errors import UserError
from edgessl.options import CacheClearOptions, CacheOptions
from edgessl.rundir import plural

CACHE_HELP = """The decoded-image cache: every image folder decoded once at each size, reused by every command.

It lives in --cache-dir (default: $EDGESSL_CACHE_DIR, else $XDG_CACHE_HOME/edgessl or ~/.cache/edgessl). `list`
shows what is there, `clear` frees it (everything, or one image folder's entries and those of the folders inside
it); the next command that reads a cleared folder decodes it again.

**Examples**

    edgessl cache list
    edgessl cache clear ./my_images     # only this folder's decoded images
    edgessl cache clear                 # everything
"""


def list_cmd(**values) -> None:
    """Show every cached image folder: images, size, bytes on disk, last use, and whether it is stale."""
    options = given(values)
    folder, entries = api.cache_entries(**options)
    budget, how = api.cache_budget_of(**options)
    limit = f"budget {_size(budget)} ({how})" if budget is not None else how
    if not entries:
        where = f"The cache in {folder} is empty" if folder.is_dir() else f"No cache in {folder} (no such folder yet)"
        console.print(f"{where} ({limit}).", highlight=False)
        return
    table = Table(title=f"Decoded-image cache: {folder}")
    for col in ("folder", "size", "images", "skipped", "on disk", "last used", "state"):
        table.add_column(col, justify="right" if col in ("images", "skipped", "on disk") else "left")
    for e in entries:
        size = f"{e['size']} px" + (f" (--teacher {e['teacher']} features)" if "teacher" in e else "")
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e.get("last_used") else ""
        state = f"stale: {e['stale']}" if e.get("stale") else ""
        table.add_row(e["root"], size, str(e["images"]), str(e["skipped"]), _size(e["bytes"]), used, state)
    console.print(table)
    teachers = sum("teacher" in e for e in entries)
    stale = [e for e in entries if e.get("stale")]
    extra = f" and {plural(teachers, 'teacher bank')}" if teachers else ""
    images = [e for e in entries if "teacher" not in e and not e.get("orphan")]  # a folder at two sizes: 2 entries
    console.print(f"Total: {_size(sum(e['bytes'] for e in entries))} in "
                  f"{plural(len(images), 'entry', 'entries')} of {plural(len({e['root'] for e in images}), 'folder')}"
                  f"{extra}; {limit}. Free it with: edgessl cache clear", highlight=False)
    if stale:
        console.print(f"{plural(len(stale), 'stale entry', 'stale entries')} ({_size(sum(e['bytes'] for e in stale))}): "
                      "edgessl cache clear --stale frees them.", highlight=False)


def clear_cmd(folder: Optional[Path] = None, **values) -> None:  # noqa: UP045 - typer reads Optional
    """Delete cached decoded images (all, one image folder's, or the stale entries)."""
    options = given(values)
    if options.get("stale") and folder is not None:
        raise UserError("cache clear takes a FOLDER or --stale, not both.")
    files, freed = api.clear_cache(folder=folder, **options)
    where = f" from {api.cache_store(options.get('cache_dir', 'auto')).parent}"  # the whole cache had gone unnamed
    if options.get("stale"):
        console.print(f"Removed {plural(files, 'stale entry', 'stale entries')}{where} ({_size(freed)}).",
                      highlight=False)
        return
    if folder is not None and files == 0:
        console.print(f"Nothing is cached for {folder} or the folders inside it (edgessl cache list shows what is).",
                      highlight=False)
        return
    what = f" of {folder}" if folder is not None else ""
    console.print(f"Removed {plural(files, 'cache file')}{what}{where} ({_size(freed)}).", highlight=False)


def register(app) -> None:
    cache_app = typer.Typer(help=CACHE_HELP, no_args_is_help=True, rich_markup_mode="markdown")
    cache_app.command("list")(friendly(options_command(list_cmd, CacheOptions)))
    folder = inspect.Parameter("folder", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],  # noqa: UP045
                               default=typer.Argument(None, help="Only the entries of this image folder and of the folders inside it (default: all)."))
    cache_app.command("clear")(friendly(options_command(clear_cmd, CacheClearOptions, leading=[folder])))
    app.add_typer(cache_app, name="cache")
