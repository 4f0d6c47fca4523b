"""Frozen-feature extraction from cached images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from edgessl.data.augment import test_transform
from edgessl.data.folder import ImageSet
from edgessl.data.loader import Prefetcher, gather


@torch.no_grad()
def extract_features(
    model: nn.Module, images: ImageSet, mean, std, device: str | torch.device = "cpu", batch_size: int = 256,
    keep_on_device: bool = False, rows: Tensor | None = None, between: Callable[[], None] | None = None,
) -> Tensor:
    """Eval-mode features of every image, or of rows `rows` (R,) (test transform: the cached resize only).
    -> (N or R, D) float32, on CPU (keep_on_device: on `device`). Batches are gathered in a background thread;
    `between` (e.g. runtime.between_batches) is called after every batch."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    order = torch.arange(len(images)) if rows is None else rows.cpu()
    chunks = order.split(batch_size)
    out = []
    with Prefetcher(lambda i: gather(images, chunks[i], device.type == "cuda"), len(chunks)) as batches:
        for raw in batches:
            x = test_transform(raw.to(device, non_blocking=True), mean, std)
            z = model(x.contiguous(memory_format=torch.channels_last)).float()  # 1.6x on a CPU, the model untouched
            out.append(z if keep_on_device else z.cpu())
            if between is not None:
                between()
    model.train(was_training)
    return torch.cat(out)
