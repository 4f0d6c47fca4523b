"""The decoded-image cache: every image of a folder decoded once (edgessl.data.folder's rules) into one uint8 file
that numpy memory-maps, plus a JSON index. Every command that reads the same folder at the same size reuses it.

Layout, under the cache folder (--cache-dir; default $EDGESSL_CACHE_DIR, else $XDG_CACHE_HOME/edgessl, else
~/.cache/edgessl), in its `images/` subfolder:

    <folder name>-<size>px-<key>.json       the index: format version, decode policy, size, folder, the file list
                                            (relative path, bytes, mtime) of every row, skipped files with reasons,
                                            the folder signature's sha256 and the name of the data file
    <folder name>-<size>px-<key>.<id>.u8    rows x 3 x size x size uint8 (C, H, W), row i = the i-th good file
    <folder name>-<size>px-<key>.lock       taken while one process builds (a second one waits, then reuses)
    <folder name>-<size>px-<key>.readers    held (shared) by every process that reads the entry: never evicted then
    <folder name>-<size>px-<key>.used       its modification time: the entry's last read (edgessl.data.budget)

key = sha256 of (absolute folder path, size, decode policy, format version). The index's signature says whether the
folder still holds the same files: a changed folder updates the entry, decoding only files that are new or changed.
Writes are atomic: the data file is written under a temporary name, fsynced and renamed, then the index is renamed
over the old one, so a reader sees the old entry or the new one, never half of one; a killed build leaves no index.
A data file of the wrong length (truncated) or an unreadable index is reported and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgessl.data.budget import damage, last_used, size_text, staleness, take, touch_used
from edgessl.errors import UserError
from edgessl.fileio import atomic_write_text

CACHE_VERSION = 1
# What a row holds: change it (or CACHE_VERSION) whenever edgessl.data.folder.decode_image changes.
POLICY = "exif transpose; alpha/palette on white; 8-bit RGB; shorter side to size (bicubic); center crop; CHW uint8"
ENV = "EDGESSL_CACHE_DIR"
SUBFOLDER = "images"
TEACHERS = "teachers"  # beside SUBFOLDER: --teacher features of a folder (<key>.safetensors + .json, train/teacher.py)
CHUNK = 256  # images decoded per round: bounds the decoded images held in RAM while the file is written


def default_cache_dir() -> Path:
    """$EDGESSL_CACHE_DIR, else $XDG_CACHE_HOME/edgessl, else ~/.cache/edgessl."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgessl"


def cache_folder(option: str | Path | None = "auto") -> Path | None:
    """Where decoded images go: option "auto" (or None) -> default_cache_dir(); "none" -> None (no disk cache)."""
    if option is None or str(option) == "auto":
        return default_cache_dir() / SUBFOLDER
    if str(option).lower() == "none":
        return None
    return Path(option).expanduser() / SUBFOLDER


def entry_name(root: Path, size: int) -> str:
    """'<folder name>-<size>px-<16 hex>': one entry per (folder, size, decode policy, format). The folder is keyed by
    its real path, so a link to a folder (or the folder through a linked parent) shares the folder's entry."""
    real = os.path.realpath(root)
    key = json.dumps([real, size, POLICY, CACHE_VERSION])
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(real).name)[:40] or "root"
    return f"{safe}-{size}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@dataclass
class Cached:
    """A valid entry: rows (N, 3, S, S) uint8 (memory-mapped, copy-on-write), its good files and skipped files."""
    rows: np.ndarray
    files: list[list[Any]]  # [relative path, bytes, mtime] per row
    skipped: list[list[Any]]  # [relative path, bytes, mtime, reason]
    data: Path
    decoded: int = 0  # images decoded to make it (0: reused as it was)


