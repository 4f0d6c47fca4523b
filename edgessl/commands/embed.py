"""`edgessl embed`: one embedding per image (edgessl.evaluate.embed), registered by `register(app)`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from edgessl.commands.common import api, argument, console, err_console, friendly, given, options_command
from edgessl.options import EmbedOptions
from edgessl.rundir import plural

EMBED_HELP = """Embed every image of a folder with a trained encoder: one row per readable image (its path and
its embedding, the pooled backbone features) in a .npz or .parquet file.

SOURCE is a run directory (its encoder, on --device) or an exported .onnx encoder: that route runs the torch-free
export/embed_onnx.py with manifest.json's preprocessing (the same file runs on a device without torch).
Unreadable files are skipped and listed in skipped_files.txt beside --out (one `path TAB reason` line each, as
pretraining lists them).

--neighbours K writes neighbours.csv (every image's K nearest images by cosine) and neighbours.png (a gallery:
--gallery-rows query images, each beside its K nearest with their cosines). Searched in chunks (never an N x N
matrix); faiss is used when installed.

--duplicates auto finds three kinds: exact (the same decoded pixels), copy (the same picture re-encoded, resized,
cropped a little, brighter or darker: each image's nearest neighbours are compared pixel by pixel on a fitted crop)
and similar (close in the embedding; listed for browsing in similar.csv, never called duplicates). The copy
threshold is chosen on --planted synthetic copies of this folder's own images for --precision (0.95), and the
estimated precision and recall are printed with it, and the look-alike pair that set it; --duplicates T uses T
and prints its estimates. It writes duplicates.csv (group, kind, image, score, cosine, estimated_precision, keep),
duplicates.png and duplicates.json (the rule); --keep first|largest writes keep.txt. Nothing is ever deleted.

**Examples**

    edgessl embed runs/my-run --data ./my_images --out emb.npz
    edgessl embed runs/my-run --data ./my_images --out emb.npz --neighbours 5 --duplicates auto
    edgessl embed runs/my-run --data ./my_images --out emb.npz --duplicates auto --keep largest
    edgessl embed runs/my-run/export/encoder.onnx --data ./my_images --out emb.parquet   # needs edgessl[parquet]

Writes --out, and beside it skipped_files.txt, neighbours.csv + neighbours.png, duplicates.csv + duplicates.png +
duplicates.json, similar.csv and keep.txt as asked.
"""


def embed_cmd(source: Path, **values) -> None:
    opts = given(values)
    warn = lambda msg: err_console.print(f"warning: {msg}", highlight=False, markup=False)  # noqa: E731
    say = lambda msg: console.print(msg, highlight=False, markup=False)  # noqa: E731
    result = api.embed(source, warn=warn, say=say, **opts)
    dim = result.embeddings.shape[1]
    say(f"Embedded {plural(len(result.paths), 'image')} ({dim} dimensions) -> {result.out}")
    if result.neighbours is not None:
        say(f"Nearest {result.neighbours[0].shape[1]} of each image -> {result.out.parent / 'neighbours.csv'}, "
            f"gallery {result.out.parent / 'neighbours.png'}")
    if result.duplicates is not None:
        for line in duplicate_lines(result):
            say(line)


def duplicate_lines(result) -> list[str]:
    """What --duplicates found, by kind, and how sure the rule is."""
    found, rule, folder = result.duplicates, result.rule, result.out.parent
    kinds = {"exact": set(), "copy": set()}
    for (a, b), kind in zip(found.pairs.tolist(), found.kinds, strict=True):
        kinds[kind] |= {a, b}
    groups = {k: len({g for g, kk in zip(found.groups.tolist(), found.kinds, strict=True) if kk == k})
              for k in kinds}
    how = ("chosen for precision >= " f"{rule.target:g}" if rule.chosen == "auto" else "given")
    verdict = verdict_of(rule)
    doubt = ""
    if rule.unsure and rule.precision_low is not None:
        what = ("the match it took for a copy already in this folder is a look-alike" if rule.unsure == 1 else
                f"the {rule.unsure} matches it took for copies already in this folder are look-alikes")
        doubt = f" ({rule.precision_low:.2f} if {what})"
    lines = [
        f"copies: estimated precision {rule.precision:.2f}{doubt}, recall {rule.recall:.2f} on {rule.planted} planted "
        f"copies (copy score >= {rule.threshold:.3f}, {how}){verdict}",
        f"exact: {plural(len(kinds['exact']), 'image')} in {plural(groups['exact'], 'group')} (the same pixels)",
        f"copy: {plural(len(kinds['copy']), 'image')} in {plural(groups['copy'], 'group')} -> "
        f"{folder / 'duplicates.csv'}" + (f", gallery {folder / 'duplicates.png'}"
                                          if (folder / "duplicates.png") in result.written else ""),
        f"similar: {plural(len(found.similar), 'pair')} close in the embedding, not copies (for browsing) -> "
        f"{folder / 'similar.csv'}",
    ]
    if rule.limit is not None:
        lines.insert(1, limit_line(rule.limit, result.paths, rule))
    if (folder / "keep.txt") in result.written:
        lines.append(f"keep: one image per group -> {folder / 'keep.txt'} (nothing was deleted)")
    return lines


FEW_PLANTED = 30  # fewer planted copies: each moves recall by more than 3 points and the estimate is rough


def verdict_of(rule) -> str:
    """What the copies line adds about the rule's estimate: nothing when it reached its target on enough planted
    copies."""
    if rule.recall > 0 and rule.planted < FEW_PLANTED:  # 3 planted copies had read as a sure 1.00 / 1.00
        return (f" (only {rule.planted} planted copies: a rough estimate)"
                + verdict_of(replace(rule, planted=FEW_PLANTED)))
    if rule.recall == 0:
        return (" (no planted copy was found at this threshold, so the precision rests on nothing: check "
                "duplicates.png, or plant more copies with --planted)")
    if rule.reached:
        return ""
    if rule.chosen == "given":
        return f" (below the {rule.target:g} target at this threshold; --duplicates auto chooses one that reaches it)"
    return f" (below the {rule.target:g} target: no threshold reached it on this folder)"


def limit_line(limit, paths: list[str], rule=None) -> str:
    """Why an "auto" copy threshold is where it is: the look-alike pair that held it up (paths relative to the
    folder they share; duplicates.png shows it), and the threshold without that pair. With the rule: where the
    threshold sits well above the pair's score, that it is the next planted copy's score, and the recall to three
    places where two would print both alike (a NEU-DET sweep had read 0.756 "set by" 0.671, recall 0.99 -> 0.99)."""
    a, b = (paths[i] for i in limit.pair)
    root = os.path.commonpath([os.path.dirname(a), os.path.dirname(b)])
    a, b = os.path.relpath(a, root), os.path.relpath(b, root)
    above = (f" (the threshold, {rule.threshold:.3f}, is the next planted copy's score above it)"
             if rule is not None and rule.threshold - limit.score > 0.01 else "")
    places = 3 if rule is not None and f"{rule.recall:.2f}" == f"{limit.recall_without:.2f}" else 2
    recall = f"{limit.recall_without:.{places}f}" + (f", now {rule.recall:.3f}" if places == 3 else "")
    return (f"  set by the highest look-alike the calibration met: a copy of {a} matched {b} at {limit.score:.3f}"
            f"{above}; without it the threshold would be {limit.threshold_without:.3f} (recall {recall}): if those "
            f"two are one picture, pass --duplicates {limit.threshold_without:.3f}.")


def register(app) -> None:
    source = [argument("source", Path, "A run directory, or an exported .onnx encoder (manifest.json beside it).")]
    app.command("embed", help=EMBED_HELP)(friendly(options_command(embed_cmd, EmbedOptions, leading=source)))
