"""4-bit weights in ONNX: INT8 weight initializers that INT4 holds exactly, stored as INT4 (opset 21).

QAT with ``weight_bits`` 4 trains weights on the grid [-7, 7] per channel; ``convert_fx`` and the TorchScript
exporter still write them as INT8 ``DequantizeLinear`` inputs. Stored as INT4 (two per byte) the same values take
half the bytes and the graph computes the same numbers: the packing is lossless by construction (a tensor is packed
only when every value lies in [-8, 7]), and the file is checked by the export stage's parity like any other.

onnxruntime has no INT4 convolution or Gemm kernels on the CPU: it dequantizes INT4 weights to float on every run
and computes in float, so an INT4 file is smaller but slower than its INT8 twin (the evaluation measures it).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.errors import PipelineError
from tasks.io import write_atomic

INT4_OPSET = 21   # the first opset whose QuantizeLinear / DequantizeLinear take INT4


def upgrade_opset(model, where: Path, opset: int = INT4_OPSET):
    """``model`` (an ``onnx.ModelProto``, read from ``where``) converted to ``opset`` of the default domain when it
    is older, with the IR version that opset needs."""
    from onnx import helper, version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as err:   # the converter raises its own ConvertError and checker errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"{where}: cannot convert the ONNX graph from opset {current} to {opset} for INT4 "
                            f"weights ({first})") from err
    del converted.graph.value_info[:]   # the converter's inferred shapes: optional, and bytes in every file
    converted.ir_version = max(converted.ir_version,
                               helper.find_min_ir_version_for(converted.opset_import, ignore_unknown=True))
    return converted


def pack_int4(path: Path) -> int:
    """Rewrite the ONNX file at ``path`` with every constant INT8 weight (rank ≥ 2) of a ``DequantizeLinear`` that
    INT4 holds exactly stored as INT4, its zero point too, at opset 21, unused initializers dropped. Returns how
    many weights it packed (0: the file is left as it was)."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))

    def packable(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
        def fits(name: str) -> bool:
            tensor = inits.get(name)
            if tensor is None or tensor.data_type != TensorProto.INT8:
                return False
            values = numpy_helper.to_array(tensor)
            return values.size > 0 and int(values.min()) >= -8 and int(values.max()) <= 7

        if node.op_type != "DequantizeLinear":
            return False
        weight = inits.get(node.input[0])
        return (weight is not None and len(weight.dims) >= 2 and fits(node.input[0])
                and (len(node.input) < 3 or fits(node.input[2])))

    inits = {t.name: t for t in model.graph.initializer}
    if not any(packable(n, inits) for n in model.graph.node):
        return 0
    model = upgrade_opset(model, path)
    inits = {t.name: t for t in model.graph.initializer}
    converted: dict[str, str] = {}   # INT8 initializer -> its INT4 copy (a zero point may be shared)
    packed = 0
    for node in model.graph.node:
        if not packable(node, inits):
            continue
        for i in range(0, len(node.input), 2):   # the weight (0) and its zero point (2), not the scale (1)
            source = node.input[i]
            if source not in converted:
                int4 = numpy_helper.from_array(numpy_helper.to_array(inits[source]).astype(ml_dtypes.int4),
                                               f"{source}_int4")
                model.graph.initializer.append(int4)
                converted[source] = int4.name
            node.input[i] = converted[source]
        packed += 1
    drop_unused_initializers(model)
    onnx.checker.check_model(model)
    write_atomic(path, model.SerializeToString())
    return packed


def drop_unused_initializers(model) -> None:
    """Remove from ``model`` (an ``onnx.ModelProto``) the initializers no node, graph input or output names."""
    graph = model.graph
    used = ({name for n in graph.node for name in n.input} | {o.name for o in graph.output}
            | {i.name for i in graph.input})
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantized_weights(path: Path) -> dict[str, list[str]]:
    """The constant weights (rank ≥ 2) of the file's ``DequantizeLinear`` nodes by storage type, e.g.
    ``{"INT4": ["/graph/0/Constant_output_0_int4", ...]}``."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        tensor = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if tensor is not None and len(tensor.dims) >= 2:
            found.setdefault(onnx.TensorProto.DataType.Name(tensor.data_type), []).append(tensor.name)
    return found


def weight_types(path: Path) -> dict[str, int]:
    """How many such weights are stored in each type, e.g. ``{"INT4": 9}``."""
    return {kind: len(names) for kind, names in quantized_weights(path).items()}


def require_int4(path: Path, bits: int, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Fail unless every quantized weight of the file at ``path``, except those ``keep`` names, is stored as INT4
    (what a model trained with ``bits``-bit weights must ship as)."""
    found = quantized_weights(path)
    wide = [name for kind, names in found.items() if kind != "INT4" for name in names if not keep(name)]
    if wide:
        raise PipelineError(f"{path}: weights trained at {bits} bits that INT4 does not hold: {', '.join(wide)}")
    if not found.get("INT4"):
        raise PipelineError(f"{path}: no quantized weight to store as INT4, though the model was trained with "
                            f"{bits}-bit weights (every quantized layer left in float?)")
