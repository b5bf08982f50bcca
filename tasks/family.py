"""The family contract, as far as the gate, the registry, serving and the report reach.

A family (data + teacher + student + metric) is listed in params.yaml's ``families`` and described by a module
``tasks/<name>/family.py`` whose ``FAMILY`` is a ``Family``: how one of its ONNX files is scored on the test split
and timed, what one request to it looks like, and which latency its gate reads. The generic flows ask a family
through this contract and never name one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import family_module
from tasks.errors import ConfigError
from tasks.gate import GateSpec

#: ``score(onnx file, processed data folder, Config) -> {"test_<metric>": ..., "<latency>_p50_ms": ..., ...}``
Score = Callable[[Path, Path, Any], dict[str, float]]


@dataclass(frozen=True)
class Family:
    name: str
    title: str                  # as reports head it
    gate: GateSpec              # which latency its gate reads
    score: Score                # test metric and latency of one ONNX file, measured now
    timing: Score               # its latency only
    input_example: Callable[[Path], dict[str, np.ndarray]]   # one request, from the processed data folder
    ablation: bool = False      # `make ablation` measures it: its report shows the ablation
    # what a request must look like and an answer means (e.g. image shape, normalisation, class names), from the
    # processed data folder: the gate never compares a candidate with a champion made for other data
    describe_data: Callable[[Path], dict[str, Any]] | None = None
    # the keys of that description the data's split measures (pixel statistics of the training rows, unless params
    # pin them): left out of what is compared with a champion split by other params
    measured: tuple[str, ...] = ()
    # files of the processed data folder a model needs beside its ONNX file to read raw data (e.g. the recommender's
    # vocabulary): registered with every version
    model_files: tuple[str, ...] = ()
    # ``paired_data(champion folder, data, scratch, Config)``: when the champion's files say it encodes this data
    # otherwise (a vocabulary of an older snapshot), (the data in the champion's encoding, the same rows in the
    # candidate's), both limited to the rows the champion can read; None when the data serves both as is
    paired_data: Callable[[Path, Path, Path, Any], tuple[Path, Path] | None] | None = None


def load_family(name: str) -> Family:
    """The ``FAMILY`` of ``tasks/<name>/family.py``."""
    family = getattr(family_module(name, "family"), "FAMILY", None)
    if not isinstance(family, Family) or family.name != name:
        raise ConfigError(f"tasks/{name}/family.py: FAMILY must be the Family named {name!r}")
    return family
