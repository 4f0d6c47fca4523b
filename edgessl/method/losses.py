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
    return mix_probs(soft_targets(target_cols, num_cols), perm, lam)


def feature_std(z: Tensor) -> Tensor:
    """Collapse monitor: mean over dimensions of the per-dimension std of unit features.

    z: (N, d) unit rows -> scalar. About 1/sqrt(d) for well-spread features, 0 when all rows are equal.
    """
    return z.float().std(dim=0).mean()



# ---------------------------------------------------------------- a frozen teacher's bank (teacher-bank distillation)
def teacher_probs(t: Tensor, teacher_cols: Tensor, tau_t: float) -> Tensor:
    """The teacher's similarity distribution q_b = softmax(t_b . T_k / tau_t) over the bank columns k in use.

    t: (B, d_t) unit teacher features of the batch's images (rows of T, or of the crops); teacher_cols: (K, d_t)
    the same columns of the teacher bank T -> (B, K), rows summing to 1.
    """
    return torch.softmax(t @ teacher_cols.t() / tau_t, dim=1)


def relational_kl(sim: Tensor, q: Tensor, tau_s: float) -> Tensor:
    """Relational distillation L_t = (1/B) sum_b KL(q_b || p_b), p_b = softmax(s_b / tau_s).

    sim: (B, K) the student's similarities z_b . v_k to its own bank columns; q: (B, K) the teacher's distribution
    over the same columns (teacher_probs, a constant) -> scalar >= 0, 0 iff p = q.
    Gradient (tested against autograd): dL_t/ds_bk = (p_bk - q_bk) / (B tau_s).
    """
    q = q.detach()
    log_p = F.log_softmax(sim / tau_s, dim=1)
    return (torch.xlogy(q, q) - q * log_p).sum(dim=1).mean()


def cosine_to_rows(pred: Tensor, rows: Tensor) -> Tensor:
    """Feature distillation through a predictor: L_pred = (1/B) sum_b (1 - cos(g_b, t_b)).

    pred: (B, d_t) the predictor's outputs g_b (any norm); rows: (B, d_t) the teacher's rows t_b (a constant) -> scalar
    in [0, 2], 0 iff every g_b points along t_b.
    """
    return (1 - F.cosine_similarity(pred, rows.detach(), dim=1)).mean()


def mix_probs(q: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """The teacher distribution of a CutMixed crop: lam_b q_b + (1 - lam_b) q_perm[b].

    q: (B, K); perm: (B,) partner of each sample; lam: (B,) area kept -> (B, K).
    """
    lam = lam.to(q.dtype).unsqueeze(1)
    return lam * q + (1 - lam) * q[perm]

# ---------------------------------------------------------------- several widths of one network (SlimCLR)
def soft_cross_entropy(logits: Tensor, target_p: Tensor) -> Tensor:
    """Distillation toward a teacher's distribution: -(1/B) sum_b sum_k q_bk log softmax(logits_b)_k.

    logits: (B, K) the student's s / tau; target_p: (B, K) the teacher's probabilities (rows sum to 1), a constant.
    Its gradient w.r.t. the logits is (softmax(logits) - q) / B; it equals KL(q || p) + H(q).
    """
    return -(target_p.detach() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def width_loss_weights(widths: list[float], reweight: bool = True) -> list[float]:
    """Weight of each width's loss, widths in descending order (full width first).

    reweight (SlimCLR's loss re-weighting): the full width weighs 1 + the sum of the sub-widths, each sub-width 1,
    e.g. [1.0, 0.75, 0.5, 0.25] -> [2.5, 1, 1, 1]; without it every width weighs 1.
    """
    if reweight:
        return [1.0 + sum(widths[1:])] + [1.0] * (len(widths) - 1)
    return [1.0] * len(widths)


def slimmable_loss(full: Tensor, subs: list[Tensor], sub_logits: list[Tensor], teacher_p: Tensor,
                   weights: list[float], distill: float = 0.5) -> Tensor:
    """L = w_1 L_full + sum_i w_i [(1 - a) L_i + a CE(p_full, p_i)] (SlimCLR's online distillation, a = distill).

    full: scalar loss of the full width; subs: [scalar] each sub-width's own loss (against the same bank columns);
    sub_logits: [(B, K)] each sub-width's s / tau; teacher_p: (B, K) the full width's detached probabilities;
    weights: width_loss_weights(...). distill = 0 turns the distillation off.
    """
    total = weights[0] * full
    for w, own, logits in zip(weights[1:], subs, sub_logits, strict=True):
        term = own if distill == 0 else (1 - distill) * own + distill * soft_cross_entropy(logits, teacher_p)
        total = total + w * term
    return total


def active_widths(widths: list[float], epoch: int, epochs: int, slow_start: float) -> list[float]:
    """Widths trained in `epoch` (0-based): only the full width before round(slow_start * epochs), then all
    (SlimCLR's slow start; slow_start = 0 trains every width from the first epoch)."""
    return list(widths) if epoch >= round(slow_start * epochs) else [widths[0]]
