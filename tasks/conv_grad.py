"""Convolution weight gradients as one matrix product, where oneDNN's own kernel is slow: bf16 training on a CPU with
AMX, convolutions whose output map is small.

Measured on 2 Intel Xeon cores with AMX (torch 2.13, batch 256, bf16, channels_last, 2026-12-06), oneDNN's
backward-weights kernel (``brgconv_bwd_w``) against gathering the patches and one bf16 matmul (``weight_grad``):

| the vision teacher's convolution | output | oneDNN ms | matmul ms |
|---|---|---:|---:|
| 256->256 3x3 (its forward: 2.9 ms) | 4x4 | 13.7 | 4.7 |
| 128->256 3x3, stride 2 | 4x4 | 8.1 | 2.9 |
| 128->256 1x1, stride 2 (the shortcut) | 4x4 | 2.3 | 0.4 |
| 128->128 3x3 | 7x7 | 5.5 | 5.9 |
| 64->64 3x3 | 14x14 | 3.8 | 33.6 |

So only outputs of at most ``MAX_POSITIONS`` positions take this path (measured on this teacher's convolutions at
batch 256 and 2 threads; another family's small convolutions take it too, unmeasured: ``make benchmark-step`` shows
the step either way). The teacher's whole training step, three alternating rounds: 150/138/138 ms before,
129/125/126 ms after (docs/results.md). Without AMX (AVX512-BF16 only, AVX2, CUDA) and in fp32 nothing changes: not
measured there. The input gradient stays oneDNN's; the weight gradient is the same up to bf16 rounding (oneDNN
rounds its fp32 sums to bf16 too, in another order).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tasks.hardware import native_amx

MAX_POSITIONS = 16            # output height x width at most this: the 4x4 maps measured above
WEIGHT_GRAD = "convolution backward, weights by matmul"   # profiler region: flows.step_profile counts it as
#                                                           the convolutions' backward


def weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
    """The gradient of a convolution's weight (groups 1, dilation 1, zero padding) from its input ``x`` (N, C, H, W)
    and its output's gradient ``grad`` (N, O, Ho, Wo): every input patch gathered once, channels innermost, then
    ``grad``ᵀ @ patches. Returns (O, C, kh, kw) in channels_last order, in the dtype of the inputs."""
    n, c = x.shape[:2]
    o, ho, wo = grad.shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
    patches = x.new_empty(n, ho, wo, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            patches[:, :, :, i, j] = padded[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    rows = grad.permute(0, 2, 3, 1).reshape(n * ho * wo, o)
    return (rows.t() @ patches.view(n * ho * wo, kh * kw * c)).view(o, kh, kw, c).permute(0, 3, 1, 2)


class _ConvWeightGradByMatmul(torch.autograd.Function):
    """``F.conv2d`` whose backward takes the input gradient from oneDNN and the weight gradient from ``weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = (stride, padding), bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        grad_x = grad_w = grad_b = None
        with torch.profiler.record_function(WEIGHT_GRAD):
            grad = grad.contiguous(memory_format=torch.channels_last)
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding),
                                                             [1, 1], False, [0, 0], 1, [True, False, False])[0]
            if ctx.needs_input_grad[1]:
                grad_w = weight_grad(x, grad, weight.shape[2:], stride, padding)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((x.shape[-2] + 2 * ph - kh) // sh + 1) * ((x.shape[-1] + 2 * pw - kw) // sw + 1)


class _Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (the same parameters and state dict) taking ``_ConvWeightGradByMatmul`` where it pays: training
    with grad on, bf16 autocast on the CPU, an output of at most ``MAX_POSITIONS`` positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in (torch.float32, torch.bfloat16) and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and _positions(self, x) <= MAX_POSITIONS):
            bf16 = torch.bfloat16
            bias = None if self.bias is None else self.bias.to(bf16)
            with torch.autocast("cpu", enabled=False):
                return _ConvWeightGradByMatmul.apply(x.to(bf16), self.weight.to(bf16), bias, self.stride, self.padding)
        return super().forward(x)


def _plain(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


@contextlib.contextmanager
def matmul_weight_grads(model: nn.Module, bf16: bool, device: torch.device) -> Iterator[int]:
    """Within it, ``model``'s plain convolutions (``nn.Conv2d``, groups 1, dilation 1, zero padding) take their
    weight gradients by ``weight_grad`` where their output is small, when training in bf16 (``bf16``, which
    ``tasks.training.autocast`` turns on only where native) on a CPU with AMX; elsewhere nothing changes. Yields how
    many convolutions may take it; they are plain ``nn.Conv2d`` again on leaving, except one given a class of its
    own inside (a parametrization's, which derives from the switched class and keeps it). Meant around a training
    step: a copy, pickle or trace of ``model`` made inside keeps the switched class."""
    convs = [m for m in model.modules() if _plain(m)] if bf16 and device.type == "cpu" and native_amx() else []
    for conv in convs:
        conv.__class__ = _Conv2d
    try:
        yield len(convs)
    finally:
        for conv in convs:
            if type(conv) is _Conv2d:   # not one given another class inside (a parametrization's)
                conv.__class__ = nn.Conv2d
