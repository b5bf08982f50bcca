"""Magnitude pruning: unstructured (global or per layer) and structured channel pruning that rebuilds a
physically smaller student. Masks are buffers registered up front, so checkpoints keep stable keys and a resumed
run continues with the same masks; the gradual schedule is Zhu & Gupta's cubic ramp
(``GradualPruning.sparsity_after`` in tasks/config.py, shared with the recommender).
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.images.arch_config import MobileArch
from tasks.images.models import MobileBlock, MobileStudent, SeparableBlock


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


def channel_groups(student: MobileStudent) -> list[list[int]]:
    """Blocks that share one channel space: a residual block's output space is its input's, so they prune together.
    Blocks residual on the stem share the stem's channels, which are not pruned: they are in no group."""
    groups: list[list[int]] = []
    on_stem = True   # still in the stem's channel space
    for i, block in enumerate(student.blocks):
        on_stem = on_stem and block.residual
        if on_stem:
            continue
        if block.residual and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def channel_importance(student: MobileStudent, group: list[int]) -> torch.Tensor:
    """L1 norm of each output channel's filter (pointwise, or the fused 3x3) times its BN scale, summed over the
    group."""
    score = 0
    for i in group:
        pw_conv, pw_bn = student.blocks[i].producer
        score = score + pw_conv.weight.detach().abs().sum(dim=(1, 2, 3)) * pw_bn.weight.detach().abs()
    return score


def prune_channels(student: MobileStudent, fraction: float, min_channels: int) -> None:
    """Mask whole output channels of each group (the least important ``fraction``, keeping at least
    ``min_channels``); weights stay in place.

    A dropped channel is cut where it is made (the producing conv's rows, BN scale and shift) and where it is read
    (the input columns of the pointwise or fused conv of every block fed by the group, or the head), so the masked
    model computes exactly what ``shrink`` builds. The stem is not pruned.
    """
    for group in channel_groups(student):
        score = channel_importance(student, group)
        keep = max(min_channels, int(round(len(score) * (1 - fraction))))
        dropped = torch.ones_like(score, dtype=torch.bool)
        dropped[score.topk(keep).indices] = False
        for i in group:
            conv, bn = student.blocks[i].producer
            conv.weight_mask[dropped] = 0
            bn.weight.data[dropped] = 0
            bn.bias.data[dropped] = 0
        readers = [student.blocks[i].reader for i in group[1:]]
        readers.append(student.blocks[group[-1] + 1].reader if group[-1] + 1 < len(student.blocks) else student.head)
        for layer in readers:
            layer.weight_mask[:, dropped] = 0


def live_channels(student: MobileStudent) -> list[torch.Tensor]:
    """Per block, the indices of output channels that still carry a weight."""
    return [block.producer[0].weight_mask.flatten(1).any(dim=1).nonzero().flatten() for block in student.blocks]


def shrink(student: MobileStudent, arch: MobileArch) -> tuple[MobileStudent, MobileArch]:
    """Rebuild ``student`` without its masked channels: a physically smaller model with the same function."""
    keep = live_channels(student)
    widths = [len(k) for k in keep]
    new_arch = arch.model_copy(update={"widths": widths, "width_multiplier": 1.0, "stem": student.stem[0].out_channels,
                                       "residual": [block.residual for block in student.blocks]})
    small = MobileStudent(new_arch, student.num_classes, student.input_shape)
    small.stem.load_state_dict(student.stem.state_dict(), strict=False)
    previous = torch.arange(student.stem[0].out_channels)
    for old, new, out_idx in zip(student.blocks, small.blocks, keep, strict=True):
        _copy_block(old, new, previous, out_idx)
        previous = out_idx
    small.head.weight.data = student.head.weight.data[:, previous].clone()
    small.head.bias.data = student.head.bias.data.clone()
    return small.eval(), new_arch


def _copy_block(old: MobileBlock, new: MobileBlock, in_idx: torch.Tensor, out_idx: torch.Tensor) -> None:
    if isinstance(old, SeparableBlock):
        dw_old, dw_bn_old = old.depthwise[0], old.depthwise[1]
        dw_new, dw_bn_new = new.depthwise[0], new.depthwise[1]
        dw_new.weight.data = (dw_old.weight.data * dw_old.weight_mask)[in_idx].clone()
        _copy_bn(dw_bn_old, dw_bn_new, in_idx)
    (conv_old, bn_old), (conv_new, bn_new) = old.producer, new.producer
    conv_new.weight.data = (conv_old.weight.data * conv_old.weight_mask)[out_idx][:, in_idx].clone()
    _copy_bn(bn_old, bn_new, out_idx)


def _copy_bn(old: nn.BatchNorm2d, new: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data = getattr(old, name).data[idx].clone()


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


def bake(student: MobileStudent, arch: MobileArch) -> MobileStudent:
    """A plain student (no masks, no hooks) whose weights are the masked weights."""
    state = {}
    for key, value in student.state_dict().items():
        if key.endswith("weight_mask"):
            continue
        mask_key = key.removesuffix("weight") + "weight_mask"
        state[key] = value * student.state_dict()[mask_key] if key.endswith("weight") and mask_key in student.state_dict() else value
    plain = MobileStudent(arch, student.num_classes, student.input_shape)
    plain.load_state_dict(state)
    return plain.eval()
