"""SlimmableEncoder: one weight-sharing encoder run at several widths (SlimCLR's slimmable network).

State only: the shared Encoder (backbone + projection head), each width's slicing plan, and each sub-width's
private BatchNorm (affine parameters and running statistics: SlimCLR's switchable BN). The maths of slicing is in
`models.slicing`, the grouping in `models.channels`, the losses in `method.losses`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgessl.models.channels import Plan, channel_groups, check_width, strip_prefix, width_plan
from edgessl.models.slicing import BN, WidthView

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def width_key(width: float) -> str:
    """ModuleDict key of a width: 0.5 -> 'w0500'."""
    return f"w{round(width * 1000):04d}"


def last_layer(head: nn.Module) -> nn.Module:
    """The projection head's output layer, whose output channels stay fixed at every width."""
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    return layers[-1]


class SlimmableEncoder(nn.Module):
    """encoder at widths (descending, 1.0 first). forward(x, widths) -> [head output at each width].

    encoder: an Encoder (backbone + head); example: (B, 3, H, W) input used once to trace the channel groups.
    Width 1.0 is the encoder itself (its own BatchNorm); width w < 1 slices every group to its first
    width_channels(C, w) channels and uses its private BatchNorm, initialised from the full one's first channels.
    """

    def __init__(self, encoder: nn.Module, widths: list[float], example: Tensor):
        super().__init__()
        for w in widths:
            check_width(w)
        self.encoder = encoder
        self.widths = sorted(set(widths) | {1.0}, reverse=True)
        self.groups = channel_groups(encoder, example, keep_outputs=[last_layer(encoder.head)])
        self.plans: dict[float, Plan] = {w: width_plan(self.groups, w) for w in self.widths if w < 1}
        self.bn = nn.ModuleDict()
        for w, plan in self.plans.items():
            private = nn.ModuleDict()
            for name, m in encoder.named_modules():
                if isinstance(m, BN):
                    k = (plan.get(name) or {}).get("out") or m.num_features
                    private[name.replace(".", "__")] = _private_bn(m, k)
            self.bn[width_key(w)] = private

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    @property
    def head(self) -> nn.Module:
        return self.encoder.head

    def bn_overrides(self, width: float, prefix: str = "") -> dict[str, Tensor]:
        """{tensor name relative to `prefix` ('' = the encoder, 'backbone'): the width's private BN tensor}."""
        out = {}
        p = prefix + "." if prefix else ""
        for key, m in self.bn[width_key(width)].items():
            name = key.replace("__", ".")
            if not name.startswith(p):
                continue
            for attr in BN_TENSORS:
                t = getattr(m, attr, None)
                if t is not None:
                    out[f"{name[len(p):]}.{attr}"] = t
        return out

    def forward_width(self, x: Tensor, width: float) -> Tensor:
        """(B, 3, H, W) -> (B, d) head output of the width-`width` sub-network."""
        if width == 1.0:
            return self.encoder(x)
        return WidthView(self.encoder, self.plans[width])(x, self.bn_overrides(width))

    def forward(self, x: Tensor, widths: list[float] | None = None) -> list[Tensor]:
        """[(B, d) head output at each width of `widths` (default all)], one call so DDP sees one forward."""
        return [self.forward_width(x, w) for w in (widths or self.widths)]

    def features(self, x: Tensor, width: float = 1.0) -> Tensor:
        """(B, 3, H, W) -> (B, C_w) pooled backbone features of the width-`width` sub-network."""
        if width == 1.0:
            return self.backbone(x)
        plan = strip_prefix(self.plans[width], "backbone")
        return WidthView(self.backbone, plan)(x, self.bn_overrides(width, "backbone"))

    def private_bn_state(self) -> dict[str, Tensor]:
        """Every sub-width's private BN of the backbone, keyed '<width>/<layer>.<tensor>' (widths.safetensors)."""
        return {f"{w:g}/{k}": v.detach().cpu().contiguous() for w in self.plans
                for k, v in self.bn_overrides(w, "backbone").items()}


def _private_bn(m: nn.modules.batchnorm._BatchNorm, k: int) -> nn.BatchNorm1d:
    """A BatchNorm holding the first k channels of m's parameters and statistics (storage only: the width's
    forward pass runs m's own code with these tensors)."""
    bn = nn.BatchNorm1d(k, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
    bn = bn.to(device=m.weight.device if m.weight is not None else None)
    with torch.no_grad():
        if m.affine:
            bn.weight.copy_(m.weight[:k])
            bn.bias.copy_(m.bias[:k])
        if m.track_running_stats:
            bn.running_mean.copy_(m.running_mean[:k])
            bn.running_var.copy_(m.running_var[:k])
    return bn
