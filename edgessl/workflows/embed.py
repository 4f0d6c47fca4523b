"""`edgessl embed`: one embedding per readable image of a folder, from a run's encoder or from its ONNX export
(embed_sources.py), written as .npz or .parquet (embed_files.py); optionally each image's nearest neighbours
(neighbours.csv + neighbours.png) and its duplicates in three kinds, exact, copy and similar, with a rule chosen on
synthetic copies of the folder's own images (edgessl.evaluate.duplicates).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgessl.data.copies import plant, sample
from edgessl.data.folder import shorter_sides, write_skipped
from edgessl.errors import UserError
from edgessl.evaluate import copies as cp
from edgessl.evaluate import copy_rule, pixels
from edgessl.evaluate import duplicates as dup
from edgessl.evaluate.neighbours import pca_whitening, top_k_neighbours, unit_rows, whitened_unit_rows
from edgessl.options import EmbedOptions, positive_count, takes_options
from edgessl.workflows.embed_files import (
    check_out,
    duplicates_gallery,
    gallery,
    write_duplicates,
    write_embeddings,
    write_keep,
    write_neighbours,
    write_rule,
    write_similar,
)
from edgessl.workflows.embed_sources import Embedded, open_source, with_rows

KEEP = ("first", "largest")


@dataclass
class EmbedResult:
    """What `edgessl embed` computed and wrote."""

    out: Path
    paths: list[str]
    embeddings: np.ndarray  # (N, D) float32, as the encoder outputs them (not L2-normalised)
    skipped: list[tuple[Path, str]]
    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # an earlier embed's outputs beside `out` this run did not write
    neighbours: tuple[np.ndarray, np.ndarray] | None = None  # (idx (N, k), cos (N, k))
    whitening: tuple[np.ndarray, np.ndarray] | None = None  # whiten=K: (mean (D,), proj (D, K)) of the search space
    duplicates: dup.Found | None = None  # the duplicate pairs (exact, copy) in groups, and the similar pairs
    rule: copy_rule.Rule | None = None  # the copy rule and its estimates
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock seconds per step: embed, and with
    # --duplicates pixels (rows, hashes, thumbnails), calibration (the planted copies), search (the folder's pairs)
    # and files (csv, gallery)

    @property
    def groups(self) -> int:
        d = self.duplicates
        return 0 if d is None or not len(d.groups) else int(d.groups.max())


def duplicates_threshold(value: str | float | None) -> float | None:
    """--duplicates: "auto" -> None (calibrated); a number -> the threshold; UserError otherwise."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or not 0 <= t <= 1:
        raise UserError(f"--duplicates takes auto or a copy-score threshold between 0 and 1 (e.g. 0.9), not "
                        f"'{value}'.")
    return t


def check_options(opts: EmbedOptions) -> None:
    """UserError for a value no embed can use; --threads as the sources take it (None: auto, else a number)."""
    threads = None if opts.threads is None else positive_count(opts.threads, "--threads")
    opts.threads = None if threads in (None, "auto") else int(threads)
    if int(opts.batch_size) < 1:
        raise UserError(f"--batch-size must be at least 1, not {opts.batch_size}.")
    if opts.neighbours is not None and int(opts.neighbours) < 1:
        raise UserError(f"--neighbours must be a positive number of neighbours, not {opts.neighbours}.")
    duplicates_threshold(opts.duplicates)
    if int(opts.gallery_rows) < 1:
        raise UserError(f"--gallery-rows must be at least 1, not {opts.gallery_rows}.")
    if opts.whiten is not None and int(opts.whiten) < 1:
        raise UserError(f"--whiten must be a positive number of directions (e.g. 128), not {opts.whiten}.")
    if opts.whiten is not None and opts.neighbours is None and opts.duplicates is None:
        raise UserError("--whiten changes the --neighbours and --duplicates search: pass one of them too.")
    if not 0 < opts.precision < 1:
        raise UserError(f"--precision is a target precision between 0 and 1 (e.g. 0.95), not {opts.precision}.")
    if int(opts.planted) < 1:
        raise UserError(f"--planted must be at least 1, not {opts.planted}.")
    if opts.keep is not None and opts.keep not in KEEP:
        raise UserError(f"--keep must be one of {', '.join(KEEP)}, not '{opts.keep}'.")
    if opts.duplicates is None and opts.keep is not None:
        raise UserError("--keep lists one image per duplicate group: pass --duplicates too.")


@takes_options(EmbedOptions, lead=("source",), positional=("data", "out", "neighbours", "duplicates", "gallery_rows"),
               extra={"use_faiss": None, "warn": None, "say": None})
