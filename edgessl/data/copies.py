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
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter

from edgessl.data.folder import open_rgb

CROP = 0.10  # at most this share of the width (and of the height) is cropped off, split between the two sides
RESIZE = (0.5, 1.25)  # the copy's size as a share of the original's
LIGHT = 0.10  # brightness and contrast factors in [1 - LIGHT, 1 + LIGHT]
QUALITY = (60, 95)  # JPEG quality


@dataclass(frozen=True)
class Edit:
    """One synthetic copy's draws for an original of `size` (w, h): the box kept (left, top, right, bottom in
    pixels), the resize factor, brightness and contrast factors, JPEG quality, and the held-out transformation
    (None: the copy model)."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    scale: float
    brightness: float
    contrast: float
    quality: int
    held_out: str | None = None

    def record(self) -> dict[str, float | int | str | None]:
        """For a benchmark row: the share of the width and of the height cropped off, and the other draws."""
        w, h = self.size
        left, top, right, bottom = self.box
        return {"crop_w": round(1 - (right - left) / w, 3), "crop_h": round(1 - (bottom - top) / h, 3),
                "scale": round(self.scale, 3), "brightness": round(self.brightness, 3),
                "contrast": round(self.contrast, 3), "quality": self.quality, "held_out": self.held_out}


def draw_edit(size: tuple[int, int], rng: random.Random, held_out: str | None = None) -> Edit:
    """The draws of one copy of an image of `size` (w, h) under the copy model, from `rng` (a held-out
    transformation draws the quality only)."""
    w, h = size
    if held_out is not None:
        return Edit(size, (0, 0, w, h), 1.0, 1.0, 1.0, rng.randint(*QUALITY), held_out)
    cut_w, cut_h = int(round(w * rng.uniform(0, CROP))), int(round(h * rng.uniform(0, CROP)))
    left, top = rng.randint(0, cut_w), rng.randint(0, cut_h)
    box = (left, top, w - (cut_w - left), h - (cut_h - top))
    scale = rng.uniform(*RESIZE)
    light = rng.uniform(1 - LIGHT, 1 + LIGHT), rng.uniform(1 - LIGHT, 1 + LIGHT)
    return Edit(size, box, scale, *light, rng.randint(*QUALITY))


def apply_edit(im: Image.Image, edit: Edit) -> Image.Image:
    """An RGB copy of RGB image `im` by `edit`, returned decoded, as the copy's JPEG file would decode."""
    if edit.held_out == "blur":
        out = im.filter(ImageFilter.GaussianBlur(radius=max(im.size) / 128))
    elif edit.held_out == "rotate":
        out = im.transpose(Image.Transpose.ROTATE_90)
    else:
        out = im.crop(edit.box)
        out = out.resize((max(8, round(out.width * edit.scale)), max(8, round(out.height * edit.scale))),
                         Image.Resampling.BICUBIC)
        out = ImageEnhance.Brightness(out).enhance(edit.brightness)
        out = ImageEnhance.Contrast(out).enhance(edit.contrast)
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=edit.quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def make_copy(im: Image.Image, rng: random.Random, held_out: str | None = None) -> Image.Image:
    """An RGB copy of RGB image `im` under the copy model (or under a held-out transformation: "blur", "rotate"),
    drawn from `rng`; returned decoded, as the copy's JPEG file would decode."""
    return apply_edit(im, draw_edit(im.size, rng, held_out))


def planted_image(path: Path, max_side: int = 512) -> Image.Image:
    """An original as plant() copies it: decoded by edgessl's rules, larger ones shrunk to `max_side` on the longer
    side."""
    im = open_rgb(path, max_side)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return im


def edits(originals: list[Path], seed: int, held_out: str | None = None, max_side: int = 512) -> list[Edit]:
    """The draws plant() makes for these originals with this seed (what each planted copy went through)."""
    return [draw_edit(planted_image(p, max_side).size, random.Random(f"{seed}-{i}"), held_out)
            for i, p in enumerate(originals)]


def plant(originals: list[Path], folder: Path, seed: int, held_out: str | None = None,
          max_side: int = 512) -> list[Path]:
    """Write one copy of each original file into `folder` as a lossless PNG (the JPEG round trip happened inside
    make_copy): <folder>/<index>.png, seeded by (seed, index). Originals are decoded by edgessl's rules and, when
    larger, first shrunk to `max_side` pixels on the longer side (the copy model resizes anyway). Returns the files
    in the order of `originals`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, path in enumerate(originals):
        files.append(folder / f"{i:06d}.png")
        make_copy(planted_image(path, max_side), random.Random(f"{seed}-{i}"), held_out).save(files[-1])
    return files


def sample(n: int, count: int, seed: int) -> list[int]:
    """The sorted rows of `count` images out of n drawn by `seed` (all of them when count >= n)."""
    return sorted(random.Random(seed).sample(range(n), min(count, n)))
