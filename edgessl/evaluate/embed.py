"""`edgessl embed`: one embedding per readable image of a folder, from a run's encoder or from its ONNX export, written
as .npz or .parquet; optionally each image's nearest neighbours (neighbours.csv + a gallery, neighbours.png) and its
near-duplicate groups (duplicates.csv).

The search works on unit rows in chunks of query rows: at most CHUNK_ELEMENTS similarities (64 MiB of float32) are
held at once, never an N x N matrix, so 100,000 images need the (N, D) embeddings plus about 200 MiB. faiss, when it
is installed, serves the top-k search (an optional speed-up; the results are the same up to float rounding).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgessl.data.folder import decode_image, load_image_folder, write_skipped
from edgessl.deploy.check import load_script
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.fileio import atomic_write
from edgessl.models.backbone import load_encoder
from edgessl.report.gallery import plot_neighbour_gallery
from edgessl.runtime import pick_device

CHUNK_ELEMENTS = 1 << 24  # similarities held at once (float32: 64 MiB; argpartition's int64 indices: 128 MiB)
MAX_PAIRS = 1_000_000  # duplicates.csv holds at most this many pairs: a lower --duplicates is refused
FORMATS = (".npz", ".parquet")
THUMBNAIL = 96  # gallery thumbnails, pixels
TWIN = 1e-4  # 1 - cosine at or below which two embeddings count as one (pixel-identical images) for --mutual
MUTUAL_K = 16  # nearest rows searched for each row's nearest non-twin (--mutual)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of L2 norm 1 (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _chunk(n: int, chunk: int | None) -> int:
    return int(chunk) if chunk else max(1, min(4096, CHUNK_ELEMENTS // max(n, 1)))


def top_k_neighbours(unit: np.ndarray, k: int, chunk: int | None = None,
                     use_faiss: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar other rows of every row (cosine of unit rows; a row is never its own neighbour).

    unit: (N, D) unit rows, N >= 2. Returns (idx (N, k') int64, cos (N, k') float32), k' = min(k, N - 1), most
    similar first, ties by the lower index. Query rows go in chunks of `chunk` (default: CHUNK_ELEMENTS // N).
    use_faiss: None = when installed, True = required, False = numpy only."""
    n = unit.shape[0]
    k = min(int(k), n - 1)
    if use_faiss is not False:
        faiss = _faiss(required=bool(use_faiss))
        if faiss is not None:
            return _faiss_top_k(faiss, unit, k, _chunk(n, chunk))
    step = _chunk(n, chunk)
    idx = np.empty((n, k), np.int64)
    cos = np.empty((n, k), np.float32)
    for start in range(0, n, step):
        sim = unit[start : start + step] @ unit.T  # (c, N)
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n else np.argsort(-sim, axis=1)[:, :k]
        vals = np.take_along_axis(sim, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)  # cosine descending, then index ascending
        idx[start : start + step] = np.take_along_axis(part, order, axis=1)
        cos[start : start + step] = np.take_along_axis(vals, order, axis=1)
    return idx, np.clip(cos, -1.0, 1.0)


def _faiss(required: bool):
    try:
        import faiss
    except ImportError:
        if required:
            raise UserError("use_faiss=True needs faiss: pip install faiss-cpu (or leave it to None).") from None
        return None
    return faiss


