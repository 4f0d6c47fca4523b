"""Physically smaller models: torch-pruning removes channels group by group.

`prune_to_counts` keeps the first k channels of each group (a width's sub-network, or the shape of a stored pruned
model before its weights are loaded); `prune_by_importance` keeps the most important channels (magnitude or
Taylor) for `edgessl prune`. Both return the kept counts per group root, which encoder.json stores so that
`load_encoder` can rebuild the architecture from timm + these counts alone.
"""

from __future__ import annotations

import torch
from torch import nn

from edgessl.errors import UserError
from edgessl.models.channels import channel_groups, torch_pruning, width_channels


def prune_to_counts(model: nn.Module, example: torch.Tensor, counts: dict[str, int],
                    keep_outputs: list[nn.Module] = ()) -> nn.Module:
    """Remove channels k.. of every group whose root is in `counts` ({root layer name: k}), in place.
    Returns the model. Raises UserError when a stored count names a layer this architecture lacks."""
    tp = torch_pruning()

    groups = {g.root: g for g in channel_groups(model, example, keep_outputs)}
    unknown = sorted(set(counts) - set(groups))
    if unknown:
        raise UserError(
            f"pruned channel counts name layers this architecture has no group for: {', '.join(unknown[:3])}."
        )
    was_training = model.training
    model.eval()
    with torch.enable_grad():  # torch-pruning traces through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    modules = dict(model.named_modules())
    for root, k in counts.items():
        c = groups[root].channels
        if not 0 < k <= c:
            raise UserError(f"cannot keep {k} of the {c} channels of '{root}'.")
        if k == c:
            continue
        layer = modules[root]
        prune_out = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_out, list(range(k, c)))
        group.prune()
    model.train(was_training)
    return model


def prune_by_importance(model: nn.Module, example: torch.Tensor, ratio: float, criterion: str = "magnitude",
                        keep_outputs: list[nn.Module] = (), taylor_batch=None) -> dict[str, int]:
    """Remove `ratio` of the channels of every group (it keeps width_channels(C, 1 - ratio), as a width does),
    keeping the most important ones: 'magnitude' (L2 norm of the group's weights) or 'taylor' (|w·∂L/∂w|;
    `taylor_batch()` must run a forward + backward of the training loss first). Returns {group root: kept channels},
    in place."""
    tp = torch_pruning()

    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be in (0, 1) (the fraction of channels removed), not {ratio:g}.")
    if criterion == "magnitude":
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    elif criterion == "taylor":
        importance = tp.importance.GroupTaylorImportance()
    else:
        raise UserError(f"--criterion must be magnitude or taylor, not '{criterion}'.")
    groups_before = {g.root: g.channels for g in channel_groups(model, example, keep_outputs)}
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=list(keep_outputs), round_to=8)
    # each group keeps what a width of 1 - ratio keeps (width_channels), not torch-pruning's floor to a multiple of 8,
    # which had halved a 16-channel group at --ratio 0.1 and taken 8 channels off every group at any ratio
    pruner._round_to = lambda _n, current, _to: current - width_channels(current, 1 - ratio)
    if criterion == "taylor":
        if taylor_batch is None:
            raise ValueError("the taylor criterion needs taylor_batch")
        model.zero_grad()
        taylor_batch()
    pruner.step()
    model.zero_grad(set_to_none=True)
    after = {g.root: g.channels for g in channel_groups(model, example, keep_outputs)}
    return {root: after.get(root, c) for root, c in groups_before.items() if after.get(root, c) != c}


def count_params_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(parameters, multiply-accumulates of one forward pass of `example`), torch-pruning's counter."""
    tp = torch_pruning()

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(params), int(macs)
