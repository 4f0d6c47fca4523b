"""Weighted k-nearest-neighbour classification on frozen features (the NPID / lightly protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The kNN settings edgessl reports everywhere (eval.json, the pretraining monitor, widths.json, export's kNN figure):
# k = 20 and 200 (a single-k figure uses KNN_K[0] = 20), temperature 0.1.
KNN_K = (20, 200)
KNN_T = 0.1


def knn_predict_many(
    query: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    num_classes: int,
    ks: tuple[int, ...] = KNN_K,
    t: float = KNN_T,
    exclude_self: bool | Tensor = False,
    chunk: int = 1024,
) -> dict[int, Tensor]:
    """Class scores of each query by weighted kNN over the memory set, for several k from one top-k search.

    query: (Q, D), memory: (M, D) features (normalised here, cosine similarity); memory_labels: (M,) long.
    Each of the k most similar memory items votes for its class with weight exp(sim / t). One top-max(ks) search per
    chunk of queries serves every k (its first k columns are the top k). exclude_self: query i is memory item i
    (leave-one-out on one set; requires Q == M), or a (Q,) long tensor: query i is memory item exclude_self[i]
    (leave-one-out for a subset of the memory). Returns {k: (Q, C) scores} for the requested k (each clipped to the
    memory items available); argmax is the prediction.
    """
    query = F.normalize(query.float(), dim=1)
    memory = F.normalize(memory.float(), dim=1)
    memory_labels = memory_labels.to(memory.device)
    if exclude_self is True:
        exclude_self = torch.arange(query.shape[0], device=query.device)
    exclude = exclude_self if isinstance(exclude_self, Tensor) else None
    available = memory.shape[0] - (0 if exclude is None else 1)
    clipped = {k: max(1, min(k, available)) for k in ks}
    widest = max(clipped.values())
    scores: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ memory.t()  # (q, M)
        if exclude is not None:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, exclude[start : start + chunk].to(sim.device)] = -float("inf")
        top_sim, top_idx = sim.topk(widest, dim=1)  # sorted, most similar first
        votes = (top_sim / t).exp().unsqueeze(-1) * F.one_hot(memory_labels[top_idx], num_classes).to(top_sim.dtype)
        for k in ks:
            scores[k].append(votes[:, : clipped[k]].sum(dim=1))
    return {k: torch.cat(v) for k, v in scores.items()}


def knn_predict(
    query: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    num_classes: int,
    k: int = KNN_K[-1],
    t: float = KNN_T,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> Tensor:
    """(Q, C) scores of knn_predict_many for one k."""
    return knn_predict_many(query, memory, memory_labels, num_classes, (k,), t, exclude_self, chunk)[k]


def loo_k(labels: Tensor | Sequence[int], k: int = KNN_K[0]) -> int:
    """A leave-one-out kNN's k: `k`, or one less than the smallest class's images. Left out of its own vote, an
    image's class has one voter fewer than the others, so a k near the class size votes against the right class
    (20 images in 4 classes at k = 19 had scored 0.0 against a chance level of 0.25). export/device_check.py applies
    the same rule."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long))
    return max(1, min(k, int(counts[counts > 0].min()) - 1))


def knn_top1s(
    query: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    num_classes: int,
    ks: tuple[int, ...] = KNN_K,
    t: float = KNN_T,
    exclude_self: bool | Tensor = False,
) -> dict[int, float]:
    """{k: top-1 accuracy in [0, 1]} of knn_predict_many (one search for every k)."""
    scores = knn_predict_many(query, memory, memory_labels, num_classes, ks, t, exclude_self)
    query_labels = query_labels.to(query.device)
    return {k: float((s.argmax(dim=1) == query_labels).float().mean()) for k, s in scores.items()}


def knn_top1(
    query: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    num_classes: int,
    k: int = KNN_K[-1],
    t: float = KNN_T,
    exclude_self: bool = False,
) -> float:
    """Top-1 accuracy in [0, 1] of knn_predict (knn_top1s for one k)."""
    return knn_top1s(query, query_labels, memory, memory_labels, num_classes, (k,), t, exclude_self)[k]
