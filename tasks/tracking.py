"""MLflow tracking: one parent run per pipeline execution, one child run per stage, lineage on every run.

The flow opens the parent run and hands its id to stage processes through ``PIPELINE_PARENT_RUN_ID``; a stage
run outside the flow (plain ``dvc repro``) is a top-level run tagged ``pipeline.launcher=dvc``.
Location: ``$MLFLOW_TRACKING_URI``, else ``tracking.uri`` in params.yaml, else ``sqlite:///mlflow.db``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.config import Config
from tasks.errors import ServiceUnavailable
from tasks.lineage import lineage_tags

PARENT_ENV = "PIPELINE_PARENT_RUN_ID"


def tracking_uri(cfg: Config, root: Path = Path(".")) -> str:
    """Where runs and the registry live; also bounds how long MLflow retries a server that does not answer."""
    bound_http_retries(cfg)
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def bound_http_retries(cfg: Config) -> None:
    """MLflow's defaults retry an unreachable server for minutes; ``tracking.http`` bounds that (for this process
    and the stage processes it starts). A value already in the environment wins."""
    http = cfg.tracking.http
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", http.max_retries),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", http.backoff_factor),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", http.timeout_seconds)):
        os.environ.setdefault(name, str(value))


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ensure_experiment(client: MlflowClient, cfg: Config, root: Path = Path(".")) -> str:
    """Id of the configured experiment, created (with a local artifact root on local stores) if missing."""
    try:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
    except MlflowException as err:  # the first call to the server: refused, timed out, or failed after retries
        raise ServiceUnavailable(f"tracking server {client.tracking_uri} is not reachable after "
                                 f"{cfg.tracking.http.max_retries} retries (tracking.http): {err}; nothing was "
                                 "recorded") from None
    if exp is not None:
        return exp.experiment_id
    location = (root / cfg.tracking.artifact_root).resolve().as_uri() if _is_local(client.tracking_uri) else None
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except MlflowException:  # created concurrently by another stage or run
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; pydantic models are dumped first."""
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: value}


class RunLogger:
    """Logs to one MLflow run through an injected client (no global fluent state)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)


@contextmanager
def _run(client: MlflowClient, cfg: Config, name: str, tags: dict[str, str], root: Path) -> Iterator[RunLogger]:
    run = client.create_run(ensure_experiment(client, cfg, root), run_name=name, tags=tags)
    logger = RunLogger(client, run.info.run_id)
    try:
        yield logger
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


@contextmanager
def stage_run(stage: str, cfg: Config, params: dict[str, Any], client: MlflowClient | None = None) -> Iterator[RunLogger]:
    """A child run of the pipeline's parent run (or a top-level run under plain ``dvc repro``)."""
    client = client or MlflowClient(tracking_uri(cfg))
    flat = flatten("", params)
    tags = {"pipeline.stage": stage, **lineage_tags(stage, flat)}
    parent = os.environ.get(PARENT_ENV)
    tags.update({"mlflow.parentRunId": parent} if parent else {"pipeline.launcher": "dvc"})
    with _run(client, cfg, stage, tags, Path(".")) as logger:
        logger.log_params(flat)
        yield logger


@contextmanager
def child_run(name: str, cfg: Config, params: dict[str, Any], parent_run_id: str, root: Path,
              client: MlflowClient) -> Iterator[RunLogger]:
    """A child run of the pipeline's parent run for a step that runs inside the flow (not a DVC stage)."""
    flat = flatten("", params)
    tags = {"pipeline.stage": name, "mlflow.parentRunId": parent_run_id, **lineage_tags(name, flat, root)}
    with _run(client, cfg, name, tags, root) as logger:
        logger.log_params(flat)
        yield logger


@contextmanager
def pipeline_run(cfg: Config, name: str, root: Path, client: MlflowClient | None = None,
                 launcher: str = "prefect") -> Iterator[RunLogger]:
    """The top-level run of one pipeline execution (``launcher`` prefect) or of a benchmark command."""
    client = client or MlflowClient(tracking_uri(cfg, root))
    tags = {"pipeline.launcher": launcher, "pipeline.profile": cfg.profile, **lineage_tags(None, {}, root)}
    with _run(client, cfg, name, tags, root) as logger:
        yield logger
