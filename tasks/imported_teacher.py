"""A pretrained teacher imported instead of trained: an ONNX file run by onnxruntime, a TorchScript module or a
``torch.export`` program (each run as its ONNX export), or a state dict of the family's own teacher architecture.
Each is verified against the SHA-256 pinned in params before anything reads it.

An ONNX teacher is enough for target and label distillation (its logits), and for feature distillation when it
exposes intermediate values named in ``features`` (the family's feature pairs count through that list). It is
frozen by nature: onnxruntime computes no gradient, and it has no parameter for an optimizer to find. Its model file
holds the ONNX bytes (the logits and the named features as outputs) and what the family needs to know of them.
A PyTorch program becomes one: exported once at import, checked to give the program's own answers.
Nothing here knows a family: each passes its example inputs and the shapes it expects.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from tasks.errors import ChecksumError, DataSourceError, PipelineError
from tasks.family_config import OnnxArch, PretrainedTeacher
from tasks.onnx_teacher import OnnxTeacher, external_tensors, graph_inputs, graph_macs


class TeacherImportError(PipelineError):
    """A pretrained teacher file that cannot serve as this family's teacher."""


def verified_bytes(path: str, sha256: str, key: str) -> bytes:
    """The file's content, when its SHA-256 is the one params pin at ``key``."""
    file = Path(path)
    if not file.is_file():
        raise DataSourceError(f"{key}.path: {file} not found; put the teacher file there or fix the path")
    blob = file.read_bytes()
    if (digest := hashlib.sha256(blob).hexdigest()) != sha256:
        raise ChecksumError(f"{key}.sha256: {file} has SHA-256 {digest}, params pin {sha256}; pin the new "
                            "checksum only once you trust the file")
    return blob


def _exposed(model: Any, wanted: list[str], file: str) -> None:
    """Make each of ``wanted`` a graph output; an intermediate value becomes one, a name the graph lacks fails."""
    from onnx import TensorProto, helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    values = {name for node in graph.node for name in node.output}
    for name in wanted:
        if name in outputs:
            continue
        if name not in values:
            raise TeacherImportError(f"{file}: the graph has no value {name!r} (outputs: {sorted(outputs)})")
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        outputs.add(name)


