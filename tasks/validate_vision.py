"""Stage ``validate_vision``: the Great Expectations gate on processed Fashion-MNIST.

Input: ``<data>/{train,val,test}_{x,y}.npy``. Output: ``<report>`` (JSON, every expectation with its observed
value). A failed expectation stops the pipeline with a message naming it and the offending values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Config, stage_args
from tasks.errors import DataFormatError, run_cli
from tasks.expectations import ephemeral_context, failure_message, publish_validation, run_suites  # noqa: F401 (failure_message: API)

TRAIN_ROWS, TEST_ROWS = 60000, 10000  # the published Fashion-MNIST split sizes
SPLITS = ("train", "val", "test")


def expected_rows(cfg: Config) -> dict[str, int]:
    data = cfg.data.vision
    if data.subset:
        return data.subset.model_dump()
    return {"train": TRAIN_ROWS - data.val_size, "val": data.val_size, "test": TEST_ROWS}


def load_arrays(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {}
    for split in SPLITS:
        try:
            arrays[split] = tuple(np.load(data_dir / f"{split}_{p}.npy", allow_pickle=False) for p in "xy")
        except (OSError, ValueError) as err:
            raise DataFormatError(f"{data_dir}/{split}_*.npy: cannot be read ({err}); re-run prepare_vision") from err
    return arrays


def validate_vision(arrays: dict[str, tuple[np.ndarray, np.ndarray]], cfg: Config,
                    docs: Path | None = None) -> dict[str, Any]:
    """Run every suite (through GE Checkpoints, rendering Data Docs into ``docs`` when given); return the report
    (``success`` plus one entry per expectation)."""
    context = ephemeral_context()
    from tasks import vision_expectations as ve

    rules, rows = cfg.validate_.vision, expected_rows(cfg)
    batches = []
    for split, (x, y) in arrays.items():
        batches.append((ve.rows_suite(split, rows[split]), ve.row_frame(x, y)))
        batches.append((ve.classes_suite(split, rows[split], rules), ve.class_frame(y)))
    for earlier, later in ve.LEAK_PAIRS:  # validation is what choices are made on: it must not leak either
        batches.append((ve.leak_suite(earlier, later, rules), ve.leak_frame(arrays[earlier][0], arrays[later][0])))
    return run_suites(context, "vision", batches, docs)


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--report", "--docs")
    from tasks.tracking import stage_run

    with stage_run("validate_vision", cfg, {"validate.vision": cfg.validate_.vision}) as run:
        report = publish_validation(run, validate_vision(load_arrays(args.data), cfg, args.docs), args.report, args.docs)
    print(f"validation passed: {len(report['checks'])} expectations")


if __name__ == "__main__":
    run_cli(main)
