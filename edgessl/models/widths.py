"""One width of a `--widths` run as a standalone, physically smaller encoder (the width maths beside channels.py,
slicing.py and slimmable.py).

build_slim: torch-pruning removes channels k.. of every channel group; the model is saved like any encoder
(encoder.safetensors + encoder.json), whose "pruned" entry ({group root: kept channels}) lets `load_encoder` rebuild
the architecture from timm alone. Its outputs equal the width's sub-network (sliced shared weights + that width's
private BatchNorm from widths.safetensors).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from edgessl.errors import UserError
from edgessl.fileio import sha256_files
from edgessl.models.backbone import (
    ENCODER_META,
    ENCODER_WEIGHTS,
    load_encoder,
    output_dim,
    read_encoder_meta,
    save_encoder,
)
from edgessl.models.channels import channel_groups, check_width, group_counts, width_plan
from edgessl.models.prune import prune_to_counts
from edgessl.models.slicing import sliced_tensors

WIDTHS_BN = "widths.safetensors"


def width_folder(run_dir: str | Path, width: float) -> Path:
    """Default output folder of a width: <run_dir>/width-<w:g> (width-0.5, width-0.25, width-1)."""
    return Path(run_dir) / f"width-{width:g}"


def run_widths(run_dir: str | Path, meta: dict[str, Any] | None = None) -> list[float]:
    """The widths a run was trained at ([1.0] for a run without --widths)."""
    meta = meta if meta is not None else read_encoder_meta(run_dir)
    return [float(w) for w in (meta.get("widths") or [1.0])]


def match_width(run_dir: Path, meta: dict[str, Any], width: float) -> float:
    """The run's own value of `width` (0.50 -> 0.5); UserError when the run was not trained at it."""
    check_width(width)
    widths = meta.get("widths")
    if not widths:
        if math.isclose(width, 1.0):
            return 1.0
        if "width" in meta:
            raise UserError(f"'{run_dir}' holds a slimmed encoder (width {float(meta['width']):g} of "
                            f"{meta.get('source_run')}): it cannot be slimmed further. Slim the source run instead.")
        raise UserError(f"'{run_dir}' was not trained with --widths: only its full width (1) exists. Pretrain with "
                        "`edgessl pretrain --widths 1.0,0.5,...` to get sub-networks to slim.")
    for w in widths:
        if math.isclose(float(w), width, abs_tol=1e-9):
            return float(w)
    raise UserError(f"width {width!r} was not trained in '{run_dir}': its widths are "
                    f"{', '.join(f'{float(w):g}' for w in widths)}.")


def source_digest(run_dir: str | Path, width: float) -> str:
    """sha256 of the files a width's encoder is made of (encoder.safetensors, + widths.safetensors below 1)."""
    run_dir = Path(run_dir)
    return sha256_files([run_dir / ENCODER_WEIGHTS] + ([run_dir / WIDTHS_BN] if width < 1 else []))


def _private_bn(run_dir: Path, width: float) -> dict[str, torch.Tensor]:
    """{backbone tensor name: the width's private BatchNorm tensor} from widths.safetensors."""
    path = run_dir / WIDTHS_BN
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {WIDTHS_BN} (each width's private BatchNorm, written by "
                        "`edgessl pretrain --widths` after every epoch): it cannot be slimmed.")
    prefix = f"{width:g}/"
    private = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not private:
        raise UserError(f"{path} holds no BatchNorm tensors for width {width:g}.")
    return private


