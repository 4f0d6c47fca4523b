"""Which channels are coupled, from torch-pruning's DependencyGraph, and how many each width keeps.

A *channel group* is a set of (layer, dimension) pairs that must keep the same channels: a conv's output, the
BatchNorm after it, the next conv's input, every branch of a residual add, a depthwise conv's input and output,
the squeeze-excite convs, the head's input. torch-pruning traces the model once and finds them for any timm CNN;
nothing here is per-architecture. Width w keeps the first `width_channels(C, w)` channels of every group.

A `Plan` maps each layer name to how many output / input channels it keeps (None = all). Slicing
(`models.slicing`) and physical pruning (`models.prune`) both follow the same plan, so their outputs agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edgessl.config import check_width, parse_widths  # noqa: F401 (the option parser lives with the options)
from edgessl.errors import UserError

# layers whose parameters the plan slices; any other layer with parameters inside a group is refused
SLICEABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def torch_pruning():
    """The torch_pruning module, or a UserError saying how to install it (it is the `slim` extra)."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise UserError(
            "--widths, `edgessl slim` and `edgessl prune` need torch-pruning: pip install 'edgessl[slim]'."
        ) from None
    return tp


def width_channels(channels: int, width: float) -> int:
    """Channels kept at `width` of a group of `channels`: round(w·C), rounded to a multiple of 8 when the group
    is a multiple of 8 and keeps at least 8; never fewer than 1, never more than C.

    >>> [width_channels(576, w) for w in (1.0, 0.75, 0.5, 0.25)]
    [576, 432, 288, 144]
    >>> width_channels(16, 0.25), width_channels(20, 0.5), width_channels(8, 0.25)
    (4, 10, 2)
    """
    check_width(width)
    k = round(width * channels)
    if channels % 8 == 0 and k >= 8:
        k = 8 * round(k / 8)
    return max(1, min(channels, k))


@dataclass
class Member:
    layer: str  # module name inside the traced model
    dim: str  # "out" or "in"
    index: list[int]  # this layer's channel for each of the group's channels, in the group's order


@dataclass
class ChannelGroup:
    root: str  # name of the layer torch-pruning roots the group at
    channels: int
    members: list[Member] = field(default_factory=list)


def channel_groups(model: nn.Module, example: torch.Tensor, keep_outputs: list[nn.Module] = ()) -> list[ChannelGroup]:
    """Trace `model` on `example` with torch-pruning and return its coupled channel groups.

    keep_outputs: layers whose output channels stay fixed (the projection head's last layer); their inputs still
    follow the group that feeds them. The image's 3 input channels belong to no group and so never change.
    Raises UserError when torch-pruning cannot trace the model or a group holds a layer that cannot be sliced.
    """
    tp = torch_pruning()

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # torch-pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        raw = list(graph.get_all_groups(ignored_layers=list(keep_outputs)))
    except Exception as exc:  # torch-pruning raises many kinds of errors on untraceable models
        raise UserError(
            f"torch-pruning cannot trace {type(model).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "--widths, slim and prune need a model its DependencyGraph understands (timm CNNs such as ResNet, "
            "MobileNetV2/V3, EfficientNet)."
        ) from exc
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for g in raw:
        root_dep = g.items[0].dep
        group = ChannelGroup(names[root_dep.target.module], len(g.items[0].idxs))
        seen = set()
        for item in g.items:
            module = item.dep.target.module
            if module not in names:  # functional nodes (add, activation, flatten) carry no parameters
                continue
            dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if (names[module], dim) in seen:
                continue
            seen.add((names[module], dim))
            has_params = any(True for _ in module.parameters(recurse=False))
            if has_params and not isinstance(module, SLICEABLE):
                raise UserError(f"layer '{names[module]}' ({type(module).__name__}) has channels in a prunable group "
                                "but cannot be sliced by width or pruned (supported: Conv, Linear, BatchNorm).")
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups not in (1, module.in_channels):
                raise UserError(f"layer '{names[module]}' is a grouped convolution ({module.groups} groups): "
                                "only plain and depthwise convolutions can be sliced by width or pruned.")
            group.members.append(Member(names[module], dim, [int(i) for i in item.idxs]))
        groups.append(group)
    return groups


Plan = dict  # layer name -> {"out": int | None, "in": int | None}


def width_plan(groups: list[ChannelGroup], width: float) -> Plan:
    """Channels each layer keeps at `width`: the first width_channels(C, w) channels of every group it is in.

    Returns {layer: {"out": n_out or None, "in": n_in or None}} (None = unchanged). The kept channels of a layer must
    be a prefix of its channels (true for the CNNs above: torch-pruning's index maps are the identity there)."""
    return counts_plan(groups, {g.root: width_channels(g.channels, width) for g in groups})


def counts_plan(groups: list[ChannelGroup], counts: dict[str, int]) -> Plan:
    """Like width_plan, from explicit kept counts per group root (what `edgessl prune` stores)."""
    plan: Plan = {}
    for g in groups:
        k = counts.get(g.root, g.channels)
        if k == g.channels:
            continue
        for m in g.members:
            kept = sorted(m.index[:k])
            if kept != list(range(len(kept))):
                raise UserError(f"layer '{m.layer}' would keep channels that are not its first {k}: "
                                "width slicing needs groups whose channels map one to one (no concatenations).")
            plan.setdefault(m.layer, {"out": None, "in": None})[m.dim] = len(kept)
    return plan


def group_counts(groups: list[ChannelGroup], width: float) -> dict[str, int]:
    """{group root: kept channels} at `width` (what encoder.json stores to rebuild a pruned model)."""
    return {g.root: width_channels(g.channels, width) for g in groups}


def strip_prefix(plan: Plan, prefix: str) -> Plan:
    """The part of `plan` under module `prefix` ('backbone'), with names relative to it."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in plan.items() if k.startswith(p)}
