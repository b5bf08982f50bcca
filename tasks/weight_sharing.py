"""Weight sharing (Deep Compression): per-layer k-means over weights, trainable centroids, storage accounting.

A shared layer's weight is ``centroids[index]``: a parametrization, so the gather's backward sums the gradients of
every weight in a cluster into its centroid ("gradients pooled per cluster"). Pruned zeros map to a fixed zero
centroid and stay zero. What ships is the student's INT8 ONNX file, which stores one INT8 value per weight whether
or not weights are shared: sharing shrinks it only once compressed (``share_vision`` measures both).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, index) of 1-D k-means with linear initialisation between min and max (none of no values)."""
    if values.numel() == 0 or k == 0:   # a layer pruned to all zeros: only its fixed zero is left
        return values.new_zeros(0), torch.zeros(values.numel(), dtype=torch.long)
    centroids = torch.linspace(float(values.min()), float(values.max()), k)
    for _ in range(iterations):
        index = (values[:, None] - centroids[None, :]).abs().argmin(dim=1)
        sums = torch.bincount(index, weights=values.double(), minlength=k).float()
        counts = torch.bincount(index, minlength=k).float()
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, (values[:, None] - centroids[None, :]).abs().argmin(dim=1)


class GatherPooled(torch.autograd.Function):
    """``codebook[index]`` whose backward sums each cluster's gradients with ``bincount``.

    Autograd's own indexing backward accumulates in a thread-dependent order on CPU, so two runs would differ in
    the last bits; this one is deterministic, and it is the per-cluster pooling of Deep Compression written out.
    """

    @staticmethod
    def forward(ctx, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = codebook.numel()
        return codebook[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        pooled = torch.bincount(index.flatten(), weights=grad.flatten().double(), minlength=ctx.size)
        return pooled.to(grad.dtype), None


class SharedWeight(nn.Module):
    """Parametrization: the layer's weight is its cluster centroids gathered by a fixed index.

    Slot 0 of the codebook is the fixed zero of pruned weights when the layer has any.
    """

    def __init__(self, weight: torch.Tensor, k: int) -> None:
        super().__init__()
        flat = weight.detach().flatten()
        nonzero = flat != 0
        centroids, index = kmeans_1d(flat[nonzero], min(k, int(nonzero.sum())))
        self.has_zero = bool((~nonzero).any())
        full_index = torch.zeros_like(flat, dtype=torch.long)
        full_index[nonzero] = index + int(self.has_zero)
        self.register_buffer("index", full_index.view(weight.shape))
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("zero", torch.zeros(int(self.has_zero)))

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return GatherPooled.apply(torch.cat([self.zero, self.centroids]), self.index)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def shared_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose weights are shared: the weight-quantized layers of a QAT model, else conv and linear."""
    quantized = [m for m in model.modules() if hasattr(m, "weight_fake_quant")]
    return quantized or [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def share_weights(model: nn.Module, k: int) -> int:
    """Replace every shared layer's weight by ``k`` trainable centroids (plus zero); returns the layer count."""
    layers = shared_layers(model)
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", SharedWeight(layer.weight, k), unsafe=True)
    return len(layers)


def bake(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Materialise shared weights as plain parameters; returns each layer's (index, codebook size)."""
    codes = []
    for layer in [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]:
        shared = layer.parametrizations.weight[0]
        codes.append((shared.index.clone(), len(shared.centroids) + int(shared.has_zero)))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return codes
