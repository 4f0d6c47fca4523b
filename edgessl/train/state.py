"""Everything a training run carries from step to step, and its checkpoint (save and exact restore)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgessl.errors import UserError
from edgessl.fileio import atomic_save
from edgessl.method.instance import InstanceDiscrimination
from edgessl.train.checkpoint import CHECKPOINT, rng_state, set_rng_state

PARTS = ("model", "method", "optimizer", "scheduler", "scaler")
MAX_NONFINITE = 10  # non-finite losses in a row before a run stops (pretraining and fine-tuning alike)


@dataclass
class TrainState:
    """model: the unwrapped module (never the DDP wrapper); method: the memory bank and losses (None when fine-tuning
    a classifier); epoch: epochs completed; nonfinite: non-finite steps in a row; batch: the global batch, fixed when
    the run starts and kept by every resume (whatever the process count)."""

    model: nn.Module
    method: InstanceDiscrimination | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    batch: int
    epoch: int = 0
    steps_done: int = 0  # steps done in epoch `epoch` (a mid-epoch checkpoint; 0 at an epoch's end)
    meter: dict[str, Any] | None = None  # that epoch's EpochMeter.state() at the mid-epoch checkpoint
    nonfinite: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    _streak: torch.Tensor | None = None  # step_on_device: non-finite losses in a row, on the device
    _worst: torch.Tensor | None = None  # ... and the longest such run since the last check_nonfinite

    @property
    def on_device(self) -> bool:
        """Whether steps can be decided on the device (step_on_device): no gradient scaler, and an optimiser whose
        fused kernel can skip an update itself (torch's fused SGD and AdamW: see edgessl.train.optim)."""
        return not self.scaler.is_enabled() and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def step_on_device(self, loss: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """TrainState.step without reading anything back to the host (no CUDA sync): `value` () is the loss
        averaged over processes, on the device. A non-finite value makes the fused optimiser skip its update
        (found_inf), so the weights and its state stay as they were; the schedule advances either way. Returns
        () bool on the device: whether the weights moved. The in-a-row count stays on the device too:
        check_nonfinite() reads it and raises after MAX_NONFINITE in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        bad = ~torch.isfinite(value.detach())
        if self._streak is None:
            self._streak = torch.tensor(float(self.nonfinite), device=value.device)
            self._worst = self._streak.clone()
        self._streak = torch.where(bad, self._streak + 1, torch.zeros_like(self._streak))
        self._worst = torch.maximum(self._worst, self._streak)
        loss.backward()  # DDP averages the gradients over processes
        self.optimizer.found_inf, self.optimizer.grad_scale = bad.float(), None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        self._advance_schedule()
        return ~bad

    def check_nonfinite(self, diverged: Callable[[], Exception]) -> None:
        """Read step_on_device's counters (one host sync): raise diverged() when MAX_NONFINITE or more losses in a
        row were non-finite since the last check; `nonfinite` gets the current count."""
        if self._streak is None:
            return
        self.nonfinite, worst = int(self._streak), int(self._worst)
        self._worst = self._streak.clone()
        if worst >= MAX_NONFINITE:
            raise diverged()

    def step(self, loss: torch.Tensor, value: float, diverged: Callable[[], Exception]) -> bool:
        """One optimiser step on `loss` (value: its float, averaged over processes). A non-finite value skips the
        step (the schedule still advances) and the MAX_NONFINITE-th in a row raises diverged(). Otherwise backward
        through the gradient scaler, optimiser and scheduler step. Returns whether the weights moved: False for a
        skipped step, also when the fp16 scaler found overflowing gradients and skipped it."""
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            self.nonfinite += 1
            self._advance_schedule()
            if self.nonfinite >= MAX_NONFINITE:
                raise diverged()
            return False
        self.nonfinite = 0
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.scale(loss).backward()  # DDP averages the gradients over processes
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._advance_schedule()
        return scale is None or self.scaler.get_scale() >= scale  # a lower scale: inf/NaN gradients, step skipped

    def _schedule_lr(self) -> None:
        """The learning rate the schedule gives at its step: a resumed run extended to more epochs (--resume RUN
        --epochs N) continues on the schedule of an N-epoch run, not from the last rate of the shorter one."""
        lambdas = getattr(self.scheduler, "lr_lambdas", None)
        if lambdas:
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, lambdas, strict=True):
                group["lr"] = base * fn(self.scheduler.last_epoch)

    def _advance_schedule(self) -> None:
        """scheduler.step(); after a skipped optimiser step torch warns that the order is wrong: here it is meant."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()

    def checkpoint(self, num_images: int, config: dict[str, Any], world: int) -> dict[str, Any]:
        if self._streak is not None:
            self.nonfinite = int(self._streak)
        return {
            **{part: getattr(self, part).state_dict() for part in PARTS if getattr(self, part) is not None},
            "epoch": self.epoch,
            "step": self.steps_done,
            "meter": self.meter,
            "rng": rng_state(),
            "nonfinite": self.nonfinite,
            "history": self.history,
            "num_images": num_images,
            "batch": self.batch,
            "config": config,
            "world_size": world,
        }

    def save(self, run_dir: Path, num_images: int, config: dict[str, Any], world: int) -> None:
        """checkpoint.pt, written atomically (a kill at any moment leaves the previous one)."""
        atomic_save(self.checkpoint(num_images, config, world), Path(run_dir) / CHECKPOINT)

    def restore(self, ckpt: dict[str, Any], run_dir: Path, num_images: int) -> None:
        """Continue from a checkpoint: weights, bank, optimiser, schedule, scaler, RNG states, epoch, history.
        UserError when it does not fit (another data size, another model); nothing is changed on disk."""
        if ckpt["num_images"] != num_images:
            raise UserError(
                f"Cannot resume '{run_dir}': it was trained on {ckpt['num_images']} images, "
                f"the data now has {num_images}."
            )
        try:
            for part in PARTS:
                if part == "scaler" and not ckpt.get(part):  # a bf16/fp32 run resumed in fp16: a fresh scaler
                    continue
                if getattr(self, part) is not None:
                    getattr(self, part).load_state_dict(ckpt[part])
            match_layouts(self.optimizer)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"Cannot resume '{run_dir}': its checkpoint does not fit the model these options build "
                f"({first[:200]}). "
                "Resume without changing model options."
            ) from None
        set_rng_state(ckpt["rng"])
        self._schedule_lr()
        self.epoch, self.history, self.nonfinite = ckpt["epoch"], ckpt["history"], ckpt["nonfinite"]
        self.steps_done, self.meter = ckpt.get("step", 0), ckpt.get("meter")
        self._streak = self._worst = None


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimiser state tensor its parameter's memory layout. A checkpoint of a CUDA run (channels_last
    weights and momentum) resumed on the CPU (NCHW weights) kept channels_last buffers, and the fused kernels, which
    read memory in flat order, added each momentum to another weight; the other way round they refuse the layouts."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

