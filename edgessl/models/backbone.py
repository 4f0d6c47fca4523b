"""timm backbones: name aliases, small-input stems, and saving/loading an encoder from its own files.

An encoder is `encoder.safetensors` (weights) + `encoder.json` (what rebuilds the architecture and how to feed it).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from edgessl.errors import UserError
from edgessl.fileio import atomic_save_tensors, atomic_write_text
from edgessl.models.prune import prune_to_counts
from edgessl.rundir import CHECKPOINT

ALIASES = {
    "mobilenetv3_small": "mobilenetv3_small_100",
    "mobilenetv3_large": "mobilenetv3_large_100",
    "mobilenetv2": "mobilenetv2_100",
    "efficientnet": "efficientnet_b0",
}

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"


def resolve_name(name: str) -> str:
    """Alias -> timm name; an unknown name raises UserError listing the closest timm names."""
    name = ALIASES.get(name, name)
    known = timm.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known + list(ALIASES), n=5, cutoff=0.5)
    hint = f" Closest timm names: {', '.join(close)}." if close else " See `timm.list_models()` for names."
    raise UserError(f"Unknown backbone '{name}'.{hint}")


def stem_kind(model: nn.Module) -> str | None:
    """Which small-input stem change applies to this timm model: 'resnet' (3x3 stride-1 conv1, no max-pool),
    'stride1' (MobileNet/EfficientNet conv_stem at stride 1), or None when no rule is known."""
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):
        return "resnet"
    if isinstance(getattr(model, "conv_stem", None), nn.Conv2d):
        return "stride1"
    return None


def apply_small_input_stem(model: nn.Module, kind: str) -> None:
    """Change the stem in place so that small images are not reduced to 1x1 feature maps."""
    if kind == "resnet":
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        model.maxpool = nn.Identity()
    elif kind == "resnet_stride1":  # --init: the pretrained 7x7 conv1 kept, at stride 1, no max-pool
        model.conv1.stride = (1, 1)
        model.maxpool = nn.Identity()
    elif kind == "stride1":
        model.conv_stem.stride = (1, 1)
    else:
        raise ValueError(f"unknown stem change {kind!r}")


def want_small_input(option: str, image_size: int) -> bool:
    """--small-input auto|on|off -> bool; auto is on for training resolutions of at most 32 px."""
    if option not in ("auto", "on", "off"):
        raise UserError(f"--small-input must be auto, on or off, not '{option}'.")
    return option == "on" or (option == "auto" and image_size <= 32)


def create_backbone(name: str, small_input: bool = False,
                    keep_stem_weights: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Create a randomly initialised timm model without classifier (pooled features), optionally with a
    small-input stem (keep_stem_weights: one whose weights have the pretrained shapes, a stride change only, for
    --init). Returns (model, arch) where arch = {"timm_name", "stem"} rebuilds it exactly."""
    timm_name = resolve_name(name)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    stem = None
    if small_input:
        stem = stem_kind(model)
        if stem is None:
            raise UserError(
                f"--small-input (on, or auto at 32 px or less): no small-input stem rule for '{timm_name}' (known: "
                "ResNet conv1+maxpool, MobileNet/EfficientNet conv_stem). Use --small-input off or a larger "
                "--image-size."
            )
        if stem == "resnet" and keep_stem_weights:
            stem = "resnet_stride1"
        apply_small_input_stem(model, stem)
    return model, {"timm_name": timm_name, "stem": stem}


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture described by encoder.json (weights not loaded)."""
    model = timm.create_model(arch["timm_name"], pretrained=False, num_classes=0)
    if arch.get("stem"):
        apply_small_input_stem(model, arch["stem"])
    if arch.get("pruned"):  # a physically smaller model (`edgessl slim`, `edgessl prune`): remove the same channels

        size = int(arch.get("image_size") or arch["input_size"][-1])
        prune_to_counts(model, torch.zeros(2, 3, size, size), arch["pruned"])
    return model


@torch.no_grad()
def output_dim(model: nn.Module, image_size: int, in_chans: int = 3) -> int:
    """Feature dimension found by a dummy forward pass (eval mode, batch of 2), not from timm attributes."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    out = model(torch.zeros(2, in_chans, image_size, image_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return int(out.shape[1])


