"""Quantization-aware training helpers (PyTorch FX): 8-, 7- or 4-bit per-channel weights, INT8 activations, BN
folded.

FX is the path that exports: a converted FX model becomes QDQ ONNX that onnxruntime runs, whereas the fused
fake-quant op of eager QAT does not export. ``prepare_qat_fx`` fuses conv + batch norm (+ ReLU) into QAT
modules, which folds batch norm into the convolution weights it fake-quantizes.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
)

from tasks.observers import freeze_observers


class PerChannelWeightObserver(MovingAveragePerChannelMinMaxObserver):
    """torch's per-channel min/max observer, but a channel whose weights are all zero (pruned away, or a dead unit)
    gets the layer's largest scale instead of float eps: its weights are zero at any scale, while the exporter
    stores the channel's bias as INT32 at (input scale x weight scale), which at eps overflowed and wrapped (a bias
    of 50 shipped as about -10)."""

    @torch.jit.export
    def calculate_qparams(self):
        scale, zero_point = super().calculate_qparams()
        empty = (self.min_val == 0) & (self.max_val == 0)
        if empty.any() and scale.dim() == 1 and empty.shape == scale.shape:
            largest = scale[~empty].max() if (~empty).any() else torch.ones((), dtype=scale.dtype)
            scale = torch.where(empty, largest.to(scale.device), scale)
        return scale, zero_point


def qat_qconfig(activation_bits: int, float_modules: Sequence[str] = (), weight_bits: int = 8) -> QConfigMapping:
    """Per-channel symmetric weights on the narrow range (``weight_bits`` 8: [-127, 127]; 7: [-63, 63]; 4: [-7, 7]); unsigned
    ``activation_bits`` activations (8: full range, no reduce_range; the pipeline refuses fewer, see QatImages).
    ``float_modules`` (student module names such as ``stem``) stay in float: a convolution over one input channel
    gains nothing from INT8 kernels."""
    activation = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** activation_bits - 1,
        dtype=torch.quint8, reduce_range=False)
    # Weights through the plain FakeQuantize, not the fused op: for symmetric per-channel ranges torch 2.13's fused
    # op computes other scales than its observer (range / 2^(b-1), not / ((2^b - 1) / 2)) and an affine zero point
    # for a channel whose weights all share a sign, while convert_fx quantizes with the observer's: ~14 % of a
    # layer's INT8 weights then sat one step from the trained ones and one-signed channels were re-centred
    # (measured on small students: 3-87 % of test images changed class between the trained and the INT8 model).
    weight = FakeQuantize.with_args(
        observer=PerChannelWeightObserver, quant_min=-(2 ** (weight_bits - 1) - 1),
        quant_max=2 ** (weight_bits - 1) - 1, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric)
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight))
    for name in float_modules:
        mapping.set_module_name(f"model.{name}", None)  # the student sits under FeatureOutputs.model
    return mapping


class FeatureOutputs(nn.Module):
    """Traceable view of a model whose forward returns ``(logits, feature maps)``, so KD hints survive QAT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_features(x)


class QatModel(nn.Module):
    """A fake-quantized FX graph presented with the ``forward`` / ``forward_features`` interface of our models;
    ``weight_bits``: the bits its weights were quantized to (4 or fewer export as INT4); ``input_shape``: (C, H, W)
    of the example it was traced with, as the models carry it."""

    def __init__(self, graph: nn.Module, weight_bits: int = 8, input_shape: Sequence[int] = ()) -> None:
        super().__init__()
        self.graph = graph
        self.weight_bits = weight_bits
        self.input_shape = tuple(input_shape)

    def forward_features(self, x: torch.Tensor):
        logits, maps = self.graph(x)
        return logits, list(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)[0]


@contextmanager
def fx_quantization() -> Iterator[None]:
    """Around FX graph-mode quantization (``prepare_qat_fx``, ``convert_fx``): its maintenance-mode warnings silenced,
    and no Python stack trace captured per node ``prepare_qat_fx`` traces (``torch.fx.config.do_not_emit_stack_traces``,
    read by its tracer; ``convert_fx`` traces nothing). Symbolizing those traces imports torch._dynamo and
    torch._inductor, ~2.5 s of a stage process's start on two cores, for debugging metadata nothing here reads."""
    import torch.fx.config as fx_config

    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        fx_config.do_not_emit_stack_traces = before


def prepare_qat(model: nn.Module, activation_bits: int, example: torch.Tensor,
                float_modules: Sequence[str] = (), weight_bits: int = 8) -> QatModel:
    """Insert fake quantization (and fuse conv + BN) into a copy of ``model``, in train mode."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with fx_quantization():
        graph = prepare_qat_fx(FeatureOutputs(copy.deepcopy(model)).train(),
                               qat_qconfig(activation_bits, float_modules, weight_bits), (example,))
    return QatModel(graph, weight_bits, example.shape[1:])


def freeze_schedule(model: nn.Module, freeze_observers_after: int, freeze_bn_after: int):
    """``before_epoch`` hook: from the given epochs on, fix quantization ranges and batch-norm statistics."""

    def before_epoch(epoch: int) -> None:
        if epoch >= freeze_observers_after:
            freeze_observers(model)
        if epoch >= freeze_bn_after:
            model.apply(freeze_bn_stats)

    return before_epoch


def convert_int8(model: QatModel) -> nn.Module:
    """The INT8 model (quantized kernels), returning logits only, computing with the weights that were trained."""
    from torch.ao.quantization.quantize_fx import convert_fx

    graph = copy.deepcopy(model.graph).eval()
    bake_weight_quantization(graph)
    with fx_quantization():
        graph = convert_fx(graph)
    return QatModel(graph, model.weight_bits, model.input_shape).eval()


@torch.no_grad()
def bake_weight_quantization(graph: nn.Module) -> None:
    """Replace every fake-quantized layer's weight by what its forward computes with: the weight (batch norm folded
    in, as the QAT forward folds it) through its weight fake quantizer, unfolded again. ``convert_fx`` quantizes the
    folded weight once more on its own, and where a folded weight had outgrown its observed range (batch-norm
    statistics move after the observer saw it) the INT8 model kept values the trained model clamped (measured on a
    small student: weights 64 and 65 where training used 63, 15 % of a depthwise layer's outputs off by up to four
    steps). Baked, the weights sit on their grid and the conversion is exact."""
    for layer in graph.modules():
        quantizer = getattr(layer, "weight_fake_quant", None)
        if quantizer is None:
            continue
        factor = torch.ones(())
        if hasattr(layer, "bn"):  # a fused conv + batch norm: the forward quantizes w·γ/σ
            factor = (layer.bn.weight / torch.sqrt(layer.bn.running_var + layer.bn.eps)).reshape(
                -1, *[1] * (layer.weight.dim() - 1))
        layer.weight.copy_(quantizer(layer.weight * factor) / factor)
