"""Quantization observers held still: frozen for good once a QAT run has fixed its ranges, and off for the length of
any evaluation pass. Kept apart from ``tasks.quantization`` (which builds and converts QAT models) because every
training loop evaluates through ``frozen_observers``: a stage that never quantizes depends on this module only.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, disable_observer


def fake_quantizers(model: nn.Module) -> list[FakeQuantizeBase]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def freeze_observers(model: nn.Module) -> None:
    """Fix every quantization range for good: the fake quantizers update their observers whenever
    ``observer_enabled`` is set, in eval mode too, so any later pass over data (validation, test, export, parity)
    would otherwise move the ranges that ship."""
    model.apply(disable_observer)


@contextmanager
def frozen_observers(model: nn.Module) -> Iterator[None]:
    """Observers off for the duration of an evaluation pass, restored after it (a QAT run that is still calibrating
    goes on calibrating on training data only); afterwards every range is checked to be unchanged."""
    quantizers = fake_quantizers(model)
    enabled = [q.observer_enabled.clone() for q in quantizers]
    ranges = [(q.scale.clone(), q.zero_point.clone()) for q in quantizers]
    model.apply(disable_observer)
    try:
        yield
    finally:
        for q, flag in zip(quantizers, enabled, strict=True):
            q.observer_enabled.copy_(flag)
    moved = [i for i, (q, (scale, zero)) in enumerate(zip(quantizers, ranges, strict=True))
             if not (torch.equal(q.scale, scale) and torch.equal(q.zero_point, zero))]
    if moved:
        raise RuntimeError(f"an evaluation pass moved the quantization ranges of fake quantizers {moved}")


@contextmanager
def float_pass(model: nn.Module) -> Iterator[None]:
    """Fake quantization and its observers off for a pass that only reads shapes (the model as the float one it
    wraps; a quantizer that has observed nothing yet has no range to apply), each quantizer's flags restored after."""
    quantizers = fake_quantizers(model)
    flags = [(q.observer_enabled.clone(), q.fake_quant_enabled.clone()) for q in quantizers]
    for q in quantizers:
        q.disable_observer()
        q.disable_fake_quant()
    try:
        yield
    finally:
        for q, (observing, quantizing) in zip(quantizers, flags, strict=True):
            q.observer_enabled.copy_(observing)
            q.fake_quant_enabled.copy_(quantizing)
