"""The decoded-image cache's size budget: least recently used entries make room for a new one, stale entries (their
folder gone, or its files changed since) go first, and an entry a running process reads is never removed.

- Budget: --cache-max / EDGESSL_CACHE_MAX (a size such as 5G, 500M, 20GiB; none: no budget) or auto: the smaller of
  DEFAULT_CAP and DISK_SHARE of the disk the cache is on. 20 GiB holds about 140,000 images at 224 px, a month of
  experiments on one machine; 10 % keeps a small laptop disk from filling (a full disk fails the next run of any
  kind).
- Use time: each read of an entry sets the modification time of <name>.used (one utime call, no write).
- In use: a process that reads an entry holds a shared flock on <name>.readers for as long as it keeps the images;
  eviction takes the same lock exclusively without waiting, and skips the entry when it cannot.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgessl.data.signature import folder_signature, scan_images
from edgessl.errors import UserError
from edgessl.options import parse_size

ENV_MAX = "EDGESSL_CACHE_MAX"
DEFAULT_CAP = 20 * 2**30
DISK_SHARE = 0.10
def cache_budget(folder: Path, option: str | None = "auto") -> tuple[int | None, str]:
    """(budget in bytes or None, how it was chosen) for the cache in `folder`: the option, else EDGESSL_CACHE_MAX,
    else auto."""
    chosen = str(option or "auto")
    if chosen == "auto" and os.environ.get(ENV_MAX):
        chosen, source = os.environ[ENV_MAX], ENV_MAX
    else:
        source = "--cache-max"
    if chosen != "auto":
        size = parse_size(chosen, source)
        return size, f"{source} {chosen}" if size is not None else f"no budget ({source} none)"
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    disk = shutil.disk_usage(probe).total
    size = min(DEFAULT_CAP, int(DISK_SHARE * disk))
    return size, f"auto: the smaller of 20 GiB and 10 % of the {disk / 2**30:.0f} GiB disk"


def size_text(nbytes: int | float) -> str:
    """A byte count for people: 1.5 GiB, 700.0 KiB, 12 B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def too_large(root: Path, size: int, images: int, budget: int | None) -> str | None:
    """When `images` decoded at `size` px need more than the whole budget the user set (--cache-max,
    EDGESSL_CACHE_MAX), the warning that says the folder is decoded without the cache (evicting every other entry
    would not make room, and writing it would break the budget); else None. The auto budget, a guess, is exceeded
    instead (make_room): a large folder decoded afresh every epoch would train several times slower."""
    needed = images * 3 * size * size
    if budget is None or needed <= budget:
        return None
    return (f"cache: {root} at {size} px needs {size_text(needed)}, more than the whole {size_text(budget)} budget: "
            "decoded without the cache this run (raise --cache-max or EDGESSL_CACHE_MAX to keep it).")


def touch_used(folder: Path, name: str) -> None:
    """Record a read of entry `name` (the mtime of <name>.used)."""
    path = folder / f"{name}.used"
    try:
        os.utime(path)
    except FileNotFoundError:
        path.touch()
    except OSError:
        pass  # a read-only cache still works; it just cannot rank its entries


def last_used(folder: Path, name: str) -> float:
    """When entry `name` was last read (else built)."""
    for path in (folder / f"{name}.used", folder / f"{name}.json"):
        if path.exists():
            return path.stat().st_mtime
    return 0.0


def hold(folder: Path, name: str):
    """A shared lock on entry `name` for as long as the returned file object stays open (None without flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fh = open(folder / f"{name}.readers", "a")  # noqa: SIM115 - kept open on purpose: the lock lives with the images
    except OSError:  # a read-only cache (nothing can evict the entry there either): used without the lock
        return None
    fcntl.flock(fh, fcntl.LOCK_SH)
    return fh


def take(folder: Path, name: str):
    """The entry's lock taken exclusively without waiting (a file object to close after removing it), or None
    when another process holds it."""
    try:
        import fcntl
    except ImportError:
        return open(os.devnull)  # noqa: SIM115 - nothing to lock on this system
    fh = open(folder / f"{name}.readers", "a")  # noqa: SIM115
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def staleness(entry: dict[str, Any], folder: Path) -> str | None:
    """Why an entry can go first: its data file is damaged (a load would decode the folder again anyway), its folder
    no longer exists, or holds other files than it recorded; None when it is current. (Stats every file of the
    folder: for `cache list` and eviction, not for every read.)"""
    root = Path(entry["root"])
    try:
        index = json.loads((folder / f"{entry['name']}.json").read_text())
        damaged = damage(index, folder)
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"
    if damaged:
        return damaged
    if not root.is_dir():
        return "folder gone"
    try:
        current = folder_signature(root, scan_images(root))["sha256"]
    except (OSError, ValueError, KeyError, UserError):
        return "unreadable"
    return None if current == index.get("signature") else "files changed"


def teacher_staleness(entry: dict[str, Any]) -> str | None:
    """staleness for a stored --teacher bank (edgessl.data.cache.teacher_entries): "folder gone" when its image
    folder is (its key, the folder's files, is checked when a run reads it); else None."""
    return None if Path(entry["root"]).is_dir() else "folder gone"


def damage(index: dict[str, Any], folder: Path) -> str | None:
    """What is wrong with an entry's data file (missing, or not the images x 3 x size x size bytes its index
    records: a copy or a disk that stopped short), None when it is whole."""
    data = folder / index["data"]
    expected = len(index["files"]) * 3 * int(index["size"]) ** 2
    actual = data.stat().st_size if data.exists() else -1
    if actual == expected:
        return None
    return "data file missing" if actual < 0 else f"data file damaged ({actual:,} of {expected:,} bytes)"
