"""Duplicates suite: does `edgessl embed --duplicates auto` find planted copies, in folders it was never tuned on?
`python -m benchmarks.run duplicates [--tiny] [--only 30|scale|twemoji]` (about 70 minutes on 2 cores; --epochs is not
used: the suite trains for EPOCHS and runs the scale part, or only the lengths, folders and parts --only names,
keeping the other rows from the earlier run).

Folders: the emoji training images (1,529, 64 px), NEU-DET's steel scans (1,440, 64 px), CIFAR-10 subsets of 2,000
and of 5,000 images (32 px; the 5,000 are the scale part's) and Twemoji's training split (1,529 of another
vendor's emoji, 64 px, fetched once from the npm registry: benchmarks.datasets.twemoji). mobilenetv3_small is
pretrained on each clean folder for 10 and for 30 epochs (a third of the default, and the default: the encoder only
proposes the candidate pairs, the pixel copy score decides). Then, with the one
default (`--duplicates auto`, no other flag):
- clean: the folder as it is: how many images are flagged (the pairs are listed: real copies in the source data,
  such as emoji that render the same picture, count as found, not as errors);
- two planted samples (seeds 1 and 2; the calibration plants its own copies with seed 0) of COPIES copies made by
  the copy model (edgessl.data.copies: JPEG 60-95, crop up to 10 %, resize, brightness and contrast), each beside its
  original, and two samples (seeds 3 and 4) made by a transformation the calibration never sees (a mild blur).
  --tiny plants seed 1 only.
Scale (the cost): `edgessl embed` alone and with `--duplicates auto` on 5,000 of CIFAR-10's training images (a
typical folder) and on the whole training split (50,000 images; 32 px; the encoder: 10 epochs on the 2,000-image
subset), each step's seconds (EmbedResult.seconds) and what the clean folder gets flagged. --tiny: the tiny folder.
Precision: of the copy pairs flagged that hold a planted copy, the share that pair it with its original (or a pixel
twin of it); recall: the planted copies paired with their original.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import edgessl
from benchmarks.common import run_line
from edgessl.options import EmbedOptions

EPOCHS = (10, 30)  # the encoders' lengths: a third of the default 30, and the default
PLANTS = ((1, None), (3, "blur"), (2, None), (4, "blur"))  # (seed, held-out transformation); --tiny: the first
COPIES = 50
PLANTED = EmbedOptions.__dataclass_fields__["planted"].default  # the calibration's planted copies: the default
# twemoji: fetched from the npm registry, never in --tiny
DATASETS = ("emoji", "neu-det", "cifar10-2k", "cifar10-5k", "twemoji")


def folders(tiny: bool, names: tuple[str, ...] = DATASETS) -> dict[str, tuple[Path, int]]:
    """name -> (clean folder, image size), for `names` (--tiny: the tiny emoji folder)."""
    from benchmarks.datasets import cifar10, emoji, neu_det, stratified_subset, twemoji

    if tiny:
        return {"emoji": (stratified_subset(emoji()[0], 4, 0, "emoji-train-tiny"), 32)}
    make = {"emoji": lambda: (emoji()[0], 64), "neu-det": lambda: (neu_det()[0], 64),
            "cifar10-2k": lambda: (stratified_subset(cifar10()[0], 200, 0, "cifar10-train-200pc-s0"), 32),
            "cifar10-5k": lambda: (stratified_subset(cifar10()[0], 500, 0, "cifar10-train-500pc-s0"), 32),
            "twemoji": lambda: (twemoji()[0], 64)}
    return {name: make[name]() for name in names}


def encoder(src: Path, out: Path, size: int, epochs: int, tiny: bool = False):
    """The suite's encoder: mobilenetv3_small pretrained on src at `size` px for `epochs` (--tiny: batches of 8)."""
    return edgessl.pretrain(data=str(src), out=str(out), image_size=size, epochs=epochs, backbone="mobilenetv3_small",
                            quiet=True, eval_every=0, batch_size=8 if tiny else 128)