def embed(source: str | Path, opts: EmbedOptions, use_faiss: bool | None = None, warn=None, say=None) -> EmbedResult:
    """One embedding per readable image of `data` into `out` (.npz, or .parquet with the `parquet` extra).

    source: a run directory (its encoder, on `device`) or an exported .onnx encoder (the torch-free
    export/embed_onnx.py with manifest.json's preprocessing; `manifest`); `threads`: the CPU threads (a run
    directory: None = auto, following the load between batches; an .onnx: onnxruntime's intra-op threads). Beside
    `out`: skipped_files.txt (unreadable files), neighbours.csv + neighbours.png (neighbours=K: every image's K
    nearest by cosine; gallery_rows queries in the picture), and with duplicates="auto" (or a copy-score threshold):
    duplicates.csv (exact twins and copies in groups, with the rule's estimated precision), duplicates.png,
    duplicates.json (the rule), similar.csv and, with keep="first" | "largest", keep.txt. whiten=K: the neighbour
    search runs on the embeddings PCA-whitened on this folder (K directions; the stored embeddings stay raw).
    Options: edgessl.options.EmbedOptions (the same as `edgessl embed`'s flags). use_faiss: None = when installed.
    warn(message): skipped files; say(message): the duplicate search's progress and estimates. Returns an
    EmbedResult."""
    out = check_out(opts.out)
    check_options(opts)
    source = Path(source).expanduser()
    src = open_source(source, opts, say)
    if source.suffix == ".onnx" and opts.device not in ("auto", "cpu") and warn is not None:
        warn(f"--device {opts.device} is for a run directory's encoder: an .onnx runs on onnxruntime's CPU provider.")
    data = Path(opts.data)
    start = time.perf_counter()
    embedded = src(data)
    embed_s = time.perf_counter() - start
    if (opts.neighbours is not None or opts.duplicates is not None) and len(embedded.paths) < 2:
        raise UserError(f"--neighbours and --duplicates need at least 2 readable images in '{opts.data}', not 1.")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = EmbedResult(out, embedded.paths, embedded.embeddings, embedded.skipped,
                         [write_embeddings(out, embedded.paths, embedded.embeddings)], seconds={"embed": embed_s})
    if embedded.skipped:
        result.written.append(write_skipped(embedded.skipped, out.parent / "skipped_files.txt"))
        if warn is not None:
            warn(f"skipped {len(embedded.skipped)} unreadable file(s) (first: {embedded.skipped[0][0]}); "
                 f"all are listed in {out.parent / 'skipped_files.txt'}.")
    unit = _search_space(result, opts)
    if opts.neighbours is not None:
        idx, cos = result.neighbours = top_k_neighbours(unit, int(opts.neighbours), use_faiss=use_faiss)
        result.written.append(write_neighbours(out.parent / "neighbours.csv", result.paths, idx, cos))
        space = "cosine" if opts.whiten is None else f"whitened cosine, {int(opts.whiten)} directions"
        result.written.append(gallery(out.parent / "neighbours.png", result.paths, idx, cos, int(opts.gallery_rows),
                                      space))
    if opts.duplicates is not None:
        _duplicates(result, opts, src, embedded, data, unit, use_faiss, say or (lambda _: None))
    result.removed = drop_stale(out.parent, result.written)
    if result.removed and say is not None:
        say(f"Removed {', '.join(p.name for p in result.removed)} beside {out.name}: an earlier embed's, which this "
            "run does not write (they described another run).")
    return result


OUTPUTS = ("skipped_files.txt", "neighbours.csv", "neighbours.png", "duplicates.csv", "duplicates.json",
           "duplicates.png", "similar.csv", "keep.txt")  # what embed may write beside --out


def drop_stale(folder: Path, written: list[Path]) -> list[Path]:
    """Delete the OUTPUTS in `folder` that this run did not write (an earlier run's, with other options or data:
    beside the new embeddings they would describe another run); returns them."""
    kept = {Path(p).resolve() for p in written}
    stale = [folder / name for name in OUTPUTS if (folder / name).is_file() and (folder / name).resolve() not in kept]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _search_space(result: EmbedResult, opts: EmbedOptions) -> np.ndarray | None:
    """The unit rows every search uses: the embeddings, or their --whiten projection (fitted on this folder)."""
    if opts.whiten is not None:
        result.whitening = pca_whitening(result.embeddings, int(opts.whiten))
        return whitened_unit_rows(result.embeddings, *result.whitening)
    return unit_rows(result.embeddings) if opts.neighbours is not None or opts.duplicates is not None else None


def _project(result: EmbedResult, embeddings: np.ndarray) -> np.ndarray:
    """Other embeddings (the planted copies') into the same search space as the folder's."""
    return whitened_unit_rows(embeddings, *result.whitening) if result.whitening else unit_rows(embeddings)


