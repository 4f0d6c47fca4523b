"""Projection head: backbone features -> d-dimensional vector that is L2-normalised by the method."""

from __future__ import annotations

from torch import Tensor, nn

from edgessl.models.backbone import create_backbone, output_dim, want_small_input


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


def build_encoder(cfg) -> tuple[Encoder, dict, int]:
    """The backbone + projection head a PretrainConfig describes (backbone, small_input, image_size, feature_dim,
    head_hidden, head), freshly initialised from torch's global RNG.
    Returns (Encoder, arch: encoder.json's architecture keys, feature dimension of the backbone)."""
    backbone, arch = create_backbone(cfg.backbone, small_input=want_small_input(cfg.small_input, cfg.image_size))
    feat_dim = output_dim(backbone, cfg.image_size)
    return Encoder(backbone, ProjectionHead(feat_dim, cfg.feature_dim, cfg.head_hidden, cfg.head)), arch, feat_dim