def chosen_folders(args) -> tuple[str, ...]:
    """The folders `--only` names (e.g. `--only twemoji,10`), else all of DATASETS."""
    named = tuple(part for part in (args.only or ()) if part in DATASETS)
    return named or DATASETS


def planted_folder(src: Path, dst: Path, n: int, seed: int, held_out: str | None) -> dict[str, str]:
    """dst: symbolic links to every image of src plus n copies '<stem>_copy.png' beside their originals.
    Returns {copy path: original path} (the originals as linked in dst)."""
    from edgessl.data.copies import plant
    from edgessl.data.signature import scan_images

    files = scan_images(src)
    for f in files:
        (dst / f.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), dst / f.relative_to(src))
    chosen = sorted(random.Random(seed).sample(files, min(n, len(files))))
    made = plant(chosen, dst / ".planted-tmp", seed, held_out)
    truth = {}
    for orig, copy in zip(chosen, made, strict=True):
        target = dst / orig.relative_to(src).with_name(orig.stem + "_copy.png")
        copy.rename(target)
        truth[str(target)] = str(dst / orig.relative_to(src))
    (dst / ".planted-tmp").rmdir()
    return truth


def twins(paths: list[str]) -> dict[str, str]:
    """path -> the sha1 of its decoded pixels (edgessl's decode rules at 64 px): pixel twins share one."""
    import hashlib

    from edgessl.data.folder import decode_image

    return {p: hashlib.sha1(decode_image(p, 64).tobytes()).hexdigest() for p in paths}


def score(result, truth: dict[str, str], found: tuple[list, list, list, set] | None = None) -> dict[str, Any]:
    """Precision and recall of the planted copies in an EmbedResult (see the module docstring); found: matched()'s
    answer when the caller has it already."""
    copy_pairs, holding, good, hit = found or matched(result, truth)
    return {"pairs": len(copy_pairs), "pairs_with_copies": len(holding), "right": len(good),
            "precision": len(good) / len(holding) if holding else 1.0, "recall": len(hit) / max(len(truth), 1)}


def matched(result, truth: dict[str, str]) -> tuple[list, list, list, set]:
    """(the duplicate pairs as paths, those holding a planted copy, those pairing it with its original or a pixel
    twin of it, the planted copies so found)."""
    found = result.duplicates
    paths = result.paths
    copy_pairs = [(paths[a], paths[b]) for (a, b), k in zip(found.pairs.tolist(), found.kinds, strict=True)]
    holding = [(a, b) for a, b in copy_pairs if a in truth or b in truth]
    pixel = twins(sorted({p for pair in holding for p in pair} | {truth[c] for c in truth}))

    def right(a: str, b: str) -> bool:
        c, o = (a, b) if a in truth else (b, a)
        return o in pixel and pixel.get(truth[c]) == pixel[o]

    good = [pair for pair in holding if right(*pair)]
    return copy_pairs, holding, good, {a if a in truth else b for a, b in good}


def missed(hit: set, truth: dict[str, str], seed: int, held_out: str | None, size: int) -> list[dict[str, Any]]:
    """The planted copies not found with their original (hit: matched()'s found copies): each one's draws
    (edgessl.data.copies.edits: crop, resize, light, JPEG quality) and its copy score with its original at the
    encoder's size (fitted whatever the prefilter would say, at the pair's coarser resolution as embed compares)."""
    import numpy as np
    import torch

    from edgessl.data.copies import edits
    from edgessl.data.folder import decode_image, shorter_sides
    from edgessl.evaluate.copies import copy_scores

    copies = list(truth)
    lost = [i for i, c in enumerate(copies) if c not in hit]
    if not lost:
        return []
    draws = edits([Path(truth[c]) for c in copies], seed, held_out)
    files = [p for i in lost for p in (copies[i], truth[copies[i]])]
    rows = torch.from_numpy(np.stack([decode_image(p, size).transpose(2, 0, 1) for p in files]))
    scores = copy_scores(lambda index: rows[index], np.arange(2 * len(lost)).reshape(-1, 2),
                         sides_a=shorter_sides(files))
    return [{"copy": Path(copies[i]).name, **draws[i].record(), "score": round(float(v), 4)}
            for i, v in zip(lost, scores.tolist(), strict=True)]


