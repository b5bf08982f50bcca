"""Stratified draws of rows: as many of each class as its share of the rows says (numpy only)."""
from __future__ import annotations

import numpy as np


def stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` rows drawn per class in proportion to the class sizes, sorted; the rounding remainder goes to
    the classes with the largest fractional quotas (ties: the first)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    quotas = np.floor(exact).astype(int)
    quotas[np.argsort(-(exact - quotas), kind="stable")[: n - quotas.sum()]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quotas, strict=True)]
    return np.sort(np.concatenate(picks))
