"""Duplicates suite: does `edgessl embed --duplicates` find planted near-duplicates? `python -m benchmarks.run
duplicates [--tiny]` (about 15 minutes on 2 cores; --epochs is not used: the suite trains for EPOCHS).

50 of the shared emoji training images (seeded) are copied beside their originals as a JPEG of quality 70 with a 5 %
crop (2.5 % off each side), composited on white as edgessl decodes RGBA. mobilenetv3_small (32 px) is pretrained on
that folder (originals + copies) for 30 and for 100 epochs with seeds 0 and 1, then every image is embedded and the
pairs are searched by raw cosine and by cosine of the embeddings PCA-whitened on the folder (`--whiten 128`, `256`).

Truth: a copy and its original are a pair; so are images with the same decoded pixels (the emoji set holds 7 such
groups). Recall: the copies paired with their original (or its twin). Precision over the pairs that hold a copy
(is the copy paired with its own original?) and over all pairs (the emoji set also holds many different images
closer than a JPEG copy: 26 clock faces, gender and skin-tone variants, which count as wrong here).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import edgessl

THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(20)]
SPACES = (None, 128, 256)  # raw cosine, --whiten 128, --whiten 256
EPOCHS = (30, 100)


def plant_copies(src: Path, dst: Path, n: int, seed: int = 0, quality: int = 70, crop: float = 0.05) -> list[Path]:
    """dst: symbolic links to every image of src (same subfolders) plus `n` seeded copies '<stem>_dup.jpg' beside
    their originals. Returns the copies' paths."""
    files = sorted(p for p in src.rglob("*.png"))
    for f in files:
        (dst / f.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), dst / f.relative_to(src))
    copies = []
    for f in random.Random(seed).sample(files, n):
        rgba = Image.open(f).convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        w, h = im.size
        c = int(round(w * crop))
        im = im.crop((c // 2, c // 2, w - (c - c // 2), h - (c - c // 2)))
        out = dst / f.relative_to(src).with_name(f.stem + "_dup.jpg")
        im.save(out, quality=quality)
        copies.append(out)
    return copies


def identity(paths: list[str]) -> list[str]:
    """One key per image: a copy shares its original's; originals with the same decoded pixels share one."""
    keys = []
    for p in map(Path, paths):
        src = p.with_name(p.name[: -len("_dup.jpg")] + ".png") if p.name.endswith("_dup.jpg") else p
        keys.append(hashlib.sha1(Image.open(src).convert("RGBA").tobytes()).hexdigest())
    return keys


def precision_recall(pairs: np.ndarray, copy: np.ndarray, keys: np.ndarray) -> tuple[float, float, float]:
    """pairs: (P, 2) image indices; copy: (N,) bool, the planted copies; keys: (N,) identity keys. Returns (precision
    over the pairs holding a copy, precision over all pairs, recall: the copies paired with their original or a
    pixel twin of it)."""
    right = keys[pairs[:, 0]] == keys[pairs[:, 1]]
    holds_copy = copy[pairs[:, 0]] | copy[pairs[:, 1]]
    good = right & holds_copy
    found = {int(i) for i in pairs[good].ravel() if copy[i]}  # copies with at least one right partner
    return (int(good.sum()) / max(int(holds_copy.sum()), 1), int(right.sum()) / max(len(pairs), 1),
            len(found) / int(copy.sum()))


def score(paths: list[str], unit: np.ndarray, keys: list[str]) -> dict[str, Any]:
    """precision_recall at each of THRESHOLDS, and how often a copy's nearest image is its original (or a pixel
    twin of it). unit: (N, D) unit rows."""
    from edgessl.evaluate.embed import duplicate_pairs, top_k_neighbours

    copy = np.array([p.endswith("_dup.jpg") for p in paths])
    keys = np.array(keys)
    pairs, cos = duplicate_pairs(unit, THRESHOLDS[0])
    curve = []
    for t in THRESHOLDS:
        chosen = pairs[cos >= t]
        p_copies, p_all, recall = precision_recall(chosen, copy, keys)
        curve.append({"threshold": t, "recall": recall, "precision_copies": p_copies, "precision_all": p_all,
                      "pairs": len(chosen)})
    idx, _ = top_k_neighbours(unit, 1, use_faiss=False)
    nn = float((keys[idx[copy, 0]] == keys[copy]).mean())
    best = max(curve, key=lambda c: (min(c["precision_copies"], c["recall"]), c["threshold"]))
    return {"nn_is_original": nn, "best": best, "curve": curve}


def suite_duplicates(args) -> list[dict[str, Any]]:
    from benchmarks.datasets import emoji, stratified_subset
    from edgessl.evaluate.embed import pca_whitening, unit_rows, whitened_unit_rows

    source, _ = emoji()
    n, seeds, spaces, epochs = (50, (0, 1), SPACES, EPOCHS) if not args.tiny else (4, (0,), (None, 8), (1,))
    if args.tiny:
        source = stratified_subset(source, 4, 0, "emoji-train-tiny")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        plant_copies(source, data, n)
        for e, seed in ((e, seed) for e in epochs for seed in seeds):
            load = os.getloadavg()[0]
            run = edgessl.pretrain(data=str(data), out=str(Path(tmp) / f"run{e}-{seed}"), backbone="mobilenetv3_small",
                                   image_size=32, epochs=e, seed=seed, quiet=True, eval_every=0,
                                   batch_size=8 if args.tiny else 128)
            res = edgessl.embed(run.run_dir, data, Path(tmp) / f"emb{e}-{seed}.npz")
            keys = identity(res.paths)
            for k in spaces:
                unit = unit_rows(res.embeddings) if k is None else whitened_unit_rows(
                    res.embeddings, *pca_whitening(res.embeddings, k))
                r = score(res.paths, unit, keys)
                rows.append({"epochs": e, "seed": seed, "space": "raw cosine" if k is None else f"--whiten {k}",
                             "whiten": k, "images": len(res.paths), "copies": n, "load_average_1min": load, **r})
                b = r["best"]
                print(f"duplicates {e} epochs seed {seed} {rows[-1]['space']}: nn {r['nn_is_original']:.2f}, best T "
                      f"{b['threshold']}: P {b['precision_copies']:.2f} / {b['precision_all']:.2f} R {b['recall']:.2f}",
                      flush=True)
    return rows


def duplicates_section(rec: dict[str, Any]) -> str:
    m, r0 = rec["machine"], rec["rows"][0]
    seeds = len({r["seed"] for r in rec["rows"]})
    out = ["## Planted near-duplicates: `edgessl embed --duplicates`\n",
           f"{m.get('cpu')}, torch {m.get('torch')}, edgessl {m.get('edgessl')}, {m.get('date')}; "
           f"`{rec['command']}`. {r0['copies']} emoji training images copied beside their originals (JPEG quality "
           f"70, 5 % crop); mobilenetv3_small at 32 px pretrained on the {r0['images']:,} images "
           f"({seeds} seed{'s' if seeds > 1 else ''} per number of epochs), "
           "then pairs searched by raw cosine or with `--whiten K`. Precision over the pairs that hold a copy / over "
           "all pairs (pixel-identical emoji count as duplicates); recall of the planted pairs. \"Best T\" is the "
           "threshold with the highest min(precision over copies, recall), chosen after the fact: it shows what the "
           "embedding can separate, not what a fixed threshold gives.\n",
           "| epochs | seed | search | copy's nearest is its original | best T | precision (copies) | precision (all) "
           "| recall | at T = 0.90: P (copies) / R |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        b = r["best"]
        at = next(c for c in r["curve"] if c["threshold"] == 0.9)
        out.append(f"| {r['epochs']} | {r['seed']} | {r['space']} | {r['nn_is_original']:.2f} | {b['threshold']:.2f} | "
                   f"{b['precision_copies']:.2f} | {b['precision_all']:.2f} | {b['recall']:.2f} | "
                   f"{at['precision_copies']:.2f} / {at['recall']:.2f} |")
    return "\n".join(out) + "\n"