def rule_record(result) -> dict[str, Any]:
    """The rule's estimates, and the look-alike pair that held an "auto" threshold up with the rule without it."""
    r, limit = result.rule, result.rule.limit
    held = {"set_by": None} if limit is None else {
        "set_by": [Path(result.paths[i]).name for i in limit.pair], "set_by_score": limit.score,
        "threshold_without": limit.threshold_without, "estimated_recall_without": limit.recall_without}
    return {"threshold": r.threshold, "estimated_precision": r.precision, "estimated_recall": r.recall,
            "estimated_precision_low": r.precision_low, "unsure": r.unsure, "planted_for_calibration": r.planted,
            "reached": r.reached, **held}


def flagged(result, root: Path | None = None) -> dict[str, Any]:
    """The images a clean folder has in duplicate groups, and the pairs (for a person to judge): file names, or
    paths relative to `root` (where names repeat, as in CIFAR-10's class folders)."""
    found, paths = result.duplicates, result.paths

    def name(i: int) -> str:
        return Path(paths[i]).name if root is None else str(Path(paths[i]).relative_to(root))

    images = {i for pair in found.pairs.tolist() for i in pair}
    return {"images": len(paths), "flagged": len(images), "flagged_share": len(images) / len(paths),
            "pairs": [[name(a), name(b), kind, round(float(s), 4)]
                      for (a, b), kind, s in zip(found.pairs.tolist(), found.kinds, found.scores.tolist(),
                                                 strict=True)]}


def one_encoder(name: str, src: Path, size: int, epochs: int, work: Path, tiny: bool) -> list[dict[str, Any]]:
    """Pretrain on the clean folder, then the clean and planted embeds."""
    run = encoder(src, work / f"run-{name}-{epochs}", size, epochs, tiny)
    planted = 20 if tiny else PLANTED
    rows = []
    load = os.getloadavg()[0]
    res = edgessl.embed(run.run_dir, str(src), str(work / f"clean-{name}-{epochs}" / "e.npz"), duplicates="auto",
                        planted=planted)
    repeated = len({Path(p).name for p in res.paths}) < len(res.paths)  # CIFAR-10: 0001.jpg in every class folder
    rows.append({"data": name, "epochs": epochs, "sample": "clean", "load_average_1min": load, **rule_record(res),
                 **flagged(res, src if repeated else None)})
    for seed, held in PLANTS[:1] if tiny else PLANTS:
        data = work / f"planted-{name}-{seed}"
        if not data.exists():
            truth = planted_folder(src, data, 4 if tiny else COPIES, seed, held)
            (data.parent / f"{data.name}.truth").write_text("\n".join(f"{c}\t{o}" for c, o in truth.items()))
        truth = dict(line.split("\t") for line in (data.parent / f"{data.name}.truth").read_text().splitlines())
        res = edgessl.embed(run.run_dir, str(data), str(work / f"emb-{name}-{epochs}-{seed}" / "e.npz"),
                            duplicates="auto", planted=planted)
        found = matched(res, truth)
        rows.append({"data": name, "epochs": epochs, "sample": f"seed {seed}" + (f" ({held})" if held else ""),
                     "held_out": held, "copies": len(truth), **rule_record(res), **score(res, truth, found),
                     "missed": missed(found[3], truth, seed, held, size)})
        print(f"duplicates {name} {epochs} epochs {rows[-1]['sample']}: P {rows[-1]['precision']:.2f} "
              f"R {rows[-1]['recall']:.2f} (estimated {rows[-1]['estimated_precision']:.2f} / "
              f"{rows[-1]['estimated_recall']:.2f})", flush=True)
    return rows


