"""Pure loss functions of the single-branch method.

Every function takes tensors and returns tensors; nothing here holds state. Shapes:
B = batch size, K = number of bank columns in use, d = feature dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarities(z: Tensor, bank_cols: Tensor) -> Tensor:
    """Cosine similarities of features to bank columns.

    z: (B, d) unit rows; bank_cols: (K, d) unit rows -> (B, K) with s_bk = z_b . v_k.
    """
    return z @ bank_cols.t()


def soft_targets(target_cols: Tensor, num_cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot targets: target_cols (B,) long in [0, K) -> (B, K)."""
    return F.one_hot(target_cols, num_cols).to(dtype)


def instance_ce(sim: Tensor, targets: Tensor, tau: float) -> Tensor:
    """Instance-discrimination cross-entropy L_ce = -(1/B) sum_b sum_k y_bk log p_bk, p_b = softmax(s_b / tau).

    sim: (B, K) cosine similarities; targets: (B,) long column of each sample's own row, or (B, K) soft
    targets whose rows sum to 1 (CutMix). Returns a scalar.
    With all similarities equal the value is log K, whatever the targets.
    """
    logits = sim / tau
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def sqrt_self_distillation(sim: Tensor, tau_sd: float = 1.0, alpha: float = 0.5) -> Tensor:
    """Self-distillation toward the flattened distribution: L_sd = (1/B) sum_b KL(q_b || sg(u_b)).

    q_b = softmax(s_b / tau_sd), u_b = q_b^alpha / sum_k q_bk^alpha (= softmax(alpha s_b / tau_sd)), sg = stop-gradient.
    sim: (B, K) similarities -> scalar.
    Identities (tested): u_b = softmax(s_b / (tau_sd / alpha)); the gradient equals that of -(1 - alpha) H(q_b).
    """
    log_q = F.log_softmax(sim / tau_sd, dim=1)
    with torch.no_grad():
        log_u = F.log_softmax(alpha * log_q, dim=1)
    return (log_q.exp() * (log_q - log_u)).sum(dim=1).mean()


def cutmix_targets(target_cols: Tensor, perm: Tensor, lam: Tensor, num_cols: int) -> Tensor:
    """Soft targets for CutMix inside a batch: sample b shows a fraction lam_b of itself and 1 - lam_b of perm[b].

    target_cols: (B,) own columns; perm: (B,) partner of each sample; lam: (B,) area kept -> (B, K).
    """
    own = soft_targets(target_cols, num_cols)
    partner = soft_targets(target_cols[perm], num_cols)
    lam = lam.to(own.dtype).unsqueeze(1)
    return lam * own + (1 - lam) * partner


def feature_std(z: Tensor) -> Tensor:
    """Collapse monitor: mean over dimensions of the per-dimension std of unit features.

    z: (N, d) unit rows -> scalar. About 1/sqrt(d) for well-spread features, 0 when all rows are equal.
    """
    return z.float().std(dim=0).mean()
