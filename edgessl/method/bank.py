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


def momentum_bank_update(rows: Tensor, z: Tensor, momentum: float) -> Tensor:
    """NPID's update of each sample's own row: v <- normalize(m v + (1 - m) z).

    rows: (B, d) the samples' own rows; z: (B, d) detached unit features -> (B, d) unit rows.
    """
    return F.normalize(momentum * rows + (1 - momentum) * z.to(rows.dtype), dim=1)


def select_columns(
    index: Tensor, num_rows: int, negatives: int, generator: torch.Generator | None = None
) -> tuple[Tensor | None, Tensor]:
    """Which bank rows a step uses, and where each sample's own row sits among them.

    index: (B,) rows of the batch's images. When num_rows <= negatives the whole bank is used:
    returns (None, index). Otherwise the batch's rows plus `negatives` rows drawn uniformly (with
    replacement, duplicates merged): returns (cols (K,) sorted unique row ids, targets (B,) positions in cols).
    """
    if num_rows <= negatives:
        return None, index
    drawn = torch.randint(num_rows, (negatives,), generator=generator, device="cpu").to(index.device)
    cols, inverse = torch.unique(torch.cat([index, drawn]), return_inverse=True)
    return cols, inverse[: index.shape[0]]


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
    def update_grad(self, cols: Tensor | None, z: Tensor, p: Tensor, targets: Tensor, lr: float) -> None:
        new = grad_bank_update(self.columns(cols), z, p, targets, lr)
        if cols is None:
            self.weight.copy_(new)
        else:
            self.weight[cols] = new

    @torch.no_grad()
    def update_momentum(self, index: Tensor, z: Tensor, momentum: float) -> None:
        self.weight[index] = momentum_bank_update(self.weight[index], z, momentum)
