"""`edgessl cache list|clear`: the decoded-image cache (edgessl.data.cache) and the stored --teacher banks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgessl.data.budget import cache_budget, last_used, staleness, teacher_staleness
from edgessl.data.cache import (
    TEACHERS,
    cache_folder,
    clear_entries,
    list_entries,
    orphan_temps,
    remove_entry,
    teacher_entries,
)
from edgessl.errors import UserError


def cache_entries(cache_dir: str | Path | None = "auto") -> tuple[Path, list[dict[str, Any]]]:
    """(the decoded-image cache folder, one dict per cached folder: name, root, size, images, skipped, bytes,
    created, last_used, stale (None, "folder gone", "files changed", "unreadable" or what is wrong with the data
    file: edgessl.data.budget.staleness); then one per stored --teacher bank, with "teacher": its timm name and
    stale: teacher_staleness); then one per temporary file a killed build left ("orphan": True). cache_dir:
    "auto" (EDGESSL_CACHE_DIR, else $XDG_CACHE_HOME/edgessl or ~/.cache/edgessl) or a folder."""
    folder = cache_store(cache_dir)
    entries = list_entries(folder)
    for e in entries:
        e["stale"], e["last_used"] = staleness(e, folder), last_used(folder, e["name"])
    teachers = teacher_entries(folder)
    for e in teachers:
        e["stale"] = teacher_staleness(e)
    orphans = [{"name": p.name, "root": f"(a killed build's {p.name})", "size": 0, "images": 0, "skipped": 0,
                "bytes": p.stat().st_size, "orphan": True, "stale": "left by a killed build"}
               for p in orphan_temps(folder)]  # found by nothing else, freed by clear --stale
    return folder, entries + teachers + orphans


def cache_budget_of(cache_dir: str | Path | None = "auto", cache_max: str = "auto") -> tuple[int | None, str]:
    """(the budget in bytes or None, how it was chosen) of the cache (edgessl.data.budget)."""
    return cache_budget(cache_store(cache_dir), cache_max)


def clear_cache(cache_dir: str | Path | None = "auto", folder: str | Path | None = None,
                stale: bool = False) -> tuple[int, int]:
    """Delete the decoded images (and stored --teacher banks) of every folder, of image folder `folder` only, or
    (stale=True) of the entries whose folder is gone or holds other files now. -> (files or, with stale, entries;
    bytes) freed."""
    store = cache_store(cache_dir)
    if not stale:
        return clear_entries(store, folder)
    stale_entries = [e for e in list_entries(store) if staleness(e, store) is not None]
    stale_teachers = [e for e in teacher_entries(store) if teacher_staleness(e) is not None]
    orphans = orphan_temps(store)  # a killed build's data file: counted as an entry of its own
    freed = sum(p.stat().st_size for p in orphans)
    for path in orphans:
        path.unlink(missing_ok=True)
    return (len(stale_entries) + len(stale_teachers) + len(orphans),
            freed + sum(remove_entry(store, e["name"]) for e in stale_entries)
            + sum(remove_entry(store.parent / TEACHERS, e["name"]) for e in stale_teachers))


def cache_store(cache_dir: str | Path | None = "auto") -> Path:
    """The folder of the decoded images of the cache `cache_dir` ("auto": EDGESSL_CACHE_DIR, else
    $XDG_CACHE_HOME/edgessl or ~/.cache/edgessl; its parent holds the stored --teacher banks too)."""
    folder = cache_folder(cache_dir)
    if folder is None:
        raise UserError("--cache-dir none means no cache: pass a folder, or leave the flag out for the default.")
    return folder
