"""A pretrained teacher saved as TorchScript (``torch.jit.save`` of a traced or scripted model), imported as the
``OnnxTeacher`` of its ONNX export (``tasks.imported_teacher``): exported once, at import, after checking that its
answers do not depend on the batch, and checked to give the module's own answers there.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import torch

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
    ``features`` names, in order (later items unused). Its answer for a row must not depend on the batch (a module
    traced in train mode normalises by the batch), and the export must give the module's own answers on
    ``examples``; then ``import_onnx`` checks it as any ONNX teacher."""
    try:
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()
    except Exception as err:  # TorchScript raises RuntimeError, zip errors, ...
        if "constants.pkl" in str(err):   # a zip of torch.save's, not of torch.jit.save's
            raise TeacherImportError(f"{file}: a torch.save file (a state dict or a pickled model), not TorchScript: "
                                     "use format: state_dict, or torch.jit.save a traced model") from err
        raise TeacherImportError(f"{file}: not a TorchScript module saved by torch.jit.save ({_line(err)})") from err
    outs = [_run_torchscript(module, examples, file), _run_torchscript(module, tuple(x[:1] for x in examples), file)]
    needed = 1 + len(features)
    for out in outs:
        if len(out) < needed:
            raise TeacherImportError(f"{file}: forward returns {len(out)} output(s); the logits and the features "
                                     f"{features} need {needed}, the logits first")
        if odd := [f"item {i}: {type(o).__name__}" for i, o in enumerate(out[:needed])
                   if not isinstance(o, torch.Tensor)]:
            raise TeacherImportError(f"{file}: forward's outputs must be tensors ({', '.join(odd)})")
    whole, alone = outs
    if list(whole[0].shape) != [len(examples[0]), *logits_shape]:
        raise TeacherImportError(f"{file}: forward's first output, the logits, has shape {list(whole[0].shape)} for a "
                                 f"batch of {len(examples[0])}, not {['N', *logits_shape]}")
    if not torch.isfinite(whole[0]).all():
        raise TeacherImportError(f"{file}: its logits for the family's example rows are not all finite numbers")
    if _gap(alone[0], whole[0][:1]):
        raise TeacherImportError(f"{file}: its answer for a row depends on the batch the row is in (traced in train "
                                 "mode? trace model.eval())")
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
            raise TeacherImportError(f"{file}: its ONNX export computes {name} up to {gap:.3g} away from TorchScript's "
                                     "(a random operation in forward, such as dropout traced in train mode?)")
    return teacher


def _run_torchscript(module: Any, examples: tuple[torch.Tensor, ...], file: str) -> list[Any]:
    """The module's outputs on ``examples``, as a list: one tensor, or the items of a tuple."""
    try:
        with torch.no_grad():
            out = module(*examples)
    except Exception as err:  # TorchScript's interpreter errors
        raise TeacherImportError(f"{file}: the module cannot run on a batch of {len(examples[0])} of "
                                 f"{[list(x.shape[1:]) for x in examples]} ({_line(err, last=True)})") from err
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
