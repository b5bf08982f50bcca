"""Structured (channel) pruning of any CNN: whole channels removed where they are made and everywhere they are read.

Which channels must go together is what torch-pruning's dependency graph (DepGraph, Fang et al. 2023) finds by
tracing the model: a convolution's output channels, its batch norm, a depthwise convolution after it, the input
columns of every layer that reads them, and every layer tied to them by a residual sum form one group. Nothing here
knows a model class: the pruning works on any network the graph traces (the image kit's MobileNet-style student and
ResNet teacher, or a family's own CNN).

Training is masked, as for unstructured pruning (``tasks.pruning``): ``prune_channels`` zeroes a group's least
important channels (their producers' rows and batch norms, and the input columns of their readers, so what a
dropped channel holds never reaches the output) and the masks are buffers, so a checkpoint resumes with them.
``shrink`` then cuts the dropped channels out for real (torch-pruning's own pruning functions): a physically
narrower model computing what the masked one did. Its layer widths (``channel_widths``) go into the model file,
and ``conform`` gives a model built from the unpruned architecture those widths before its weights are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.errors import PipelineError
from tasks.layer_widths import KINDS
from tasks.pruning import bake


class StructuredPruningError(PipelineError, ValueError):
    """A model structured pruning cannot cut whole (a layer it cannot rebuild, a group left without channels, a cut
    that changes what the model computes): the stage stops with this one line, no model written."""


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The layers whose output is the model's output (its classifier): never pruned, or the model's output would
    change its meaning. Found by running ``example``; a model whose output comes after its last layer (a reshape,
    a pooling) falls back to the last linear layer, and ``shrink`` refuses a result whose output changed."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []   # the outputs themselves, kept alive: compared by identity
    hooks = [m.register_forward_hook(lambda m, _i, out: seen.append((m, out)))
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = out if isinstance(out, tuple | list) else (out,)
    found = [layer for layer, made in seen if any(made is o for o in outputs)]
    return found or [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


@dataclass(frozen=True)
class ChannelGroups:
    """The dependency graph of a model and its coupled channel groups (torch-pruning ``Group``s over all their
    channels), each rooted at a convolution's or linear layer's output channels."""

    graph: Any
    groups: list[Any]


def channel_groups(model: nn.Module, example: torch.Tensor) -> ChannelGroups:
    """The channel groups of ``model``, traced on ``example``; its output layers are left out."""
    import torch_pruning as tp

    with torch.enable_grad():   # the graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = [group for group in graph.get_all_groups(ignored_layers=output_layers(model, example),
                                                      root_module_types=[nn.Conv2d, nn.Linear])
              if _root(group)[0] is not None]
    names = {m: name for name, m in model.named_modules()}
    for group in groups:   # a layer whose width a model file cannot restore (tasks.layer_widths), or a GroupNorm
        for item in group:  # whose statistics would mix kept and dropped channels: refused, not silently changed
            layer = item.dep.target.module
            if isinstance(layer, nn.Module) and not isinstance(layer, KINDS) and any(
                    True for _ in layer.parameters(recurse=False)):
                raise StructuredPruningError(
                    f"{names.get(layer, layer)}: a {type(layer).__name__} shares channels with "
                    f"{names[_root(group)[0]]}; structured pruning rebuilds only Conv2d, Linear and BatchNorm layers "
                    "(use unstructured pruning for this model)")
    return ChannelGroups(graph, groups)


def _root(group: Any) -> tuple[nn.Module | None, Any]:
    """The layer whose output channels a group prunes, and the handler that prunes them."""
    import torch_pruning as tp

    dep = group[0].dep
    out_handlers = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)
    return (dep.target.module, dep.handler) if dep.handler in out_handlers else (None, None)


def _is_out(handler: Any) -> bool:
    import torch_pruning as tp

    return handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels,
                       tp.prune_depthwise_conv_out_channels)


def dropped_channels(root: nn.Module) -> torch.Tensor:
    """The output channels of ``root`` its mask has dropped (every weight of the channel masked)."""
    mask = getattr(root, "weight_mask", None)
    if mask is None:
        return torch.zeros(0, dtype=torch.long)
    return (~mask.flatten(1).bool().any(dim=1)).nonzero().flatten()


def importance(group: Any) -> torch.Tensor:
    """Per channel of a group: the L1 norm of its weights in every coupled layer (torch-pruning's group magnitude
    importance, batch-norm scales included), averaged over the group."""
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean")(group).detach()


def prune_channels(channels: ChannelGroups, fraction: float, min_channels: int) -> None:
    """Mask the least important ``fraction`` of each group's channels (keeping at least ``min_channels``, and every
    channel a group already dropped stays dropped); weights stay in place, masks from ``tasks.pruning.attach_masks``.
    """
    for group in channels.groups:
        score = importance(group)
        score[dropped_channels(_root(group)[0])] = -float("inf")
        keep = min(len(score), max(min_channels, round(len(score) * (1 - fraction))))
        dropped = torch.ones_like(score, dtype=torch.bool)
        dropped[score.topk(keep).indices] = False
        _mask(channels.graph, group, dropped.nonzero().flatten().tolist())


def _mask(graph: Any, group: Any, root_idxs: list[int]) -> None:
    """Zero ``root_idxs`` of a group's root and the matching channels of every layer coupled to it."""
    if not root_idxs:
        return
    root, handler = _root(group)
    pruning = graph.get_pruning_group(root, handler, idxs=root_idxs)
    for item in pruning:
        layer, idxs = item.dep.target.module, torch.as_tensor(item.idxs, dtype=torch.long)
        if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d) and layer.affine:
            layer.weight.data[idxs] = 0
            layer.bias.data[idxs] = 0
        elif isinstance(layer, nn.Conv2d | nn.Linear) and hasattr(layer, "weight_mask"):
            if _is_out(item.dep.handler):    # the channels it makes (a depthwise conv's are also those it reads)
                layer.weight_mask[idxs] = 0
            else:                            # the channels it reads
                layer.weight_mask[:, idxs] = 0


def shrink(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A plain copy of masked ``model`` (put in eval mode) without its dropped channels: physically narrower, same
    function, checked on ``example``: a result that computes anything else is a StructuredPruningError."""
    model.eval()
    dropped = {name: dropped_channels(m) for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    small = bake(model)
    names = {m: name for name, m in small.named_modules()}
    found = channel_groups(small, example)
    planned = []   # (root, handler, channels): every group found before any is cut (cutting changes the graph)
    for group in found.groups:
        root, handler = _root(group)
        channels = dropped.get(names[root], torch.zeros(0, dtype=torch.long)).tolist()
        if len(channels) >= root.weight.shape[0]:   # the root's output channels: the group's
            raise StructuredPruningError(f"{names[root]}: every output channel of its group was dropped")
        planned.append((root, handler, channels))
    for root, handler, channels in planned:
        if channels:
            found.graph.get_pruning_group(root, handler, idxs=channels).prune()
    with torch.no_grad():
        want, got = model(example), small.eval()(example)
    same = want.shape == got.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-4 * (1 + float(want.abs().max())))
    if not same:
        raise StructuredPruningError(f"cutting the dropped channels changed what the model computes (output "
                                     f"{tuple(want.shape)} -> {tuple(got.shape)}): its classifier may not be the "
                                     "layer that makes its output")
    return small
