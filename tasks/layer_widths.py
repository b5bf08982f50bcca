"""The layer widths of a structurally pruned model, and giving them to a model built from its unpruned architecture.

Kept apart from ``tasks.channel_pruning`` (which needs torch-pruning and the pruning masks): ``tasks.artifacts``
imports this module to rebuild any pruned model file, so every stage that loads models depends on it alone.
"""
from __future__ import annotations

from torch import nn

#: the layers a width is recorded and restored for; a channel group holding any other layer with weights is refused
#: by ``tasks.channel_pruning`` (its pruned file could not be rebuilt)
KINDS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


def channel_widths(model: nn.Module) -> dict[str, list[int]]:
    """What ``conform`` needs to rebuild ``model``'s layers: ``[out, in]`` of each convolution and linear layer,
    ``[features]`` of each batch norm."""
    widths: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = [m.out_channels, m.in_channels]
        elif isinstance(m, nn.Linear):
            widths[name] = [m.out_features, m.in_features]
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            widths[name] = [m.num_features]
    return widths


def conform(model: nn.Module, widths: dict[str, list[int]]) -> nn.Module:
    """Give ``model`` (built from its unpruned architecture) the layer widths of a pruned one, in place; weights
    are left uninitialised, to be loaded. A layer named but missing, or of another kind, is a ValueError."""
    layers = dict(model.named_modules())
    for name, width in widths.items():
        layer = layers.get(name)
        if isinstance(layer, nn.Conv2d) and len(width) == 2:
            out, inp = width
            depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
            layer.out_channels, layer.in_channels, layer.groups = out, inp, (inp if depthwise else layer.groups)
            layer.weight = nn.Parameter(layer.weight.new_empty(out, inp // layer.groups, *layer.kernel_size))
            _resize_bias(layer, out)
        elif isinstance(layer, nn.Linear) and len(width) == 2:
            layer.out_features, layer.in_features = width
            layer.weight = nn.Parameter(layer.weight.new_empty(*width))
            _resize_bias(layer, width[0])
        elif isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d) and len(width) == 1:
            (layer.num_features,) = width
            for key in ("weight", "bias"):
                if getattr(layer, key) is not None:
                    setattr(layer, key, nn.Parameter(getattr(layer, key).new_empty(width[0])))
            for key in ("running_mean", "running_var"):
                if getattr(layer, key) is not None:
                    setattr(layer, key, getattr(layer, key).new_empty(width[0]))
        else:
            raise ValueError(f"{name}: no layer of that name and kind to give widths {width}")
    return model


def _resize_bias(layer: nn.Conv2d | nn.Linear, out: int) -> None:
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.new_empty(out))
