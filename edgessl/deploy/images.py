"""Small, evenly spread image samples of a folder for parity checks, int8 calibration and reference outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgessl.data.augment import test_transform
from edgessl.data.folder import _try_decode, check_folder, scan_images
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
    """Decode up to `limit` images spread over the sorted files of `root` (by edgessl's decoding rules).

    UserError when the folder is missing, holds no image files, or none of the chosen files can be read."""
    root = check_folder(root, what)
    paths = scan_images(root, what)
    if not paths:
        raise UserError(f"{what} '{root}' holds no image files (searched recursively for jpg/png/webp/... files).")
    classes = _folder_classes(root, paths)
    good, arrays, reasons = [], [], []
    for i in spread(len(paths), limit):
        arr, why = _try_decode(paths[i], size)
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


def to_input(images: np.ndarray, mean, std) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 model input, by edgessl's own test transform."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return test_transform(x, mean, std).contiguous().numpy()
