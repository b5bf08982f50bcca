"""Great Expectations suites for processed Fashion-MNIST, kept as code.

The images are summarised into small frames (one row per image, one row per class, one row per test image
with its leak flag) so that the expectations read like the data contract they enforce.
"""
from __future__ import annotations

import hashlib

import great_expectations as gx
import numpy as np
import pandas as pd

from tasks.vision_config import VisionValidation

NUM_CLASSES, IMAGE_SHAPE = 10, (28, 28)
E = gx.expectations


def row_frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """One row per image: its label and pixel statistics."""
    flat = x.reshape(len(x), -1)
    as_float = flat.astype(np.float64)
    return pd.DataFrame({
        "label": y.astype(np.int64),
        "dtype": str(x.dtype),
        "height": x.shape[1] if x.ndim == 3 else -1,
        "width": x.shape[2] if x.ndim == 3 else -1,
        "pixel_min": as_float.min(axis=1),
        "pixel_max": as_float.max(axis=1),
        "nan_count": np.isnan(as_float).sum(axis=1),
    })


def class_frame(y: np.ndarray) -> pd.DataFrame:
    """One row per expected class with its count (0 for a class that is missing)."""
    counts = np.bincount(y.astype(np.int64).clip(0, NUM_CLASSES), minlength=NUM_CLASSES + 1)[:NUM_CLASSES]
    return pd.DataFrame({"label": np.arange(NUM_CLASSES), "count": counts})


#: (earlier split, later split): a later split's image must not be a copy of one the model trained or was chosen on
LEAK_PAIRS = (("train", "test"), ("val", "test"), ("train", "val"))


def leak_frame(earlier_x: np.ndarray, later_x: np.ndarray) -> pd.DataFrame:
    """One row per image of the later split: 1 when an identical image is in the earlier split."""
    digest = lambda a: [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in a.reshape(len(a), -1)]
    seen = set(digest(earlier_x))
    return pd.DataFrame({"in_earlier": [int(h in seen) for h in digest(later_x)]})


def rows_suite(split: str, expected_rows: int) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=f"vision_rows_{split}")
    for exp in (
        E.ExpectTableRowCountToEqual(value=expected_rows),
        E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=IMAGE_SHAPE[0], max_value=IMAGE_SHAPE[0]),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=IMAGE_SHAPE[1], max_value=IMAGE_SHAPE[1]),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(NUM_CLASSES))),
        E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0),
    ):
        suite.add_expectation(exp)
    return suite


def classes_suite(split: str, rows: int, cfg: VisionValidation) -> gx.ExpectationSuite:
    per_class = rows / NUM_CLASSES
    suite = gx.ExpectationSuite(name=f"vision_classes_{split}")
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(
        column="count", min_value=int(np.floor(per_class * (1 - cfg.class_balance_tolerance))),
        max_value=int(np.ceil(per_class * (1 + cfg.class_balance_tolerance)))))
    return suite


def leak_suite(earlier: str, later: str, cfg: VisionValidation) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=f"vision_{earlier}_{later}_leak")
    suite.add_expectation(E.ExpectColumnMeanToBeBetween(
        column="in_earlier", min_value=0.0, max_value=cfg.max_cross_split_duplicate_fraction))
    return suite
