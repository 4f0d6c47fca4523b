"""--init: start a backbone from other weights instead of a random initialisation.

    timm        timm's default pretrained weights for the backbone (downloaded by timm when online)
    FILE        a local state dict: .safetensors, or .pth/.pt/.bin (torch.load with weights_only); a checkpoint
                dict holding it under "state_dict", "model" or "state_dict_ema" is unwrapped, and a "module." or
                "backbone." prefix on every key is dropped
    RUN         an edgessl run directory: its encoder (the same architecture, also a pruned one) and, when its
                checkpoint has one of the same shape, its projection head

Keys are matched to the timm model by name. Keys of the file the model lacks (a classifier, say) and keys the
model lacks in the file are listed in one warning; a missing key other than a classifier's, or a shape that
differs, is an error. A small-input stem keeps the pretrained stem's weights: only its stride changes (for a ResNet
the 7x7 conv1 at stride 1 and no max-pool, stem "resnet_stride1", instead of the from-scratch 3x3 conv1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from edgessl.errors import UserError
from edgessl.fileio import safe_torch_load, sha256_file
from edgessl.models import hub

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.", "last_linear.")
WRAPPERS = ("state_dict", "model", "state_dict_ema")
PREFIXES = ("module.", "backbone.")
STEM_KEYS = ("conv1.", "conv_stem.", "stem.")  # the first convolution of timm's ResNets, MobileNets and others
BACKBONE_FLAG = {"--init": "--backbone", "--teacher": "--teacher-backbone"}  # which flag names the architecture


def init_kind(option: str) -> str:
    """'timm', 'run' (a folder with encoder.json) or 'file'; UserError when the path does not exist."""
    if option == "timm":
        return "timm"
    path = Path(option).expanduser()
    if path.is_dir():
        if not (path / "encoder.json").is_file():
            raise UserError(f"--init '{option}' is a folder without encoder.json: pass an edgessl run directory, a "
                            "weights file (.safetensors, .pth) or timm.")
        return "run"
    if not path.is_file():
        raise UserError(f"--init '{option}' does not exist: pass timm, a weights file (.safetensors, .pth) or an "
                        "edgessl run directory.")
    return "file"


def read_state_dict(path: str | Path, option: str = "--init") -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (unwrapped and un-prefixed as the module docstring says).
    option: the flag named in error messages."""
    path = Path(path).expanduser()
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = safe_torch_load(path, option)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise UserError(f"{option} '{path}' could not be read as weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}): it takes a .safetensors file or a "
                        "PyTorch state dict / checkpoint (.pth, .pt).") from None
    while isinstance(state, dict) and any(k in state and isinstance(state[k], dict) for k in WRAPPERS):
        state = next(state[k] for k in WRAPPERS if k in state and isinstance(state[k], dict))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{option} '{path}' holds no state dict (a mapping of parameter names to tensors).")
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def timm_state_dict(timm_name: str) -> dict[str, torch.Tensor]:
    """timm's default pretrained weights of `timm_name` (timm downloads and caches them; offline, its cache alone:
    edgessl.models.hub)."""
    try:
        return hub.create_pretrained(timm_name, num_classes=0).state_dict()
    except Exception as e:  # noqa: BLE001 - offline, blocked, missing: one line with the way out
        raise UserError(
            f"--init timm: timm could not get the pretrained weights of '{timm_name}' ({hub.failure(e)}). "
            f"Where you are online, timm.create_model('{timm_name}', pretrained=True) caches them; or pass a local "
            "file: --init path/to/weights.safetensors (or .pth)."
        ) from None


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                  warn: Callable[[str], None], option: str = "--init") -> dict[str, Any]:
    """Load `state` into `model` by key. Returns {"missing": [...], "unexpected": [...]}; warns once when either
    is non-empty; UserError when a non-classifier key is missing or a shape differs. option: the flag named in
    messages, with `source` after it."""
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        hint = f"Is it the same {BACKBONE_FLAG[option]}?"
        if all(w.startswith(STEM_KEYS) for w in wrong):  # the same network with another stem
            hint = (f"Only the stem differs (a small-input stem?): for an edgessl run's encoder pass its run directory "
                    f"as {option}, which rebuilds its stem.")
        raise UserError(f"{option} {source}: {len(wrong)} weight(s) have another shape than the model's, e.g. '{k}' "
                        f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}. {hint}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    serious = [k for k in missing if not k.startswith(CLASSIFIER_PREFIXES)]
    if serious:
        raise UserError(f"{option} {source}: {len(serious)} of the model's {len(own)} weights are not in it, e.g. "
                        f"{', '.join(serious[:3])}. Is it the same {BACKBONE_FLAG[option]}?")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing or unexpected:
        warn(f"{option} {source}: {len(unexpected)} key(s) not used ({', '.join(unexpected[:4])}"
             f"{', ...' if len(unexpected) > 4 else ''}), {len(missing)} missing"
             f"{' (' + ', '.join(missing[:4]) + ')' if missing else ''}.")
    return {"missing": missing, "unexpected": unexpected}


def load_init(backbone: nn.Module, option: str, timm_name: str, warn: Callable[[str], None],
              kind: str | None = None) -> dict[str, Any]:
    """Load --init `option` (timm, a file or a run directory) into `backbone` by key (load_matching).
    Returns encoder.json's "init" record (describe)."""
    kind = kind or init_kind(option)
    if kind == "timm":
        state = timm_state_dict(timm_name)
    elif kind == "file":
        state = read_state_dict(option)
    else:
        state = load_file(str(Path(option).expanduser() / "encoder.safetensors"))
    found = load_matching(backbone, state, option, warn)
    return describe(option, kind, {"missing": len(found["missing"]), "unexpected": len(found["unexpected"])})


def describe(option: str, kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    """encoder.json's "init" record: where the weights came from."""
    record: dict[str, Any] = {"kind": kind, **extra}
    if kind == "timm":
        record["source"] = f"timm:{timm.__version__}"
    else:
        record["source"] = os.path.abspath(os.path.expanduser(option))
        if kind == "file":
            record["sha256"] = sha256_file(record["source"])
    return record
