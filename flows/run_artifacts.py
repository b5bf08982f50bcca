"""What a pipeline run shows in the Prefect UI: Prefect artifacts beside its logs.

Each flow run publishes the stages it ran or found cached, each family's evaluation (one row per ONNX model), each
family's gate table with pass/fail and why, and where its MLflow parent run is (a link when the tracking store is a
server, the ``mlflow ui`` command for a local store). Keys make them show on the Artifacts page too, one version
per run, so a model's gate history is one click away.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.expectations import DATA_DOCS
from tasks.gate import Check, gate_markdown, health_markdown
from tasks.mlflow_store import redact

# Per-model columns of the evaluation table, in this order, where the family's evaluation has them (a pattern: each
# key it matches, the ranking's cut-off and the latency's unit of work being the family's own)
_COLUMNS = ("val_accuracy", "test_accuracy", "val_auc", "test_auc", "test_logloss", re.compile(r"test_ndcg_at_\d+"),
            re.compile(r"(\w+_)?p95_ms"), "bytes", "parameters", "nonzero_parameters")


def evaluation_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model of a family's ``evaluation.json``: its scores, latency and size, rounded for reading."""
    rows = []
    for model, measured in evaluation["models"].items():
        row: dict[str, Any] = {"model": model}
        for column in _COLUMNS:
            for key in ([column] if isinstance(column, str) else sorted(k for k in measured if column.fullmatch(k))):
                if key in measured:
                    value = measured[key]
                    row[key] = round(value, 4) if isinstance(value, float) else value
        rows.append(row)
    return rows


def mlflow_run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI's page of a run on a tracking server (credentials left out), or None for a local store."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.netloc.rpartition("@")[2]   # user and password left out; an IPv6 address keeps its brackets
    return f"{urlunsplit(parts._replace(netloc=host)).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def local_index(artifact_uri: str) -> str:
    """The Data Docs' index page in a run's local artifact folder, as a path that exists (the URI's escapes, a
    space as %20, undone: the page named before did not exist in a project whose path had one)."""
    return str(Path(url2pathname(urlsplit(artifact_uri).path)) / DATA_DOCS / "index.html")


def publish_run(statuses: dict[str, str], root: Path, families: list[str], uri: str, experiment_id: str,
                parent_run_id: str) -> None:
    """The flow run's artifacts: stage statuses, each family's evaluation table and the MLflow parent run."""
    create_table_artifact([{"stage": stage, "status": status} for stage, status in statuses.items()],
                          key="pipeline-stages", description="Stages of dvc.yaml: ran, or cached by DVC")
    for family in families:
        path = root / "metrics" / family / "evaluation.json"
        if path.exists():
            create_table_artifact(evaluation_rows(json.loads(path.read_text())), key=f"{family}-evaluation",
                                  description=f"{family}: every ONNX model on the validation and test splits "
                                              f"({path.relative_to(root)})")
    link = mlflow_run_link(uri, experiment_id, parent_run_id)
    if link is not None:
        create_link_artifact(link, link_text=f"MLflow parent run {parent_run_id}", key="mlflow-run",
                             description="Every stage's child run, metrics, figures and models")
    else:
        create_markdown_artifact(
            f"MLflow parent run `{parent_run_id}` (experiment {experiment_id}) in `{redact(uri)}`.\n\n"
            f"Open it with `{mlflow_ui_command(redact(uri))}`.",
            key="mlflow-run", description="Every stage's child run, metrics, figures and models")


def mlflow_ui_command(uri: str, mlflow: str = "mlflow") -> str:
    """The command line that opens MLflow's UI on the store ``uri``, quoted for a shell (a project folder's spaces)."""
    return shlex.join([mlflow, "ui", "--backend-store-uri", uri])


def publish_gate(family: str, report: dict[str, Any]) -> None:
    """A family's gate as a markdown table: each check with its value, threshold, pass/fail and why."""
    if report["unchanged"]:
        text = (f"Candidate unchanged: {report['name']} version {report['version']} already holds this file "
                f"(gate {'passed' if report['passed'] else 'failed'} then); the registry was not touched.\n")
    else:
        checks = [Check(**c) for c in report["checks"]]
        decision = ("champion moved to it" if report["champion"] else "champion unchanged")
        text = (gate_markdown(checks, report["passed"]) + health_markdown(report.get("champion_health"), report["passed"])
                + f"\nRegistered {report['name']} version {report['version']} as challenger; {decision}.\n")
    create_markdown_artifact(text, key=f"{family}-gate",
                             description=f"{family} promotion gate: {'PASS' if report['passed'] else 'FAIL'}")


DEGRADED = "champion-degraded"   # flow-run tag: a family's champion degraded on the recent window and stays champion


def flag_degraded_champion(family: str, report: dict[str, Any]) -> bool:
    """When the champion degraded on the recent window and stays champion (no challenger passed the gate, or none
    may be promoted), say so loudly: an ``ALERT`` at error level and tags ``champion-degraded`` and
    ``champion-degraded-<family>`` on the flow run (the UI filters runs by tag); True when it did."""
    from prefect import get_client, get_run_logger
    from prefect.runtime import flow_run

    health = report.get("champion_health")
    if health is None or not health["degraded"] or report["champion"]:
        return False
    get_run_logger().error(f"ALERT: {family} champion v{health['version']} degraded on the recent window (drop "
                           f"{health['drop']:.4g} > {health['max_drop']:.4g}) and it stays champion (no challenger "
                           "passed the gate, or none may be promoted)")
    if flow_run.id:
        try:   # after the registration: a Prefect API that did not answer must not fail (and retry) the gate
            with get_client(sync_client=True) as client:
                tags = client.read_flow_run(flow_run.id).tags
                client.update_flow_run(flow_run.id, tags=sorted({*tags, DEGRADED, f"{DEGRADED}-{family}"}))
        except Exception as err:  # noqa: BLE001 - the ALERT above and the MLflow tag say it regardless
            get_run_logger().warning(f"the flow run is not tagged {DEGRADED} ({type(err).__name__}: {err})")
    return True


def publish_data_docs(stage: str, uri: str, parent_run_id: str) -> None:
    """Where the Data Docs of ``stage``'s latest run under ``parent_run_id`` are: a link to its MLflow run on a
    tracking server, else the local path of its ``data_docs/index.html`` artifact. Published whether the
    validation passed or failed: a failure's Data Docs show the offending values."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                             f"tags.`pipeline.stage` = '{stage}'", order_by=["start_time DESC"],
                               max_results=1)
    if not found:
        return
    run = found[0]
    key, verdict = f"{stage.replace('_', '-')}-data-docs", run.data.tags.get("validation.success", "unknown")
    what = f"Great Expectations Data Docs of {stage} (validation success: {verdict})"
    link = mlflow_run_link(uri, experiment, run.info.run_id)
    if link is not None:
        create_link_artifact(f"{link}/artifacts/{DATA_DOCS}/index.html", link_text=what, key=key,
                             description="Every expectation with its observed value; failures with the offending values")
    else:
        index = local_index(run.info.artifact_uri)
        create_markdown_artifact(f"{what}: open `{index}` in a browser (MLflow run `{run.info.run_id}`, artifact "
                                 f"folder `{DATA_DOCS}`).", key=key,
                                 description="Every expectation with its observed value; failures with the offending values")
