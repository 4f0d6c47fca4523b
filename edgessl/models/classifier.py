"""A fine-tuned classifier: encoder backbone + linear layer, saved as classifier.safetensors + classifier.json.

classifier.json = the encoder's metadata (timm_name, stem, input_size, mean, std, feature_dim, ...) plus
"classes" (names, in logit order) and "num_classes". Weights: "backbone.<...>" and "fc.weight", "fc.bias".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from edgessl.errors import UserError
from edgessl.fileio import atomic_save_tensors, atomic_write_text
from edgessl.models.backbone import build_from_arch

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_META = "classifier.json"


class Classifier(nn.Module):
    """backbone (pooled features, (B, D)) -> fc -> logits (B, C)."""
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))


def save_classifier(model: Classifier, folder: str | Path, meta: dict[str, Any]) -> Path:
    """meta: encoder metadata + "classes". Returns the json path."""
    if "classes" not in meta:
        raise ValueError("classifier metadata needs 'classes'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_tensors(state, folder / CLASSIFIER_WEIGHTS)
    meta = {**meta, "num_classes": len(meta["classes"])}
    return atomic_write_text(folder / CLASSIFIER_META, json.dumps(meta, indent=2) + "\n")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Load a classifier folder (or its json/safetensors file) in eval mode; `.edgessl_meta` holds its metadata."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not (folder / CLASSIFIER_META).is_file() or not (folder / CLASSIFIER_WEIGHTS).is_file():
        raise UserError(f"No classifier in '{folder}': expected {CLASSIFIER_WEIGHTS} and {CLASSIFIER_META}.")
    meta = json.loads((folder / CLASSIFIER_META).read_text())
    model = Classifier(build_from_arch(meta), int(meta["feature_dim"]), int(meta["num_classes"]))
    model.load_state_dict(load_file(str(folder / CLASSIFIER_WEIGHTS)))
    model.edgessl_meta = meta
    return model.to(device).eval()
