"""Magnitude pruning of any model: masks, unstructured pruning (global or per layer), and baking masks into weights.
Masks are buffers registered up front, so checkpoints keep stable keys and a resumed run continues with the same
masks; the gradual schedule is Zhu & Gupta's cubic ramp (``GradualPruning.sparsity_after`` in
tasks/family_config.py, shared with the recommender). Channel pruning, on the same masks: ``tasks.channel_pruning``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def prunable(model: nn.Module) -> list[nn.Module]:
    """Convolutions and linear layers whose weights are pruned (depthwise kernels included)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _apply_mask(module: nn.Module, _inputs) -> None:
    module.weight.data.mul_(module.weight_mask)


def attach_masks(model: nn.Module) -> None:
    """Give every prunable layer an all-ones ``weight_mask`` buffer, applied before each forward."""
    for m in prunable(model):
        if not hasattr(m, "weight_mask"):
            m.register_buffer("weight_mask", torch.ones_like(m.weight))
            m.register_forward_pre_hook(_apply_mask)


def keep_pruned_zeros(model: nn.Module, min_sparsity: float) -> int:
    """Keep the exact zeros of already-pruned layers at zero during further training (e.g. QAT).

    A layer counts as pruned when at least ``min_sparsity`` of its weights are zero. The masks are derived from the
    weights as they are now, registered as non-persistent buffers (the saved state dict is unchanged) and applied
    before every forward; returns how many layers got one.
    """
    count = 0
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() > 1 and (weight == 0).float().mean() >= min_sparsity:
            m.register_buffer("weight_mask", (weight.detach() != 0).float(), persistent=False)
            m.register_forward_pre_hook(_apply_mask)
            count += 1
    return count


def enforce_masks(model: nn.Module) -> None:
    """Zero masked weights now (an optimizer step may have moved them since the last forward)."""
    for m in model.modules():
        if hasattr(m, "weight_mask"):
            _apply_mask(m, ())


def prune_unstructured(model: nn.Module, sparsity: float, scope: str) -> None:
    """Zero the smallest-magnitude weights: a fraction ``sparsity`` overall (``global``) or of each layer."""
    layers = prunable(model)
    if scope == "global":
        magnitudes = torch.cat([(m.weight.detach() * m.weight_mask).abs().flatten() for m in layers])
        k = int(sparsity * magnitudes.numel())
        threshold = magnitudes.kthvalue(k).values if k else magnitudes.new_tensor(-1.0)
        for m in layers:
            m.weight_mask.copy_(((m.weight.detach() * m.weight_mask).abs() > threshold).float())
        return
    for m in layers:
        w = (m.weight.detach() * m.weight_mask).abs().flatten()
        k = int(sparsity * w.numel())
        if k:
            m.weight_mask.copy_(((m.weight.detach() * m.weight_mask).abs() > w.kthvalue(k).values).float())


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights per prunable layer, and overall."""
    report, zeros, total = {}, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            w = m.weight.detach() * getattr(m, "weight_mask", 1)
            report[name] = float((w == 0).float().mean())
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    report["overall"] = zeros / total
    return report


def bake(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` (no masks, no hooks) whose weights are the masked weights."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if "weight_mask" in m._buffers:
            m.weight.data.mul_(m._buffers.pop("weight_mask"))
            m._non_persistent_buffers_set.discard("weight_mask")
            for key, hook in list(m._forward_pre_hooks.items()):
                if hook is _apply_mask:
                    del m._forward_pre_hooks[key]
    return plain.eval()
