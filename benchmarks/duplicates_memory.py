"""Peak memory of the duplicate finder's pixel comparison at a given image size, in a fresh process.

    python -m benchmarks.duplicates_memory [--size 224] [--images 3000] [--per-image 6] [--fit 1024]

Random uint8 images (seeded) of --size px and about --per-image random pairs per image (what a folder's candidate
search proposes, without the embedding): the coarse prefilter of every pair (copies.coarse_of), then the full box
fit of the first --fit pairs (copies.copy_scores). Memory does not depend on the pictures, only on their size and
number. Prints one JSON line: images, size, pairs, peak RSS after the set-up and after each stage (MiB, the process's
high-water mark VmHWM), seconds of each stage.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.common import peak_rss_bytes
from edgessl.evaluate import copies as cp


def peak_mib() -> float:
    return peak_rss_bytes() / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--per-image", type=int, default=6)
    ap.add_argument("--fit", type=int, default=1024)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    rng = np.random.default_rng(0)
    pairs = np.unique(np.sort(rng.integers(0, args.images, (args.per_image * args.images, 2)), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    get = lambda i: rows[i]  # noqa: E731
    out = {"images": args.images, "size": args.size, "pairs": len(pairs), "fitted": min(args.fit, len(pairs)),
           "rss_after_setup_mib": peak_mib()}
    t = time.perf_counter()
    cp.coarse_of(get, pairs)
    out.update(coarse_s=time.perf_counter() - t, peak_after_coarse_mib=peak_mib())
    t = time.perf_counter()
    cp.copy_scores(get, pairs[: args.fit])
    out.update(fit_s=time.perf_counter() - t, peak_after_fit_mib=peak_mib())
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
