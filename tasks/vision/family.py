"""The vision family's contract (``tasks.family``): image classification (Fashion-MNIST or a user's image folder),
accuracy, batch-1 latency."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.family import Family
from tasks.gate import GateSpec
from tasks.image_training import Split, image_manifest
from tasks.onnx_models import INPUT
from tasks.vision.evaluate import accuracy_on_test, latency


def score(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    ev, test = cfg.evaluate.vision, Split.load(data, "test")
    return {**accuracy_on_test(path, test, data, ev.threads)[0], **latency(path, test, ev)}


def timing(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return latency(path, Split.load(data, "test"), cfg.evaluate.vision)


def input_example(data: Path) -> dict[str, np.ndarray]:
    return {INPUT: Split.load(data, "test").inputs(slice(1)).contiguous().numpy()}


def describe_data(data: Path) -> dict[str, Any]:
    """The image shape, normalisation and class names a model of this data takes and answers in."""
    return image_manifest(data)


FAMILY = Family("vision", "Vision compression report", GateSpec("latency_b1", "batch-1"), score, timing,
                input_example, ablation=True, describe_data=describe_data)
