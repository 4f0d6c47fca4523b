"""Projection head: backbone features -> d-dimensional vector that is L2-normalised by the method."""

from __future__ import annotations

from torch import Tensor, nn


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
