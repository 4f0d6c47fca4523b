"""The files `edgessl embed` writes: the embeddings (.npz or .parquet), neighbours.csv and the galleries
(neighbours.png, duplicates.png), duplicates.csv, duplicates.json (the rule), similar.csv and keep.txt."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from edgessl.data.folder import decode_image
from edgessl.errors import UserError
from edgessl.fileio import atomic_write, atomic_write_text, check_folder_path
from edgessl.report.gallery import plot_neighbour_gallery

FORMATS = (".npz", ".parquet")
THUMBNAIL = 96  # gallery thumbnails, pixels


def check_out(out: str | Path) -> Path:
    """The output file: .npz (numpy only) or .parquet (pyarrow, the `parquet` extra), checked before any work."""
    out = Path(out).expanduser()
    if out.suffix not in FORMATS:
        raise UserError(f"--out must end in .npz or .parquet, not '{out.name}'.")
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; pass a file name ending in .npz or .parquet.")
    check_folder_path(out.parent, out)
    if out.suffix == ".parquet":
        _pyarrow()
    return out


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Writing .parquet needs pyarrow: pip install 'edgessl[parquet]' (or write .npz).") from None
    return pa, pq


def write_embeddings(out: Path, paths: Sequence[str | Path], embeddings: np.ndarray) -> Path:
    """out (.npz: arrays `paths` (N,) str and `embeddings` (N, D) float32; .parquet: columns `path` string and
    `embedding` fixed-size list of float32), written to a temporary file, then renamed."""
    names = [str(p) for p in paths]
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if out.suffix == ".npz":
        return atomic_write(out, lambda tmp: _save_npz(tmp, names, emb))
    pa, pq = _pyarrow()
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    table = pa.table({"path": pa.array(names, pa.string()), "embedding": column})
    return atomic_write(out, lambda tmp: pq.write_table(table, str(tmp)))


def _save_npz(tmp: Path, names: list[str], emb: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        np.savez(f, paths=np.array(names, dtype=str), embeddings=emb)


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(paths, (N, D) float32 embeddings) of a file write_embeddings wrote."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return [str(p) for p in z["paths"]], z["embeddings"]
    _, pq = _pyarrow()
    table = pq.read_table(str(path))
    emb = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32)
    return table.column("path").to_pylist(), emb.reshape(table.num_rows, -1)


def _write_csv(path: Path, header: Sequence[str], rows) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    return atomic_write(path, write)


def write_neighbours(path: Path, paths: Sequence[str], idx: np.ndarray, cos: np.ndarray) -> Path:
    """neighbours.csv: query, rank (1 = nearest), neighbour, cosine; one row per image and rank."""
    rows = ((paths[q], r + 1, paths[j], f"{c:.6f}")
            for q in range(len(idx)) for r, (j, c) in enumerate(zip(idx[q].tolist(), cos[q].tolist(), strict=True)))
    return _write_csv(path, ("query", "rank", "neighbour", "cosine"), rows)


def gallery(path: Path, paths: Sequence[str], idx: np.ndarray, cos: np.ndarray, rows: int = 8,
            space: str = "cosine") -> Path:
    """neighbours.png: `rows` queries spread evenly over the images, each beside its neighbours (idx, cos: (N, k)),
    every image named; `space` says which cosine (raw or whitened)."""
    queries = np.unique(np.linspace(0, len(paths) - 1, max(1, min(rows, len(paths)))).round().astype(int))
    thumb = {}
    for i in {int(j) for q in queries for j in (q, *idx[q].tolist())}:
        thumb[i] = decode_image(paths[i], THUMBNAIL)
    plot_neighbour_gallery(
        [thumb[q] for q in queries], [[thumb[int(j)] for j in idx[q]] for q in queries], cos[queries],
        [Path(paths[q]).name for q in queries], path,
        neighbour_names=[[Path(paths[int(j)]).name for j in idx[q]] for q in queries], space=space)
    return path


def group_members(found) -> dict[int, dict]:
    """{group: {"kind", "members" [rows], "score" {row: best score}, "cosine" {row: best cosine}}} of a Found."""
    groups: dict[int, dict] = {}
    for (a, b), kind, score, cos, g in zip(found.pairs.tolist(), found.kinds, found.scores.tolist(),
                                           found.cosines.tolist(), found.groups.tolist(), strict=True):
        entry = groups.setdefault(g, {"kind": "exact", "members": [], "score": {}, "cosine": {}})
        entry["kind"] = "copy" if kind == "copy" else entry["kind"]
        for i in (a, b):
            if i not in entry["score"]:
                entry["members"].append(i)
            entry["score"][i] = max(entry["score"].get(i, -1.0), score)
            entry["cosine"][i] = max(entry["cosine"].get(i, -1.0), cos)
    for entry in groups.values():
        entry["members"].sort()
    return groups


def keeper(paths: Sequence[str], members: list[int], keep: str) -> int:
    """The member of a group to keep: the first path, or the one with the most pixels (ties: the first)."""
    if keep == "first":
        return min(members, key=lambda i: paths[i])
    def pixels(i: int) -> int:
        with Image.open(paths[i]) as im:
            return im.width * im.height

    return max(sorted(members, key=lambda i: paths[i]), key=pixels)


def write_duplicates(path: Path, paths: Sequence[str], found, precision: float | None, keep: str | None) -> Path:
    """duplicates.csv: one row per image in a group: group, kind (exact | copy), image, score (its best copy score
    in the group; 1 for exact twins), cosine (its best embedding cosine in the group), estimated_precision (of the
    rule that put it there; 1 for exact twins; empty when no planted copy was found: no estimate), keep (yes | no
    with --keep, else empty)."""
    rows = []
    for g, entry in sorted(group_members(found).items()):
        kept = keeper(paths, entry["members"], keep) if keep else None
        est = 1.0 if entry["kind"] == "exact" else precision
        for i in entry["members"]:
            rows.append((g, entry["kind"], paths[i], f"{entry['score'][i]:.6f}", f"{entry['cosine'][i]:.6f}",
                         "" if est is None else f"{est:.4f}", "" if kept is None else ("yes" if i == kept else "no")))
    return _write_csv(path, ("group", "kind", "image", "score", "cosine", "estimated_precision", "keep"), rows)


def write_rule(path: Path, paths: Sequence[str], rule) -> Path:
    """duplicates.json: the copy rule as the command printed it (copy_rule.Rule: threshold, how it was chosen, the
    estimated precision with its pessimistic end (null when no planted copy was found), recall, planted copies,
    target, reached) and, for an "auto" threshold, the look-alike pair that set it (paths) with the threshold and
    estimated recall without it."""
    limit, found = rule.limit, rule.recall > 0  # no planted copy found: the precision rests on nothing (null)
    record = {"threshold": rule.threshold, "chosen": rule.chosen, "target_precision": rule.target,
              "reached": rule.reached, "estimated_precision": rule.precision if found else None,
              "estimated_precision_low": rule.precision_low if found else None, "unsure": rule.unsure,
              "estimated_recall": rule.recall,
              "planted": rule.planted, "set_by": None if limit is None else {
                  "copy_of": paths[limit.pair[0]], "matched": paths[limit.pair[1]], "score": limit.score,
                  "threshold_without": limit.threshold_without, "estimated_recall_without": limit.recall_without}}
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def write_similar(path: Path, paths: Sequence[str], found) -> Path:
    """similar.csv: image_a, image_b, cosine: close in the embedding, not copies (for browsing), closest first."""
    order = np.argsort(-found.similar_cosines, kind="stable")
    rows = ((paths[found.similar[i, 0]], paths[found.similar[i, 1]], f"{found.similar_cosines[i]:.6f}")
            for i in order.tolist())
    return _write_csv(path, ("image_a", "image_b", "cosine"), rows)


def write_keep(path: Path, paths: Sequence[str], found, keep: str) -> Path:
    """keep.txt: one image per duplicate group (by --keep), one path per line; the other members are the ones a
    person may drop. Nothing is deleted."""
    kept = [paths[keeper(paths, e["members"], keep)] for _, e in sorted(group_members(found).items())]
    return atomic_write_text(path, "".join(f"{p}\n" for p in kept))


def duplicates_gallery(path: Path, paths: Sequence[str], found, rows: int = 8, limit=None) -> Path:
    """duplicates.png: the largest groups and the least certain ones (lowest copy score), a row each: the first
    member framed, the others with their copy scores; with `limit` (copy_rule.Limit), a last row:
    the look-alike pair that set the threshold, for a person to judge whether the two are one picture (the only row
    when no group was found)."""
    groups = group_members(found)
    by_size = sorted(groups, key=lambda g: (-len(groups[g]["members"]), g))
    by_doubt = sorted(groups, key=lambda g: (min(groups[g]["score"].values()), g))
    chosen = list(dict.fromkeys([*by_size[: (rows + 1) // 2], *by_doubt]))[:rows]
    firsts = [groups[g]["members"][0] for g in chosen]
    others = [groups[g]["members"][1:7] for g in chosen]
    scores = [[groups[g]["score"][i] for i in o] for g, o in zip(chosen, others, strict=True)]
    names = [f"{groups[g]['kind']} {g}: {Path(paths[i]).name}" for g, i in zip(chosen, firsts, strict=True)]
    title = f"duplicate groups (copy score), {len(chosen)} of {len(groups)}" if groups else "no duplicate groups"
    if limit is not None:
        firsts, others, scores = [*firsts, limit.pair[0]], [*others, [limit.pair[1]]], [*scores, [limit.score]]
        names.append(f"threshold: {Path(paths[limit.pair[0]]).name}")
        title += "\nlast row: the look-alike that set the threshold"
    thumbs = {i: decode_image(paths[i], THUMBNAIL) for i in [*firsts, *(i for o in others for i in o)]}
    width = max((len(o) for o in others), default=1)
    plot_neighbour_gallery([thumbs[i] for i in firsts], [[thumbs[i] for i in o] for o in others],
                           np.array([s + [0.0] * (width - len(s)) for s in scores]), names, path, title=title)
    return path
