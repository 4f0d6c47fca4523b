"""`--temperature auto`: the instance loss's temperature chosen from how alike the folder's images look.

Instance discrimination pushes every image away from every other. In a folder whose images look alike (steel scans
of one texture, icons drawn in one style, digits) a low temperature pushes hardest on the pairs that differ least,
which are mostly the same kind of thing; a higher one (0.2) pushes them apart less. Measured
(benchmarks/README.md "Domains", the temperature table): tau 0.2 gained linear@10 on NEU-DET scans and emoji and
lost on CIFAR-10 photos, whatever their size or colour. What separated them is the folder's *look-alike score*:
the mean, over an evenly spread sample of LOOKALIKE_SAMPLE images, of each image's cosine similarity to its nearest
other image in the sample, on 16 x 16 grey thumbnails with their mean removed. CIFAR-10 photos score 0.62-0.63,
NEU-DET scans 0.77 and emoji 0.82 at every resolution tried, on samples of 1,000 images; LOOKALIKE_THRESHOLD sits
between them. On fewer images every folder scores lower, and the threshold falls with it (threshold_for). Of two folders
nobody tuned on, both scored "alike": scikit-learn's 8 x 8 digits (0.95) gained with 0.2 (+0.032 linear@10 over 2
seeds), another vendor's emoji (Twemoji, 0.80) neither gained nor lost beyond its seeds' spread (-0.004).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgessl.data.folder import ImageSet

THUMB = 16  # px of the grey thumbnails the score compares
LOOKALIKE_SAMPLE = 1000  # images compared at most, evenly spread
LOOKALIKE_THRESHOLD = 0.70  # look-alike score from which tau 0.2 is chosen, on a sample of LOOKALIKE_SAMPLE images
SIZE_SLOPE = 0.94  # how the threshold falls with 1/sqrt(images) on smaller samples (threshold_for)
FEWEST_SURE = 20  # a sample of fewer images is always reported as unsure
SURE_MARGIN = 0.05  # a score closer than this to the threshold is reported as unsure
TEMPERATURES = (0.1, 0.2)  # (photos, look-alike folders)
MEASURED = {"photos": (0.62, 0.63), "look-alike": (0.77, 0.95)}  # the score's range on the measured folders


def grey_thumbnails(rows: torch.Tensor, side: int = THUMB) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> (B, side * side) float: the grey image area-averaged to side x side, its mean removed,
    unit length (a flat image stays all zeros)."""
    grey = rows.float().mean(dim=1, keepdim=True)
    t = torch.nn.functional.adaptive_avg_pool2d(grey, side).flatten(1)
    return torch.nn.functional.normalize(t - t.mean(dim=1, keepdim=True), dim=1)


def nearest_similarity(x: torch.Tensor) -> torch.Tensor:
    """x: (B, D) unit rows, B >= 2 -> (B,): each row's largest cosine similarity to another row."""
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    return sim.max(dim=1).values


def lookalike_score(images: ImageSet, limit: int = LOOKALIKE_SAMPLE, chunk: int = 256) -> float:
    """The folder's look-alike score (module docstring): mean nearest-other similarity of up to `limit` images,
    evenly spread, read in chunks. A folder of one image scores 0."""
    n = len(images)
    if n < 2:
        return 0.0
    index = torch.linspace(0, n - 1, min(n, limit)).round().long().unique()
    thumbs = torch.cat([grey_thumbnails(images.get(part)) for part in index.split(chunk)])
    return float(nearest_similarity(thumbs).mean())


@dataclass(frozen=True)
class TemperatureChoice:
    """What `--temperature auto` chose, the score it rests on and why (the banner's line)."""

    value: float
    score: float
    reason: str


def threshold_for(n_images: int) -> float:
    """The threshold for a score over `n_images` (at most LOOKALIKE_SAMPLE count): each image's nearest other is
    found among fewer candidates, so the score reads lower on a small folder (NEU-DET 0.57 at 20 images, 0.77 at
    1,000; CIFAR-10 0.42 and 0.63). Fewer than FEWEST_SURE images take the threshold at FEWEST_SURE.
    LOOKALIKE_THRESHOLD - SIZE_SLOPE * (1 / sqrt(n) - 1 / sqrt(LOOKALIKE_SAMPLE)), the slope fitted on random
    subsets of CIFAR-10 and NEU-DET and checked on emoji, Twemoji and digits (benchmarks/README.md "Look-alike
    score and folder size")."""
    n = max(FEWEST_SURE, min(n_images, LOOKALIKE_SAMPLE))  # below FEWEST_SURE unmeasured: the threshold at it
    return LOOKALIKE_THRESHOLD - SIZE_SLOPE * (n ** -0.5 - LOOKALIKE_SAMPLE ** -0.5)


def choose_temperature(score: float, n_images: int = LOOKALIKE_SAMPLE) -> TemperatureChoice:
    """tau from the folder's look-alike score over `n_images`: TEMPERATURES[1] at or above threshold_for(n_images),
    else TEMPERATURES[0]; the reason says how far the score is from the threshold and from the measured folders."""
    photos, alike = MEASURED["photos"], MEASURED["look-alike"]
    threshold = threshold_for(n_images)
    kind = "the images look alike" if score >= threshold else "the images differ"
    tau = TEMPERATURES[score >= threshold]
    why = f"only {n_images} images" if n_images < FEWEST_SURE else \
        f"within {SURE_MARGIN:.2f} of it" if abs(score - threshold) < SURE_MARGIN else None
    sure = "clear of it" if why is None else \
        f"{why}, so unsure: try --temperature {TEMPERATURES[score < threshold]:g} too"
    at = "" if n_images >= LOOKALIKE_SAMPLE else \
        f" for {n_images:,} images ({LOOKALIKE_THRESHOLD:.2f} for {LOOKALIKE_SAMPLE:,}: a small folder's score " \
        "reads lower)"
    reason = (f"auto: look-alike score {score:.2f}, {kind} (threshold {threshold:.2f}{at}, {sure}; measured: photos "
              f"{photos[0]:.2f}-{photos[1]:.2f}, scans, icons and digits {alike[0]:.2f}-{alike[1]:.2f})")
    return TemperatureChoice(tau, score, reason)
