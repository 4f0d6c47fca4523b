"""Look-alike score and folder size: `python -m benchmarks.run lookalike [--tiny]` (about 2 minutes on 2 cores).

`--temperature auto` picks tau 0.2 for a folder whose images look alike (edgessl.data.lookalike). Its score, each
image's similarity to its nearest other image, rises with the number of images compared (more candidates, a nearer
one), so a small folder of look-alike scans had read as "the images differ". threshold_for(n) lowers the threshold
with 1 / sqrt(n) below the 1,000 images the score samples; its slope (SIZE_SLOPE) was fitted on the CIFAR-10 and
NEU-DET rows of this suite (the midpoints between the two at 20 and 1,000 images) and is checked here on folders it
was not fitted on: emoji, Twemoji (fetched once from the npm registry; left out of --tiny) and digits.

Per folder and size n: REPEATS random subsets of n training images (seeded), decoded at 32 px (the score does not
move with the resolution: benchmarks/README.md "Domains"), each scored as `edgessl pretrain` scores a folder of n
images; the row keeps the scores, the threshold at n and how many subsets the rule sends the right way (tau 0.2 for
the look-alike folders, 0.1 for CIFAR-10's photos).
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.common import run_line

FOLDERS = {"cifar10-5k": "photos", "neu-det": "look-alike", "emoji": "look-alike", "twemoji": "look-alike",
           "digits": "look-alike"}
FITTED_ON = ("cifar10-5k", "neu-det")
SIZES = (20, 50, 100, 200, 400, 1000)
REPEATS = 5


def folder_rows(name: str, tiny: bool) -> list[dict[str, Any]]:
    """One row per size of one folder: its subsets' scores, the threshold there and the subsets sent the right way."""
    import torch

    from benchmarks.domains import folders
    from edgessl.data.folder import load_image_folder
    from edgessl.data.lookalike import choose_temperature, grey_thumbnails, nearest_similarity, threshold_for

    images = load_image_folder(folders(name, tiny)[0], 32)
    want = 0.2 if FOLDERS[name] == "look-alike" else 0.1
    rows = []
    for n in (5, 10) if tiny else SIZES:
        if n > len(images):
            break
        g = torch.Generator().manual_seed(n)
        scores = []
        for _ in range(2 if tiny else REPEATS):
            pick = torch.randperm(len(images), generator=g)[:n].sort().values
            scores.append(float(nearest_similarity(grey_thumbnails(images.get(pick))).mean()))
        right = sum(choose_temperature(s, n).value == want for s in scores)
        rows.append({"data": name, "kind": FOLDERS[name], "fitted_on": name in FITTED_ON, "images": n,
                     "folder_images": len(images), "scores": scores, "threshold": threshold_for(n), "right": right})
        print(f"lookalike {name} n={n}: {statistics.mean(scores):.3f} (threshold {threshold_for(n):.3f}), "
              f"{right}/{len(scores)} right", flush=True)
    return rows


def suite_lookalike(args) -> list[dict[str, Any]]:
    from benchmarks.domains import FETCHED

    return [row for name in FOLDERS if not (args.tiny and name in FETCHED) for row in folder_rows(name, args.tiny)]


def lookalike_section(rec: dict[str, Any]) -> str:
    from edgessl.data.lookalike import LOOKALIKE_THRESHOLD, SIZE_SLOPE

    rows = rec["rows"]
    sizes = sorted({r["images"] for r in rows})
    out = ["\n## Look-alike score and folder size (`--temperature auto` on small folders)\n",
           f"{run_line(rec)}; {rec['seconds'] / 60:.1f} min. Each cell: the mean look-alike score of "
           f"{len(rows[0]['scores'])} random subsets of that many training images (32 px) and how many of them the "
           "rule sends the right way (τ 0.2 for the look-alike folders, 0.1 for photos). The score rises with the "
           f"number of images compared, so the threshold falls with it: {LOOKALIKE_THRESHOLD:.2f} − {SIZE_SLOPE:g} · "
           "(1/√n − 1/√1000), fitted on the CIFAR-10 and NEU-DET rows and checked on the others (a fixed 0.70 had sent "
           "small look-alike folders to τ 0.1).\n",
           "| folder | kind | " + " | ".join(f"{n} images" for n in sizes) + " |",
           "|---|---|" + "---|" * len(sizes),
           "| threshold | | " + " | ".join(f"{_threshold(rows, n):.2f}" for n in sizes) + " |"]
    for name in dict.fromkeys(r["data"] for r in rows):
        mine = {r["images"]: r for r in rows if r["data"] == name}
        cells = [f"{statistics.mean(mine[n]['scores']):.2f} ({mine[n]['right']}/{len(mine[n]['scores'])})"
                 if n in mine else "–" for n in sizes]
        kind = mine[min(mine)]["kind"] + (" (fitted on)" if mine[min(mine)]["fitted_on"] else "")
        out.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    held = [r for r in rows if not r["fitted_on"]]
    right, total = sum(r["right"] for r in held), sum(len(r["scores"]) for r in held)
    fixed = sum((s >= LOOKALIKE_THRESHOLD) == (r["kind"] == "look-alike") for r in held for s in r["scores"])
    out.append(f"\nOn the folders the slope was not fitted on: {right} of {total} subsets sent the right way "
               f"({fixed} of {total} with a fixed {LOOKALIKE_THRESHOLD:.2f}).")
    return "\n".join(out) + "\n"


def _threshold(rows: list[dict[str, Any]], n: int) -> float:
    return next(r["threshold"] for r in rows if r["images"] == n)
