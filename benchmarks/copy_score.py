"""Copy-score suite: the pixel copy score alone (no encoder, no calibration), sharp colour against colour compared at
the resolution a JPEG copy keeps (edgessl.evaluate.copies.chroma_blur), and each image as decoded against each pair
at its coarser image's resolution (edgessl.evaluate.resolution), on the duplicates suite's folders.
`python -m benchmarks.run copy-score [--tiny]` (about 5 minutes on 2 cores).

Per folder (the duplicates suite's four, at their sizes): COPIES planted copies by the copy model (seed 11, not a
seed the duplicates suite plants) scored against their originals, and the folder's look-alike pairs (each image's 4
nearest other images on the search's 8 x 8 thumbnails, each colour's mean removed; pixel-identical pairs left out)
scored the same way.
For each CHROMA value (the blur of the colour around the luma, in comparison pixels; 0: none): the share of copies
scoring above the folder's 10th and 20th best look-alike (what a threshold that flags only those few look-alikes
would find), the look-alikes above 0.7, the copies below 0.7 and the copies' median score.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from benchmarks.common import run_line

CHROMA = (0.0, 0.5, 1.0, 1.5)  # CHROMA_SMOOTH values compared (0: the colour as sharp as the luma)
COPIES = 400  # planted copies per folder (--tiny: 8)
NEIGHBOURS = 4  # look-alike pairs: each image's nearest others on the thumbnails
RANKS = (10, 20)  # recall above the k-th best look-alike


def lookalike_pairs(rows):
    """(N, 3, S, S) uint8 -> (P, 2) int64 pairs i < j: each image with its NEIGHBOURS nearest others on the
    thumbnails `edgessl embed` proposes candidates with (edgessl.evaluate.pixels.thumbnails), pixel-identical pairs
    left out."""
    import numpy as np
    import torch

    from edgessl.evaluate.pixels import thumbnails

    t = torch.from_numpy(thumbnails(rows.__getitem__, len(rows)))
    sim = t @ t.T
    sim.fill_diagonal_(-2.0)
    near = sim.topk(min(NEIGHBOURS, len(rows) - 1), dim=1).indices
    pairs = np.stack([np.repeat(np.arange(len(rows)), near.shape[1]), near.flatten().numpy()], 1)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    same = (rows[pairs[:, 0]] == rows[pairs[:, 1]]).flatten(1).all(dim=1).numpy()
    return pairs[~same]


def planted(paths: list[Path], size: int, count: int):
    """(original rows (count,), (count, 3, size, size) uint8 copies, (count,) each copy's shorter side as stored) by
    the copy model, seed 11."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from edgessl.data.copies import make_copy, planted_image

    rows = sorted(random.Random(11).sample(range(len(paths)), min(count, len(paths))))
    made = [make_copy(planted_image(paths[r]), random.Random(f"11-{i}")) for i, r in enumerate(rows)]
    copies = [ImageOps.fit(c, (size, size), method=Image.Resampling.BICUBIC) for c in made]
    pixels = torch.from_numpy(np.stack([np.asarray(c, np.uint8) for c in copies])).permute(0, 3, 1, 2)
    return np.array(rows), pixels, torch.tensor([min(c.size) for c in made])


def folder_rows(name: str, folder: Path, size: int, tiny: bool) -> list[dict[str, Any]]:
    """One row per CHROMA value on one folder, each image as decoded; and one at the default CHROMA with each pair
    compared at its coarser image's resolution (copy_scores' sides, as `edgessl embed` compares them)."""
    import numpy as np

    import edgessl.evaluate.copies as cp
    from edgessl.data.folder import load_image_folder, shorter_sides

    images = load_image_folder(folder, size)  # decoded (and cached) as edgessl decodes them
    paths, rows = images.paths, images.get(range(len(images)))
    looks = lookalike_pairs(rows)
    originals, copies, copy_sides = planted(paths, size, 8 if tiny else COPIES)
    pos = np.stack([np.arange(len(originals)), originals], 1)
    sides = shorter_sides(paths)
    kept, out = cp.CHROMA_SMOOTH, []
    try:
        for chroma, matched in [(c, False) for c in CHROMA] + [(kept, True)]:
            cp.CHROMA_SMOOTH = chroma or 1e-6  # a Gaussian of 1e-6 pixels keeps every pixel as it is
            t0 = time.time()
            own = {"sides_a": sides} if matched else {}
            alike = np.sort(cp.copy_scores(rows.__getitem__, looks, **own))[::-1]
            both = {"sides_a": copy_sides.__getitem__, "sides_b": sides} if matched else {}
            true = cp.copy_scores(copies.__getitem__, pos, rows.__getitem__, **both)
            above = {f"recall_above_{k}th": float(np.mean(true > alike[k - 1])) if len(alike) >= k else None
                     for k in RANKS}
            out.append({"data": name, "size": size, "images": len(rows), "lookalike_pairs": len(looks),
                        "copies": len(true), "chroma": chroma, "matched": matched, **above,
                        "lookalikes_above_0.7": int(np.sum(alike > 0.7)), "copies_below_0.7": int(np.sum(true < 0.7)),
                        "copy_median": float(np.median(true)), "seconds": time.time() - t0})
            how = " at the pair's coarser resolution" if matched else ""
            print(f"copy-score {name} chroma {chroma}{how}: {above} copies < 0.7: {out[-1]['copies_below_0.7']}",
                  flush=True)
    finally:
        cp.CHROMA_SMOOTH = kept
    return out


def suite_copy_score(args) -> list[dict[str, Any]]:
    from benchmarks.duplicates import folders

    return [row for name, (folder, size) in folders(args.tiny).items()
            for row in folder_rows(name, folder, size, args.tiny)]


def copy_score_section(rec: dict[str, Any]) -> str:
    from edgessl.evaluate.copies import CHROMA_SMOOTH
    from edgessl.evaluate.resolution import FINE

    out = ["\n## Copy score: colour compared at the resolution a JPEG copy keeps, each pair at its coarser image's\n",
           f"{run_line(rec)}; "
           f"{rec['seconds'] / 60:.1f} min. The pixel copy score alone (no encoder): {rec['rows'][0]['copies']} "
           "copies per folder planted by the copy model (seed 11) against the folder's look-alike pairs (each image's "
           f"{NEIGHBOURS} nearest on the 8 x 8 thumbnails the search proposes candidates with, pixel-identical pairs "
           "left out); chroma: the blur of the "
           f"colour around the luma in comparison pixels (the default: {CHROMA_SMOOTH:g}; 0: as sharp as the luma). "
           "Recall above the k-th look-alike: the copies scoring above the folder's k-th best look-alike pair. "
           "Resolution: each image as decoded (its shorter side enlarged or shrunk to the folder's size), or each "
           "pair compared at its coarser image's (the sharper one resampled through the smaller file's size first, "
           "edgessl.evaluate.resolution, as `edgessl embed` compares them; only files under "
           f"{FINE} px change).\n",
           "| folder | images | look-alike pairs | chroma | resolution | recall above 10th look-alike | above 20th | "
           "look-alikes > 0.7 | copies < 0.7 | copies' median |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        cells = [r["data"], f"{r['images']:,}", f"{r['lookalike_pairs']:,}", f"{r['chroma']:g}",
                 "the pair's coarser" if r.get("matched") else "as decoded",
                 *("–" if r[f"recall_above_{k}th"] is None else f"{r[f'recall_above_{k}th']:.3f}" for k in RANKS),
                 str(r["lookalikes_above_0.7"]), f"{r['copies_below_0.7']} of {r['copies']}", f"{r['copy_median']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