def read_entry(folder: Path, name: str, size: int, warn: Callable[[str], None]) -> tuple[dict | None, Path | None]:
    """(index, data file) of an entry when both are whole; (None, None) when there is none or it is damaged
    (damage is reported through warn)."""
    index_path = folder / f"{name}.json"
    if not index_path.exists():
        return None, None
    try:
        index = json.loads(index_path.read_text())
        data = folder / index["data"]
        ok = index["version"] == CACHE_VERSION and index["policy"] == POLICY and index["size"] == size
        damaged = damage(index, folder) if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        warn(f"the image cache index {index_path} is unreadable; rebuilding it.")
        return None, None
    if not ok:
        return None, None
    if damaged:
        warn(f"the image cache file {data}: {damaged}; rebuilding it.")
        return None, None
    return index, data


def map_rows(data: Path, count: int, size: int) -> np.ndarray:
    """The data file as a (count, 3, size, size) uint8 array: memory-mapped copy-on-write (writable for torch,
    never written back)."""
    if count == 0:
        return np.zeros((0, 3, size, size), np.uint8)
    return np.memmap(data, dtype=np.uint8, mode="c", shape=(count, 3, size, size))


def open_cache(folder: Path, root: Path, size: int, signature: dict[str, Any],
               warn: Callable[[str], None]) -> Cached | None:
    """The entry of `root` at `size` when it holds exactly the files of `signature`, else None. A hit is recorded
    as a use (the budget evicts the least recently used entries first)."""
    name = entry_name(root, size)
    index, data = read_entry(folder, name, size, warn)
    if index is None or index["signature"] != signature["sha256"]:
        return None
    touch_used(folder, name)
    return Cached(map_rows(data, len(index["files"]), size), index["files"], index["skipped"], data)


@contextlib.contextmanager
def build_lock(folder: Path, name: str) -> Iterator[None]:
    """One builder per entry at a time (an exclusive flock, released when the process ends, also when killed)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent builders still publish atomically
        yield
        return
    with open(folder / f"{name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_space(folder: Path, needed: int) -> None:
    """UserError before any decoding when the cache's disk lacks `needed` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"The decoded-image cache needs {needed:,} bytes ({needed / 2**30:.2f} GiB) in {folder}, which has "
            f"{free:,} free. Pass --cache-dir <folder on a larger disk>, or --cache-dir none to decode on the fly."
        )


def load_or_build(folder: Path, root: Path, size: int, paths: Sequence[Path], signature: dict[str, Any],
                  decode: Callable[[Path], tuple[np.ndarray | None, str | None]], workers: int,
                  warn: Callable[[str], None], progress: Callable[[int, int], None] | None = None,
                  budget: int | None = None) -> Cached:
    """The valid entry of `root` (signature: folder_signature(root, paths)), built or updated when needed; before a
    build, entries are evicted to keep the cache within `budget` bytes (make_room; None: no budget).

    decode(path) -> ((S, S, 3) uint8 or None, reason or None). Files whose path, bytes and mtime match the old
    entry keep their rows (and skipped files their reasons) without decoding."""
    hit = open_cache(folder, root, size, signature, warn)
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    name = entry_name(root, size)
    with build_lock(folder, name):
        hit = open_cache(folder, root, size, signature, lambda _: None)  # another process may have built it
        if hit is not None:
            return hit
        _remove_stale(folder, name)
        index, data = read_entry(folder, name, size, lambda _: None)
        old = Cached(map_rows(data, len(index["files"]), size), index["files"], index["skipped"], data) \
            if index is not None else None
        needed = len(paths) * 3 * size * size
        make_room(folder, needed, budget, name, warn)
        check_space(folder, needed + (0 if old is None else -old.data.stat().st_size))
        built = _build(folder, name, root, size, paths, signature, decode, workers, old, progress)
        touch_used(folder, name)
        return built


