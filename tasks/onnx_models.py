"""ONNX models of the vision family: FP32 export, INT8 QDQ export of a QAT student, onnxruntime static PTQ, and
evaluation in onnxruntime.

Every exported graph takes ``image``: normalised float (N, C, H, W) as produced by ``tasks.image_training.to_input`` (the
data's channels and size: Fashion-MNIST's (N, 1, 28, 28)), and returns ``logits`` (N, classes), with a dynamic
batch axis. Files are written atomically.
"""
from __future__ import annotations

import gzip
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tasks.errors import PipelineError
from tasks.int4 import drop_unused_initializers, pack_int4, require_int4, upgrade_opset
from tasks.io import write_atomic
from tasks.quantization import QatModel, convert_int8

if TYPE_CHECKING:  # annotations only: the recommender's export runs this module without the vision config
    from tasks.image_training import Split
    from tasks.images.config import QatImages

INPUT, OUTPUT = "image", "logits"


class OnnxError(PipelineError):
    """An ONNX file that is missing, unreadable or does not fit the data."""


def export_fp32(model: nn.Module, path: Path, opset: int = 17, example: torch.Tensor | None = None) -> Path:
    """Export a float model (teacher or FP32 student) to ONNX; an imported ONNX teacher is written as it was
    imported, with the pipeline's input and output names."""
    if hasattr(model, "onnx_for_export"):
        write_atomic(path, model.onnx_for_export([INPUT], OUTPUT))
        return path
    model = model.eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(1, *model.input_shape) if example is None else example.contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "model.onnx"
        # dynamo=False: the TorchScript exporter is the one that turns converted FX INT8 graphs into QDQ; use the
        # same exporter for every model so the FP32 and INT8 graphs are comparable.
        torch.onnx.export(model, (example,), str(scratch), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset, dynamo=False)
        write_atomic(path, scratch.read_bytes())
    return path


def export_int8(qat: QatModel, path: Path, opset: int = 17) -> Path:
    """Convert a QAT student to real INT8 (``convert_fx``) and export it as QDQ ONNX (per-channel weights; INT4
    weights at opset 21 when it was trained with 4-bit weights, see ``tasks.int4``).

    The exporter writes INT8 weights as ``Constant`` nodes and puts a no-op ``Cast`` between each activation's
    QuantizeLinear and DequantizeLinear; onnxruntime's basic (ONNX-only, portable) graph optimisations fold these,
    leaving plain Q/DQ pairs around each Conv/Gemm with INT8 weight initializers."""
    export_fp32(convert_int8(qat), path, opset)
    tidy_qdq(path)
    if qat.weight_bits <= 4:   # stored as INT4 (opset 21): half the weight bytes, the same numbers
        pack_int4(path)
        require_int4(path, qat.weight_bits)
    return path


