"""The single-branch instance-discrimination method: a thin module around the pure losses and bank rules.

forward(z, index) computes the loss of one step and returns what the bank update needs; the training loop
calls `update_bank` after the optimiser step, with detached tensors, outside autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgessl.method.bank import MemoryBank, select_columns
from edgessl.method.losses import cutmix_targets, instance_ce, similarities, sqrt_self_distillation


@dataclass
class StepOutput:
    loss: Tensor  # scalar, L_ce + lambda L_sd
    ce: Tensor  # scalar, detached
    sd: Tensor  # scalar, detached
    index: Tensor  # (B,) rows of the batch (the global batch in data-parallel training)
    cols: Tensor | None  # (K,) rows in use, None = whole bank
    targets: Tensor  # (B,) long or (B, K) soft, for the whole (global) batch
    p: Tensor  # (B_r, K) softmax(s / tau) of this process's rows (B_r = B with one process), detached
    z: Tensor  # (B_r, d) detached unit features of this process's rows
    sim: Tensor  # (B_r, K) similarities to the columns in use, with gradient (distillation between widths)


class InstanceDiscrimination(nn.Module):
    """Memory bank + losses of the method (see docs/method.md for the equations)."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        temperature: float = 0.1,
        negatives: int = 16384,
        bank_update: str = "grad",
        bank_lr: float = 1.0,
        bank_momentum: float = 0.5,
        sd_weight: float = 5.0,
        sd_temperature: float = 1.0,
        sd_alpha: float = 0.5,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if bank_update not in ("grad", "momentum"):
            raise ValueError(f"bank_update must be 'grad' or 'momentum', not {bank_update!r}")
        self.bank = MemoryBank(num_rows, dim, generator=generator)
        self.temperature = temperature
        self.negatives = negatives
        self.bank_update = bank_update
        self.bank_lr = bank_lr
        self.bank_momentum = bank_momentum
        self.sd_weight = sd_weight
        self.sd_temperature = sd_temperature
        self.sd_alpha = sd_alpha

    def forward(
        self,
        z: Tensor,
        index: Tensor,
        generator: torch.Generator | None = None,
        mix: tuple[Tensor, float] | None = None,
        local: slice | None = None,
        host_index: Tensor | None = None,
    ) -> StepOutput:
        """z: (B, d) unit features of the batch's crops; index: (B,) their bank rows;
        mix: (perm (B,), lam) when the crops were CutMixed with partners perm.

        local: data-parallel training. z is then (B_r, d), the rows `local` of the global batch whose bank rows
        are `index` (B,). Columns and (CutMix) targets are those of the global batch, so they match one process;
        the loss is the mean over the local rows (DDP's gradient average over equal slices makes it the global
        mean); out.z and out.p cover the local rows, and `update_bank` takes the gathered global z.
        Autocast is off inside: sim (B_r, K), p (B_r, K) and the losses are float32 whatever the caller's autocast.
        host_index: `index` on the host, when the caller has it (the column draw then reads nothing from the device)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._step(z.float(), index, generator, mix, local, host_index)

    def _step(self, z: Tensor, index: Tensor, generator: torch.Generator | None,
              mix: tuple[Tensor, float] | None, local: slice | None, host_index: Tensor | None = None) -> StepOutput:
        """forward's body in float32; z: (B_r, d) float32 unit features."""
        cols, targets = select_columns(index, self.bank.num_rows, self.negatives, generator, host_index)
        bank_cols = self.bank.columns(cols)
        sim = similarities(z, bank_cols)
        if mix is not None:
            perm, lam = mix
            lam_t = torch.full((index.shape[0],), float(lam), device=z.device)
            targets = cutmix_targets(targets, perm, lam_t, bank_cols.shape[0])
        ce = instance_ce(sim, targets if local is None else targets[local], self.temperature)
        loss = ce
        sd = torch.zeros((), device=z.device)
        if self.sd_weight > 0:
            sd = sqrt_self_distillation(sim, self.sd_temperature, self.sd_alpha)
            loss = ce + self.sd_weight * sd
        with torch.no_grad():
            p = torch.softmax(sim.detach() / self.temperature, dim=1)
        return StepOutput(loss, ce.detach(), sd.detach(), index, cols, targets, p, z.detach(), sim)

    @torch.no_grad()
    def update_bank(self, out: StepOutput, z: Tensor | None = None, keep: Tensor | None = None) -> None:
        """Apply this step's bank update (gradient rule over all columns in use, or NPID's momentum rule).

        z: (B, d) features of the whole global batch (every process's out.z gathered in rank order) when `out`
        covers one process's rows; p is then recomputed against the same columns of the not-yet-updated bank, so
        every process applies the update of one process with the global batch. None: out.z, out.p (one process).
        keep: () bool on the device; False leaves the bank untouched (the step was skipped), decided on the device.
        Autocast is off inside: the update is computed in the bank's float32."""
        with torch.autocast(device_type=out.z.device.type, enabled=False):
            p = out.p
            if z is None:
                z = out.z
            elif self.bank_update == "grad":
                p = torch.softmax(similarities(z.float(), self.bank.columns(out.cols)) / self.temperature, dim=1)
            if self.bank_update == "grad":
                self.bank.update_grad(out.cols, z, p, out.targets, self.bank_lr, keep)
            else:
                self.bank.update_momentum(out.index, z, self.bank_momentum, keep)
