"""Settings chosen from the user's folder: `--image-size auto` and `--epochs auto` (the defaults of `edgessl
pretrain`; a recipe or a flag with a number keeps working exactly as before).

- Image size: the median shorter side of up to HEADER_LIMIT images (headers only, evenly spread over the sorted
  files), rounded down to SIZE_LADDER, so icons and thumbnails train at their own size (the banner says how many
  smaller images are upscaled; a folder below the smallest size trains at it);
  larger images (photos, scans) are capped at PHOTO_SIZE on every device, the size the domains suite measured worth
  its time per epoch at the automatic epochs (benchmarks/domains.py, NEU-DET steel scans; PHOTO_WHY says it in the
  banner).
- Epochs: a budget of IMAGES_SEEN image views (where the domains suite's accuracy-vs-length curves flatten on
  NEU-DET and emoji), i.e. IMAGES_SEEN / N epochs for N images, kept within EPOCH_BOUNDS.
Each choice carries its reason (printed in the banner) and how sure it is.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SIZE_LADDER = (32, 48, 64, 96, 128, 160, 192, 224)
PHOTO_SIZE = 128  # px, on any device; see benchmarks/README.md "Domains"
PHOTO_WHY = ("(NEU-DET, 31 epochs: linear@10 +0.05 over 96 px at 1.8x the time per epoch and per image on the device; "
             "--image-size 96 for shorter epochs and a faster encoder, larger: --image-size N)")
HEADER_LIMIT = 256
IMAGES_SEEN = 45_000  # image views of one run; see benchmarks/README.md "Domains"
EPOCH_BOUNDS = (15, 100)
LONG_RATIO = 3.0  # images longer than this (long side : short side) lose most of themselves to the centre crop


@dataclass(frozen=True)
class AutoChoice:
    """One setting chosen for the run: its value and why (the banner's line)."""

    value: int
    reason: str


def header_sizes(paths: Sequence[Path], limit: int = HEADER_LIMIT) -> list[tuple[int, int]]:
    """(width, height) of up to `limit` of `paths`, evenly spread; read from the headers (nothing is decoded).
    Files Pillow cannot open are left out (the decoding step reports them)."""
    n, count = len(paths), min(len(paths), limit)
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})
    sizes = []
    with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: the decoder reports such a file in one line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for i in picks:
            try:
                with Image.open(paths[i]) as img:
                    sizes.append(img.size)
            except Exception:  # noqa: BLE001 - any unreadable file is the decoder's to report
                continue
    return sizes


def choose_image_size(sizes: Sequence[tuple[int, int]]) -> AutoChoice:
    """`--image-size auto` from the images' (width, height): the median shorter side rounded down to SIZE_LADDER
    (a median below its smallest size trains at that size), at most PHOTO_SIZE."""
    if not sizes:
        return AutoChoice(64, "auto: no image header could be read, so the default 64 px")
    shorts = sorted(min(w, h) for w, h in sizes)
    median = int(statistics.median_low(shorts))
    native = max([s for s in SIZE_LADDER if s <= median], default=SIZE_LADDER[0])
    spread = f"{median} px" if shorts[0] == shorts[-1] else f"{median} px median ({shorts[0]}-{shorts[-1]} px)"
    seen = f"shorter side {spread} over {len(shorts):,} images"
    value = min(native, PHOTO_SIZE)
    below = sum(s < value for s in shorts)
    up = f"; {below:,} of the {len(shorts):,} are smaller and upscaled to it" if below else ""
    up += long_note(sizes)
    if native > median:  # smaller than the smallest size trained at
        return AutoChoice(native, f"auto: {seen}; trained at {native} px, the smallest size{up}")
    if native <= PHOTO_SIZE:
        how = "their own size" if native == median else f"their size rounded down to {native} px"
        return AutoChoice(native, f"auto: {seen}; trained at {how}{up or ', never upscaled'}")
    return AutoChoice(PHOTO_SIZE, f"auto: {seen}; capped at {PHOTO_SIZE} px {PHOTO_WHY}{up}")


def long_note(sizes: Sequence[tuple[int, int]], ratio: float = LONG_RATIO) -> str:
    """'; N of the M are longer than 3:1: ...' when images are so long that the square centre crop keeps a third or
    less of each (a panorama of 4000 x 300 keeps 7.5 %), else ''."""
    long = sum(max(w, h) >= ratio * min(w, h) for w, h in sizes)
    if not long:
        return ""
    return (f"; {long:,} of the {len(sizes):,} are longer than {ratio:g}:1, and the square centre crop keeps a third "
            "or less of each: crop or pad them to squares first")


def choose_epochs(n_images: int) -> AutoChoice:
    """`--epochs auto`: IMAGES_SEEN / n_images epochs, within EPOCH_BOUNDS."""
    lo, hi = EPOCH_BOUNDS
    if n_images <= 0:
        return AutoChoice(lo, f"auto: no images counted, so {lo}")
    epochs = min(hi, max(lo, round(IMAGES_SEEN / n_images)))
    evidence = "on NEU-DET and emoji twice as long changed linear@10 by at most 0.02"
    if epochs in (lo, hi) and epochs != round(IMAGES_SEEN / n_images):  # a bound: say the views it really gives
        which, side = ("the most", "short of") if epochs == hi else ("the fewest", "past")
        return AutoChoice(epochs, f"auto: {n_images:,} images x {epochs} epochs ({which}) = {n_images * epochs:,} "
                                  f"image views, {side} the budget of about {IMAGES_SEEN:,}; {evidence}")
    return AutoChoice(epochs, f"auto: about {IMAGES_SEEN:,} image views for {n_images:,} images; {evidence}")
