"""The Great Expectations gate passes the real data and catches each kind of corruption by name."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.images.data_config import SplitSizes
from tasks.images.validate import failure_message, validate_images


@pytest.fixture
def gate_config(config, real_splits):
    sizes = SplitSizes(**{s: len(y) for s, (_, y) in real_splits.items()})
    return config.model_copy(update={"data": config.data.model_copy(update={
        "vision": config.data.vision.model_copy(update={"subset": sizes})})})


def _copy(splits):
    return {s: (x.copy(), y.copy()) for s, (x, y) in splits.items()}


def _failed(report):
    return {(c["suite"], c["expectation"]) for c in report["checks"] if not c["success"]}


def test_real_data_passes(real_splits, gate_config):
    report = validate_images(real_splits, gate_config, "vision")
    assert report["success"], failure_message(report)
    assert len(report["checks"]) == 3 * 11 + 3  # per split (9 on the rows, 2 on the class counts), then a leak check per pair


@pytest.mark.fault("data", "a label out of range (10 classes, label 10+)",
                   "validation fails naming the label check and the value")
def test_label_out_of_range(real_splits, gate_config):
    splits = _copy(real_splits)
    splits["train"][1][:3] = 11
    report = validate_images(splits, gate_config, "vision")
    assert ("vision_rows_train", "expect_column_values_to_be_in_set") in _failed(report)
    assert "3 unexpected values, e.g. [11, 11, 11]" in failure_message(report)


@pytest.mark.slow
def test_data_docs_of_a_failed_validation_show_the_offending_values(real_splits, gate_config, tmp_path):
    """Validation runs through GE Checkpoints whose Data Docs (what GE users open) render every suite, and for a
    failed expectation its unexpected values."""
    import re

    splits = _copy(real_splits)
    splits["train"][1][:3] = 11
    docs = tmp_path / "docs"
    assert not validate_images(splits, gate_config, "vision", docs)["success"]
    index = (docs / "index.html").read_text()
    assert "'_expectation_suite_name_sort': 'vision_rows_train'" in index and "vision_train_test_leak" in index
    (page,) = (docs / "validations" / "vision_rows_train").rglob("*.html")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text()))
    assert "values must belong to this set: 0 1 2 3 4 5 6 7 8 9 . 3 unexpected values found." in text
    assert "Unexpected Value Count 11 3 " in text   # the offending label and how often it occurs


@pytest.mark.fault("data", "every image of one class removed",
                   "validation fails naming the class-count check")
def test_class_collapse(real_splits, gate_config):
    x, y = real_splits["test"]
    keep = y != 7
    splits = {**real_splits, "test": (x[keep], y[keep])}
    report = validate_images(splits, gate_config, "vision")
    failed = _failed(report)
    assert ("vision_classes_test", "expect_column_pair_values_a_to_be_greater_than_b") in failed
    assert ("vision_rows_test", "expect_table_row_count_to_equal") in failed


@pytest.mark.parametrize("earlier", [
    pytest.param("train", marks=pytest.mark.fault("data", "train/test leak above the threshold",
                                                  "validation fails naming the leak check and the fraction observed")),
    # before: only train/test copies were checked, while every choice (epoch, recipe) is made on validation data
    pytest.param("val", marks=pytest.mark.fault("data", "validation/test leak above the threshold",
                                                "validation fails naming the val/test leak check and the fraction "
                                                "observed")),
])
def test_leak_into_test_above_threshold(real_splits, gate_config, earlier):
    splits = _copy(real_splits)
    n = len(splits["test"][0]) // 20  # 5 % of test copied from an earlier split
    splits["test"][0][:n] = splits[earlier][0][:n]
    report = validate_images(splits, gate_config, "vision")
    assert _failed(report) == {(f"vision_{earlier}_test_leak", "expect_column_mean_to_be_between")}
    assert "observed 0.05" in failure_message(report)


def test_wrong_dtype_and_nan(real_splits, gate_config):
    splits = _copy(real_splits)
    x = splits["val"][0].astype(np.float32)
    x[0, 0, 0] = np.nan
    splits["val"] = (x, splits["val"][1])
    failed = {e for s, e in _failed(validate_images(splits, gate_config, "vision")) if s == "vision_rows_val"}
    assert {"expect_column_values_to_be_in_set", "expect_column_values_to_be_between"} <= failed


def test_a_published_idx_set_that_is_not_balanced_is_held_to_its_own_class_mix(config):
    """The kit's IDX contract was Fashion-MNIST's alone (equal class shares, 60,000 + 10,000 images of 28x28): an
    MNIST-like data set, whose classes differ by 12 %, would have failed a 5 % balance check. ``published`` says it."""
    from tasks.images.validate import class_shares, contract

    vision = config.data.vision
    unbalanced = config.model_copy(update={"data": config.data.model_copy(update={"vision": vision.model_copy(
        update={"published": vision.published.model_copy(update={"balanced": False, "height": 20, "width": 24})})})})
    manifest = {"splits": {"train": {"class_counts": [3, 1]}, "val": {"class_counts": [1, 1]},
                           "test": {"class_counts": [1, 3]}}}
    assert class_shares(unbalanced, "vision", manifest, 2) == {
        "train": pytest.approx([2 / 3, 1 / 3]), "val": pytest.approx([2 / 3, 1 / 3]), "test": pytest.approx([0.25, 0.75])}
    assert class_shares(config, "vision", manifest, 2)["test"] == [0.5, 0.5]   # Fashion-MNIST: balanced, published
    _, image = contract(unbalanced, "vision", None)
    assert (image["height"], image["width"]) == (20, 24)
