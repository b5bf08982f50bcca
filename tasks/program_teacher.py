"""A pretrained teacher saved as a PyTorch program — TorchScript (``torch.jit.save`` of a traced or scripted model) or
a ``torch.export`` program (``torch.export.save``, a ``.pt2`` file) — imported as the ``OnnxTeacher`` of its ONNX
export (``tasks.imported_teacher``): exported once, at import, after checking that its answers do not depend on the
batch, and checked to give the program's own answers there.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
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
    ``features`` names, in order (later items unused). See ``import_program``."""
    try:
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()
    except Exception as err:  # TorchScript raises RuntimeError, zip errors, ...
        raise TeacherImportError(f"{file}: not a TorchScript module saved by torch.jit.save ({_line(err)})") from err

    def onnx_graph() -> bytes:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no signature found")   # a ScriptModule has none to read
            return export_teacher_graph(module, examples, features)   # later outputs go unused

    return import_program(module, "TorchScript's", onnx_graph, sha256, file, features, examples, logits_shape,
                          feature_rank)


PLAIN = ("weight_", "tensor_")   # payload files of plain tensors (torch.export's weight and tensor constant names)


def safe_program_archive(blob: bytes, file: str) -> bytes:
    """A ``torch.export.save`` archive that loads without unpickling anything: its weights and constants stored as
    plain tensors (``torch.export.load`` unpickles a tensor subclass's payload, a script object or an opaque
    object, with no ``weights_only`` guard), no AOTInductor package, and without its sample inputs (a pickle the
    loader retries without the guard: emptied, which it reads as none; the family's own example rows serve)."""
    records = {}
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for info in archive.infolist():
            record = info.filename.partition("/")[2]
            if record.startswith("data/aotinductor/"):
                raise TeacherImportError(f"{file}: an AOTInductor package (compiled code), not a torch.export "
                                         "program: save the program with torch.export.save")
            if record.startswith(("data/weights/", "data/constants/")) and record.endswith(".pt"):
                raise TeacherImportError(f"{file}: holds its weights or constants as a pickle ({record}, the format "
                                         "of an older PyTorch): save it again with torch.export.save")
            records[info.filename] = b"" if record.startswith("data/sample_inputs/") else archive.read(info)
    for name, content in records.items():   # the program's own records (extra/ holds files of the user's)
        if not (name.endswith(".json") and name.partition("/")[2].startswith(("models/", "data/"))):
            continue
        record_json = json.loads(content)
        if away := sorted(set(_devices(record_json)) - {"cpu"}):
            raise TeacherImportError(f"{file}: a program exported on {', '.join(away)} (its tensors are stored there; "
                                     "the teacher runs on the CPU): export it from the model moved to the CPU, "
                                     "model.cpu()")
        if not name.endswith("_config.json"):
            continue
        payloads = record_json.get("config", {})
        if pickled := sorted(fqn for fqn, meta in payloads.items()
                             if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(PLAIN)):
            raise TeacherImportError(f"{file}: holds pickled objects ({', '.join(pickled[:3])}): only plain tensors "
                                     "are read, as no pickle from a file is ever run")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, content in records.items():
            archive.writestr(name, content)
    return out.getvalue()


def _devices(node: Any) -> Iterator[str]:
    """Every device type a ``torch.export`` archive's JSON records (``{"device": {"type": "cuda", ...}}``: where a
    weight, a constant or a value of the graph lives)."""
    if isinstance(node, dict):
        device = node.get("device")
        if isinstance(device, dict) and isinstance(device.get("type"), str):
            yield device["type"]
        for value in node.values():
            yield from _devices(value)
    elif isinstance(node, list):
        for value in node:
            yield from _devices(value)


def import_exported_program(blob: bytes, sha256: str, file: str, features: list[str],
                            examples: tuple[torch.Tensor, ...], logits_shape: list[int],
                            feature_rank: int) -> OnnxTeacher:
    """The ``OnnxTeacher`` of a ``torch.export`` program (``torch.export.save``), exported in eval mode and with a
    free batch axis (``dynamic_shapes`` with ``Dim.AUTO`` or a ``Dim`` on axis 0 of each input): its module returns
    the logits, or a tuple of the logits and then the feature maps ``features`` names. Converted by torch.onnx's
    exporter of exported programs (onnxscript), which keeps the sizes the program computes from its inputs (a
    ``view(x.size(0), -1)``). See ``import_program``."""
    try:
        program = torch.export.load(io.BytesIO(safe_program_archive(blob, file)))
    except TeacherImportError:
        raise
    except Exception as err:  # deserialisation errors of every kind
        raise TeacherImportError(f"{file}: not a torch.export program saved by torch.export.save "
                                 f"({_line(err)})") from err

    def onnx_graph() -> bytes:
        inputs = [f"input{i}" for i in range(len(examples))]
        with contextlib.redirect_stdout(io.StringIO()):   # the exporter reports its steps on stdout
            exported = torch.onnx.export(program, (), dynamo=True, input_names=inputs,
                                         output_names=["logits", *features], verbose=False)
        return exported.model_proto.SerializeToString()

    return import_program(program.module(), "the program's", onnx_graph, sha256, file, features, examples,
                          logits_shape, feature_rank,
                          hint="export it with a free batch axis: dynamic_shapes={0: Dim.AUTO} for each input")


def import_program(module: Any, theirs: str, onnx_graph: Callable[[], bytes], sha256: str, file: str,
                   features: list[str], examples: tuple[torch.Tensor, ...], logits_shape: list[int],
                   feature_rank: int, hint: str = "") -> OnnxTeacher:
    """``module`` (a loaded PyTorch program, in eval mode) as the ``OnnxTeacher`` of ``onnx_graph()``, its ONNX
    export. Its answer for a row must not depend on the batch (a module traced or exported in train mode normalises
    by the batch), and the export must give ``theirs`` (the module's) answers on ``examples``; then ``import_onnx``
    checks it as any ONNX teacher. ``hint`` says what to do when the module refuses a batch of another size."""
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
        graph = onnx_graph()
    except Exception as err:  # the exporter's errors of every kind
        raise TeacherImportError(f"{file}: does not export to ONNX ({_line(err)})") from err
    teacher = import_onnx(graph, sha256, file, "logits", features, examples, logits_shape, feature_rank)
    logits, maps = teacher.forward_features(*examples)
    for name, got, want in zip(["logits", *features], [logits, *maps], whole, strict=False):
        if gap := _gap(got, want):
            raise TeacherImportError(f"{file}: its ONNX export computes {name} up to {gap:.3g} away from {theirs} "
                                     "(a random operation in forward, such as dropout traced in train mode?)")
    return teacher


def _run(module: Any, examples: tuple[torch.Tensor, ...], file: str, hint: str = "") -> list[Any]:
    """The module's outputs on ``examples``, as a list: one tensor, or the items of a tuple. ``hint`` joins the
    refusal of a batch whose size a program's guard fixes."""
    try:
        with torch.no_grad():
            out = module(*examples)
    except Exception as err:  # TorchScript's interpreter errors, a program's shape guards, ...
        batch = hint and re.search(r"size\(\)\[0\]|shape\[0\]", str(err))
        raise TeacherImportError(f"{file}: the module cannot run on a batch of {len(examples[0])} of "
                                 f"{[list(x.shape[1:]) for x in examples]} ({_line(err, last=True)})"
                                 + (f"; {hint}" if batch else "")) from err
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