def encoder_lengths(args) -> tuple[int, ...]:
    """The encoders' epochs: EPOCHS, or those `--only` names (e.g. `--only 30`: the other lengths' rows are kept;
    `--only scale`: none)."""
    if args.tiny:
        return (1,)
    if not args.only:
        return EPOCHS
    if not all((part.isdigit() and int(part) > 0) or part in ("scale", "spread") or part in DATASETS
               for part in args.only):
        raise SystemExit(f"duplicates: --only takes encoder epochs such as 10,30, scale, spread and folders "
                         f"({', '.join(DATASETS)}), not {','.join(args.only)}")
    lengths = tuple(int(part) for part in args.only if part.isdigit())
    return lengths or (EPOCHS if any(part in DATASETS for part in args.only) else ())


def with_scale(args) -> bool:
    """Whether the run includes the scale part: always, unless --only leaves it out."""
    return args.tiny or not args.only or "scale" in args.only


def _part(r: dict[str, Any]) -> Any:
    return r["part"] if r.get("part") in ("scale", "spread") else r["epochs"]


def merged(rows: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A partial run's rows with the earlier rows of the other folders and encoder lengths (and the scale part when
    this run has none), by folder and then epochs, then the spread rows, the scale rows last."""
    done = {(r["data"], _part(r)) for r in rows}
    order = {name: i for i, name in enumerate(DATASETS)}
    both = [r for r in earlier if (r["data"], _part(r)) not in done] + rows
    last = {"spread": 1, "scale": 2}
    return sorted(both, key=lambda r: (last.get(r.get("part"), 0), order.get(r["data"], len(order)), r["epochs"]))


SCALE_EPOCHS = 10  # the scale part's encoder: this many epochs on the 2,000-image CIFAR-10 subset


SCALE_FOLDERS = ("cifar10-5k", "cifar10-50k", "cifar10-100k")  # 5,000 CIFAR-10 training images (a typical
# folder), all 50,000, and the 50,000 with a mirror image of each (the 100,000 the cost bound names)


def scale_folder(name: str) -> Path:
    from benchmarks.datasets import cifar10, mirrored_double, stratified_subset

    if name == "cifar10-5k":
        return stratified_subset(cifar10()[0], 500, 0, "cifar10-train-500pc-s0")
    return cifar10()[0] if name == "cifar10-50k" else mirrored_double(cifar10()[0], "cifar10-train-mirrored")


def scale_rows(work: Path, tiny: bool) -> list[dict[str, Any]]:
    """`edgessl embed` alone and with --duplicates auto on the folders of SCALE_FOLDERS (--tiny: the tiny emoji
    folder): seconds per step and the clean folder's flags."""
    subset = folders(tiny)["emoji" if tiny else "cifar10-2k"][0]
    epochs = 1 if tiny else SCALE_EPOCHS
    run = encoder(subset, work / "run-scale", 32, epochs, tiny)
    rows = []
    for name in ("emoji-tiny",) if tiny else SCALE_FOLDERS:
        train = subset if tiny else scale_folder(name)
        rows.append(scale_row(run.run_dir, train, name, work / name, epochs, tiny))
    return rows + memory_rows(tiny)


MEMORY_SIZES = (64, 224)  # image sides of the memory probe (benchmarks/duplicates_memory.py)


def memory_rows(tiny: bool) -> list[dict[str, Any]]:
    """Peak memory of the pixel comparison on 3,000 random images per size, each in a fresh process (--tiny: 40
    images of 32 px, in this process)."""
    from benchmarks.common import probe

    sizes, images = ((32,), 40) if tiny else (MEMORY_SIZES, 3000)
    rows = []
    for size in sizes:
        got = probe("benchmarks.duplicates_memory", ["--size", str(size), "--images", str(images)], tiny)
        rows.append({"part": "scale", "kind": "memory", "data": f"random {size} px", "epochs": 0, **got})
        print(f"duplicates memory {size} px: peak {got['peak_after_fit_mib']:.0f} MiB "
              f"(after set-up {got['rss_after_setup_mib']:.0f} MiB)", flush=True)
    return rows