def _faiss_top_k(faiss, unit: np.ndarray, k: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """top_k_neighbours through faiss.IndexFlatIP (exact inner products): k + 1 results, the row itself dropped."""
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    idx = np.empty((len(unit), k), np.int64)
    cos = np.empty((len(unit), k), np.float32)
    for start in range(0, len(unit), step):
        sims, found = index.search(unit[start : start + step], k + 1)
        own = found == (start + np.arange(len(found)))[:, None]
        own[~own.any(axis=1), -1] = True  # the row itself not among the k + 1 (ties at 1.0): drop the last one
        keep = ~own
        idx[start : start + step] = found[keep].reshape(-1, k)
        cos[start : start + step] = sims[keep].reshape(-1, k)
    return idx, np.clip(cos, -1.0, 1.0)


def duplicate_pairs(unit: np.ndarray, threshold: float, chunk: int | None = None,
                    max_pairs: int = MAX_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows with cosine >= threshold, each once (i < j), in chunks of query rows.

    unit: (N, D) unit rows. Returns (pairs (P, 2) int64, cos (P,) float32) ordered by i, then j.
    Raises UserError when more than max_pairs pairs reach the threshold."""
    n = unit.shape[0]
    step = _chunk(n, chunk)
    found_pairs, found_cos, total = [], [], 0
    for start in range(0, n, step):
        stop = min(start + step, n)
        sim = unit[start:stop] @ unit[start:].T  # (c, N - start): only columns j >= start can have j > i
        sim[np.tril_indices(stop - start)] = -np.inf  # j <= i
        r, c = np.nonzero(sim >= threshold)
        total += len(r)
        if total > max_pairs:
            raise UserError(f"More than {max_pairs:,} pairs of images reach cosine {threshold:g}; "
                            "raise --duplicates (e.g. 0.95) to find near-duplicates.")
        found_pairs.append(np.stack([r + start, c + start], axis=1))
        found_cos.append(sim[r, c])
    pairs = np.concatenate(found_pairs).astype(np.int64) if found_pairs else np.empty((0, 2), np.int64)
    cos = np.concatenate(found_cos) if found_cos else np.empty(0, np.float32)
    return pairs, np.clip(cos, -1.0, 1.0).astype(np.float32)


def nearest_distances(unit: np.ndarray, k: int = MUTUAL_K, chunk: int | None = None,
                      use_faiss: bool | None = None) -> np.ndarray:
    """Each row's distance (1 - cosine) to its nearest row that is not its twin (1 - cosine > TWIN).

    unit: (N, D) unit rows, N >= 2. Returns (N,) float64, searched among each row's k nearest (top_k_neighbours);
    a row whose k nearest are all twins gets the k-th one's distance (so only its twins stay near it)."""
    _, cos = top_k_neighbours(unit, k, chunk, use_faiss)
    dist = 1.0 - cos.astype(np.float64)
    apart = dist > TWIN
    first = np.where(apart.any(axis=1), apart.argmax(axis=1), dist.shape[1] - 1)
    return dist[np.arange(len(dist)), first]


def mutual_pairs(pairs: np.ndarray, cos: np.ndarray, nearest: np.ndarray, ratio: float) -> np.ndarray:
    """Which pairs are mutual near-nearest neighbours (--mutual R): twins (1 - cos <= TWIN), or pairs (i, j) whose
    distance d = 1 - cos is at most (1 + R) x nearest[i] and at most (1 + R) x nearest[j], i.e. each image is
    (nearly) the other's nearest. R = 0: mutual nearest neighbours.

    pairs: (P, 2) row indices; cos: (P,); nearest: (N,) from nearest_distances. Returns (P,) bool."""
    dist = 1.0 - cos.astype(np.float64)
    limit = (1.0 + float(ratio)) * nearest + 1e-6  # 1e-6: the same cosine from two matrix products
    return (dist <= TWIN) | ((dist <= limit[pairs[:, 0]]) & (dist <= limit[pairs[:, 1]]))


def find_duplicates(unit: np.ndarray, threshold: float, mutual: float | None = None,
                    use_faiss: bool | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """--duplicates T [--mutual R]: the pairs with cosine >= T (duplicate_pairs), then, with R, only the mutual
    near-nearest ones (mutual_pairs). unit: (N, D) unit rows. Returns (pairs (P, 2), cos (P,), pairs before the
    mutual rule)."""
    pairs, cos = duplicate_pairs(unit, float(threshold))
    candidates = len(pairs)
    if mutual is not None:
        keep = mutual_pairs(pairs, cos, nearest_distances(unit, use_faiss=use_faiss), float(mutual))
        pairs, cos = pairs[keep], cos[keep]
    return pairs, cos, candidates


def pca_whitening(x: np.ndarray, dim: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening fitted on the rows of x (N, D): returns (mean (D,), proj (D, dim)) float32 such that
    (x - mean) @ proj has the identity as its covariance (1/N), its columns the top `dim` principal directions in
    order of variance, each direction's sign fixed (its largest-magnitude entry positive). The covariance is summed
    in chunks of rows in float64 (memory: D x D, not N x D). Needs 1 <= dim <= min(D, N - 1) directions of nonzero
    variance; else a UserError naming the largest possible --whiten."""
    x = np.asarray(x)
    n, d = x.shape
    limit = min(d, n - 1)
    if not 1 <= int(dim) <= limit:
        raise UserError(f"--whiten {dim}: between 1 and {limit} (the embedding's dimensions and images - 1).")
    mean = sum(x[s : s + chunk].sum(axis=0, dtype=np.float64) for s in range(0, n, chunk)) / n
    cov = np.zeros((d, d))
    for s in range(0, n, chunk):
        c = x[s : s + chunk].astype(np.float64) - mean
        cov += c.T @ c
    var, vec = np.linalg.eigh(cov / n)  # ascending
    var, vec = var[::-1][: int(dim)], vec[:, ::-1][:, : int(dim)]
    rank = int((var > 1e-9 * max(var[0], 1e-30)).sum())
    if rank < int(dim):
        raise UserError(f"--whiten {dim}: these embeddings vary along only {rank} directions; pass --whiten {rank} "
                        "or less.")
    vec = vec * np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])])
    return mean.astype(np.float32), (vec / np.sqrt(var)).astype(np.float32)


def whitened_unit_rows(x: np.ndarray, mean: np.ndarray, proj: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(N, D) embeddings -> (N, dim) unit rows of (x - mean) @ proj, in chunks of rows."""
    return np.concatenate([unit_rows((x[s : s + chunk] - mean) @ proj) for s in range(0, len(x), chunk)])


def group_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph (union-find). pairs: (P, 2) indices < n. Returns (P,) int64 group
    numbers 1..G, numbered in the order of each group's lowest index."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is the group's lowest index
    roots = np.array([find(a) for a in pairs[:, 0].tolist()], np.int64)
    number = {root: g + 1 for g, root in enumerate(sorted(set(roots.tolist())))}
    return np.array([number[r] for r in roots.tolist()], np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Files


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


# ---------------------------------------------------------------------------------------------------------------
# Sources and the command


def embed_with_run(run_dir: str | Path, data: str | Path, device: str = "auto", batch_size: int = 256,
                   cache_mb: float = 4096, workers: int | str = "auto", cache_dir: str | Path | None = "auto"):
    """A run's encoder over every readable image of `data` (decoded through the decoded-image cache).
    Returns (paths, (N, D) float32 pooled features, skipped [(path, reason)])."""
    model = load_encoder(run_dir)
    meta = model.edgessl_meta
    dev = pick_device(device)
    images = load_image_folder(data, int(meta["image_size"]), cache_mb=cache_mb, workers=workers, min_images=1,
                               cache_dir=cache_dir)
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


def embed_folder(source: str | Path, data: str | Path, out: str | Path, neighbours: int | None = None,
                 duplicates: float | None = None, gallery_rows: int = 8, use_faiss: bool | None = None,
                 warn=None, whiten: int | None = None, mutual: float | None = None, **options) -> EmbedResult:
    """Embed `data` with `source` (a run directory, or an exported .onnx + its manifest.json) into `out`, and write
    skipped_files.txt, neighbours.csv + neighbours.png (neighbours = K) and duplicates.csv (duplicates = T)
    beside it. whiten = K: search (not store) PCA-whitened embeddings (pca_whitening fitted on this folder, K
    directions) instead of the raw ones. mutual = R: keep only the pairs that are mutual near-nearest neighbours
    (mutual_pairs). options: device, batch_size, cache_mb, workers, cache_dir (run) or
    manifest, batch_size, threads (onnx). warn: callable(message) for skipped files."""
    out = check_out(out)
    check_options(neighbours, duplicates, gallery_rows, whiten, mutual)
    source = Path(source).expanduser()
    if source.suffix == ".onnx":
        paths, emb, skipped = embed_with_onnx(source, data, **options)
    else:
        paths, emb, skipped = embed_with_run(source, data, **options)
    if (neighbours is not None or duplicates is not None) and len(paths) < 2:
        raise UserError(f"--neighbours and --duplicates need at least 2 readable images in '{data}', not 1.")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = EmbedResult(out, paths, emb, skipped, [write_embeddings(out, paths, emb)])
    if skipped:
        result.written.append(write_skipped(skipped, out.parent / "skipped_files.txt"))
        if warn is not None:
            warn(f"skipped {len(skipped)} unreadable file(s) (first: {skipped[0][0]}); "
                 f"all are listed in {out.parent / 'skipped_files.txt'}.")
    unit = None
    if whiten is not None:
        result.whitening = pca_whitening(emb, int(whiten))
        unit = whitened_unit_rows(emb, *result.whitening)
    elif neighbours is not None or duplicates is not None:
        unit = unit_rows(emb)
    if neighbours is not None:
        idx, cos = result.neighbours = top_k_neighbours(unit, int(neighbours), use_faiss=use_faiss)
        result.written.append(write_neighbours(out.parent / "neighbours.csv", paths, idx, cos))
        result.written.append(gallery(out.parent / "neighbours.png", paths, idx, cos, int(gallery_rows)))
    if duplicates is not None:
        result.pairs, result.pair_cosines, result.candidates = find_duplicates(unit, duplicates, mutual, use_faiss)
        result.pair_groups = group_pairs(len(paths), result.pairs)
        result.written.append(write_duplicates(out.parent / "duplicates.csv", paths, result.pairs,
                                               result.pair_cosines, result.pair_groups))
    return result
