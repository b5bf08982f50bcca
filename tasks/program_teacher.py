"""A pretrained teacher saved as a PyTorch program — TorchScript (``torch.jit.save`` of a traced or scripted model) or
a ``torch.export`` program (``torch.export.save``, a ``.pt2`` file) — imported as the ``OnnxTeacher`` of its ONNX
export (``tasks.imported_teacher``): exported once, at import, after checking that its answers do not depend on the
batch, and checked to give the program's own answers there.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from tasks.imported_teacher import TeacherImportError, export_teacher_graph, import_onnx
from tasks.onnx_teacher import OnnxTeacher


def _line(err: BaseException, last: bool = False) -> str:
    """One line of ``err``'s message (TorchScript's run errors end with the one that says what went wrong)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[-1] if last else lines[0]


def import_torchscript(blob: bytes, sha256: str, file: str, features: list[str], examples: tuple[torch.Tensor, ...],
                       logits_shape: list[int], feature_rank: int) -> OnnxTeacher:
    """The ``OnnxTeacher`` of a TorchScript teacher (``torch.jit.save`` of a scripted or traced module), through its
    ONNX export: ``forward(*inputs)`` returns the logits, or a tuple of the logits and then the feature maps
    ``features`` names, in order (later items unused). See ``import_program``."""
    try:
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()
    except Exception as err:  # TorchScript raises RuntimeError, zip errors, ...
        raise TeacherImportError(f"{file}: not a TorchScript module saved by torch.jit.save ({_line(err)})") from err
    return import_program(module, "TorchScript's", sha256, file, features, examples, logits_shape, feature_rank)


class _Program(nn.Module):
    """A ``torch.export`` program's module, frozen, behind a module the ONNX exporter can switch to eval mode: the
    program's own module refuses ``train()`` and ``eval()``, so it is held out of the module tree."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "program", program)
        # the program's tensors as this module's own, so that the exporter stores them as the graph's initializers
        self.weights = nn.ParameterList(tensor.requires_grad_(False) for tensor in program.parameters())
        for i, tensor in enumerate(program.buffers()):
            self.register_buffer(f"buffer{i}", tensor)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.program(*inputs)


def import_exported_program(blob: bytes, sha256: str, file: str, features: list[str],
                            examples: tuple[torch.Tensor, ...], logits_shape: list[int],
                            feature_rank: int) -> OnnxTeacher:
    """The ``OnnxTeacher`` of a ``torch.export`` program (``torch.export.save``), exported in eval mode and with a
    free batch axis (``dynamic_shapes`` with ``Dim.AUTO`` or a ``Dim`` on axis 0 of each input): its module returns
    the logits, or a tuple of the logits and then the feature maps ``features`` names. See ``import_program``."""
    try:
        program = torch.export.load(io.BytesIO(blob)).module()
    except Exception as err:  # deserialisation errors of every kind
        raise TeacherImportError(f"{file}: not a torch.export program saved by torch.export.save "
                                 f"({_line(err)})") from err
    with warnings.catch_warnings():
        # the program checks its inputs' shapes in Python: the tracer notes those checks as constants
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return import_program(_Program(program), "the program's", sha256, file, features, examples, logits_shape,
                              feature_rank,
                              hint="export it with a free batch axis: dynamic_shapes={0: Dim.AUTO} for each input")


def import_program(module: nn.Module, theirs: str, sha256: str, file: str, features: list[str],
                   examples: tuple[torch.Tensor, ...], logits_shape: list[int], feature_rank: int,
                   hint: str = "") -> OnnxTeacher:
    """``module`` (a loaded PyTorch program, in eval mode) as the ``OnnxTeacher`` of its ONNX export. Its answer for
    a row must not depend on the batch (a module traced or exported in train mode normalises by the batch), and the
    export must give ``theirs`` (the module's) answers on ``examples``; then ``import_onnx`` checks it as any ONNX
    teacher. ``hint`` says what to do when the module runs on a batch of one size and not another."""
    whole = _run(module, examples, file, hint)
    alone = _run(module, tuple(x[:1] for x in examples), file, hint)
    needed = 1 + len(features)
    for out in (whole, alone):
        if len(out) < needed:
            raise TeacherImportError(f"{file}: forward returns {len(out)} output(s); the logits and the features "
                                     f"{features} need {needed}, the logits first")
        if odd := [f"item {i}: {type(o).__name__}" for i, o in enumerate(out[:needed])
                   if not isinstance(o, torch.Tensor)]:
            raise TeacherImportError(f"{file}: forward's outputs must be tensors ({', '.join(odd)})")
    if list(whole[0].shape) != [len(examples[0]), *logits_shape]:
        raise TeacherImportError(f"{file}: forward's first output, the logits, has shape {list(whole[0].shape)} for a "
                                 f"batch of {len(examples[0])}, not {['N', *logits_shape]}")
    if not torch.isfinite(whole[0]).all():
        raise TeacherImportError(f"{file}: its logits for the family's example rows are not all finite numbers")
    if _gap(alone[0], whole[0][:1]):
        raise TeacherImportError(f"{file}: its answer for a row depends on the batch the row is in (traced or "
                                 "exported in train mode? save it from model.eval())")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no signature found")   # a ScriptModule has none to read
            graph = export_teacher_graph(module, examples, features)   # later outputs go unused
    except Exception as err:  # the exporter's errors of every kind
        raise TeacherImportError(f"{file}: does not export to ONNX ({_line(err)})") from err
    teacher = import_onnx(graph, sha256, file, "logits", features, examples, logits_shape, feature_rank)
    logits, maps = teacher.forward_features(*examples)
    for name, got, want in zip(["logits", *features], [logits, *maps], whole, strict=False):
        if gap := _gap(got, want):
            raise TeacherImportError(f"{file}: its ONNX export computes {name} up to {gap:.3g} away from {theirs} "
                                     "(a random operation in forward, such as dropout traced in train mode?)")
    return teacher


def _run(module: nn.Module, examples: tuple[torch.Tensor, ...], file: str, hint: str = "") -> list[Any]:
    """The module's outputs on ``examples``, as a list: one tensor, or the items of a tuple."""
    try:
        with torch.no_grad():
            out = module(*examples)
    except Exception as err:  # TorchScript's interpreter errors, a program's shape guards, ...
        raise TeacherImportError(f"{file}: the module cannot run on a batch of {len(examples[0])} of "
                                 f"{[list(x.shape[1:]) for x in examples]} ({_line(err, last=True)})"
                                 + (f"; {hint}" if hint else "")) from err
    if not isinstance(out, torch.Tensor | tuple):
        raise TeacherImportError(f"{file}: forward returns a {type(out).__name__}; return the logits, or a tuple of "
                                 "the logits and the feature maps")
    return list(out) if isinstance(out, tuple) else [out]


def _gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference between two answers when it is more than 0.1 % of ``want``'s scale, else 0 (infinite
    for other shapes, or a value finite in one and not in the other)."""
    got, want = got.float(), want.float()
    if got.shape != want.shape or not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return float("inf")
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    gap = float((got[finite] - want[finite]).abs().max())
    return gap if gap > 1e-3 * max(1.0, float(want[finite].abs().max())) else 0.0
