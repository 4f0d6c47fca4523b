"""Greyscale folders (scans, X-rays, steel surfaces): detected on the decoded rows, so single-channel files and RGB
files whose three channels are equal count alike.

A greyscale folder's images carry no colour, so the augmentations that act only on colour (colour jitter's
saturation and hue, random grayscale) change nothing but the random stream and cost time: `--greyscale auto` (the
default) turns them off for such a folder, says so in the banner, and records it in encoder.json and the export
manifest, whose device-side preprocessing then turns any colour input grey as training saw it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgessl.data.augment import AugmentConfig
from edgessl.data.folder import ImageSet

GREY_TOLERANCE = 1.0  # mean |R - G| + |G - B| per pixel (0-255) up to which an image is grey (JPEG chroma noise)
CHECK_LIMIT = 5000  # images checked at most, evenly spread (a folder of 100,000 large scans is not read twice)
MIXED_SHARE = 0.25  # a colour folder is "mixed" from this share of grey images among those checked (CIFAR-10: 3 %)


def grey_rows(rows: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> (B,) bool: each image's mean |R - G| + |G - B| is at most GREY_TOLERANCE."""
    x = rows.to(torch.int16)
    spread = (x[:, 0] - x[:, 1]).abs() + (x[:, 1] - x[:, 2]).abs()
    return spread.flatten(1).float().mean(dim=1) <= GREY_TOLERANCE


@dataclass(frozen=True)
class GreyCheck:
    """The folder check: grey when every checked image is; `colour` the first colour image found (its row) and
    `colour_name` its file name."""

    grey: bool
    checked: int
    total: int
    colour: int | None = None
    grey_seen: int = 0  # a colour folder: the grey images among the `read` checked up to its first colour chunk
    read: int = 0
    colour_name: str | None = None

    def describe(self) -> str:
        if not self.grey:
            return f"colour ({self.colour_name or f'image {self.colour}'} has colour)"
        some = f"{self.checked:,} of {self.total:,} images, evenly spread" if self.checked < self.total else \
            f"all {self.total:,} images"
        return f"greyscale ({some}: R = G = B)"


def check_greyscale(images: ImageSet, limit: int = CHECK_LIMIT, chunk: int = 512) -> GreyCheck:
    """Whether `images` is a greyscale folder: up to `limit` rows evenly spread, read in chunks, stopping at the
    first colour image (a colour folder is decided by its first chunk)."""
    n = len(images)
    index = torch.linspace(0, n - 1, min(n, limit)).round().long().unique() if n else torch.zeros(0, dtype=torch.long)
    seen = read = 0
    for part in index.split(chunk):
        grey = grey_rows(images.get(part))
        seen, read = seen + int(grey.sum()), read + len(part)
        if not bool(grey.all()):
            row = int(part[~grey][0])
            return GreyCheck(False, len(index), n, row, seen, read, Path(images.paths[row]).name)
    return GreyCheck(True, len(index), n)


@dataclass(frozen=True)
class GreyChoice:
    """What `--greyscale` decided for a run: on (colour-only augmentations off) or not, and why."""

    on: bool
    reason: str
    mixed: bool = False  # auto found grey and colour images: said in the banner too

    def describe(self) -> str:
        if self.on:
            return f"grey images: saturation, hue and random greyscale off ({self.reason})"
        return f"colour augmentations kept ({self.reason})"


def colour_under_on(option: str, images: ImageSet) -> str | None:
    """The warning for --greyscale on over a folder with colour images (None otherwise): training keeps their colour
    (only the colour-only augmentations are off) while the export turns the device's input grey."""
    if option != "on":
        return None
    check = check_greyscale(images)
    if check.grey:
        return None
    return (f"--greyscale on: the folder has colour ({check.describe()}); training keeps it (only the colour "
            "augmentations are off) while the export turns the device's input grey: convert the images to grey "
            "first for the two to match.")


def choose_greyscale(option: str, images: ImageSet) -> GreyChoice:
    """--greyscale auto | on | off for the training images."""
    if option == "on":
        return GreyChoice(True, "--greyscale on")
    if option == "off":
        return GreyChoice(False, "--greyscale off")
    check = check_greyscale(images)
    if not check.grey and check.grey_seen >= MIXED_SHARE * check.read:  # a few grey photos among colour: not mixed
        return GreyChoice(False, f"auto: {check.describe()}; {check.grey_seen:,} of the {check.read:,} images "
                                 "checked are grey: a mixed folder trains in colour (--greyscale on: no colour "
                                 "jitter, grey input on the device)", mixed=True)
    return GreyChoice(check.grey, f"auto: {check.describe()}")


def training_augment(blur: float, grey: GreyChoice) -> AugmentConfig:
    """The pretraining augmentation: the default with blur probability `blur`, colour-free for a greyscale run."""
    aug = AugmentConfig(blur_p=blur)
    return colour_free(aug) if grey.on else aug


def colour_free(aug: AugmentConfig) -> AugmentConfig:
    """`aug` without what acts only on colour: saturation and hue jitter, random grayscale (brightness and contrast
    jitter, crops, flips and blur stay)."""
    b, c, _, _ = aug.jitter
    return replace(aug, jitter=(b, c, 0.0, 0.0), grayscale_p=0.0)
