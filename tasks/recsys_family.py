"""The recommender family's contract (``tasks.family``): MovieLens-100K clicks, AUC, one-request latency."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluate_recsys import Catalog, request_latency, score_onnx
from tasks.family import Family
from tasks.gate import GateSpec


def score(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return score_onnx(path, data, cfg.evaluate.recsys)


def timing(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return request_latency(path, Catalog(data), cfg.evaluate.recsys)


def input_example(data: Path) -> dict[str, np.ndarray]:
    return Catalog(data).request(0, np.arange(1))


FAMILY = Family("recsys", "Recsys compression report", GateSpec("latency", "one-request"), score, timing,
                input_example)
