"""`edgessl cache list|clear`: the decoded-image cache (edgessl.data.cache) and the stored --teacher banks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgessl.data.cache import cache_folder, clear_entries, list_entries, teacher_entries
from edgessl.errors import UserError


def cache_entries(cache_dir: str | Path | None = "auto") -> tuple[Path, list[dict[str, Any]]]:
    """(the decoded-image cache folder, one dict per cached folder: name, root, size, images, skipped, bytes,
    created; then one per stored --teacher bank, with "teacher": its timm name). cache_dir: "auto"
    (EDGESSL_CACHE_DIR, else ~/.cache/edgessl) or a folder."""
    folder = _cache_folder(cache_dir)
    return folder, list_entries(folder) + teacher_entries(folder)


def clear_cache(cache_dir: str | Path | None = "auto", folder: str | Path | None = None) -> tuple[int, int]:
    """Delete the decoded images (and stored --teacher banks) of every folder, or of image folder `folder` only.
    -> (files, bytes) freed."""
    return clear_entries(_cache_folder(cache_dir), folder)


def _cache_folder(cache_dir: str | Path | None) -> Path:
    folder = cache_folder(cache_dir)
    if folder is None:
        raise UserError("--cache-dir none means no cache: pass a folder, or leave the flag out for the default.")
    return folder
