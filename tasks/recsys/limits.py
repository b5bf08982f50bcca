"""The limits ``validate.recsys`` sets on the recommender's labelled ratings as a whole: the share of the ratings that
is labelled, each split's share of the labelled rows and each split's label balance.

``validate_recsys`` holds the processed snapshot to them; the intake (``tasks.recsys.intake``) holds the snapshot as
it would be with an arriving batch to the same expectations, so batches each within their drift limits cannot carry
the snapshot out of them one after another.
"""
from __future__ import annotations

import math
from typing import Any

from tasks.expectations import expectation_types

SPLITS = ("train", "val", "test")   # the order of ``data.recsys.split.sizes``


def kept_expectation(rules: Any, ratings: int) -> Any:
    """Column ``ratings_labelled`` at least ``min_kept_fraction`` of the ``ratings`` the raw data holds."""
    return expectation_types().ExpectColumnValuesToBeBetween(
        column="ratings_labelled", min_value=math.ceil(rules.min_kept_fraction * ratings), max_value=ratings)


def split_expectations(cfg: Any, split: str, labelled: int) -> list[Any]:
    """On a frame of ``split``'s rows: its share of the ``labelled`` rows (within ``split_tolerance``, above its
    ``min_rows`` floor) and the mean of its ``label`` (within ``positive_tolerance`` of ``positive_fraction``)."""
    E, rules = expectation_types(), cfg.validate_.recsys
    size = dict(zip(SPLITS, cfg.data.recsys.split.sizes(labelled), strict=True))[split]
    return [E.ExpectTableRowCountToBeBetween(
                min_value=max(rules.min_rows.get(split, 1), math.floor(size - rules.split_tolerance * labelled)),
                max_value=math.ceil(size + rules.split_tolerance * labelled)),
            E.ExpectColumnMeanToBeBetween(column="label", min_value=rules.positive_fraction - rules.positive_tolerance,
                                          max_value=rules.positive_fraction + rules.positive_tolerance)]
