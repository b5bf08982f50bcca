"""Stage ``validate_vision``: the Great Expectations gate on processed Fashion-MNIST.

Input: ``<data>/{train,val,test}_{x,y}.npy``. Output: ``<report>`` (JSON, every expectation with its observed
value). A failed expectation stops the pipeline with a message naming it and the offending values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Config, stage_args
from tasks.errors import DataFormatError, DataValidationError, run_cli
from tasks.io import write_json

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


def _summarise(suite: str, result: Any) -> dict[str, Any]:
    cfg, res = result.expectation_config, result.result or {}
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    return {"suite": suite, "expectation": cfg.type, "kwargs": kwargs, "success": bool(result.success),
            "observed": res.get("observed_value"), "unexpected_count": res.get("unexpected_count"),
            "unexpected_examples": res.get("partial_unexpected_list", [])[:10]}


def validate_vision(arrays: dict[str, tuple[np.ndarray, np.ndarray]], cfg: Config) -> dict[str, Any]:
    """Run every suite; return the report (``success`` plus one entry per expectation)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    from tasks import vision_expectations as ve

    context = gx.get_context(mode="ephemeral")  # suites need a current context even before they run
    rules, rows = cfg.validate_.vision, expected_rows(cfg)
    batches = []
    for split, (x, y) in arrays.items():
        batches.append((ve.rows_suite(split, rows[split]), ve.row_frame(x, y)))
        batches.append((ve.classes_suite(split, rows[split], rules), ve.class_frame(y)))
    batches.append((ve.leak_suite(rules), ve.leak_frame(arrays["train"][0], arrays["test"][0])))
    asset = context.data_sources.add_pandas("vision").add_dataframe_asset("frames")
    definition = asset.add_batch_definition_whole_dataframe("whole")
    checks = []
    for suite, frame in batches:
        outcome = definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        checks += [_summarise(suite.name, r) for r in outcome.results]
    return {"success": all(c["success"] for c in checks), "checks": checks}


def failure_message(report: dict[str, Any]) -> str:
    lines = ["processed data failed validation:"]
    for c in (c for c in report["checks"] if not c["success"]):
        args = ", ".join(f"{k}={v}" for k, v in c["kwargs"].items())
        got = f"observed {c['observed']}" if c["observed"] is not None else ""
        if c["unexpected_count"]:
            got = f"{c['unexpected_count']} unexpected values, e.g. {c['unexpected_examples']}"
        lines.append(f"  [{c['suite']}] {c['expectation']}({args}): {got}")
    return "\n".join(lines)


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--report")
    from tasks.tracking import stage_run

    with stage_run("validate_vision", cfg, {"validate.vision": cfg.validate_.vision}) as run:
        report = validate_vision(load_arrays(args.data), cfg)
        failed = sum(not c["success"] for c in report["checks"])
        run.log_metrics({"expectations": len(report["checks"]), "expectations_failed": failed})
        run.set_tag("validation.success", str(report["success"]).lower())
        write_json(args.report, report)
        run.log_artifact(args.report)
        if not report["success"]:
            args.report.unlink()  # never leave a failing report where the next stage would take it as a pass
            raise DataValidationError(failure_message(report))
    print(f"validation passed: {len(report['checks'])} expectations")


if __name__ == "__main__":
    run_cli(main)
