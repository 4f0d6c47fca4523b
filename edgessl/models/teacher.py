"""--teacher: a frozen encoder whose features of every training image become a second, fixed bank.

    RUN                 an edgessl run directory: its encoder (backbone), at the run's image size and normalisation
    timm:<name>         timm's pretrained weights of <name> (downloaded by timm when online; a one-line error
                        otherwise), at the pretrained input size and normalisation
    FILE                a local state dict (.safetensors, .pth; read as `--init FILE` reads it) for the timm
                        architecture --teacher-backbone, at its default input size and normalisation

The teacher is a feature extractor: timm's pooled features (num_classes=0), never a projection head.
--teacher-image-size overrides the input size of any of the three.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file
from torch import nn

from edgessl.errors import UserError
from edgessl.fileio import sha256_file
from edgessl.models import hub
from edgessl.models.backbone import ENCODER_WEIGHTS, build_from_arch, read_encoder_meta, resolve_name
from edgessl.models.init import load_matching, read_state_dict


@dataclass
class TeacherSpec:
    """What the teacher is and how to feed it: teacher.json's record (minus the timing the pass adds)."""
    source: str  # the --teacher value as given
    kind: str  # "run" | "timm" | "file"
    timm_name: str
    image_size: int
    mean: list[float]
    std: list[float]
    identity: str  # what names these exact weights: a sha256 of the file, or timm:<name>:<tag>
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "timm_name": self.timm_name, "image_size": self.image_size,
                "mean": self.mean, "std": self.std, "identity": self.identity, **self.extra}


def teacher_kind(source: str, backbone: str | None) -> str:
    """'timm', 'run' or 'file' for a --teacher value; UserError when it cannot be one."""
    if source.startswith("timm:"):
        if not source[len("timm:"):]:
            raise UserError("--teacher timm: needs a model name, e.g. --teacher timm:resnet50.")
        return "timm"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "encoder.json").is_file():
            raise UserError(f"--teacher '{source}' is a folder without encoder.json: pass an edgessl run directory, "
                            "timm:<name>, or a weights file with --teacher-backbone.")
        return "run"
    if not path.is_file():
        raise UserError(f"--teacher '{source}' does not exist: pass an edgessl run directory, timm:<name> (timm's "
                        "pretrained weights), or a weights file (.safetensors, .pth) with --teacher-backbone.")
    if not backbone:
        raise UserError(f"--teacher '{source}' is a weights file: name its timm architecture with --teacher-backbone, "
                        "e.g. --teacher-backbone resnet50.")
    return "file"


def _timm_model(name: str, pretrained: bool) -> nn.Module:
    try:
        if pretrained:
            return hub.create_pretrained(name, num_classes=0)
        return timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise UserError(f"--teacher: timm has no model '{name}' (timm.list_models() lists them).") from None
        raise


def _pretrained(name: str) -> nn.Module:
    """timm's pretrained `name`, or the one-line offline error."""
    try:
        return _timm_model(name, pretrained=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, blocked, no weights: one line with the way out
        raise UserError(
            f"--teacher timm:{name}: timm could not get the pretrained weights ({hub.failure(e)}). Where "
            f"you are online, timm.create_model('{name}', pretrained=True) caches them; or pass a local file: "
            f"--teacher path/to/weights.safetensors --teacher-backbone {name}."
        ) from None


def load_teacher(source: str, backbone: str | None = None, image_size: int | None = None,
                 warn: Callable[[str], None] = lambda _m: None) -> tuple[nn.Module, TeacherSpec]:
    """(the teacher backbone in eval mode with frozen weights, on CPU; its TeacherSpec) for a --teacher value.
    backbone: --teacher-backbone (a FILE's architecture); image_size: --teacher-image-size (None: the teacher's own)."""
    kind = teacher_kind(source, backbone)
    if kind == "run":
        meta = read_encoder_meta(source)
        model = build_from_arch(meta)
        weights = Path(source).expanduser() / ENCODER_WEIGHTS
        model.load_state_dict(load_file(str(weights)))
        spec = TeacherSpec(source, kind, meta["timm_name"], meta["image_size"], list(meta["mean"]), list(meta["std"]),
                           sha256_file(weights), {"path": os.path.abspath(os.path.expanduser(source))})
    else:
        name = resolve_name(source[len("timm:"):] if kind == "timm" else backbone)
        if kind == "timm":
            model = _pretrained(name)
            identity = f"timm:{name}:{model.pretrained_cfg.get('tag') or ''}:{timm.__version__}"
        else:
            model = _timm_model(name, pretrained=False)
            load_matching(model, read_state_dict(source, "--teacher"), source, warn, "--teacher")
            identity = sha256_file(Path(source).expanduser())
        cfg = model.pretrained_cfg
        spec = TeacherSpec(source, kind, name, int(cfg.get("input_size", (3, 224, 224))[-1]),
                           list(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
                           list(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)), identity)
    if image_size:
        spec.image_size = image_size
    return model.eval().requires_grad_(False), spec