def scale_row(run_dir: Path, train: Path, name: str, work: Path, epochs: int, tiny: bool) -> dict[str, Any]:
    load = os.getloadavg()[0]
    plain = edgessl.embed(run_dir, str(train), str(work / "scale-plain" / "e.npz"))
    res = edgessl.embed(run_dir, str(train), str(work / "scale-dup" / "e.npz"), duplicates="auto",
                        planted=20 if tiny else PLANTED)
    found = flagged(res, train)  # with every flagged pair, for a person to judge
    kinds = [p[2] for p in found["pairs"]]
    row = {"part": "scale", "data": name, "epochs": epochs, "encoder_data": "emoji-tiny" if tiny else "cifar10-2k",
           "load_average_1min": load, "plain_seconds": plain.seconds, "seconds": res.seconds, **rule_record(res),
           **found, "exact_pairs": kinds.count("exact"), "copy_pairs": kinds.count("copy")}
    print(f"duplicates scale {row['data']}: {row['images']:,} images, embed alone {plain.seconds['embed']:.0f} s, "
          f"with --duplicates auto {sum(res.seconds.values()):.0f} s {res.seconds}", flush=True)
    return row


def suite_duplicates(args) -> list[dict[str, Any]]:
    rows = []
    lengths = encoder_lengths(args)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (src, size) in folders(args.tiny, chosen_folders(args)).items():
            for epochs in lengths:
                rows += one_encoder(name, src, size, epochs, Path(tmp), args.tiny)
        if with_spread(args):
            rows += spread_rows(Path(tmp))
        if with_scale(args):
            rows += scale_rows(Path(tmp), args.tiny)
    return rows


SPREAD = ("emoji", "twemoji", "neu-det")  # the folders with look-alikes that score like copies
SPREAD_PLANTED = (400, 800)  # calibration sizes compared
SPREAD_SEEDS = (0, 1, 2)  # calibration samples (embed --seed)


def with_spread(args) -> bool:
    """Whether the run includes the spread part: a full run or `--only spread` (never --tiny)."""
    return not args.tiny and (not args.only or "spread" in args.only)


def spread_rows(work: Path) -> list[dict[str, Any]]:
    """How far the rule moves with the calibration's sample: for each SPREAD folder, a 10-epoch encoder and the
    copy model's planted sample of seed 2 (seed 1 on Twemoji, where the threshold rose most); embed --duplicates
    auto with --planted 400 and 800, --seed 0, 1, 2."""
    rows = []
    for name, (src, size) in folders(False, SPREAD).items():
        run = encoder(src, work / f"run-spread-{name}", size, 10)
        data = work / f"spread-{name}"
        sample = 1 if name == "twemoji" else 2
        truth = planted_folder(src, data, COPIES, sample, None)
        for planted in SPREAD_PLANTED:
            for seed in SPREAD_SEEDS:
                load = os.getloadavg()[0]
                res = edgessl.embed(run.run_dir, str(data), str(work / f"spread-{name}-{planted}-{seed}" / "e.npz"),
                                    duplicates="auto", planted=planted, seed=seed)
                rows.append({"part": "spread", "data": name, "epochs": 10, "sample": f"seed {sample}", "seed": seed,
                             "load_average_1min": load, "calibration_seconds": res.seconds["calibration"],
                             **rule_record(res), **score(res, truth)})
                print(f"duplicates spread {name} planted {planted} seed {seed}: threshold {res.rule.threshold:.3f} "
                      f"P {rows[-1]['precision']:.2f} R {rows[-1]['recall']:.2f}", flush=True)
    return rows


