"""ONNX models of the click-through kit: FP32 export, INT8 export, scoring in onnxruntime.

Every graph takes ``fields`` int64 (N, F) and ``genres`` float (N, G) and returns ``probability`` (N,), with a
dynamic batch axis. The INT8 graph stores every embedding table as an INT8 initializer with its scales (per row;
per tensor for the one-column first-order tables) feeding ``DequantizeLinear`` and then ``Gather`` / ``MatMul``;
its MLP is the QDQ graph of the FX-converted QAT MLP. A shared table's id -> row map is stored in one or two bytes
per id and widened by a ``Cast``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from tasks.ctr.ctr_training import CtrSplit
from tasks.ctr.models import TABLES, CtrModel, Probability, quantize_table
from tasks.int4 import pack_int4, require_int4
from tasks.io import write_atomic
from tasks.onnx_models import OnnxError, session, tidy_qdq

INPUTS, OUTPUT = ("fields", "genres"), "probability"
MODELS = ("teacher_fp32", "student_fp32", "student_int8")   # the files the export stage writes: <name>.onnx


def export_ctr_fp32(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Export ``model`` (logits) as a probability graph; an imported ONNX teacher is written as it was imported,
    with a sigmoid on its logits and the pipeline's input and output names."""
    if hasattr(model, "onnx_for_export"):
        write_atomic(path, model.onnx_for_export(list(INPUTS), OUTPUT, head="Sigmoid"))
        return path
    example = (torch.zeros(2, model.num_fields, dtype=torch.int64), torch.zeros(2, model.genre_embedding.num_embeddings))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "model.onnx"
        torch.onnx.export(Probability(model.eval()), example, str(scratch), input_names=list(INPUTS),
                          output_names=[OUTPUT], opset_version=opset, dynamo=False,
                          dynamic_axes={**{name: {0: "batch"} for name in INPUTS}, OUTPUT: {0: "batch"}})
        write_atomic(path, scratch.read_bytes())
    return path


def quantize_tables(path: Path) -> Path:
    """Replace each embedding-table initializer of ``path`` by INT8 values, scales and a DequantizeLinear node.

    The exported model's tables must already sit on their INT8 grid (``convert_ctr_int8``), so this loses nothing."""
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    # The tables under the Probability wrapper; one the model does not use (an LR's embeddings) is not exported.
    present = [name for name in (f"model.{table}" for table in TABLES) if name in initializers]
    if not present:
        raise OnnxError(f"{path}: the exported graph has none of the embedding tables {list(TABLES)} to quantize")
    for name in present:
        weight = torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())
        q, scale = quantize_table(weight)
        graph.initializer.remove(initializers[name])
        per_row = scale.shape[0] > 1
        graph.initializer.extend([numpy_helper.from_array(q.numpy(), f"{name}.int8"),
                                  numpy_helper.from_array(scale.reshape(-1).numpy() if per_row
                                                          else scale.reshape(()).numpy(), f"{name}.scale")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale"], [name],
                                      name=f"dequantize/{name}", **({"axis": 0} if per_row else {})))
    if "model.row_map" in initializers:  # weight sharing: each id's row index, in one or two bytes
        nodes.append(_narrow_index(graph, initializers["model.row_map"]))
    for position, node in enumerate(nodes):  # before their consumers: ONNX nodes are topologically ordered
        graph.node.insert(position, node)
    onnx.checker.check_model(graph_model)
    write_atomic(path, graph_model.SerializeToString())
    return path


def _narrow_index(graph: onnx.GraphProto, init: onnx.TensorProto) -> onnx.NodeProto:
    """Store an int64 index initializer as uint8 / uint16 and cast it back where the graph reads it."""
    values = numpy_helper.to_array(init)
    dtype = np.uint8 if values.max() < 256 else np.uint16
    graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array(values.astype(dtype), f"{init.name}.index"))
    return helper.make_node("Cast", [f"{init.name}.index"], [init.name], name=f"widen/{init.name}",
                            to=onnx.TensorProto.INT64)


def export_ctr_int8(model: CtrModel, path: Path, opset: int = 17) -> Path:
    """``model``: a converted INT8 model (``convert_ctr_int8``) or an FP32 one whose tables are quantized after
    training (a recipe without QAT). MLP weights trained at 4 bits or fewer are stored as INT4 (``tasks.int4``;
    the tables stay INT8); a model without an MLP (an FM) has none to store so."""
    export_ctr_fp32(model, path, opset)
    quantize_tables(tidy_qdq(path))
    bits = (model.qat_settings or {}).get("mlp_weight_bits", 8)
    if bits <= 4 and model.mlp is not None:
        pack_int4(path)
        tables = {f"model.{table}.int8" for table in TABLES}   # the tables stay INT8 (quantize_tables)
        require_int4(path, bits, keep=tables.__contains__)
    return path


def onnx_probabilities(path: Path, split: CtrSplit, batch_size: int = 8192, threads: int = 2) -> np.ndarray:
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    if names != list(INPUTS):
        raise OnnxError(f"{path}: inputs {names} are not a click-through model's {list(INPUTS)}")
    return np.concatenate([sess.run([OUTPUT], {"fields": split.fields[i:i + batch_size].numpy(),
                                               "genres": split.genres[i:i + batch_size].numpy()})[0]
                           for i in range(0, len(split), batch_size)])
