"""The text family's contract (``tasks.family``): sentence polarity, accuracy, one-sentence latency."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.family import Family
from tasks.gate import GateSpec
from tasks.text.data import WordTokenizer
from tasks.text.evaluate import score_onnx, sentence_latency
from tasks.text.onnx_graph import feeds
from tasks.text.training import TextSplit, student_shape


def score(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return score_onnx(path, data, cfg.evaluate.text)


def timing(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return sentence_latency(path, TextSplit.load(data, "test").texts, cfg.evaluate.text)


def input_example(data: Path) -> dict[str, np.ndarray]:
    """The first test sentence as the candidate (the student, over the data's word vocabulary) takes it."""
    tokenizer = WordTokenizer(**{k: v for k, v in student_shape(data).items() if k != "classes"})
    return feeds(*tokenizer.encode(TextSplit.load(data, "test").texts[:1]))


FAMILY = Family("text", "Text compression report", GateSpec("sentence", "one-sentence (batch 1)"), score, timing,
                input_example)
