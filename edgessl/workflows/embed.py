"""`edgessl embed`: one embedding per readable image of a folder, from a run's encoder or from its ONNX export,
written as .npz or .parquet; optionally each image's nearest neighbours (neighbours.csv + a gallery,
neighbours.png) and its near-duplicate groups (duplicates.csv), searched by edgessl.evaluate.neighbours.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgessl.data.folder import decode_image, load_image_folder, write_skipped
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.neighbours import (
    find_duplicates,
    group_pairs,
    pca_whitening,
    top_k_neighbours,
    unit_rows,
    whitened_unit_rows,
)
from edgessl.fileio import atomic_write
from edgessl.models.backbone import load_encoder
from edgessl.options import Decode, EmbedOptions, check_groups, takes_options
from edgessl.report.gallery import plot_neighbour_gallery
from edgessl.runtime import pick_device
from edgessl.scripts import load_script

FORMATS = (".npz", ".parquet")
THUMBNAIL = 96  # gallery thumbnails, pixels


def check_out(out: str | Path) -> Path:
    """The output file: .npz (numpy only) or .parquet (pyarrow, the `parquet` extra), checked before any work."""
    out = Path(out).expanduser()
    if out.suffix not in FORMATS:
        raise UserError(f"--out must end in .npz or .parquet, not '{out.name}'.")
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; pass a file name ending in .npz or .parquet.")
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


def write_duplicates(path: Path, paths: Sequence[str], pairs: np.ndarray, cos: np.ndarray,
                     groups: np.ndarray) -> Path:
    """duplicates.csv: group, image_a, image_b, cosine; by group, then cosine (highest first)."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -cos, groups))
    rows = ((int(groups[i]), paths[pairs[i, 0]], paths[pairs[i, 1]], f"{cos[i]:.6f}") for i in order.tolist())
    return _write_csv(path, ("group", "image_a", "image_b", "cosine"), rows)


def gallery(path: Path, paths: Sequence[str], idx: np.ndarray, cos: np.ndarray, rows: int = 8) -> Path:
    """neighbours.png: `rows` queries spread evenly over the images, each beside its neighbours (idx, cos: (N, k))."""
    queries = np.unique(np.linspace(0, len(paths) - 1, max(1, min(rows, len(paths)))).round().astype(int))
    thumb = {}
    for i in {int(j) for q in queries for j in (q, *idx[q].tolist())}:
        thumb[i] = decode_image(paths[i], THUMBNAIL)
    plot_neighbour_gallery(
        [thumb[q] for q in queries], [[thumb[int(j)] for j in idx[q]] for q in queries], cos[queries],
        [Path(paths[q]).name for q in queries], path)
    return path


def embed_with_run(run_dir: str | Path, data: str | Path, device: str = "auto", batch_size: int = 256,
                   decode: Decode | None = None):
    """A run's encoder over every readable image of `data` (decoded through the decoded-image cache: `decode`).
    Returns (paths, (N, D) float32 pooled features, skipped [(path, reason)])."""
    model = load_encoder(run_dir)
    meta = model.edgessl_meta
    dev = pick_device(device)
    images = load_image_folder(data, int(meta["image_size"]), decode=decode, min_images=1)
    feats = extract_features(model.to(dev), images, meta["mean"], meta["std"], dev, batch_size)
    return [str(p) for p in images.paths], feats.numpy().astype(np.float32), images.skipped


