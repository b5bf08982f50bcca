"""Running Great Expectations suites over pandas frames, and the report every validation stage writes."""
from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import DataValidationError
from tasks.io import write_json

DOCS_SITE = "pipeline"   # the Data Docs site every validation stage renders into
DATA_DOCS = "data_docs"  # a validation stage's Data Docs: its output folder's name and its MLflow artifact folder


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
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # no progress bars: a stage's output is its log (Prefect's too), where every redraw would be a line
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def expectation_types() -> Any:
    """``great_expectations.expectations``, imported when a suite is built: importing Great Expectations costs
    ~6 s of CPU, which a stage that only reads its intake (snapshot, prepare) never pays."""
    import great_expectations as gx

    return gx.expectations


def suite(name: str, expectations: list) -> Any:
    """A Great Expectations suite named ``name`` holding ``expectations`` (an ephemeral context must exist)."""
    import great_expectations as gx

    built = gx.ExpectationSuite(name=name)
    for exp in expectations:
        built.add_expectation(exp)
    return built


def run_suites(context: Any, source: str, batches: list[tuple[Any, Any]], docs: Path | None = None) -> dict[str, Any]:
    """Validate each (suite, frame) pair through a Great Expectations Checkpoint of its own (the suite, and a
    validation definition on the frame's batch); return the report (``success`` plus one entry per expectation).

    With ``docs``, the results are rendered into a Data Docs site there once all checkpoints ran (the index, each
    suite, and each validation with its observed values and, for a failed expectation, the offending values and
    their counts): one build of the site, not one per checkpoint (an ``UpdateDataDocsAction`` on each rebuilt it
    every time, 0.3-0.6 s apiece)."""
    import great_expectations as gx

    asset = context.data_sources.add_pandas(source).add_dataframe_asset("frames")
    definition = asset.add_batch_definition_whole_dataframe("whole")
    checks = []
    for suite, frame in batches:
        name = f"{source}-{suite.name}"
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=definition, suite=context.suites.add(suite)))
        checkpoint = context.checkpoints.add(gx.Checkpoint(name=name, validation_definitions=[validation]))
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        checks += [_summarise(suite.name, r) for result in outcome.run_results.values() for r in result.results]
    if docs is not None:
        render_docs(context, docs)
    return {"success": all(c["success"] for c in checks), "checks": checks}


def render_docs(context: Any, docs: Path) -> None:
    """The Data Docs site of every validation ``context`` ran, rendered into ``docs`` (one build however many
    ``run_suites`` calls ran in it: each build costs 0.3-0.6 s), the values from the data HTML-escaped."""
    if DOCS_SITE in context.get_site_names():   # rendered before: into the same site
        context.delete_data_docs_site(DOCS_SITE)
    context.add_data_docs_site(DOCS_SITE, {
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())}})
    with _html_escaped_results(context):
        context.build_data_docs(site_names=[DOCS_SITE])


def _html_escaped(value: Any) -> Any:
    """``value`` with every string in it (in lists, tuples and dict values, nested) HTML-escaped; dict keys, which
    Great Expectations looks values up by, stay as they are."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {k: _html_escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_html_escaped(v) for v in value)
    return value


@contextmanager
def _html_escaped_results(context: Any) -> Iterator[None]:
    """The validation results ``context`` holds, their ``result`` values HTML-escaped while Data Docs render them,
    then as they were (the store keeps the raw values, so a later build escapes them once again, not twice).

    Great Expectations 1.x (1.24) writes a result's values into the page as they are: the unexpected values table
    (``partial_unexpected_list``/``_counts``, ``unexpected_list``...) and the observed value cell (``str()`` of
    ``observed_value``, e.g. a most common value or the columns found), so a category or a gender such as
    ``<img src=x onerror=...>`` in a batch ran as script in the page an engineer opens to see why it was refused.
    It does escape its string templates' parameters (the expectation's kwargs, a ``value_set`` or a ``regex``, an
    exception's message), so those are left alone: escaped here too they would show as ``&lt;``. Not escaped by
    it, nor here: a ``column`` kwarg in the column sections' headers; ours come from code and params.yaml, never
    from a batch. The report (``_summarise``) was taken from the checkpoint's own results and keeps the raw values.

    Rewritten as the store's JSON text (an ephemeral context's in-memory store holds each result so): through
    ``store.get``/``set`` each result was a marshmallow load and dump, 0.5 s for 100 expectations."""
    store = context.validation_results_store
    backend, keys = store.store_backend, [store.key_to_tuple(key) for key in store.list_keys()]
    raw = {key: backend.get(key) for key in keys}
    for key, text in raw.items():
        found = json.loads(text)
        for r in found["results"]:
            r["result"] = _html_escaped(r["result"])
        backend.set(key, json.dumps(found))
    try:
        yield
    finally:
        for key, text in raw.items():
            backend.set(key, text)


def _short(value: Any) -> Any:
    """A long value set (every known id) as its first values and its length: the message stays one line each."""
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:5]))}, ... ({len(value)} values)]"
    return value


def failure_message(report: dict[str, Any]) -> str:
    lines = ["processed data failed validation:"]
    for c in (c for c in report["checks"] if not c["success"]):
        args = ", ".join(f"{k}={_short(v)}" for k, v in c["kwargs"].items())
        got = f"observed {c['observed']}" if c["observed"] is not None else ""
        if c["unexpected_count"]:
            got = f"{c['unexpected_count']} unexpected values, e.g. {c['unexpected_examples']}"
        lines.append(f"  [{c['suite']}] {c['expectation']}({args}): {got}")
    return "\n".join(lines)


def publish_validation(run: Any, report: dict[str, Any], path: Path, docs: Path | None = None) -> dict[str, Any]:
    """Write and log ``report`` and the Data Docs site ``docs`` (artifact folder ``data_docs``, passed or not: a
    failure's offending values are there); on failure remove the report (so no later stage takes it as a pass)
    and raise."""
    failed = sum(not c["success"] for c in report["checks"])
    run.log_metrics({"expectations": len(report["checks"]), "expectations_failed": failed})
    run.set_tag("validation.success", str(report["success"]).lower())
    write_json(path, report)
    run.log_artifact(path)
    if docs is not None:
        run.log_artifacts(docs, DATA_DOCS)
    if not report["success"]:
        path.unlink()
        raise DataValidationError(failure_message(report))
    return report
