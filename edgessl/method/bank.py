"""Memory bank: pure update rules, and a thin module holding the (N, d) state.

The state change happens in `MemoryBank` methods that the training loop calls after the optimiser step,
never inside autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------- pure functions
def grad_bank_update(cols: Tensor, z: Tensor, p: Tensor, targets: Tensor, lr: float) -> Tensor:
    """Gradient-based update of the bank columns in use.

    v_k <- normalize(v_k + lr * sum_b (y_bk - p_bk) z_b), with y the (one-hot or soft) targets.
    This is v_k - lr * B * tau * dL_ce/dv_k: every column that took probability mass is pushed away from the
    batch's features, the own column is pulled toward them.
    cols: (K, d) unit rows; z: (B, d) detached unit features; p: (B, K) softmax(z cols^T / tau);
    targets: (B,) long or (B, K) soft -> (K, d) unit rows.
    """
    if targets.dim() == 1:
        targets = F.one_hot(targets, cols.shape[0]).to(p.dtype)
    delta = (targets - p).t() @ z.to(p.dtype)
    return F.normalize(cols + lr * delta.to(cols.dtype), dim=1)


BANK_STEP = 0.1  # eta * tau of `--bank-lr auto`: eta 1 at tau 0.1, where eta was tuned (docs/method.md)


def auto_bank_lr(tau: float, step: float = BANK_STEP) -> float:
    """eta of `--bank-lr auto`: step / tau. grad_bank_update moves a column by eta * B * tau times -dL_ce/dv_k, so
    eta = step / tau keeps that move, in units of the loss's gradient, the one eta 1 takes at tau 0.1 (0.5 at
    tau 0.2). tau > 0 -> eta > 0."""
    return step / tau


def momentum_bank_update(rows: Tensor, z: Tensor, momentum: float) -> Tensor:
    """NPID's update of each sample's own row: v <- normalize(m v + (1 - m) z).

    rows: (B, d) the samples' own rows; z: (B, d) detached unit features -> (B, d) unit rows.
    """
    return F.normalize(momentum * rows + (1 - momentum) * z.to(rows.dtype), dim=1)


def project_rows(rows: Tensor, dim: int) -> Tensor:
    """Unit rows of another width, keeping their dot products as well as a rank-`dim` map can.

    rows: (N, d_t) unit rows -> (N, dim) unit rows normalize(rows W), W (d_t, dim) the top-`dim` right singular
    vectors of `rows` (Eckart-Young: rows W W^T is the best rank-dim approximation, so (rows W)(rows W)^T is closest
    to rows rows^T), each with its largest entry positive; zero columns pad W when dim > rank. dim == d_t returns the
    rows unchanged (no rotation).
    """
    if dim == rows.shape[1]:
        return rows.clone()
    device, rows = rows.device, rows.cpu()  # float64 on the CPU, once per run: MPS has no float64
    _, _, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    w = vh[:dim].t()
    signs = torch.sign(w.gather(0, w.abs().argmax(dim=0, keepdim=True)))  # a singular vector's sign is arbitrary:
    w = w * torch.where(signs == 0, 1.0, signs)  # largest entry positive, so close rows give close banks
    if w.shape[1] < dim:
        w = F.pad(w, (0, dim - w.shape[1]))
    return F.normalize((rows.double() @ w).to(rows.dtype), dim=1).to(device)


def in_sorted(x: Tensor, values: Tensor) -> Tensor:
    """x: (n,) long; values: (E,) sorted unique long -> (n,) bool, x_i in values (O(n log E), unlike torch.isin)."""
    if values.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    pos = torch.searchsorted(values, x).clamp_(max=values.numel() - 1)
    return values[pos] == x


def draw_without_replacement(
    num_rows: int, count: int, exclude: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """`count` distinct rows of [0, num_rows) outside `exclude`, a uniform draw without replacement, on CPU.

    exclude: (E,) sorted unique long rows, count <= num_rows - E -> (count,) long, in no particular order.
    Small share of the bank (2 (count + E) <= num_rows): the distinct values of i.i.d. uniform draws, redrawn until
    `count` are outside `exclude`, then a random `count` of them (given its size, that set is a uniform subset),
    O(count log count). Otherwise the first `count` rows outside `exclude` of a random permutation, O(num_rows).
    """
    if 2 * (count + exclude.numel()) > num_rows:
        drawn = torch.randperm(num_rows, generator=generator, device="cpu")[: count + exclude.numel()]
        return drawn[~in_sorted(drawn, exclude)][:count]
    drawn = rows = torch.empty(0, dtype=torch.long)
    while rows.numel() < count:
        more = torch.randint(num_rows, (count + count // 2 + 16,), generator=generator, device="cpu")
        drawn = torch.cat([drawn, more])
        rows = torch.unique(drawn)
        rows = rows[~in_sorted(rows, exclude)]
    return rows[torch.randperm(rows.numel(), generator=generator, device="cpu")[:count]]


def select_columns(
    index: Tensor, num_rows: int, negatives: int, generator: torch.Generator | None = None, host: Tensor | None = None
) -> tuple[Tensor | None, Tensor]:
    """Which bank rows a step uses, and where each sample's own row sits among them.

    index: (B,) rows of the batch's images, B_u of them distinct. When num_rows <= B_u + negatives the whole bank
    is used: returns (None, index). Otherwise the batch's B_u rows plus `negatives` distinct other rows drawn
    uniformly without replacement: returns (cols (K,) sorted unique long row ids, K = B_u + negatives exactly;
    targets (B,) positions of index in cols). So K = min(num_rows, B_u + negatives), continuous in num_rows.
    Drawn on CPU from `generator` only: a pure function of (index, num_rows, negatives, generator state), the same
    columns on every data-parallel process with the same generator key. host: `index` on the CPU when the caller has
    it (reading a GPU's index back would wait for the device).
    """
    own = torch.unique(index.cpu() if host is None else host)
    if num_rows <= own.numel() + negatives:
        return None, index
    others = draw_without_replacement(num_rows, negatives, own, generator)
    cols = torch.cat([own, others]).sort().values.to(index.device)
    return cols, torch.searchsorted(cols, index)


# ---------------------------------------------------------------- state
class MemoryBank(nn.Module):
    """N unit rows of dimension d, one per training image, saved with the model's state_dict."""

    def __init__(self, num_rows: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        rows = F.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)
        self.register_buffer("weight", rows)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def columns(self, cols: Tensor | None) -> Tensor:
        """(K, d) rows in use; cols None means the whole bank."""
        return self.weight if cols is None else self.weight[cols]

    @torch.no_grad()
    def fill(self, index: Tensor, z: Tensor) -> None:
        """Overwrite rows `index` (B,) with unit features z (B, d), e.g. during the forward-pass initialisation."""
        self.weight[index] = F.normalize(z.to(self.weight.dtype), dim=1)

    @torch.no_grad()
    def update_grad(self, cols: Tensor | None, z: Tensor, p: Tensor, targets: Tensor, lr: float,
                    keep: Tensor | None = None) -> None:
        """keep: () bool on the device; False leaves the bank as it is (a skipped step), without a host sync."""
        old = self.columns(cols)
        new = grad_bank_update(old, z, p, targets, lr)
        if keep is not None:
            new = torch.where(keep, new, old)
        if cols is None:
            self.weight.copy_(new)
        else:
            self.weight[cols] = new

    @torch.no_grad()
    def update_momentum(self, index: Tensor, z: Tensor, momentum: float, keep: Tensor | None = None) -> None:
        """keep: as in update_grad."""
        old = self.weight[index]
        new = momentum_bank_update(old, z, momentum)
        self.weight[index] = new if keep is None else torch.where(keep, new, old)
