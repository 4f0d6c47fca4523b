"""Image-weighted means of step values over an epoch (pretraining and fine-tuning)."""

from __future__ import annotations

import time
from typing import Any

import torch


class EpochMeter:
    """Image-weighted means of the step losses over an epoch, and its images and start time. Values may be floats
    or 0-d tensors on the training device, summed there (no host sync until means()); `moved` (a () bool tensor)
    says whether a step counts. images: images of the steps that counted (known after means() for tensors);
    seen: every image processed (the rate)."""
    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.images = 0
        self.seen = 0
        self.counted: Any = 0
        self.t0 = time.time()

    def add(self, values: dict[str, Any] | None, images: int, moved: torch.Tensor | None = None) -> None:
        if values is None:
            return
        self.seen += images
        if moved is None:
            self.counted += images
            weighted = {k: v * images for k, v in values.items()}
        else:
            self.counted = self.counted + moved.float() * images
            weighted = {k: torch.where(moved, v, torch.zeros_like(v)) * images for k, v in values.items()}
        for k, v in weighted.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state(self) -> dict[str, Any]:
        """Plain values a mid-epoch checkpoint holds (one host sync): the sums, counts and seconds so far."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "seen": self.seen,
                "counted": float(self.counted), "seconds": time.time() - self.t0}

    @classmethod
    def resumed(cls, state: dict[str, Any] | None) -> EpochMeter:
        """A meter that goes on from a checkpointed state (None: a fresh one)."""
        meter = cls()
        if state:
            meter.sums, meter.seen, meter.counted = dict(state["sums"]), state["seen"], state["counted"]
            meter.t0 = time.time() - state["seconds"]
        return meter

    def means(self) -> dict[str, float]:
        """{"loss", "loss_ce", "loss_sd", "loss_ce_w<w>"...}: the metrics.jsonl keys."""
        self.images = int(round(float(self.counted)))
        n = max(self.images, 1)
        out = {"loss": 0.0, "loss_ce": 0.0, "loss_sd": 0.0}
        out.update({("loss" if k == "loss" else f"loss_{k}"): float(v) / n for k, v in self.sums.items()})
        return out
