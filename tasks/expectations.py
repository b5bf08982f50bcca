"""Running Great Expectations suites over pandas frames, and the report every validation stage writes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.errors import DataValidationError
from tasks.io import write_json


def _summarise(suite: str, result: Any) -> dict[str, Any]:
    cfg, res = result.expectation_config, result.result or {}
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    return {"suite": suite, "expectation": cfg.type, "kwargs": kwargs, "success": bool(result.success),
            "observed": res.get("observed_value"), "unexpected_count": res.get("unexpected_count"),
            "unexpected_examples": res.get("partial_unexpected_list", [])[:10]}


def ephemeral_context() -> Any:
    """An in-memory Great Expectations context; suites can only be built once one exists."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    return gx.get_context(mode="ephemeral")


def run_suites(context: Any, source: str, batches: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Validate each (suite, frame) pair in ``context``; return the report (``success`` plus one entry per
    expectation)."""
    asset = context.data_sources.add_pandas(source).add_dataframe_asset("frames")
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


def publish_validation(run: Any, report: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write and log ``report``; on failure remove it (so no later stage takes it as a pass) and raise."""
    failed = sum(not c["success"] for c in report["checks"])
    run.log_metrics({"expectations": len(report["checks"]), "expectations_failed": failed})
    run.set_tag("validation.success", str(report["success"]).lower())
    write_json(path, report)
    run.log_artifact(path)
    if not report["success"]:
        path.unlink()
        raise DataValidationError(failure_message(report))
    return report
