"""The intake contract: how a family's raw data arrives, is checked and is stored (``tasks/<family>/intake.py``).

A family that takes arriving data describes it with an ``Intake``: how its published data set bootstraps the
snapshot, how a batch folder is read and written, how batches combine, and which Great Expectations suites check a
new batch — the **contract** (schema, types, ranges, label set, referential integrity, duplicates) and the **drift**
against the reference profile of the data already accepted — and, optionally, which check the **aggregate**: the
accepted data with the batch, against the limits the family's validation stage holds the whole snapshot to (so
batches each within their drift limits cannot, one after another, carry the snapshot out of them).
``tasks.snapshot`` and ``flows.ingest`` are generic and ask a family only through this. The distances are the ones
TFX's data validation uses: L-infinity between categorical distributions, Jensen-Shannon divergence (base 2, so 0 to
1) between distributions of values.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import family_module
from tasks.errors import ConfigError

Tables = dict[str, pd.DataFrame]
Suites = list[tuple[Any, pd.DataFrame]]   # (Great Expectations suite, the frame it validates)


@dataclass(frozen=True)
class Intake:
    settings: Callable[[Any], Any]                           # Config -> the family's ``ingest.<family>`` block
    pins_key: str                                            # where params.yaml pins the published files
    pins: Callable[[Any], dict[str, str]]                    # Config -> those pins
    bootstrap: Callable[[Any], tuple[str, Tables, dict[str, str]]]   # Config -> (source, tables, pins)
    read_batch: Callable[[Path], Tables]                     # a batch folder -> its tables (DataFormatError names a file)
    write_batch: Callable[[Tables, Path], None]              # tables -> a batch folder
    combine: Callable[[list[Tables]], Tables]                # batches in order -> the tables of them all
    rows: Callable[[Tables], dict[str, int]]                 # what a batch holds, for the manifest and the logs
    contract: Callable[[Tables, Tables | None, Any], Suites]  # (batch, accepted or None, Config) -> suites
    profile: Callable[[Tables, Any], dict[str, Any]]         # reference statistics of accepted data
    drift: Callable[[Tables, Tables, Any], tuple[dict[str, float], Suites]]   # (batch, accepted) -> (stats, suites)
    replay: Callable[[Any, Path], list[Path]]                # Config, landing folder -> batch folders written
    aggregate: Callable[[Tables, Any], Suites] | None = None   # (accepted data with the batch, Config) -> suites


def load_intake(family: str) -> Intake:
    """The ``INTAKE`` of ``tasks/<family>/intake.py``."""
    intake = getattr(family_module(family, "intake"), "INTAKE", None)
    if not isinstance(intake, Intake):
        raise ConfigError(f"tasks/{family}/intake.py: INTAKE must be an Intake")
    return intake


def shares(values: pd.Series, categories: list[Any] | None = None) -> pd.Series:
    """Share of each category among ``values`` (every one of ``categories`` present, 0 where absent)."""
    counts = values.value_counts()
    if categories is not None:
        counts = counts.reindex(categories, fill_value=0)
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def linf(p: pd.Series, q: pd.Series) -> float:
    """L-infinity distance between two categorical distributions (TFX's skew and drift comparator)."""
    keys = p.index.union(q.index)
    return float(np.abs(p.reindex(keys, fill_value=0) - q.reindex(keys, fill_value=0)).max()) if len(keys) else 0.0


def jensen_shannon(p: pd.Series, q: pd.Series) -> float:
    """Jensen-Shannon divergence, base 2 (0: the same distribution, 1: disjoint)."""
    keys = p.index.union(q.index)
    a, b = (s.reindex(keys, fill_value=0).to_numpy(float) for s in (p, q))
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return max(0.0, (kl(a) + kl(b)) / 2)