def import_onnx(blob: bytes, sha256: str, file: str, logits: str | None, features: list[str],
                examples: tuple[torch.Tensor, ...], logits_shape: list[int], feature_rank: int) -> OnnxTeacher:
    """An ``OnnxTeacher`` from verified ONNX bytes: its inputs take a batch of ``examples`` (any batch size),
    ``logits`` (default: the first output) has ``logits_shape`` per example, every name of ``features`` is a tensor
    of ``feature_rank`` axes (batch included)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load_from_string(blob)
        outside = external_tensors(model.graph)
        if not outside:   # the checker would look for the files
            onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError, ...
        raise TeacherImportError(f"{file}: not a valid ONNX model ({str(err).splitlines()[0]})") from err
    if outside:   # weights the pinned SHA-256 does not cover
        name, location = next(iter(outside.items()))
        raise TeacherImportError(f"{file}: tensor {name!r} is stored as external data ({location}), which its pinned "
                                 f"SHA-256 does not cover ({len(outside)} such tensor(s)); save the model as one file "
                                 "(onnx.save_model(model, path, save_as_external_data=False)) and pin its checksum")
    inputs = [i.name for i in graph_inputs(model.graph)]
    if len(inputs) != len(examples):
        raise TeacherImportError(f"{file}: the family's teacher takes {len(examples)} input(s), this graph takes "
                                 f"{inputs}")
    logits = logits or model.graph.output[0].name
    _exposed(model, [logits, *features], file)
    floats = [numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)]
    arch = OnnxArch(inputs=inputs, logits=logits, features=list(features), feature_shapes=[[] for _ in features],
                    sha256=sha256, parameters=sum(a.size for a in floats),
                    nonzero=sum(int(np.count_nonzero(a)) for a in floats), macs=0)
    teacher = OnnxTeacher(arch, model.SerializeToString())
    for size in (1, 2):
        batch = tuple(x[:size] for x in examples)
        try:
            out, maps = teacher.forward_features(*batch)
        except Exception as err:  # onnxruntime's own error types
            raise TeacherImportError(f"{file}: onnxruntime cannot run it on a batch of {size} of "
                                     f"{[list(x.shape[1:]) for x in batch]} ({str(err).splitlines()[0]})") from err
        if list(out.shape) != [size, *logits_shape]:
            raise TeacherImportError(f"{file}: output {logits!r} has shape {list(out.shape)} for a batch of {size}, "
                                     f"not {['N', *logits_shape]} (name the logits output)")
        for name, fmap in zip(features, maps, strict=True):
            if fmap.dim() != feature_rank or len(fmap) != size:
                raise TeacherImportError(f"{file}: feature {name!r} has shape {list(fmap.shape)} for a batch of "
                                         f"{size}; this family aligns features of {feature_rank} axes")
    try:   # once the graph is known to run on the family's examples
        macs = graph_macs(model, examples)
    except Exception as err:  # onnx shape inference raises its own types
        raise TeacherImportError(f"{file}: ONNX shape inference fails on it ({str(err).splitlines()[0]})") from err
    teacher.arch = arch.model_copy(update={"feature_shapes": [list(m.shape[1:]) for m in maps], "macs": macs})
    return teacher


def import_state_dict(blob: bytes, file: str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the weights of a ``torch.save``d state dict (plain tensors only: loaded with
    ``weights_only``); a dict holding it under ``state_dict`` works too."""
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors of every kind
        raise TeacherImportError(f"{file}: not a torch state dict ({str(err).splitlines()[0]})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = build()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        problem = " ".join(line.strip() for line in str(err).splitlines())
        raise TeacherImportError(f"{file}: does not fit the teacher architecture in params ({problem[:300]})") from err
    return model.eval()


# what each format's file is, as the refusal of a file in another format names it
SAVED_AS = {"onnx": "an ONNX model", "torchscript": "a TorchScript archive (torch.jit.save)",
            "exported_program": "a torch.export program (torch.export.save, .pt2)",
            "state_dict": "a torch.save file (a state dict or a pickled model)"}


def saved_format(blob: bytes) -> str | None:
    """The PyTorch format a file's bytes are in, read from their layout (the records of its zip archive, or the
    pickle of torch.save's legacy format): a key of ``SAVED_AS``, or None for anything else (ONNX included)."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            records = {name.partition("/")[2] for name in archive.namelist()}   # below the archive's folder
    except zipfile.BadZipFile:
        return "state_dict" if blob[:2] == b"\x80\x02" else None   # torch.save's format before PyTorch 1.6
    except Exception:  # noqa: BLE001 -- a damaged archive (a name that is no text): its loader says what is wrong
        return None
    if "archive_format" in records:
        return "exported_program"
    if "constants.pkl" in records:
        return "torchscript"
    return "state_dict" if "data.pkl" in records else None


def load_pretrained(spec: PretrainedTeacher, key: str, examples: tuple[torch.Tensor, ...], logits_shape: list[int],
                    feature_rank: int, build: Callable[[], nn.Module]) -> nn.Module:
    """The teacher ``spec`` (params key ``key``) names, checksum verified: an ``OnnxTeacher`` checked against the
    family's ``examples`` and shapes (see ``import_onnx``; a PyTorch program through ``tasks.program_teacher``), or
    ``build()`` with the state dict's weights. A refusal names ``key`` and the file."""
    blob = verified_bytes(spec.path, spec.sha256, key)
    found = saved_format(blob)
    if found is not None and found != spec.format:
        raise TeacherImportError(f"{key}: {spec.path} is {SAVED_AS[found]}, not {SAVED_AS[spec.format]}: "
                                 f"use format: {found}")
    try:
        if spec.format == "onnx":
            return import_onnx(blob, spec.sha256, spec.path, spec.logits, spec.features, examples, logits_shape,
                               feature_rank)
        if spec.format == "state_dict":
            return import_state_dict(blob, spec.path, build)
        from tasks import program_teacher

        load = {"torchscript": program_teacher.import_torchscript,
                "exported_program": program_teacher.import_exported_program}[spec.format]
        return load(blob, spec.sha256, spec.path, spec.features, examples, logits_shape, feature_rank)
    except TeacherImportError as err:
        raise TeacherImportError(f"{key}: {err}") from err


class _Features(nn.Module):
    """``forward`` as ``(logits, *feature maps)``: what an exporter can name output by output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, maps = self.model.forward_features(*inputs)
        return (logits, *maps)


def onnx_twin(model: nn.Module, examples: tuple[torch.Tensor, ...], feature_rank: int) -> OnnxTeacher:
    """``model`` (whose ``forward_features`` gives logits and a list of feature maps) exported to ONNX and imported
    back: the same frozen teacher, run by onnxruntime."""
    model.eval()
    with torch.no_grad():
        logits, maps = model.forward_features(*examples)
    features = [f"feature{i}" for i in range(len(maps))]
    # the wrapper in eval mode: the exporter restores the mode it finds, and would leave the model training
    blob = export_teacher_graph(_Features(model).eval(), examples, features)
    return import_onnx(blob, hashlib.sha256(blob).hexdigest(), "the teacher's ONNX twin", "logits", features,
                       examples, list(logits.shape[1:]), feature_rank)


def export_teacher_graph(module: nn.Module, examples: tuple[torch.Tensor, ...], features: list[str]) -> bytes:
    """``module``'s ONNX graph (opset 17, a free batch axis) with inputs ``input0``, … and its outputs named
    ``logits``, then ``features`` (later outputs keep the exporter's names): what ``import_onnx`` reads back."""
    buffer = io.BytesIO()
    inputs = [f"input{i}" for i in range(len(examples))]
    torch.onnx.export(module, tuple(x.contiguous() for x in examples), buffer, input_names=inputs,
                      output_names=["logits", *features], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "n"} for name in (*inputs, "logits", *features)})
    return buffer.getvalue()


def publish_imported(run: Any, model: nn.Module, spec: PretrainedTeacher, metrics: dict[str, float], paths: Any,
                     kind: str, arch: BaseModel, **extra: Any) -> None:
    """A teacher stage's outputs for an imported teacher, logged to ``run`` with its provenance as tags: an ONNX
    teacher as a model file of kind ``onnx`` holding its graph, a state-dict one as the family's ``kind`` and
    ``arch`` (with ``extra``). Nothing was trained: the history is empty and a checkpoint folder, a DVC output of
    the stage, is created empty."""
    from tasks.artifacts import empty_checkpoint, publish_training

    run.set_tags({"teacher.imported.format": spec.format, "teacher.imported.sha256": spec.sha256,
                  "teacher.imported.path": spec.path})
    empty_checkpoint(paths)
    if isinstance(model, OnnxTeacher):
        graph = torch.frombuffer(bytearray(model.graph), dtype=torch.uint8)
        publish_training(run, model, "onnx", model.arch, [], metrics, paths, onnx=graph)
    else:
        publish_training(run, model, kind, arch, [], metrics, paths, **extra)