def _build(folder, name, root, size, paths, signature, decode, workers, old, progress) -> Cached:
    """Write the data file (temporary name, fsync, rename), then the index; remove the old data file."""
    files, skipped, decoded = [], [], 0
    reuse = {} if old is None else {tuple(f): ("row", i) for i, f in enumerate(old.files)}
    if old is not None:
        reuse.update({tuple(s[:3]): ("skip", s[3]) for s in old.skipped})
    listed = signature["files"]
    data = folder / f"{name}.{secrets.token_hex(4)}.u8"
    tmp = folder / f".{data.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh, ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(paths), CHUNK):
                todo = [i for i in range(start, min(start + CHUNK, len(paths))) if tuple(listed[i]) not in reuse]
                fresh = dict(zip(todo, pool.map(lambda i: decode(paths[i]), todo), strict=True))
                decoded += len(todo)
                for i in range(start, min(start + CHUNK, len(paths))):
                    kind, value = reuse.get(tuple(listed[i]), (None, None))
                    if kind == "row":
                        row = old.rows[value]
                    elif kind == "skip":
                        row, why = None, value
                    else:
                        arr, why = fresh[i]
                        row = None if arr is None else arr.transpose(2, 0, 1)
                    if row is None:
                        skipped.append([*listed[i], why])
                    else:
                        fh.write(np.ascontiguousarray(row).tobytes())
                        files.append(list(listed[i]))
                    if progress is not None:
                        progress(i + 1, len(paths))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    index = {"version": CACHE_VERSION, "policy": POLICY, "size": size, "root": os.path.abspath(root),
             "signature": signature["sha256"], "data": data.name, "files": files, "skipped": skipped,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(folder / f"{name}.json", json.dumps(index) + "\n")
    for other in folder.glob(f"{name}.*.u8"):
        if other != data:
            other.unlink(missing_ok=True)  # an open memory map of it stays valid until closed
    return Cached(map_rows(data, len(files), size), files, skipped, data, decoded)


def _remove_stale(folder: Path, name: str) -> None:
    """Temporary files of builds that were killed (the caller holds the build lock, so none is running)."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def orphan_temps(folder: Path) -> list[Path]:
    """Temporary data files of builds whose process is gone (killed mid-build: `.<entry>.<id>.u8.<pid>.tmp`), which
    only a rebuild of the same entry had removed."""
    found = []
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        pid = tmp.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(tmp)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): alive
        return True
    return True


# ---------------------------------------------------------------- the budget
def make_room(folder: Path, incoming: int, budget: int | None, keep: str, say: Callable[[str], None]) -> list[str]:
    """Evict entries until the cache plus `incoming` bytes fits `budget`: stale entries first (their folder gone or
    changed), then the least recently used; never `keep` (the entry about to be built) nor an entry another
    process reads (edgessl.data.budget.hold). One line through say() per eviction, and one when entries in use
    keep the cache over budget. Returns the evicted names. An entry larger than the whole budget evicts nothing
    (only the auto budget gets here: load_image_folder keeps a budget the user set by not caching such a folder)."""
    if budget is None:
        return []
    if incoming > budget:  # evicting every other entry would not make room for it
        say(f"cache: this folder needs {size_text(incoming)}, more than the whole {size_text(budget)} budget (auto): "
            "cached anyway, nothing evicted for it (--cache-max sets a budget that is kept).")
        return []
    entries = [e for e in list_entries(folder) if e["name"] != keep]
    total = sum(e["bytes"] for e in entries)
    if total + incoming <= budget:
        return []
    for e in entries:
        e["stale"] = staleness(e, folder)
    order = sorted(entries, key=lambda e: (e["stale"] is None, last_used(folder, e["name"])))
    evicted, busy = [], []
    for e in order:
        if total + incoming <= budget:
            break
        lock = take(folder, e["name"])
        if lock is None:  # a running process reads it
            busy.append(e)
            continue
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(last_used(folder, e["name"])))  # before its files go
        with lock:
            remove_entry(folder, e["name"])
        total -= e["bytes"]
        evicted.append(e["name"])
        why = f"stale: {e['stale']}" if e["stale"] else f"least recently used, last on {used}"
        say(f"cache: evicted {e['root']} at {e['size']} px ({size_text(e['bytes'])}; {why}) to stay within "
            f"the {size_text(budget)} budget.")
    if total + incoming > budget and busy:
        one = len(busy) == 1
        say(f"cache: {size_text(total + incoming)} after this folder, over the {size_text(budget)} budget: "
            f"{len(busy)} {'entry' if one else 'entries'} in use by another process "
            f"({', '.join(str(e['root']) for e in busy[:2])}{', ...' if len(busy) > 2 else ''}) cannot be "
            f"evicted now; the next run that needs room evicts {'it' if one else 'them'} once free.")
    return evicted


def remove_entry(folder: Path, name: str) -> int:
    """Delete every file of entry `name`; returns the bytes freed."""
    freed = 0
    for path in list(folder.glob(f"{name}.*")) + list(folder.glob(f".{name}.*")):
        if path.suffix not in (".lock", ".readers"):
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    return freed


# ---------------------------------------------------------------- edgessl cache list | clear
def list_entries(folder: Path) -> list[dict[str, Any]]:
    """One dict per entry: name, root, size, images, skipped, bytes (data + index), created."""
    entries = []
    for index_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            index = json.loads(index_path.read_text())
            data = folder / index["data"]
            nbytes = index_path.stat().st_size + (data.stat().st_size if data.exists() else 0)
            entries.append({"name": index_path.stem, "root": index["root"], "size": index["size"],
                            "images": len(index["files"]), "skipped": len(index["skipped"]), "bytes": nbytes,
                            "created": index.get("created", "")})
        except (OSError, ValueError, KeyError, TypeError):
            entries.append({"name": index_path.stem, "root": "(unreadable index)", "size": 0, "images": 0,
                            "skipped": 0, "bytes": index_path.stat().st_size, "created": ""})
    return entries


def teacher_entries(folder: Path) -> list[dict[str, Any]]:
    """The --teacher features kept beside the decoded images (folder.parent / TEACHERS): one dict per entry with
    list_entries' keys (root: the image folder, size: the teacher's input size) and "teacher" (its timm name)."""
    tdir = folder.parent / TEACHERS
    entries = []
    for record_path in sorted(tdir.glob("*.json")) if tdir.is_dir() else []:
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        data = record_path.with_suffix(".safetensors")
        nbytes = record_path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        entries.append({"name": record_path.stem, "root": record.get("data_root", "(unreadable record)"),
                         "size": record.get("image_size", 0), "images": record.get("rows", 0), "skipped": 0,
                         "bytes": nbytes, "created": record.get("created", ""),
                         "teacher": record.get("timm_name", "?")})
    return entries


def clear_entries(folder: Path, root: str | Path | None = None) -> tuple[int, int]:
    """Remove every entry (or only those of folder `root` and the folders inside it), leftover temporary files, and
    the --teacher features of the same folders. -> (files, bytes) freed. Only files named like cache files are
    touched."""
    want = None if root is None else os.path.abspath(os.path.expanduser(str(root)))
    count, freed = _clear_teachers(folder, want)
    if not folder.is_dir():
        return count, freed
    names = {e["name"] for e in list_entries(folder) if within(e["root"], want)}
    for path in folder.iterdir():
        stem = entry_of(path.name)  # '<folder name>-<size>px-<16 hex>', a '.' in the folder's name included
        if stem is not None and (stem in names or want is None):
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
            count += 1
    return count, freed


def entry_of(file_name: str) -> str | None:
    """The entry name a cache file belongs to (its name up to '-<size>px-<16 hex>'), or None for any other file."""
    found = re.match(r"\.?(.+?-\d+px-[0-9a-f]{16})\.", file_name)
    return found.group(1) if found else None


def within(root: str, want: str | None) -> bool:
    """Whether an entry of image folder `root` (absolute) is folder `want` or inside it (None: every folder); either
    may be named through a link."""
    if want is None:
        return True
    root, want = os.path.realpath(root), os.path.realpath(want)
    return root == want or root.startswith(want.rstrip(os.sep) + os.sep)


def _clear_teachers(folder: Path, want: str | None) -> tuple[int, int]:
    names = {e["name"] for e in teacher_entries(folder) if within(e["root"], want)}
    count = freed = 0
    for name in names:
        for path in (folder.parent / TEACHERS).glob(f"{name}.*"):
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
            count += 1
    return count, freed
