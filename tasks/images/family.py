"""An image family's contract (``tasks.family``): image classification (a published IDX data set or a user's image
folder), accuracy, batch-1 latency. ``image_family`` makes the ``FAMILY`` of a family built on this kit."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from tasks.family import Family
from tasks.gate import GateSpec
from tasks.image_training import Split, image_manifest
from tasks.images.evaluate import accuracy_on_test, latency
from tasks.onnx_models import INPUT


def score(family: str, path: Path, data: Path, cfg: Any) -> dict[str, float]:
    ev, test = cfg.block("evaluate", family), Split.load(data, "test")
    return {**accuracy_on_test(path, test, data, ev.threads)[0], **latency(path, test, ev)}


def timing(family: str, path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return latency(path, Split.load(data, "test"), cfg.block("evaluate", family))


def input_example(data: Path) -> dict[str, np.ndarray]:
    return {INPUT: Split.load(data, "test").inputs(slice(1)).contiguous().numpy()}


def describe_data(data: Path) -> dict[str, Any]:
    """The image shape, normalisation and class names a model of this data takes and answers in."""
    return image_manifest(data)


def image_family(name: str, title: str, *, ablation: bool = False) -> Family:
    """The contract of image family ``name`` (``ablation``: it has an ``ablation.<name>`` block that `make ablation`
    measures)."""
    return Family(name, title, GateSpec("latency_b1", "batch-1"), functools.partial(score, name),
                  functools.partial(timing, name), input_example, ablation=ablation, describe_data=describe_data,
                  measured=("mean", "std"))