def embed_with_onnx(model: str | Path, data: str | Path, manifest: str | Path | None = None,
                    batch_size: int = 64, threads: int | None = None):
    """An exported .onnx encoder over every readable image of `data`, by the torch-free export/embed_onnx.py (the
    manifest's preprocessing, decoded in batches). Returns (paths, (N, D) float32 outputs, skipped)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("Embedding with an .onnx needs onnxruntime: pip install 'edgessl[export]'.") from None
    script = load_script("embed_onnx.py")
    try:
        sess, entry = script.open_model(Path(model), Path(manifest) if manifest else None, threads)
        if entry.get("kind") == "classifier" or entry.get("classes"):
            raise UserError(f"{Path(model).name} is a classifier (logits); embed needs an encoder export.")
        paths, emb, skipped = script.embed_folder(sess, entry["preprocess"], Path(data), max(1, int(batch_size)))
    except script.device_check().CheckError as e:
        raise UserError(str(e)) from None
    return [str(p) for p in paths], emb, skipped


@dataclass
class EmbedResult:
    """What `edgessl embed` computed and wrote."""

    out: Path
    paths: list[str]
    embeddings: np.ndarray  # (N, D) float32, as the encoder outputs them (not L2-normalised)
    skipped: list[tuple[Path, str]]
    written: list[Path] = field(default_factory=list)
    neighbours: tuple[np.ndarray, np.ndarray] | None = None  # (idx (N, k), cos (N, k))
    pairs: np.ndarray | None = None  # (P, 2) image indices with cosine >= the --duplicates threshold
    pair_cosines: np.ndarray | None = None  # (P,)
    pair_groups: np.ndarray | None = None  # (P,) group numbers 1..G
    whitening: tuple[np.ndarray, np.ndarray] | None = None  # whiten=K: (mean (D,), proj (D, K)) of the search space
    candidates: int | None = None  # the pairs at cosine >= T (before mutual=R kept `pairs`)

    @property
    def groups(self) -> int:
        return 0 if self.pair_groups is None or not len(self.pair_groups) else int(self.pair_groups.max())


def check_options(neighbours: int | None, duplicates: float | None, gallery_rows: int,
                  whiten: int | None = None, mutual: float | None = None) -> None:
    if neighbours is not None and int(neighbours) < 1:
        raise UserError(f"--neighbours must be a positive number of neighbours, not {neighbours}.")
    if duplicates is not None and not -1.0 <= float(duplicates) <= 1.0:
        raise UserError(f"--duplicates is a cosine between -1 and 1 (e.g. 0.95), not {duplicates}.")
    if int(gallery_rows) < 1:
        raise UserError(f"--gallery-rows must be at least 1, not {gallery_rows}.")
    if whiten is not None and int(whiten) < 1:
        raise UserError(f"--whiten must be a positive number of directions (e.g. 128), not {whiten}.")
    if whiten is not None and neighbours is None and duplicates is None:
        raise UserError("--whiten changes the --neighbours and --duplicates search: pass one of them too.")
    if mutual is not None and not float(mutual) >= 0:
        raise UserError(f"--mutual is a distance ratio of at least 0 (e.g. 0.75), not {mutual}.")
    if mutual is not None and duplicates is None:
        raise UserError("--mutual filters the --duplicates pairs: pass --duplicates too.")


@takes_options(EmbedOptions, lead=("source",), positional=("data", "out", "neighbours", "duplicates", "gallery_rows"),
               extra={"use_faiss": None, "warn": None})
def embed(source: str | Path, opts: EmbedOptions, use_faiss: bool | None = None, warn=None) -> EmbedResult:
    """One embedding per readable image of `data` into `out` (.npz, or .parquet with the `parquet` extra).

    source: a run directory (its encoder, on `device`) or an exported .onnx encoder (the torch-free
    export/embed_onnx.py with manifest.json's preprocessing; `manifest`, `threads`). Beside `out`: skipped_files.txt
    (unreadable files), neighbours.csv + neighbours.png (neighbours=K: every image's K nearest by cosine;
    gallery_rows queries in the picture) and duplicates.csv (duplicates=T: the pairs with cosine >= T, grouped).
    whiten=K: both search the embeddings PCA-whitened on this folder (K directions; the stored embeddings stay raw).
    mutual=R: keep only the pairs whose images are each (nearly) the other's nearest: distance 1 - cosine within
    (1 + R) x each one's distance to its nearest other image (pixel twins count as one). Options:
    edgessl.options.EmbedOptions (the same as `edgessl embed`'s flags). use_faiss: None = when installed.
    warn: callable(message) for skipped files. Returns an EmbedResult (paths, embeddings (N, D), skipped, written,
    neighbours, pairs, pair_groups, whitening, candidates)."""
    out = check_out(opts.out)
    check_options(opts.neighbours, opts.duplicates, opts.gallery_rows, opts.whiten, opts.mutual)
    source = Path(source).expanduser()
    paths, emb, skipped = _embeddings(source, opts)
    if (opts.neighbours is not None or opts.duplicates is not None) and len(paths) < 2:
        raise UserError(f"--neighbours and --duplicates need at least 2 readable images in '{opts.data}', not 1.")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = EmbedResult(out, paths, emb, skipped, [write_embeddings(out, paths, emb)])
    if skipped:
        result.written.append(write_skipped(skipped, out.parent / "skipped_files.txt"))
        if warn is not None:
            warn(f"skipped {len(skipped)} unreadable file(s) (first: {skipped[0][0]}); "
                 f"all are listed in {out.parent / 'skipped_files.txt'}.")
    _search(result, opts, use_faiss)
    return result


def _embeddings(source: Path, opts: EmbedOptions):
    """(paths, (N, D) embeddings, skipped) from a run directory or an .onnx export."""
    if source.suffix == ".onnx":
        return embed_with_onnx(source, opts.data, opts.manifest, opts.batch_size, opts.threads)
    if opts.manifest is not None or opts.threads is not None:
        raise UserError("--manifest and --threads are for an .onnx source; SOURCE here is a run directory.")
    check_groups(opts)
    return embed_with_run(source, opts.data, opts.device, opts.batch_size, opts.decode)


def _search(result: EmbedResult, opts: EmbedOptions, use_faiss: bool | None) -> None:
    """--neighbours and --duplicates (in the --whiten space when asked): the files beside result.out."""
    paths, emb, folder = result.paths, result.embeddings, result.out.parent
    unit = None
    if opts.whiten is not None:
        result.whitening = pca_whitening(emb, int(opts.whiten))
        unit = whitened_unit_rows(emb, *result.whitening)
    elif opts.neighbours is not None or opts.duplicates is not None:
        unit = unit_rows(emb)
    if opts.neighbours is not None:
        idx, cos = result.neighbours = top_k_neighbours(unit, int(opts.neighbours), use_faiss=use_faiss)
        result.written.append(write_neighbours(folder / "neighbours.csv", paths, idx, cos))
        result.written.append(gallery(folder / "neighbours.png", paths, idx, cos, int(opts.gallery_rows)))
    if opts.duplicates is not None:
        result.pairs, result.pair_cosines, result.candidates = find_duplicates(unit, opts.duplicates, opts.mutual,
                                                                               use_faiss)
        result.pair_groups = group_pairs(len(paths), result.pairs)
        result.written.append(write_duplicates(folder / "duplicates.csv", paths, result.pairs, result.pair_cosines,
                                               result.pair_groups))
