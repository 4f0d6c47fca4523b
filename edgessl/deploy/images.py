"""Small, evenly spread image samples of a folder for parity checks, int8 calibration and reference outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgessl.data.augment import test_transform
from edgessl.data.cache import cache_folder, open_cache
from edgessl.data.folder import _try_decode
from edgessl.data.signature import check_folder, folder_signature, scan_images
from edgessl.errors import UserError


@dataclass
class Sample:
    """Decoded images (N, S, S, 3) uint8 of `root`, with folder labels when every image lies in a class folder."""

    root: Path
    paths: list[Path]
    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def spread(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total) (all of them when total <= count)."""
    if total <= count:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def _folder_classes(root: Path, paths: list[Path]) -> list[str] | None:
    """Class names when every image lies in a first-level subfolder and there are at least two of them."""
    firsts = [p.relative_to(root).parts for p in paths]
    if any(len(parts) < 2 for parts in firsts):
        return None
    classes = sorted({parts[0] for parts in firsts})
    return classes if len(classes) >= 2 else None


def sample_folder(root: str | Path, size: int, limit: int, what: str) -> Sample:
    """Decode up to `limit` images spread over the sorted files of `root` (by edgessl's decoding rules; rows of the
    decoded-image cache are used when the folder is cached at this size: the same images, nothing decoded).

    UserError when the folder is missing, holds no image files, or none of the chosen files can be read."""
    root = check_folder(root, what)
    paths = scan_images(root, what)
    if not paths:
        raise UserError(f"{what} '{root}' holds no image files (searched recursively for jpg/png/webp/... files).")
    classes = _folder_classes(root, paths)
    good, arrays, reasons = [], [], []
    cached = _cached_rows(root, size, paths)
    for i in spread(len(paths), limit):
        arr, why = cached(paths[i]) or _try_decode(paths[i], size)
        if arr is None:
            reasons.append(f"{paths[i].name}: {why}")
        else:
            good.append(paths[i])
            arrays.append(arr)
    if not good:
        raise UserError(
            f"{what} '{root}' has no readable image ({len(reasons)} file(s) tried, e.g. {reasons[0]})."
        )
    labels = None
    if classes:
        lookup = {c: k for k, c in enumerate(classes)}
        labels = np.array([lookup[p.relative_to(root).parts[0]] for p in good], dtype=np.int64)
    return Sample(root, good, np.stack(arrays), labels, classes)


def _cached_rows(root: Path, size: int, paths: list[Path]):
    """path -> (its decoded (S, S, 3) uint8 row, None) or (None, its reason) from the decoded-image cache
    (edgessl.data.cache) when a valid entry for this folder and size exists; otherwise -> None (decode it)."""
    store = cache_folder("auto")
    hit = None if store is None else open_cache(store, root, size, folder_signature(root, paths), lambda _: None)
    if hit is None:
        return lambda path: None
    rows = {f[0]: i for i, f in enumerate(hit.files)}
    reasons = {s[0]: s[3] for s in hit.skipped}

    def lookup(path: Path):
        rel = path.relative_to(root).as_posix()
        if rel in rows:
            return np.ascontiguousarray(hit.rows[rows[rel]].transpose(1, 2, 0)), None
        return (None, reasons[rel]) if rel in reasons else None

    return lookup


def to_input(images: np.ndarray, mean, std) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 model input, by edgessl's own test transform."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return test_transform(x, mean, std).contiguous().numpy()
