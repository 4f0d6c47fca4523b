"""Nearest neighbours of a set of embeddings (numpy arrays, chunked: never an N x N matrix), whitening, and groups.

The search works on unit rows in chunks of query rows: at most CHUNK_ELEMENTS similarities (64 MiB of float32) are
held at once, so 100,000 images need the (N, D) embeddings plus about 200 MiB. faiss, when it is installed, serves
the top-k search (an optional speed-up; the results are the same up to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch

from edgessl.errors import UserError

CHUNK_ELEMENTS = 1 << 24  # similarities held at once (float32: 64 MiB)


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
        top = torch.topk(torch.from_numpy(sim), k, dim=1)  # 5x numpy's argpartition at 50,000 columns (2 threads)
        part, vals = top.indices.numpy(), top.values.numpy()
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
