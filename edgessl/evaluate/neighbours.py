"""Neighbours and near-duplicates of a set of embeddings (pure numpy, chunked: never an N x N matrix).

The search works on unit rows in chunks of query rows: at most CHUNK_ELEMENTS similarities (64 MiB of float32) are
held at once, so 100,000 images need the (N, D) embeddings plus about 200 MiB. faiss, when it is installed, serves
the top-k search (an optional speed-up; the results are the same up to float rounding).
"""

from __future__ import annotations

import numpy as np

from edgessl.errors import UserError

CHUNK_ELEMENTS = 1 << 24  # similarities held at once (float32: 64 MiB; argpartition's int64 indices: 128 MiB)
MAX_PAIRS = 1_000_000  # duplicates.csv holds at most this many pairs: a lower --duplicates is refused
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
