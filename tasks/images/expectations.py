"""Great Expectations suites for an image family's processed images (a published IDX data set or a user's folder),
kept as code.

The images are summarised into small frames (one row per image, one row per class, one row per test image
with its leak flag) so that the expectations read like the data contract they enforce.
"""
from __future__ import annotations

import hashlib

import great_expectations as gx
import numpy as np
import pandas as pd

from tasks.images.data_config import ImageValidation

E = gx.expectations


def row_frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """One row per image: its label, shape and pixel statistics."""
    flat = x.reshape(len(x), -1)
    as_float = flat.astype(np.float64)
    image = x.ndim in (3, 4)
    return pd.DataFrame({
        "label": y.astype(np.int64),
        "dtype": str(x.dtype),
        "channels": (1 if x.ndim == 3 else x.shape[1]) if image else -1,
        "height": x.shape[-2] if image else -1,
        "width": x.shape[-1] if image else -1,
        "pixel_min": as_float.min(axis=1),
        "pixel_max": as_float.max(axis=1),
        "nan_count": np.isnan(as_float).sum(axis=1),
    })


def class_frame(y: np.ndarray, shares: list[float], tolerance: float) -> pd.DataFrame:
    """One row per expected class: its count (0 for a class that is missing) and the range its share of the data
    (``shares``, one per class) allows, ``tolerance`` either way."""
    num_classes = len(shares)
    counts = np.bincount(y.astype(np.int64).clip(0, num_classes), minlength=num_classes + 1)[:num_classes]
    expected = np.asarray(shares) * len(y)
    return pd.DataFrame({"label": np.arange(num_classes), "count": counts,
                         "low": np.floor(expected * (1 - tolerance)).astype(np.int64),
                         "high": np.ceil(expected * (1 + tolerance)).astype(np.int64)})


#: (earlier split, later split): a later split's image must not be a copy of one the model trained or was chosen on
LEAK_PAIRS = (("train", "test"), ("val", "test"), ("train", "val"))


def leak_frame(earlier_x: np.ndarray, later_x: np.ndarray) -> pd.DataFrame:
    """One row per image of the later split: 1 when an identical image is in the earlier split."""
    digest = lambda a: [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in a.reshape(len(a), -1)]
    seen = set(digest(earlier_x))
    return pd.DataFrame({"in_earlier": [int(h in seen) for h in digest(later_x)]})


def rows_suite(family: str, split: str, expected_rows: int, image: dict) -> gx.ExpectationSuite:
    """Row count, dtype, the image's shape (``image``: channels, height, width, classes) and the label set."""
    suite = gx.ExpectationSuite(name=f"{family}_rows_{split}")
    for exp in (
        E.ExpectTableRowCountToEqual(value=expected_rows),
        E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        *(E.ExpectColumnValuesToBeBetween(column=dim, min_value=image[dim], max_value=image[dim])
          for dim in ("channels", "height", "width")),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(len(image["classes"])))),
        E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0),
    ):
        suite.add_expectation(exp)
    return suite


def classes_suite(family: str, split: str) -> gx.ExpectationSuite:
    """Every class's count inside the range of its share (``class_frame``)."""
    suite = gx.ExpectationSuite(name=f"{family}_classes_{split}")
    suite.add_expectation(E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="count", column_B="low", or_equal=True))
    suite.add_expectation(E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="high", column_B="count", or_equal=True))
    return suite


def leak_suite(family: str, earlier: str, later: str, cfg: ImageValidation) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=f"{family}_{earlier}_{later}_leak")
    suite.add_expectation(E.ExpectColumnMeanToBeBetween(
        column="in_earlier", min_value=0.0, max_value=cfg.max_cross_split_duplicate_fraction))
    return suite
