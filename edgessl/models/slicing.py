"""Run a network at a width by slicing its weights: sub-networks really cost less, and train the shared weights.

`sliced_tensors` returns views of the first channels of every parameter the plan touches (basic slicing: views,
so gradients flow into the full tensors); `WidthView` runs the model through `torch.func.functional_call` with
them, setting each depthwise conv's `groups` to its kept channels for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.func import functional_call

from edgessl.models.channels import Plan

BN = nn.modules.batchnorm._BatchNorm


def _cut(t: Tensor | None, out: int | None, inp: int | None = None) -> Tensor | None:
    if t is None:
        return None
    if t.dim() == 1 or inp is None:
        return t[:out] if out is not None else t
    return t[: out if out is not None else t.shape[0], :inp]


def sliced_tensors(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """{parameter or buffer name: sliced view} for every layer in `plan`.

    Conv weight (C_out, C_in/groups, kh, kw) -> (k_out, k_in, kh, kw); depthwise (C, 1, kh, kw) -> (k, 1, kh, kw);
    Linear (C_out, C_in) -> (k_out, k_in); bias and BatchNorm weight, bias, running_mean, running_var (C,) -> (k,).
    """
    out: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    for name, p in plan.items():
        m = modules[name]
        o, i = p.get("out"), p.get("in")
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:  # depthwise: input channels follow the output
            o = o if o is not None else i
            i = None
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            out[f"{name}.weight"] = _cut(m.weight, o, i)
            if m.bias is not None and o is not None:
                out[f"{name}.bias"] = m.bias[:o]
        elif isinstance(m, BN) and o is not None:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, attr)
                if t is not None:
                    out[f"{name}.{attr}"] = t[:o]
    return out


@contextmanager
def depthwise_groups(model: nn.Module, plan: Plan) -> Iterator[None]:
    """Temporarily set `groups` of each sliced depthwise conv to its kept channels."""
    modules = dict(model.named_modules())
    changed = []
    for name, p in plan.items():
        m = modules[name]
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            k = p.get("out") or p.get("in")
            changed.append((m, m.groups))
            m.groups = k
    try:
        yield
    finally:
        for m, g in changed:
            m.groups = g


class WidthView:
    """model run at one width: view(x, overrides) == the physically pruned model's output (same plan).

    overrides: {name: tensor} replacing sliced tensors (the width's private BatchNorm parameters and statistics)."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.model = model
        self.plan = plan

    def __call__(self, x: Tensor, overrides: dict[str, Tensor] | None = None) -> Tensor:
        tensors = sliced_tensors(self.model, self.plan)
        if overrides:
            tensors.update(overrides)
        with depthwise_groups(self.model, self.plan):
            return functional_call(self.model, tensors, (x,))
