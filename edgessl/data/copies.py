"""The copy model: how `edgessl embed --duplicates auto` makes synthetic copies of a folder's own images to calibrate
itself on them (and how the duplicates benchmark plants copies).

A copy of an image is the same picture after what files go through on their way into a folder: a crop of up to
CROP of each side in all (a random share off each side), a resize to RESIZE x the size, a brightness and a
contrast change of up to LIGHT, and a JPEG re-encoding at quality QUALITY. Every draw comes from a seeded random
generator, so the same seed makes the same copies. HELD_OUT holds transformations the calibration never uses (the
benchmark reports them separately): a mild blur and a 90° rotation.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter

from edgessl.data.folder import open_rgb

CROP = 0.10  # at most this share of the width (and of the height) is cropped off, split between the two sides
RESIZE = (0.5, 1.25)  # the copy's size as a share of the original's
LIGHT = 0.10  # brightness and contrast factors in [1 - LIGHT, 1 + LIGHT]
QUALITY = (60, 95)  # JPEG quality


def _crop(im: Image.Image, rng: random.Random) -> Image.Image:
    w, h = im.size
    cut_w, cut_h = int(round(w * rng.uniform(0, CROP))), int(round(h * rng.uniform(0, CROP)))
    left, top = rng.randint(0, cut_w), rng.randint(0, cut_h)
    return im.crop((left, top, w - (cut_w - left), h - (cut_h - top)))


def make_copy(im: Image.Image, rng: random.Random, held_out: str | None = None) -> Image.Image:
    """An RGB copy of RGB image `im` under the copy model (or under a held-out transformation: "blur", "rotate"),
    drawn from `rng`; returned decoded, as the copy's JPEG file would decode."""
    if held_out == "blur":
        out = im.filter(ImageFilter.GaussianBlur(radius=max(im.size) / 128))
    elif held_out == "rotate":
        out = im.transpose(Image.Transpose.ROTATE_90)
    else:
        out = _crop(im, rng)
        scale = rng.uniform(*RESIZE)
        out = out.resize((max(8, round(out.width * scale)), max(8, round(out.height * scale))),
                         Image.Resampling.BICUBIC)
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(1 - LIGHT, 1 + LIGHT))
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(1 - LIGHT, 1 + LIGHT))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=rng.randint(*QUALITY))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def plant(originals: list[Path], folder: Path, seed: int, held_out: str | None = None,
          max_side: int = 512) -> list[Path]:
    """Write one copy of each original file into `folder` as a lossless PNG (the JPEG round trip happened inside
    make_copy): <folder>/<index>.png, seeded by (seed, index). Originals are decoded by edgessl's rules and, when
    larger, first shrunk to `max_side` pixels on the longer side (the copy model resizes anyway). Returns the files
    in the order of `originals`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, path in enumerate(originals):
        im = open_rgb(path, max_side)
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        files.append(folder / f"{i:06d}.png")
        make_copy(im, random.Random(f"{seed}-{i}"), held_out).save(files[-1])
    return files


def sample(n: int, count: int, seed: int) -> list[int]:
    """The sorted rows of `count` images out of n drawn by `seed` (all of them when count >= n)."""
    return sorted(random.Random(seed).sample(range(n), min(count, n)))
