"""Frozen-feature extraction from cached images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgessl.data.augment import test_transform
from edgessl.data.folder import ImageSet


@torch.no_grad()
def extract_features(
    model: nn.Module, images: ImageSet, mean, std, device: str | torch.device = "cpu", batch_size: int = 256
) -> Tensor:
    """Eval-mode features of every image (test transform: the cached resize only). -> (N, D) float32 on CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)))
        x = test_transform(images.get(idx).to(device), mean, std)
        out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out)
