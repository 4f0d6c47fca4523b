"""Image folders: scan, decode once into uint8 rows (the disk cache of edgessl.data.cache, or RAM), report bad files.

Decoding rules (the same for training, evaluation and export checks):
EXIF orientation applied; palette and alpha images composited onto a fixed white background; grayscale, CMYK,
16-bit and float images converted to 8-bit RGB; then resized so the shorter side is `size` (bicubic) and
center-cropped to size x size.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from edgessl.data.budget import cache_budget, hold, too_large
from edgessl.data.cache import cache_folder, entry_name, load_or_build
from edgessl.data.signature import check_folder, folder_signature, scan_images
from edgessl.errors import UserError
from edgessl.fileio import atomic_write_text
from edgessl.options import Decode

BACKGROUND = (255, 255, 255)
MAX_AUTO_WORKERS = 8  # --workers auto: one decoding thread per available core, at most this many
# Images above this many pixels are refused as decompression bombs (Pillow's own default limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        elif arr.max() > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(canvas, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def open_rgb(path: str | Path, draft: int | None = None) -> Image.Image:
    """One file as an RGB image by the rules in this module's docstring (EXIF rotation, alpha composited on white),
    at its own size (draft: a JPEG may decode at a reduced size no smaller than draft x draft).

    Raises OSError/ValueError (unreadable, truncated, not an image), PermissionError, or
    Image.DecompressionBombError (more than MAX_PIXELS pixels)."""
    with Image.open(path) as img:
        if img.width * img.height > MAX_PIXELS:
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} pixels exceeds the limit of {MAX_PIXELS} (decompression bomb?)"
            )
        if img.format == "JPEG" and draft:
            img.draft("RGB", (draft, draft))
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one file to a (size, size, 3) uint8 RGB array: open_rgb, then the shorter side resized to `size` and
    the centre cropped (bicubic). Raises what open_rgb raises."""
    img = ImageOps.fit(open_rgb(path, size), (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


LARGE_SIDE = 1 << 30  # shorter_sides' answer for a file whose header cannot be read: as sharp as its row


def shorter_sides(paths: Sequence[str | Path]):
    """index (k,) -> (k,) int64 tensor: each file's shorter side in pixels as stored (its header, read on first
    use and kept; LARGE_SIDE when unreadable). What edgessl.evaluate.copies.copy_scores compares pairs by."""
    known = np.full(len(paths), -1, np.int64)

    def sides(index) -> torch.Tensor:
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        for i in idx[known[idx] < 0].tolist():
            try:
                with Image.open(paths[i]) as img:
                    known[i] = min(img.size)
            except (OSError, ValueError, Image.DecompressionBombError):
                known[i] = LARGE_SIDE
        return torch.from_numpy(known[idx].copy())

    return sides


def _try_decode(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(path, size), None
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb: {e}"
    except PermissionError:
        return None, "permission denied"
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        if not os.path.exists(path):
            return None, "broken link" if os.path.islink(path) else "missing (removed while reading?)"
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        return None, f"unreadable: {str(e) or type(e).__name__}"


@dataclass
class ImageSet:
    """Decoded images of one folder. images: (N, 3, S, S) uint8 rows, in RAM or memory-mapped from the disk cache
    (edgessl.data.cache), or None when streaming from disk (no disk cache and too large for cache_mb)."""
    root: Path
    paths: list[Path]
    size: int
    images: torch.Tensor | None
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    workers: int = 2
    reading: Any = None  # the shared lock on its cache entry (edgessl.data.budget.hold), released with the set

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def streaming(self) -> bool:
        return self.images is None

    def get(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S) images of rows `index`."""
        if self.images is not None:
            return self.images[torch.as_tensor(index, dtype=torch.long)]
        idx = [int(i) for i in index]
        with ThreadPoolExecutor(self.workers) as pool:
            arrays = list(pool.map(lambda i: decode_image(self.paths[i], self.size), idx))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def folder_labels(root: Path, paths: Sequence[Path], what: str = "--data") -> tuple[torch.Tensor, list[str]]:
    """Class label of each image = its first-level subfolder under root (ImageFolder layout). what: the option that
    named the folder (the error's way out: --data's labels are asked for by --labels-from-folders; other folders,
    such as --val, are labelled folders by definition)."""
    names = []
    for p in paths:
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            out = ("or drop --labels-from-folders" if what == "--data" else
                   f"or pass another {what}: it takes a labelled folder")
            raise UserError(f"Labels need one subfolder per class under '{root}', but '{rel}' lies directly in it. "
                            f"Move images into class folders, {out}.")
        names.append(rel.parts[0])
    classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lookup[n] for n in names], dtype=torch.long), classes


def load_image_folder(
    root: str | Path,
    size: int,
    labels: bool = False,
    decode: Decode | None = None,
    min_images: int = 2,
    what: str = "--data",
    progress=None,
    paths: Sequence[Path] | None = None,
    warn=None,
    signature: dict | None = None,
) -> ImageSet:
    """Scan `root`, decode every image once (skipping unreadable files) and keep them as uint8 rows.

    decode (edgessl.options.Decode; None: its defaults): decode.cache_dir is the decoded-image cache on disk
    (edgessl.data.cache; "auto": the default folder, "none": off). With it, a folder decoded before is not decoded
    again; its rows are read into RAM when N * 3 * size^2 bytes fit in decode.cache_mb MiB, and memory-mapped
    otherwise. Without it, images are decoded into RAM when they fit, and otherwise checked once and then decoded
    again at every use (streaming). decode.workers: decoding threads.
    Raises UserError when the folder is missing, is a file, or holds fewer than `min_images` readable images.
    progress: optional callable(done, total); warn: callable(message) for a damaged cache (default: stderr);
    paths: the folder's scan_images(root) when the caller has it already; signature: its folder_signature(root,
    paths) when the caller has computed it (the files are not stat-ed twice).
    """
    root = check_folder(root, what)
    paths = list(paths) if paths is not None else scan_images(root, what)
    if not paths:
        raise UserError(
            f"No image files found in {what} '{root}' (searched recursively for "
            "jpg/png/webp/bmp/... files). Point it at the folder that contains your images."
        )
    decode = decode or Decode()
    workers, cache_mb = resolve_workers(decode.workers), decode.cache_mb
    if not cache_mb >= 0:  # nan too
        raise UserError(f"--cache-mb must be zero (rows read from the disk cache) or positive MiB, not {cache_mb:g}.")
    store = cache_folder(decode.cache_dir)
    budget, how = cache_budget(store, decode.cache_max) if store is not None else (None, "")
    if not how.startswith("auto") and (note := too_large(root, size, len(paths), budget)) is not None:
        (warn or _stderr_warning)(note)  # a budget the user set is kept; the auto one: make_room says so
        store = None
    if store is None:
        good, images, skipped = _decode_all(paths, size, workers, cache_mb, progress)
    else:
        signature = signature or folder_signature(root, paths)
        store.mkdir(parents=True, exist_ok=True)
        reading = hold(store, entry_name(root, size))  # no eviction while this ImageSet lives
        hit = load_or_build(store, root, size, paths, signature, lambda p: _try_decode(p, size),
                            workers, warn or _stderr_warning, progress, budget)
        good = [root / f[0] for f in hit.files]
        skipped = [(root / s[0], s[3]) for s in hit.skipped]
        fits = hit.rows.nbytes <= cache_mb * 2**20
        images = torch.from_numpy(np.fromfile(hit.data, np.uint8).reshape(hit.rows.shape) if fits else hit.rows)
    _check_count(good, skipped, min_images, root, what)
    label_tensor, classes = folder_labels(root, good, what) if labels else (None, None)
    images_set = ImageSet(root, good, size, images, label_tensor, classes, skipped, workers)
    images_set.reading = reading if store is not None else None
    return images_set


def _decode_all(paths: Sequence[Path], size: int, workers: int, cache_mb: float, progress):
    """No disk cache: (good paths, (N, 3, S, S) uint8 in RAM or None when it would exceed cache_mb, skipped)."""
    stream = len(paths) * 3 * size * size > cache_mb * 2**20
    rows = None if stream else np.empty((len(paths), 3, size, size), np.uint8)  # filled in place: no np.stack copy
    good: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = pool.map(lambda p: _try_decode(p, size), paths)
        for i, (path, (arr, why)) in enumerate(zip(paths, decoded, strict=True)):
            if arr is None:
                skipped.append((path, why))
            else:
                if rows is not None:
                    rows[len(good)] = arr.transpose(2, 0, 1)
                good.append(path)
            if progress is not None:
                progress(i + 1, len(paths))
    return good, None if rows is None else torch.from_numpy(rows[: len(good)]), skipped


def _check_count(good, skipped, min_images: int, root: Path, what: str) -> None:
    if len(good) < min_images:
        found = f"{len(good)} readable image{'s' if len(good) != 1 else ''}"
        extra = f" ({len(skipped)} unreadable files skipped)" if skipped else ""
        first = "; ".join(f"{Path(p).relative_to(root) if Path(p).is_relative_to(root) else p} ({why})"
                          for p, why in skipped[:2])  # the command is refused: no skipped_files.txt lists them
        raise UserError(
            f"{what} '{root}' has {found}{extra}; at least {min_images} {'is' if min_images == 1 else 'are'} needed. "
            + (f"Skipped: {first}{f'; and {len(skipped) - 2} more' if len(skipped) > 2 else ''}. " if skipped else "")
            + "Add images or point it at another folder."
        )


def _stderr_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def resolve_workers(option: int | str | None = "auto") -> int:
    """Decoding threads: a positive number as given; "auto" (or None): the cores this process may use, at most
    MAX_AUTO_WORKERS."""
    if option is None or str(option) == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(cores, MAX_AUTO_WORKERS))
    if not str(option).isdigit() or int(option) < 1:
        raise UserError(f"--workers must be auto or a positive number, not '{option}'.")
    return int(option)


def write_skipped(skipped: Sequence[tuple[Path, str]], path: str | Path) -> Path:
    """One line per skipped file: '<path>\\t<reason>'. Returns the path."""
    return atomic_write_text(path, "".join(f"{p}\t{why}\n" for p, why in skipped))


# Truncated files must fail loudly (they are reported and skipped), never be half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
