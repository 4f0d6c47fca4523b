"""The identity of an image folder: which files are its images (scan_images), their list with sizes and
modification times, and a hash of that list.

A run records the signature of the folder it trained on (data.json in the run directory); `--resume` compares it
with the folder it is given, so a different folder is refused even when it holds the same number of images, and a
moved copy of the same files (same relative paths, sizes and modification times, e.g. `mv`, `cp -a`, `rsync -a`)
is accepted. The decoded-image cache can key on the same hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from edgessl.errors import UserError

SIGNATURE_VERSION = 1


def folder_signature(root: str | Path, paths: Sequence[Path]) -> dict[str, Any]:
    """{"root", "files": [[relative path, size in bytes, mtime in whole seconds], ...], "sha256", "version"}.

    root: the folder; paths: the image files found in it (scan_images), in bank-row order. Whole seconds, because
    copies between file systems keep seconds but not always nanoseconds."""
    root = Path(os.path.abspath(os.path.expanduser(str(root))))  # links kept: a linked file is named as listed
    files = []
    for p in paths:
        st = listed_stat(p)
        files.append([Path(os.path.relpath(os.path.abspath(p), root)).as_posix(), st.st_size, int(st.st_mtime)])
    return {"version": SIGNATURE_VERSION, "root": str(root), "files": files, "sha256": files_hash(files)}


def listed_stat(path: str | Path) -> os.stat_result:
    """A listed file's stat: a linked file's size and time, a broken link's own (it is skipped when read)."""
    return os.stat(path) if os.path.exists(path) else os.lstat(path)


def files_hash(files: Sequence[Sequence[Any]]) -> str:
    """sha256 of the file list (paths, sizes and mtimes; not the root, so a moved copy hashes the same)."""
    return hashlib.sha256(json.dumps([list(f) for f in files], separators=(",", ":")).encode()).hexdigest()


def describe_difference(old: dict[str, Any], new: dict[str, Any], limit: int = 2) -> str:
    """One phrase saying how two signatures differ, e.g. "2 files added (a.jpg, b.jpg), 1 changed (c.jpg)";
    "" when they are the same."""
    if old["sha256"] == new["sha256"]:
        return ""
    before = {f[0]: tuple(f[1:]) for f in old["files"]}
    after = {f[0]: tuple(f[1:]) for f in new["files"]}
    groups = (
        ("added", sorted(set(after) - set(before))),
        ("removed", sorted(set(before) - set(after))),
        ("changed", sorted(k for k in set(before) & set(after) if before[k] != after[k])),
    )
    parts = []
    for what, names in groups:
        if names:
            shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
            parts.append(f"{len(names)} file{'s' if len(names) != 1 else ''} {what} ({shown})")
    changed = groups[2][1]
    if len(parts) == 1 and changed and all(before[k][0] == after[k][0] for k in changed):
        parts[0] += (": the same sizes, other modification times (a copy that did not keep them, `cp -r` rather "
                     "than `cp -a`?)")
    return ", ".join(parts) or "the files are the same but in another order"


def image_extensions() -> set[str]:
    """Lower-case file extensions Pillow can open (e.g. '.jpg', '.png', '.webp')."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def check_folder(root: str | Path, what: str = "--data") -> Path:
    """A folder that exists, or UserError saying what is wrong."""
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"{what} '{root}' does not exist. Pass a folder of images.")
    if not path.is_dir():
        raise UserError(f"{what} '{root}' is a file, not a folder. Pass the folder that contains the images.")
    return path


def scan_images(root: str | Path, what: str = "--data") -> list[Path]:
    """All files below `root` (recursively, hidden files and folders skipped) whose extension Pillow knows,
    sorted by path so that row i of the memory bank is always the same image. Linked folders are followed, each
    real folder once: a link back up the tree (a loop) or a second link to a folder already seen adds nothing (a
    loop had repeated every image ~40 times, until the system refused the path)."""
    root = check_folder(root, what)
    exts = image_extensions()
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                found.append(Path(dirpath) / name)
    return sorted(found)
