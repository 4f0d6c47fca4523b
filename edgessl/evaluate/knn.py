"""Weighted k-nearest-neighbour classification on frozen features (the NPID / lightly protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The kNN settings edgessl reports everywhere (eval.json, the pretraining monitor, widths.json, export's kNN figure):
# k = 20 and 200 (a single-k figure uses KNN_K[0] = 20), temperature 0.1.
KNN_K = (20, 200)
KNN_T = 0.1


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
    """Class scores of each query by weighted kNN over the memory set.

    query: (Q, D), memory: (M, D) features (normalised here, cosine similarity); memory_labels: (M,) long.
    Each of the k most similar memory items votes for its class with weight exp(sim / t).
    exclude_self: query i is memory item i (leave-one-out on one set; requires Q == M).
    Returns (Q, C) scores; argmax is the prediction. k is clipped to the memory items available.
    """
    query = F.normalize(query.float(), dim=1)
    memory = F.normalize(memory.float(), dim=1)
    available = memory.shape[0] - (1 if exclude_self else 0)
    k = max(1, min(k, available))
    scores = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ memory.t()  # (q, M)
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / t).exp()
        onehot = F.one_hot(memory_labels[top_idx], num_classes).to(weights.dtype)  # (q, k, C)
        scores.append((weights.unsqueeze(-1) * onehot).sum(dim=1))
    return torch.cat(scores)


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
    """Top-1 accuracy in [0, 1] of knn_predict."""
    pred = knn_predict(query, memory, memory_labels, num_classes, k, t, exclude_self).argmax(dim=1)
    return float((pred == query_labels).float().mean())
