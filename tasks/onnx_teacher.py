"""A frozen teacher computed by onnxruntime from an ONNX graph: what an imported ONNX teacher (``tasks.imported_teacher``)
and a trained teacher's ONNX twin run as during distillation, and the graph a teacher's ONNX file is exported from;
with what is read from such a graph (its real inputs, its multiply-accumulates, its tensors kept outside it).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.family_config import OnnxArch

PREFIX = "teacher/"   # of every name of an imported graph once exported under the pipeline's names


def graph_inputs(graph: Any) -> list[Any]:
    """The graph's real inputs (older exporters also list the initializers as inputs)."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def external_tensors(graph: Any) -> dict[str, str]:
    """Name -> location of each tensor of ``graph`` stored as external data (a file beside the model): initializers,
    sparse ones, tensors of node attributes (``Constant``), and those of every subgraph (If, Loop, Scan bodies)."""
    from onnx import TensorProto

    tensors = [*graph.initializer, *(t for s in graph.sparse_initializer for t in (s.values, s.indices))]
    found: dict[str, str] = {}
    for attr in (a for node in graph.node for a in node.attribute):
        sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
        tensors += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
        tensors += [t for s in sparse for t in (s.values, s.indices)]
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            found |= external_tensors(sub)
    for t in tensors:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            found[t.name] = {e.key: e.value for e in t.external_data}.get("location", "?")
    return found


def graph_macs(model: Any, examples: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one example through the graph's Conv, Gemm and MatMul nodes (shape inference with
    the batch axis set to 1); other operators are not counted."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input, example in zip(graph_inputs(fixed.graph), examples, strict=True):
        for dim, size in zip(graph_input.type.tensor_type.shape.dim, [1, *example.shape[1:]], strict=True):
            dim.Clear()
            dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(fixed).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    weights = {t.name: list(t.dims) for t in inferred.initializer}
    total = 0
    for node in inferred.node:
        out, weight = shapes.get(node.output[0]), weights.get(node.input[1]) if len(node.input) > 1 else None
        if not out or weight is None or 0 in out:
            continue
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            total += int(np.prod(out)) * (weight[-1] if transposed else weight[0])
    return total


class OnnxTeacher(nn.Module):
    """A frozen teacher computed by onnxruntime: ``forward(*inputs)`` gives logits, ``forward_features(*inputs)``
    (logits, features), as torch tensors on the inputs' device. The session starts on first use, with this process's
    torch thread count."""

    def __init__(self, arch: OnnxArch, graph: bytes) -> None:
        super().__init__()
        self.arch, self.graph = arch, graph
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles rebuild the session
        return {**self.__dict__, "_session": None}

    def _run(self, names: list[str], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])
        feed = {name: x.detach().contiguous().cpu().numpy() for name, x in zip(self.arch.inputs, inputs, strict=True)}
        return [torch.from_numpy(out).to(inputs[0].device) for out in self._session.run(names, feed)]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._run([self.arch.logits], inputs)[0]

    def forward_features(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, *features = self._run([self.arch.logits, *self.arch.features], inputs)
        return logits, features

    def counts(self) -> dict[str, int]:
        """Parameters, non-zero parameters and MACs per example, read from the graph."""
        return {"parameters": self.arch.parameters, "nonzero": self.arch.nonzero, "macs": self.arch.macs}

    def onnx_for_export(self, input_names: list[str], output_name: str, head: str = "Identity") -> bytes:
        """The graph with one output, ``head`` (an ONNX operator: ``Sigmoid`` for a probability) of the logits,
        named ``output_name``, and its inputs named, in order, ``input_names``. Every name of the imported graph
        gets a prefix first, so none can collide with the pipeline's (an input already called ``fields``, a logits
        output called ``probability``)."""
        import onnx
        from onnx import compose, helper

        if len(input_names) != len(self.arch.inputs):
            raise ValueError(f"the teacher takes {self.arch.inputs}, not {input_names}")
        model = compose.add_prefix(onnx.load_from_string(self.graph), PREFIX)
        graph = model.graph
        by_name = {i.name: i for i in graph.input}
        renamed = []
        for old, new in zip(self.arch.inputs, input_names, strict=True):
            info = onnx.ValueInfoProto()
            info.CopyFrom(by_name[PREFIX + old])
            info.name = new
            renamed.append(info)
            graph.node.insert(0, helper.make_node("Identity", [new], [PREFIX + old]))
        kept = [i for i in graph.input if i.name not in {PREFIX + old for old in self.arch.inputs}]   # initializers
        del graph.input[:]
        graph.input.extend([*renamed, *kept])
        output = onnx.ValueInfoProto()
        output.CopyFrom(next(o for o in graph.output if o.name == PREFIX + self.arch.logits))
        output.name = output_name
        del graph.output[:]
        graph.output.append(output)
        graph.node.append(helper.make_node(head, [PREFIX + self.arch.logits], [output_name]))
        onnx.checker.check_model(model)
        return model.SerializeToString()
