"""Teacher-bank distillation: a thin module around the frozen teacher bank T and the pure relational KL.

T (N, d_t) holds the teacher's unit features of every training image, computed once before training
(edgessl.train.teacher). A step asks `targets` for the teacher's distribution over the bank columns the method
uses, and adds weight x relational_kl(sim, q, tau) for every trained width (docs/method.md gives the equations).
T is not part of the student's state_dict: the run keeps it in teacher.safetensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgessl.method.losses import mix_probs, teacher_probs


class TeacherBank(nn.Module):
    """features: (N, d_t) unit rows; weight: --teacher-weight; temperature: tau_t.
    per_step: the teacher network as a function of the crops, x (B_r, 3, S, S) -> (B_r, d_t) unit features: the
    per-step teacher (as SEED and LightlyTrain run it), an ablation; None (the default) reads t_b = T[index_b]."""

    def __init__(self, features: Tensor, weight: float = 1.0, temperature: float = 0.05,
                 per_step: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.register_buffer("features", features.float(), persistent=False)
        self.weight = weight
        self.temperature = temperature
        self.per_step = per_step

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @torch.no_grad()
    def targets(self, index: Tensor, cols: Tensor | None, mix: tuple[Tensor, float] | None = None,
                local: slice | None = None, x: Tensor | None = None) -> Tensor:
        """q: (B_r, K) the teacher's distribution over the columns `cols` (K,) (None: all N) for this process's rows.

        index: (B,) the global batch's bank rows; mix: (perm (B,), lam) of CutMix: q_b = lam q_b + (1 - lam)
        q_perm[b]; local: this process's rows of the global batch (None: all); x: (B_r, ...) the crops, read only
        by the per-step teacher (which sees the mixed crop itself). Float32, outside autocast."""
        cols_t = self.features if cols is None else self.features[cols]
        with torch.autocast(device_type=self.features.device.type, enabled=False):
            if self.per_step is not None:
                return teacher_probs(self.per_step(x).float(), cols_t, self.temperature)
            q = teacher_probs(self.features[index], cols_t, self.temperature)
            if mix is not None:
                perm, lam = mix
                q = mix_probs(q, perm, torch.full((index.shape[0],), float(lam), device=q.device))
            return q if local is None else q[local]

    @torch.no_grad()
    def rows(self, index: Tensor, mix: tuple[Tensor, float] | None = None, local: slice | None = None) -> Tensor:
        """(B_r, d_t) the teacher's unit rows t_index of this process's rows (the predictor's targets); with CutMix
        normalize(lam t_b + (1 - lam) t_perm[b])."""
        t = self.features[index]
        if mix is not None:
            perm, lam = mix
            t = F.normalize(float(lam) * t + (1 - float(lam)) * t[perm], dim=1)
        return t if local is None else t[local]


def teacher_predictor(dim: int, teacher_dim: int, hidden: int = 512) -> nn.Module:
    """The small predictor g of the --teacher-predictor variant: z (B, dim) -> (B, teacher_dim),
    Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, teacher_dim))