@torch.no_grad()
def build_slim(run_dir: str | Path, width: float) -> tuple[nn.Module, dict[str, Any]]:
    """(physically pruned backbone in eval mode, its encoder.json meta) of the run's width-`width` sub-network.

    Width 1.0 is the run's encoder unchanged. UserError for a width outside (0, 1], a width the run was not trained
    at, a run without --widths (width < 1) or without widths.safetensors."""
    run_dir = Path(run_dir)
    check_width(width)
    meta = read_encoder_meta(run_dir)
    width = match_width(run_dir, meta, width)
    full = load_encoder(run_dir)  # rebuilds an already pruned architecture (a pruned run pretrained with --widths)
    size = int(meta["image_size"])
    example = torch.zeros(2, 3, size, size)
    pruned = dict(meta.get("pruned") or {})
    if width == 1.0:
        model = full
    else:
        groups = channel_groups(full, example)
        counts = group_counts(groups, width)
        state = dict(full.state_dict())
        state.update(sliced_tensors(full, width_plan(groups, width)))
        private = _private_bn(run_dir, width)
        unknown = sorted(set(private) - set(state))
        if unknown:
            raise UserError(f"{run_dir / WIDTHS_BN} does not match the encoder: it names {', '.join(unknown[:3])}.")
        state.update(private)
        model = prune_to_counts(copy.deepcopy(full), example, counts)
        model.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()})
        channels = {g.root: g.channels for g in groups}
        pruned.update({root: int(k) for root, k in counts.items() if k != channels[root]})
    model.eval()
    slim_meta = {k: v for k, v in meta.items() if k not in ("widths", "edgessl_meta")}
    slim_meta.update({
        "width": width,
        "pruned": pruned,
        "feature_dim": output_dim(model, size),
        "source_run": str(run_dir.resolve()),
        "source_widths": run_widths(run_dir, meta),
        "source_digest": source_digest(run_dir, width),
    })
    model.edgessl_meta = slim_meta
    return model, slim_meta


def save_slim(model: nn.Module, meta: dict[str, Any], run_dir: str | Path, out: str | Path) -> Path:
    """Save build_slim's result into `out` (encoder files + a copy of the run's config.yaml). Returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise UserError(f"the slimmed encoder cannot be written into the run directory '{run_dir}' itself "
                        "(it would replace the run's encoder): choose another --out.")
    save_encoder(model, out, meta)
    config = run_dir / "config.yaml"  # export/eval find the training images through it, as for a run
    if config.is_file() and config.resolve() != (out / "config.yaml").resolve():
        shutil.copyfile(config, out / "config.yaml")
    return out


def is_up_to_date(folder: str | Path, run_dir: str | Path, width: float) -> bool:
    """Whether `folder` holds the run's width-`width` encoder made from the run's current weights."""
    folder = Path(folder)
    if not (folder / ENCODER_META).is_file() or not (folder / ENCODER_WEIGHTS).is_file():
        return False
    try:
        meta = json.loads((folder / ENCODER_META).read_text())
        return (math.isclose(float(meta.get("width", -1)), width)
                and meta.get("source_digest") == source_digest(run_dir, width))
    except (OSError, ValueError):
        return False


def slim_encoder(run_dir: str | Path, width: float, out: str | Path | None = None) -> Path:
    """Write the run's width-`width` sub-network as a standalone encoder into `out` (default <run_dir>/width-<w>/):
    encoder.safetensors + encoder.json (run meta + "width", "pruned", updated "feature_dim", "source_run") and a
    copy of the run's config.yaml. Returns the folder. `load_encoder(folder)` rebuilds it."""
    run_dir = Path(run_dir)
    model, meta = build_slim(run_dir, width)
    return save_slim(model, meta, run_dir, Path(out) if out is not None else width_folder(run_dir, meta["width"]))


def ensure_slimmed(run_dir: str | Path, width: float) -> tuple[Path, bool]:
    """(<run_dir>/width-<w>/, reused): slim into it unless it already holds this width of the current weights.
    Width 1 is the run itself: (run_dir, True)."""
    run_dir = Path(run_dir)
    meta = read_encoder_meta(run_dir)
    width = match_width(run_dir, meta, width)
    if width == 1.0:
        return run_dir, True
    folder = width_folder(run_dir, width)
    if is_up_to_date(folder, run_dir, width):
        return folder, True
    return slim_encoder(run_dir, width, folder), False