def tidy_qdq(path: Path) -> Path:
    """Rewrite ``path`` after onnxruntime's basic (ONNX-only, portable) optimisations: they fold the exporter's
    ``Constant`` INT8 weights into initializers and drop its no-op ``Cast`` between QuantizeLinear and
    DequantizeLinear, leaving plain Q/DQ pairs; then store biases as the floats they dequantize to
    (``fold_bias_dequantize``)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "tidy.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(Path(tmp) / "tidy.onnx"))
    fold_bias_dequantize(model)
    write_atomic(path, model.SerializeToString())
    return path


def fold_bias_dequantize(model) -> int:
    """Replace each ``DequantizeLinear`` of a constant INT32 vector (the exporter's quantized biases) in ``model``
    (an ``onnx.ModelProto``) by the float vector it computes, ``(x - zero_point) * scale``: four bytes per channel
    instead of twelve (values, scales, zero points). onnxruntime re-quantizes a float bias at the same scale when it
    fuses the INT8 kernels, so the file computes the same numbers (tested). Returns how many it folded."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    folded = []
    for node in model.graph.node:
        x = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        constant = all(name in inits for name in node.input[1:] if name)
        if x is None or x.data_type != TensorProto.INT32 or len(x.dims) > 1 or not constant or node.output[0] in outputs:
            continue
        values = numpy_helper.to_array(x).astype(np.int64)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2 and node.input[2] else 0
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array((values - zero).astype(np.float32) * scale,
                                                               node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    drop_unused_initializers(model)
    return len(folded)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a uint8 image split."""

    def __init__(self, images: Split, batch_size: int) -> None:
        self.batches = iter([images.inputs(slice(i, i + batch_size)).contiguous().numpy()
                             for i in range(0, len(images.y), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch}


def module_nodes(onnx_path: Path, modules: Sequence[str]) -> list[str]:
    """Names of the nodes the TorchScript exporter made from these modules: ``/stem/stem.0/Conv``, and for an item of
    a ModuleList (whose own forward never runs) ``/blocks.0/conv/conv.0/Conv``; a submodule reached by attribute
    path is ``/a/b/``."""
    import onnx

    prefixes = tuple({form for name in modules for form in (f"/{name}/", f"/{name.replace('.', '/')}/")})
    return [node.name for node in onnx.load(str(onnx_path)).graph.node if prefixes and node.name.startswith(prefixes)]


def quantize_ptq(fp32_path: Path, calibration: Split, path: Path, qat: QatImages, per_channel: bool = True) -> Path:
    """The baseline a user would otherwise pick: onnxruntime static post-training quantization (QDQ, INT8
    per-channel weights, UINT8 activations, MinMax calibration on ``calibration`` — never the test split).
    Quantized as ``qat`` quantizes: its ``float_modules`` left in float, weights in its ``weight_bits`` (7:
    onnxruntime's ``reduce_range``; 4: its INT4 weights, symmetric on [-8, 7], at opset 21)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    float_modules, weight_bits = qat.float_modules, qat.weight_bits
    if weight_bits not in (4, 7, 8):
        raise OnnxError(f"onnxruntime PTQ takes 4-, 7- or 8-bit weights here, not {weight_bits}")
    with tempfile.TemporaryDirectory() as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        if weight_bits == 4:   # standard INT4 QDQ needs opset 21 (older graphs get com.microsoft's Q/DQ instead)
            onnx.save(upgrade_opset(onnx.load(str(prepared)), fp32_path), str(prepared))
        excluded = module_nodes(prepared, float_modules)
        if float_modules and not excluded:
            raise OnnxError(f"{fp32_path}: no node belongs to the float modules {list(float_modules)}")
        quantize_static(str(prepared), str(out), _Calibration(calibration, 256), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8,
                        nodes_to_exclude=excluded, reduce_range=weight_bits == 7)
        write_atomic(path, out.read_bytes())
    return path


def session(path: Path, threads: int = 2, optimized: bool = True):
    """An onnxruntime CPU session with a fixed thread count (measurements must not depend on the machine's load).
    ``optimized=False`` runs the graph as written, without any graph optimisation: QuantizeLinear and
    DequantizeLinear stay separate float operations around float kernels (the simulated INT8 model), where the
    optimised session fuses them into the INT8 kernels that deploy."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise OnnxError(f"{path}: ONNX model not found; re-run the stage that exports it")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise OnnxError(f"{path}: onnxruntime cannot load this model ({err})") from err


def onnx_logits(path: Path, split: Split, batch_size: int = 1024, threads: int = 2, optimized: bool = True
                ) -> np.ndarray:
    """Logits of the ONNX model at ``path`` for every image of ``split`` (``optimized``: see ``session``), once its
    input and output are the pipeline's and fit the data."""
    sess = session(path, threads, optimized)
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    if inputs != [INPUT] or OUTPUT not in outputs:
        raise OnnxError(f"{path}: inputs {inputs} and outputs {outputs}; expected the one input {INPUT!r} and an "
                        f"output {OUTPUT!r} (export it with these names)")
    shape = sess.get_inputs()[0].shape   # a dynamic axis (a name, or None): any size fits it
    if len(shape) != len(split.image_shape) + 1 or any(
            isinstance(dim, int) and dim != size for dim, size in zip(shape[1:], split.image_shape, strict=False)):
        expected = ", ".join(map(str, split.image_shape))
        raise OnnxError(f"{path}: input shape {shape} does not match the data (N, {expected})")
    out = next(o.shape for o in sess.get_outputs() if o.name == OUTPUT)
    seen = int(split.y.max()) + 1 if len(split.y) else 0   # without class names, the labels bound them from below
    if len(out) == 2 and isinstance(out[1], int) and (out[1] != len(split.classes) if split.classes else out[1] < seen):
        data = len(split.classes) if split.classes else f"at least {seen}"
        raise OnnxError(f"{path}: output {OUTPUT!r} has {out[1]} classes, the data {data}")
    return np.concatenate([sess.run([OUTPUT], {INPUT: split.inputs(slice(i, i + batch_size)).contiguous().numpy()})[0]
                           for i in range(0, len(split.y), batch_size)])


def timed_runs(sess, feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]], warmup: int, repeats: int
               ) -> np.ndarray:
    """Seconds of each of ``repeats`` runs of ``sess`` on ``feeds`` (one request, or a list of requests taken in
    turn), after ``warmup`` untimed runs: the one latency loop of every family's evaluation."""
    requests = feeds if isinstance(feeds, list) else [feeds]
    for i in range(warmup):
        sess.run(None, requests[i % len(requests)])
    times = np.empty(repeats)
    for i in range(repeats):
        feed = requests[i % len(requests)]
        start = time.perf_counter()
        sess.run(None, feed)
        times[i] = time.perf_counter() - start
    return times


def percentiles_ms(times: np.ndarray, prefix: str) -> dict[str, float]:
    """``<prefix>_p50_ms``, ``_p95_ms`` and ``_p99_ms`` of run times in seconds."""
    p50, p95, p99 = np.percentile(times * 1000, [50, 95, 99])
    return {f"{prefix}_p50_ms": float(p50), f"{prefix}_p95_ms": float(p95), f"{prefix}_p99_ms": float(p99)}


def check_finite(name: str, reference: np.ndarray, onnx: np.ndarray, rows: str) -> None:
    """Parity compares numbers: a ParityError when either model's logits for some of the ``rows`` are not finite
    (two files that both answer NaN would agree on every row's argmax)."""
    from tasks.errors import ParityError

    for who, logits in (("the ONNX file", onnx), ("PyTorch", reference)):
        if bad := int((~np.isfinite(logits)).any(axis=1).sum()):
            raise ParityError(f"{name}: {who} gives logits that are not finite for {bad} of {len(logits)} {rows}")


def accuracy_delta(reference: np.ndarray, onnx: np.ndarray, labels: np.ndarray) -> float:
    """|accuracy of ``onnx`` - accuracy of ``reference``| (two arrays of logits), from their counts of correct rows:
    the difference of two rounded means lands above a limit it equals (0.8725 - 0.8625 = 0.010000000000000009)."""
    right = [int((logits.argmax(1) == labels).sum()) for logits in (onnx, reference)]
    return abs(right[0] - right[1]) / len(labels)


def onnx_accuracy(path: Path, split: Split, threads: int = 2) -> float:
    return float((onnx_logits(path, split, threads=threads).argmax(1) == split.y.numpy()).mean())


def file_sizes(path: Path) -> dict[str, int]:
    """Stored size: raw bytes and gzip bytes (what a download or a container layer really costs)."""
    blob = Path(path).read_bytes()
    return {"bytes": len(blob), "gzip_bytes": len(gzip.compress(blob, compresslevel=9, mtime=0))}


def export_student_int8(model: nn.Module, path: Path, calibration: Split, opset: int, qat: QatImages) -> Path:
    """The INT8 ONNX file a student ships as: a QAT student converted and exported as QDQ, any other (FP32, maybe
    pruned or weight-shared) through onnxruntime static PTQ calibrated on ``calibration``, with ``qat``'s float
    modules and weight bits."""
    if isinstance(model, QatModel):
        return export_int8(model, path, opset)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32(model, Path(tmp) / "student_fp32.onnx", opset)
        return quantize_ptq(fp32, calibration, path, qat)
