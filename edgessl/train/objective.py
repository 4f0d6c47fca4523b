"""The loss of one training step: the method at every trained width, plus distillation from a frozen teacher
(per step, `edgessl prune`'s recovery) or from a teacher bank (--teacher, one pass before training).

In the spirit of timm's TrainingTask: the loop calls `objective(net, x, index, epoch, step, mix, local)` and gets the
loss to back-propagate, whatever the composition; no `if` about widths or teachers stays in the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgessl.method.instance import InstanceDiscrimination, StepOutput
from edgessl.method.losses import (
    active_widths,
    cosine_to_rows,
    relational_kl,
    slimmable_loss,
    soft_cross_entropy,
    width_loss_weights,
)
from edgessl.method.teacher import TeacherBank
from edgessl.runtime import autocast
from edgessl.seeding import keyed_generator


@dataclass
class StepLoss:
    loss: Tensor  # scalar to back-propagate
    out: StepOutput  # the full width's method output: the bank update and the logged L_ce, L_sd come from it
    sub_ce: list[Tensor] = field(default_factory=list)  # each trained sub-width's detached L_ce
    widths: list[float] = field(default_factory=lambda: [1.0])  # the widths trained this step, full width first
    logged: dict[str, Tensor] = field(default_factory=dict)  # further detached terms: "teacher" (L_t of the full
    # width), "teacher_pred" (L_pred), as metrics.jsonl's loss_<name>


@dataclass
class Teacher:
    """A frozen encoder whose distribution over the same bank columns the student also matches:
    loss <- (1 - weight) * loss + weight * soft_ce(s / tau, softmax(t . V^T / tau)), t its unit feature of the crop."""

    model: nn.Module
    weight: float = 0.5


class Objective:
    """method: the single-branch loss and bank; widths: the widths of a slimmable net (full width first, a plain
    net when there is one); the sub-widths join after `slow_start` of `epochs`, distil the full width's
    distribution with weight `width_distill` and are weighted by width_loss_weights(widths, reweight).
    teacher_bank (--teacher): every trained width's loss gains w_t L_t, the relational KL to the teacher's
    distribution over the same columns (w_t = teacher_bank.weight; a weight of 0 leaves the loss untouched);
    predictor (the --teacher-predictor variant): the full width's loss also gains predictor_weight L_pred, the cosine
    loss of predictor(z) to the teacher's row of the image."""

    def __init__(self, method: InstanceDiscrimination, seed: int, epochs: int, device: torch.device, precision: str,
                 widths: Sequence[float] = (1.0,), slow_start: float = 0.5, width_distill: float = 0.5,
                 reweight: bool = True, teacher: Teacher | None = None, teacher_bank: TeacherBank | None = None,
                 predictor: nn.Module | None = None, predictor_weight: float = 0.0):
        self.method, self.seed, self.epochs = method, seed, epochs
        self.device, self.precision = device, precision
        self.widths, self.slow_start, self.width_distill = list(widths), slow_start, width_distill
        self.weights = width_loss_weights(self.widths, reweight)
        self.teacher = teacher
        self.teacher_bank = teacher_bank
        self.predictor, self.predictor_weight = (predictor, predictor_weight) if predictor_weight > 0 else (None, 0.0)

    @property
    def slim(self) -> bool:
        return len(self.widths) > 1

    def __call__(self, net: nn.Module, x: Tensor, index: Tensor, epoch: int, step: int,
                 mix: tuple[Tensor, float] | None = None, local: slice | None = None) -> StepLoss:
        """x: (B_r, 3, S, S) crops of this process's rows; index: (B,) the global batch's bank rows, best on the host
        (the column draw reads them there: from a GPU that read would wait for the device every step)."""
        host, index = index, index.to(self.device, non_blocking=True)
        trained = active_widths(self.widths, epoch, self.epochs, self.slow_start)
        with autocast(self.device, self.precision):
            zs = net(x, trained) if self.slim else [net(x)]
        # every width meets the same bank columns: the same generator key
        outs = [self.method(F.normalize(z.float(), dim=1), index, keyed_generator(self.seed, epoch, step), mix, local,
                            host_index=host) for z in zs]
        losses, logged = [o.loss for o in outs], {}
        if self.teacher_bank is not None and self.teacher_bank.weight != 0:  # weight 0: the loss untouched
            losses, logged["teacher"] = self._with_teacher_bank(outs, index, mix, local, x)
        if self.predictor is not None:
            rows = self.teacher_bank.rows(index, mix, local)
            logged["teacher_pred"] = cosine_to_rows(self.predictor(zs[0].float()), rows)
            losses[0] = losses[0] + self.predictor_weight * logged["teacher_pred"]
        loss = self._widths_loss(outs, losses)
        if self.teacher is not None:
            loss = self._with_teacher(loss, outs[0], x)
        return StepLoss(loss, outs[0], [o.ce for o in outs[1:]], trained,
                        {k: v.detach() for k, v in logged.items()})

    def _widths_loss(self, outs: list[StepOutput], losses: list[Tensor]) -> Tensor:
        if len(outs) == 1:
            return losses[0]
        tau = self.method.temperature
        return slimmable_loss(losses[0], losses[1:], [o.sim / tau for o in outs[1:]], outs[0].p,
                              self.weights[: len(outs)], self.width_distill)

    def _with_teacher_bank(self, outs: list[StepOutput], index: Tensor, mix, local: slice | None,
                           x: Tensor) -> tuple[list[Tensor], Tensor]:
        """([each width's loss + w_t L_t], the full width's detached L_t): one teacher distribution per step (all
        widths meet the same columns), one relational KL per width."""
        tb, tau = self.teacher_bank, self.method.temperature
        q = tb.targets(index, outs[0].cols, mix, local, x)
        kls = [relational_kl(o.sim, q, tau) for o in outs]
        return [o.loss + tb.weight * kl for o, kl in zip(outs, kls, strict=True)], kls[0].detach()

    def _with_teacher(self, loss: Tensor, out: StepOutput, x: Tensor) -> Tensor:
        tau, w = self.method.temperature, self.teacher.weight
        with torch.no_grad(), autocast(self.device, self.precision):
            zt = F.normalize(self.teacher.model(x).float(), dim=1)
        pt = torch.softmax(zt @ self.method.bank.columns(out.cols).t() / tau, dim=1)
        return (1 - w) * loss + w * soft_cross_entropy(out.sim / tau, pt)
