"""Projection head: backbone features -> d-dimensional vector that is L2-normalised by the method."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from edgessl.errors import UserError
from edgessl.fileio import DAMAGED_TORCH_FILE, safe_torch_load
from edgessl.models.backbone import (
    build_from_arch,
    create_backbone,
    output_dim,
    read_encoder_meta,
    resolve_name,
    want_small_input,
)
from edgessl.models.init import init_kind, load_init


class ProjectionHead(nn.Module):
    """'mlp': Linear-BN-ReLU-Linear (hidden units `hidden`); 'linear': one Linear. in_dim comes from a dummy
    forward pass of the backbone (models.backbone.output_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 2048, kind: str = "mlp"):
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_dim),
            )
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            raise ValueError(f"head kind must be 'mlp' or 'linear', not {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> (B, out_dim), not normalised."""
        return self.net(x)


class Encoder(nn.Module):
    """Backbone + projection head. `forward` returns the head output; `features` the backbone's pooled features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_encoder(cfg, warn: Callable[[str], None] | None = None) -> tuple[Encoder, dict, int]:
    """The backbone + projection head a PretrainConfig describes (backbone, small_input, image_size, feature_dim,
    head_hidden, head), initialised from torch's global RNG, then, with cfg.init, the backbone's weights (and a
    run's head) loaded as edgessl.models.init describes; warn(message) gets the key-mismatch warning.
    Returns (Encoder, arch: encoder.json's architecture keys (+ "init": where the weights came from), feature
    dimension of the backbone)."""
    init = getattr(cfg, "init", None)
    kind = init_kind(init) if init else None
    if kind == "run":
        meta = read_encoder_meta(init)
        if resolve_name(cfg.backbone) != meta["timm_name"]:
            raise UserError(f"--init {init} holds a {meta['timm_name']} encoder, not --backbone {cfg.backbone}: pass "
                            f"--backbone {meta['timm_name']}.")
        backbone = build_from_arch(meta)
        arch = {k: meta[k] for k in ("timm_name", "stem", "pruned") if k in meta}
    else:
        small = want_small_input(cfg.small_input, cfg.image_size)
        backbone, arch = create_backbone(cfg.backbone, small_input=small, keep_stem_weights=kind is not None)
    feat_dim = output_dim(backbone, cfg.image_size)
    head = ProjectionHead(feat_dim, cfg.feature_dim, cfg.head_hidden, cfg.head)
    if kind is not None:
        arch["init"] = _load_init(backbone, head, init, kind, arch["timm_name"], warn or (lambda _: None))
    return Encoder(backbone, head), arch, feat_dim


def _load_init(backbone: nn.Module, head: nn.Module, init: str, kind: str, timm_name: str,
               warn: Callable[[str], None]) -> dict:
    """Load --init's weights into the backbone (and a run's head when its shapes fit); encoder.json's record."""
    record = load_init(backbone, init, timm_name, warn, kind)
    if kind == "run":
        record["head"] = _run_head(head, Path(init))
    return record


def _run_head(head: nn.Module, run: Path) -> str:
    """Load the run's projection head from its checkpoint when it has the same shapes: 'from the run', else 'new'."""
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        return "new"
    try:
        model = safe_torch_load(ckpt, "--init").get("model", {})
    except DAMAGED_TORCH_FILE:  # damaged: the encoder alone
        return "new (its checkpoint.pt is unreadable)"
    state = {k[len("head."):]: v for k, v in model.items() if k.startswith("head.")}
    own = head.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        return "new"
    head.load_state_dict(state)
    return "from the run"