def estimated(r: dict[str, Any]) -> str:
    """A row's estimated precision, with its pessimistic end in brackets when the calibration had unsure matches
    (rows from before the pessimistic end was recorded: the estimate alone)."""
    low = r.get("estimated_precision_low")
    return f"{r['estimated_precision']:.2f}" + (f" ({low:.2f})" if r.get("unsure") and low is not None else "")


def duplicates_section(rec: dict[str, Any]) -> str:
    out = ["## Duplicates: `edgessl embed --duplicates auto` on folders it was never tuned on\n",
           f"{run_line(rec)}. mobilenetv3_small pretrained on each clean folder; the default setting only. "
           "Planted samples: copies by the copy model (seeds 1, 2) and by a mild blur the calibration never "
           "uses (seeds 3, 4), each beside its original; the calibration plants its own copies (seed 0). "
           "Precision: of the flagged pairs that hold a planted copy, the share pairing it with its original; "
           "recall: the planted copies found. Estimated precision (in brackets: if the matches the calibration "
           "took for copies already in the folder are look-alikes, when there are any) and recall: what the command "
           "printed.\n",
           "| folder | encoder epochs | sample | precision | recall | estimated precision / recall | threshold |",
           "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if r.get("sample") in ("clean", None) or r.get("part") == "spread":
            continue
        out.append(f"| {r['data']} | {r['epochs']} | {r['sample']} | {r['precision']:.2f} | {r['recall']:.2f} | "
                   f"{estimated(r)} / {r['estimated_recall']:.2f} | {r['threshold']:.3f} |")
    out += ["\nThe same folders without planted copies (what a user's clean folder gets flagged):\n",
            "| folder | encoder epochs | images | flagged | share | exact pairs | copy pairs | estimated precision |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if r.get("sample") != "clean":
            continue
        kinds = [p[2] for p in r["pairs"]]
        out.append(f"| {r['data']} | {r['epochs']} | {r['images']:,} | {r['flagged']} | {r['flagged_share']:.1%} | "
                   f"{kinds.count('exact')} | {kinds.count('copy')} | {estimated(r)} |")
    rows = rec["rows"]
    return "\n".join(out + missed_section(rows) + spread_section(rows) + scale_section(rows)) + "\n"


def missed_section(rows: list[dict[str, Any]]) -> list[str]:
    """The planted copies each sample missed, with what the copy model did to them (rows that recorded it)."""
    lost = [(r, m) for r in rows if r.get("missed") for m in r["missed"]]
    if not lost:
        return []
    out = ["\nThe planted copies not found, with what was done to them (crop: share of the width / height cut off; "
           "resize: the copy's size over the original's; score: its copy score with its original):\n",
           "| folder | encoder epochs | sample | copy | crop | resize | JPEG quality | score |",
           "|---|---|---|---|---|---|---|---|"]
    for r, m in lost:
        out.append(f"| {r['data']} | {r['epochs']} | {r['sample']} | {m['copy']} | {m['crop_w']:.2f} / "
                   f"{m['crop_h']:.2f} | {m['scale']:.2f} | {m['quality']} | {m['score']:.3f} |")
    return out


def spread_section(rows: list[dict[str, Any]]) -> list[str]:
    """The spread rows: the rule under other calibration samples and sizes (none: no table)."""
    spread = [r for r in rows if r.get("part") == "spread"]
    if not spread:
        return []
    out = ["\nHow far the rule moves with the calibration's sample (`--only spread`): a 10-epoch encoder, the copy "
           "model's planted sample (seed 2; Twemoji: 1), `--duplicates auto` with `--planted` 400 and 800 and "
           "`--seed` 0, 1, 2. At precision 0.95 and a 3 % share of copies, 400 planted copies let no look-alike "
           "among them score above the threshold (the threshold is the highest look-alike the sample met); 800 let "
           "one, but meet more of the folder's look-alikes. Set by: the look-alike pair that held the threshold up "
           "(a copy of the first image matched the second; the command prints it), and the threshold and estimated "
           "recall without it (none: without it the threshold would find no more copies):\n",
           "| folder | planted | seed | threshold | precision | recall | estimated precision / recall | "
           "calibration s | set by | without it |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in spread:
        out.append(f"| {r['data']} | {r['planted_for_calibration']} | {r['seed']} | {r['threshold']:.3f} | "
                   f"{r['precision']:.2f} | {r['recall']:.2f} | {estimated(r)} / {r['estimated_recall']:.2f} | "
                   f"{r['calibration_seconds']:.0f} | {set_by(r)} |")
    return out


def set_by(r: dict[str, Any]) -> str:
    """A row's 'set by' and 'without it' cells: the look-alike pair with its score; the threshold and estimated
    recall without it (rows from before the pair was recorded: blank; without it the threshold would find no more
    copies: none)."""
    if "set_by" not in r:
        return " | "
    if r["set_by"] is None:
        return "none | "
    a, b = r["set_by"]
    return f"{a} / {b} ({r['set_by_score']:.3f}) | {r['threshold_without']:.3f}; {r['estimated_recall_without']:.2f}"


def scale_section(rows: list[dict[str, Any]]) -> list[str]:
    """The cost table of the scale rows (none: no table)."""
    scale = [r for r in rows if r.get("part") == "scale" and r.get("kind") != "memory"]
    if not scale:
        return []
    out = ["\nCost on a larger folder (`--only scale`): `edgessl embed` alone, then with `--duplicates auto` (its "
           "steps: the embedding, the pixel rows with their hashes and thumbnails, the calibration on "
           f"{scale[0].get('planted_for_calibration', PLANTED)} planted copies, the search of the folder's pairs, "
           "the files), "
           "seconds on this machine, and what the clean folder gets flagged (cifar10-100k: the 50,000 and a "
           "left-right mirror of each, a flip being no copy; a mirror pair the search takes for a copy is counted "
           "among the copy pairs):\n",
           "| folder | images | encoder | embed alone | with duplicates | pixels | calibration | search | files | "
           "calibration / embed alone | flagged | exact pairs | copy pairs |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in scale:
        s, alone = r["seconds"], r["plain_seconds"]["embed"]
        out.append(f"| {r['data']} | {r['images']:,} | {r['encoder_data']}, {r['epochs']} epochs | {alone:.0f} s | "
                   f"{sum(s.values()):.0f} s | {s['pixels']:.0f} s | {s['calibration']:.0f} s | {s['search']:.0f} s | "
                   f"{s['files']:.0f} s | "
                   f"{s['calibration'] / alone:.0%} | {r['flagged']} ({r['flagged_share']:.1%}) | "
                   f"{r['exact_pairs']} | {r['copy_pairs']} |")
    return out + memory_section(rows)


def memory_section(rows: list[dict[str, Any]]) -> list[str]:
    memory = [r for r in rows if r.get("kind") == "memory"]
    if not memory:
        return []
    out = ["\nMemory of the pixel comparison (`benchmarks/duplicates_memory.py`, a fresh process per size): random "
           "images, about 6 random pairs per image, the coarse prefilter of every pair, then the box fit of 1,024 "
           "pairs; peak RSS (the process's high-water mark, the images themselves included):\n",
           "| images | px | pairs | RSS after set-up | peak after the prefilter | peak after the fit | prefilter | "
           "fit |",
           "|---|---|---|---|---|---|---|---|"]
    for r in memory:
        out.append(f"| {r['images']:,} | {r['size']} | {r['pairs']:,} | {r['rss_after_setup_mib']:.0f} MiB | "
                   f"{r['peak_after_coarse_mib']:.0f} MiB | {r['peak_after_fit_mib']:.0f} MiB | "
                   f"{r['coarse_s']:.1f} s | {r['fit_s']:.1f} s |")
    return out
