"""The text family's ONNX files: inputs ``ids`` (N, T) int64 and ``lengths`` (N,) int64, output ``logits`` (N, C),
with the batch and the sentence length dynamic. Each file carries its tokenizer in its metadata (``tokenizer``: the
kind, vocabulary and rules; ``labels``: the class names; both JSON): the model's SHA-256 covers the vocabulary it was
trained with, and whoever loads it from the registry turns text into its inputs without another file (the teacher's
WordPiece ids and the student's word ids differ, and each file says which it takes).

The INT8 student is onnxruntime's dynamic quantization of the FP32 export: INT8 weights for the LSTMs
(``DynamicQuantizeLSTM``), the matrix products, the convolutions and the embedding table, activations quantized with
each run's own ranges (so it is scored one sentence per run, as it is served).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.io import write_atomic
from tasks.onnx_models import OnnxError, session
from tasks.text.data import WordPieceTokenizer, WordTokenizer, tokenizer_from_spec

INPUTS, OUTPUT = ("ids", "lengths"), "logits"


def export_text_fp32(model: nn.Module, path: Path, opset: int, texts: list[str]) -> Path:
    model = model.eval()
    ids, lengths = model.encode(texts[:2])
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (ids, lengths), str(scratch), input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes={"ids": {0: "batch", 1: "tokens"}, "lengths": {0: "batch"},
                                        OUTPUT: {0: "batch"}}, opset_version=opset, dynamo=False)
        write_atomic(path, scratch.read_bytes())
    return path


def quantize_text_int8(fp32: Path, path: Path) -> Path:
    """onnxruntime dynamic INT8 quantization of ``fp32`` (signed per-channel weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "model.onnx"
        quantize_dynamic(str(fp32), str(scratch), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["LSTM", "MatMul", "Gemm", "Conv", "Gather"])
        write_atomic(path, scratch.read_bytes())
    return path


def quantize_text_static(fp32: Path, path: Path, tokenizer: WordTokenizer | WordPieceTokenizer,
                         calibration: list[str], batch_size: int = 64) -> Path:
    """onnxruntime static INT8 quantization of ``fp32`` (QDQ, per-channel INT8 weights, UINT8 activations, MinMax
    ranges from ``calibration`` sentences — validation ones, never test): the alternative to ``quantize_text_int8``.
    onnxruntime has no static INT8 LSTM, so a BiLSTM's recurrences stay float; the embedding table and the matrix
    products (a CNN's convolutions) are INT8."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    ids, lengths = tokenizer.encode(calibration)
    batches = iter([feeds(ids[i:i + batch_size, : max(int(lengths[i:i + batch_size].max()), 1)],
                          lengths[i:i + batch_size]) for i in range(0, len(calibration), batch_size)])

    class Reader:   # onnxruntime's CalibrationDataReader protocol
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "model.onnx"
        quantize_static(str(fp32), str(scratch), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv", "Gather"])
        write_atomic(path, scratch.read_bytes())
    return path


def attach_tokenizer(path: Path, tokenizer: WordTokenizer | WordPieceTokenizer, labels: list[str]) -> None:
    """Write the model's tokenizer and the class names into the file's metadata."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in (("tokenizer", tokenizer.spec()), ("labels", labels)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    write_atomic(path, model.SerializeToString())


def tokenizer_of(path: Path) -> WordTokenizer | WordPieceTokenizer:
    """The tokenizer an ONNX file of this family carries."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "tokenizer" not in props:
        raise OnnxError(f"{path}: no tokenizer in its metadata; it was not exported by export_text")
    try:
        return tokenizer_from_spec(json.loads(props["tokenizer"]))
    except (ValueError, KeyError, TypeError) as err:   # DataFormatError is a ValueError
        raise OnnxError(f"{path}: its tokenizer metadata cannot be used ({type(err).__name__}: {err})") from None


def feeds(ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    return {"ids": np.asarray(ids, dtype=np.int64), "lengths": np.asarray(lengths, dtype=np.int64)}


# onnxruntime's dynamic quantization: activation ranges computed at run time over the whole input tensor
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "QAttention"})


def _graphs(graph):
    """``graph`` and every subgraph of its nodes (If, Loop, Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def quantizes_per_run(path: Path) -> bool:
    """Whether the ONNX file quantizes activations with ranges of each run's own input (a dynamic quantization op,
    or a QuantizeLinear whose scale or zero point is computed): then a row's output depends on its batch-mates."""
    import onnx

    graphs = list(_graphs(onnx.load(str(path), load_external_data=False).graph))
    constants = {t.name for g in graphs for t in g.initializer} | {
        out for g in graphs for n in g.node if n.op_type == "Constant" for out in n.output}
    return any(node.op_type in DYNAMIC_OPS or node.op_type == "QuantizeLinear" and any(
        name and name not in constants for name in node.input[1:]) for g in graphs for node in g.node)


def onnx_text_logits(path: Path, texts: list[str], batch_size: int = 512, threads: int = 2) -> np.ndarray:
    """Logits of the ONNX file for every text, encoded by the file's own tokenizer: a file that quantizes
    activations per run (the dynamic INT8 student) one sentence per run, unpadded, as a client sends it (in a
    batch its ranges would be the batch's, and a sentence's logits its batch-mates'); any other in batches of
    similar length (padding changes nothing)."""
    sess = session(path, threads)
    ids, lengths = tokenizer_of(path).encode(texts)
    if quantizes_per_run(path):
        rows = [sess.run([OUTPUT], feeds(ids[i:i + 1, :max(int(n), 1)], lengths[i:i + 1]))[0]
                for i, n in enumerate(lengths)]
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    order = np.argsort(lengths, kind="stable")
    out = []
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        longest = max(int(lengths[rows].max()), 1)
        out.append(sess.run([OUTPUT], feeds(ids[rows, :longest], lengths[rows]))[0])
    logits = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return logits[np.argsort(order, kind="stable")]