def save_encoder(model: nn.Module, folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write encoder.safetensors + encoder.json into `folder`. meta must hold timm_name, stem, input_size,
    mean, std, feature_dim. Returns the json path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_tensors(state, folder / ENCODER_WEIGHTS)
    return atomic_write_text(folder / ENCODER_META, json.dumps(meta, indent=2) + "\n")


def _encoder_folder(path: str | Path) -> Path:
    """The folder of a run directory or of one of its encoder files; a UserError names the path as given (another
    file had been reported as its folder, e.g. '.')."""
    given = Path(path)
    if not given.exists():
        raise UserError(f"'{given}' does not exist: pass a run directory of `edgessl pretrain`.")
    path = given.parent if given.is_file() else given
    if given.is_file() and not (path / ENCODER_WEIGHTS).is_file():
        raise UserError(f"'{given}' is a file, not an encoder: pass a run directory of `edgessl pretrain` (or its "
                        f"{ENCODER_WEIGHTS}).")
    if not (path / ENCODER_META).is_file() or not (path / ENCODER_WEIGHTS).is_file():
        raise UserError(f"No encoder in '{path}': expected {ENCODER_WEIGHTS} and {ENCODER_META} "
                        f"(a run directory of `edgessl pretrain`).{_no_encoder_hint(path)}")
    return path


def _no_encoder_hint(path: Path) -> str:
    """What the folder is instead, when it says: a fine-tuned classifier (classifier.json names the run it came
    from), a run missing one of its encoder files, or a run stopped before its first epoch ended (checkpoint.pt
    alone)."""
    if (path / "classifier.json").is_file():  # edgessl.models.classifier.CLASSIFIER_META
        try:
            origin = (json.loads((path / "classifier.json").read_text()).get("finetune") or {}).get("encoder_run")
        except (OSError, ValueError, AttributeError):
            origin = None
        run = origin or "<run>"
        return (f" It holds a fine-tuned classifier: pass the run it came from ({run}), or export the classifier "
                f"with: edgessl export {run} --classifier {path}")
    kept = [name for name in (ENCODER_META, ENCODER_WEIGHTS) if (path / name).is_file()]
    if (path / CHECKPOINT).is_file() and kept:  # one of the pair deleted after training
        missing = ENCODER_WEIGHTS if kept == [ENCODER_META] else ENCODER_META
        return (f" Its {missing} is missing while checkpoint.pt holds the trained weights: edgessl pretrain --resume "
                f"{path} with a larger --epochs trains on and writes it again.")
    if (path / CHECKPOINT).is_file():
        return (" It holds a run stopped before its first epoch ended (checkpoint.pt only): continue it with "
                f"edgessl pretrain --resume {path}")
    return ""


def read_encoder_meta(path: str | Path) -> dict[str, Any]:
    """encoder.json of a run directory (or of the folder holding the files)."""
    return json.loads((_encoder_folder(path) / ENCODER_META).read_text())


def run_encoder_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the folder holding the encoder, its encoder.json) of a run directory or an encoder file (UserError when there
    is none)."""
    path = Path(path)
    meta = read_encoder_meta(path)
    return (path if path.is_dir() else path.parent), meta


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a saved encoder from its own files into the same timm architecture, in eval mode.

    path: a run directory, or the folder/file of encoder.safetensors. The returned module carries the
    metadata as `model.edgessl_meta` (input size, mean/std, feature dim, ...).
    """
    folder = _encoder_folder(path)
    meta = read_encoder_meta(folder)
    model = build_from_arch(meta)
    model.load_state_dict(load_file(str(folder / ENCODER_WEIGHTS)))
    model.edgessl_meta = meta
    return model.to(device).eval()