def _duplicates(result: EmbedResult, opts: EmbedOptions, src, embedded: Embedded, data: Path, unit: np.ndarray,
                use_faiss: bool | None, say) -> None:
    """Calibrate on planted copies, score the folder's neighbour pairs, choose the rule, write the files."""
    clock = time.perf_counter()
    images = with_rows(src, embedded, data)
    n, get = len(result.paths), _ticking(images.get, src)
    hashes = pixels.pixel_hashes(get, n)
    spaces = [unit, pixels.thumbnails(get, n)]  # candidates: the embedding's neighbours and the pixels'
    result.seconds["pixels"] = time.perf_counter() - clock
    clock = time.perf_counter()
    sides = shorter_sides(result.paths)  # each file's stored size: small copies are compared at their resolution
    calibration = _calibrate(result, opts, src, get, spaces, say, sides, hashes)
    result.seconds["calibration"] = time.perf_counter() - clock
    say(f"Calibrated in {result.seconds['calibration']:.0f} s.")
    clock = time.perf_counter()
    scored = dup.score_folder(spaces, hashes, get, calibration.gates, use_faiss, calibration.coarse_gate,
                              sides)
    result.seconds["search"] = time.perf_counter() - clock
    say(f"Compared {scored.compared:,} of {len(scored.pairs):,} candidate pairs in full in "
        f"{result.seconds['search']:.0f} s " + (
            f"(the others differ at a glance: coarse match below {calibration.coarse_gate:.2f}, set "
            f"{cp.COARSE_MARGIN} below 99 % of the planted copies)." if np.isfinite(calibration.coarse_gate) else
            "(no planted copy was found with its original to set the prefilter, so none was skipped)."))
    clock = time.perf_counter()
    threshold = duplicates_threshold(opts.duplicates)
    args = (calibration.true, calibration.wrong, scored.scores, opts.precision)
    rule = copy_rule.choose_rule(*args) if threshold is None else copy_rule.rule_at(threshold, *args)
    rule = copy_rule.with_doubt(rule, calibration.true, calibration.wrong, calibration.doubtful)
    result.rule = copy_rule.limiting(rule, *args[:3], calibration.wrong_pairs)
    result.duplicates = found = dup.classify(scored, unit, result.rule, calibration.similar)
    folder = result.out.parent
    evidence = result.rule.precision if result.rule.recall > 0 else None  # no planted copy found: no estimate
    result.written.append(write_duplicates(folder / "duplicates.csv", result.paths, found, evidence, opts.keep))
    result.written.append(write_rule(folder / "duplicates.json", result.paths, result.rule))
    result.written.append(write_similar(folder / "similar.csv", result.paths, found))
    if len(found.pairs) or result.rule.limit is not None:  # the pair the threshold line asks a person to judge
        result.written.append(duplicates_gallery(folder / "duplicates.png", result.paths, found,
                                                 int(opts.gallery_rows), result.rule.limit))
    if opts.keep is not None:
        result.written.append(write_keep(folder / "keep.txt", result.paths, found, opts.keep))
    result.seconds["files"] = time.perf_counter() - clock


def _ticking(get, src):
    """`get` (pixel rows by index), also letting a run directory's thread governor look at the load on each call
    (once per read of the copy search: a chunk of 1,024 pairs, or 64 images of a block, each a second or less)."""
    tick = getattr(src, "tick", None)
    if tick is None:
        return get

    def rows(index):
        tick()
        return get(index)

    return rows


def _calibrate(result: EmbedResult, opts: EmbedOptions, src, get, spaces: list[np.ndarray], say, sides,
               hashes: list[str]) -> dup.Calibration:
    """Plant copies of a seeded sample of the folder's images (edgessl.data.copies), embed them with the same
    encoder, and score them against the folder as the search will."""
    rows = sample(len(result.paths), int(opts.planted), seed=int(opts.seed))
    say(f"Calibrating on {len(rows)} synthetic copies of this folder's images ...")
    with tempfile.TemporaryDirectory(prefix="edgessl-planted-") as tmp:
        files = plant([Path(result.paths[i]) for i in rows], Path(tmp), seed=int(opts.seed))
        planted = src(Path(tmp), cache=False)
        if len(planted.paths) != len(files):
            raise UserError("a synthetic copy could not be decoded; run the command again.")
        planted_rows = with_rows(src, planted, Path(tmp), cache=False)
        planted_get = _ticking(planted_rows.get, src)
        planted_spaces = [_project(result, planted.embeddings), pixels.thumbnails(planted_get, len(files))]
        return dup.calibrate(planted_spaces, np.array(rows), spaces, planted_get, get,
                             (shorter_sides(planted.paths), sides), hashes)
