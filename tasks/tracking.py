"""MLflow tracking: one parent run per pipeline execution, one child run per stage, lineage on every run.

The flow opens the parent run and hands its id to stage processes through ``PIPELINE_PARENT_RUN_ID``; a stage
run outside the flow (plain ``dvc repro``) is a top-level run tagged ``pipeline.launcher=dvc``.
Location: ``$MLFLOW_TRACKING_URI``, else ``tracking.uri`` in params.yaml, else ``sqlite:///mlflow.db``.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.config import ABSENT, PARAMS_FILE, Config, listed_params, param_at
from tasks.errors import ArtifactStoreError, PipelineError
from tasks.hardware import check_device, host_tags
from tasks.io import load_yaml
from tasks.lineage import data_context, dataset_inputs, dvc_inputs, lineage_tags, locked_outputs
from tasks.mlflow_store import client_for, ensure_experiment, is_server_call_error, redact, server_error, tracking_uri
from tasks.staging import after_commit

PARENT_ENV = "PIPELINE_PARENT_RUN_ID"


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


def guarded(client: MlflowClient, action: str, call: Callable[[], Any], run_id: str | None = None) -> Any:
    """``call()``, with a failure of the tracking or artifact store raised as a ``PipelineError`` naming it."""
    try:
        return call()
    except OSError as err:  # a local artifact store: no space left, not a folder, not writable
        store = redact(client.get_run(run_id).info.artifact_uri) if run_id else "of the experiment"
        reason = errno.errorcode.get(err.errno or 0, type(err).__name__)
        raise ArtifactStoreError(f"cannot {action}: the artifact store {store} refused the write ({reason}: "
                                 f"{err.strerror or err}); free space or fix its permissions and re-run") from None
    except Exception as err:
        if not is_server_call_error(err):
            raise
        raise server_error(err, f"tracking server {redact(client.tracking_uri)}",
                           f"could not {action}" + (f" (run {run_id})" if run_id else "")) from None


class RunLogger:
    """Logs to one MLflow run through an injected client (no global fluent state). A failed call raises a
    ``PipelineError`` saying what failed and where: a full or unwritable artifact store, refused credentials, or a
    server that stopped answering in the middle of the run."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def _call(self, action: str, call: Callable[[], Any]) -> Any:
        return guarded(self.client, action, call, self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log params", lambda batch=items[i:i + 100]: self.client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def set_tag(self, key: str, value: str) -> None:
        self._call(f"set tag {key}", lambda: self.client.set_tag(self.run_id, key, value))

    def set_tags(self, tags: dict[str, str]) -> None:
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(f"log artifact {path.name}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._call(f"log artifacts {folder.name}",
                   lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        self._call(f"log artifact {name}", lambda: self.client.log_text(self.run_id, text, name))

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as the image ``name`` (shown in the run's artifacts), then close it."""
        import matplotlib.pyplot as plt

        try:
            self._call(f"log figure {name}", lambda: self.client.log_figure(self.run_id, figure, name))
        finally:
            plt.close(figure)

    def publish_evaluation(self, path: Path, results: dict[str, dict], summary: dict[str, float],
                           settings: BaseModel, onnx_dir: Path) -> None:
        """An evaluate stage's output ``path`` (per model its measurements, the ratios, the settings, and the SHA-256
        of every ONNX file measured: the gate registers only those files), logged as metrics and an artifact."""
        from tasks.io import digests, write_json

        write_json(path, {"models": results, "ratios": summary, "settings": settings.model_dump(),
                          "sha256": digests(onnx_dir, "*.onnx")})
        self.log_metrics({f"{m}.{k}": v for m, r in results.items() for k, v in r.items()} | summary)
        self.log_artifact(path)

    def log_data_inputs(self, stage: str, root: Path, context: str | None = None) -> None:
        """Log the data sets ``stage`` of dvc.yaml reads as MLflow dataset inputs: name = the path, digest = DVC's
        hash, source = the folder, profile = its size and file count, so the run shows which data it saw."""
        self.log_datasets(dvc_inputs(stage, root), root, context or data_context(stage))

    def log_data(self, paths: list[str], root: Path, context: str) -> None:
        """Log the stage outputs at ``paths`` (data sets dvc.lock records) as dataset inputs of a run that is not a
        stage (the ablation trains on them)."""
        self.log_datasets({p: found for p, found in locked_outputs(root).items() if p in paths}, root, context)

    def log_datasets(self, found: dict[str, dict[str, Any]], root: Path, context: str) -> None:
        """Log the data sets among ``found`` (path -> DVC's md5, size, nfiles; ``dvc_inputs``) as dataset inputs."""
        inputs = dataset_inputs(found, root, context)

        def log() -> None:
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
            except MlflowException:  # runs creating the same new data set's row at once: one wins the unique key,
                self.client.log_inputs(self.run_id, datasets=inputs)   # the others find it on a second try

        if inputs:
            self._call("log dataset inputs", log)

    def end(self, status: str) -> None:
        self._call(f"mark the run {status}", lambda: self.client.set_terminated(self.run_id, status))


def current_user() -> str:
    """Who runs this process, for runs and the audit tags: the login name, else ``$USER``, else ``uid<N>`` (a uid
    with no passwd entry, as a pod's ``runAsUser`` gives, has no name: getpass raises)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or f"uid{os.getuid()}"


def _who_and_where() -> dict[str, str]:
    """The tags MLflow's own ``start_run`` gives a run (its UI's User and Source columns; "unknown" without them):
    set here, since MLflow's default provider asks getpass, which fails for a uid with no name."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    return {MLFLOW_USER: current_user(), MLFLOW_SOURCE_NAME: sys.argv[0] or "python",
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL)}


@contextmanager
def _run(client: MlflowClient, cfg: Config, name: str, tags: dict[str, str], root: Path,
         with_outputs: bool = False) -> Iterator[RunLogger]:
    """A run ended FAILED when its body raises (KILLED when interrupted), else FINISHED: ``with_outputs`` (a stage's
    run) once the stage's outputs are in place (``tasks.staging.after_commit``), FAILED if they could not be put
    there."""
    experiment = ensure_experiment(client, cfg, root)
    run = guarded(client, "start a run", lambda: client.create_run(experiment, run_name=name,
                                                                   tags={**_who_and_where(), **tags}))
    logger = RunLogger(client, run.info.run_id, run.info.experiment_id)
    try:
        yield logger
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"   # Ctrl-C, SIGTERM: stopped, not broken
        try:
            logger.end(status)
        except PipelineError as lost:  # the server went away too: say so, but report the failure that happened first
            print(f"warning: run {run.info.run_id} could not be marked {status} ({lost})", file=sys.stderr)
        raise
    if not (with_outputs and after_commit(lambda committed: logger.end("FINISHED" if committed else "FAILED"))):
        logger.end("FINISHED")


def tracked_params(stage: str, cfg: Config, logged: dict[str, Any], root: Path = Path(".")) -> dict[str, Any]:
    """The params keys dvc.yaml lists for ``stage`` that ``logged`` (the blocks its code logs) does not hold, with
    their values as the stage reads them (the profile applied): a run logs every param DVC re-runs it for (before:
    a distillation run named its own blocks, not the teacher's architecture it read, nor a validation its data
    params). The profile's overlay keys (``profiles.*``) are in the values already; keys of another params file, or
    that the config does not hold, are left out."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    keys = listed_params((load_yaml(dvc_yaml.read_text()) or {}).get("stages", {}).get(stage), PARAMS_FILE.name)
    resolved, found = cfg.model_dump(by_alias=True), {}
    for key in keys:
        if key.split(".")[0] in ("profile", "profiles") or any(
                key == have or key.startswith(f"{have}.") for have in logged):
            continue
        if (value := param_at(resolved, key)) is not ABSENT:
            found[key] = value
    return found


@contextmanager
def stage_run(stage: str, cfg: Config, params: dict[str, Any], client: MlflowClient | None = None
              ) -> Iterator[RunLogger]:
    """A child run of the pipeline's parent run (or a top-level run under plain ``dvc repro``). ``params``: the
    blocks the stage reads, its own first (``prune.vision`` for ``prune_vision``)."""
    if params:   # before any run exists: a device this machine lacks is a params error
        check_device(*next(iter(params.items())))
    client = client or client_for(tracking_uri(cfg))
    flat = flatten("", tracked_params(stage, cfg, params)) | flatten("", params)   # (what the stage logs wins)
    inputs = dvc_inputs(stage)   # read once: for the lineage tags and the dataset inputs
    tags = {"pipeline.stage": stage, **lineage_tags(stage, cfg, inputs=inputs), **host_tags()}
    parent = os.environ.get(PARENT_ENV)
    tags.update({"mlflow.parentRunId": parent} if parent else {"pipeline.launcher": "dvc"})
    with (_run(client, cfg, stage, tags, Path("."), with_outputs=True) as logger,
          system_metrics(logger, cfg.tracking.system_metrics_seconds)):
        logger.log_params(flat)
        logger.log_datasets(inputs, Path("."), data_context(stage))
        yield logger


@contextmanager
def system_metrics(run: RunLogger, seconds: float | None) -> Iterator[None]:
    """MLflow's system metrics of this process's run (``system/cpu_utilization_percentage``, memory, disk, network),
    sampled every ``seconds`` by MLflow's monitor thread; nothing when ``seconds`` is None."""
    if seconds is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=seconds, samples_before_logging=1,
                                   tracking_uri=run.client.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextmanager
def child_run(name: str, cfg: Config, params: dict[str, Any], parent_run_id: str, root: Path,
              client: MlflowClient) -> Iterator[RunLogger]:
    """A child run of the pipeline's parent run for a step that runs inside the flow (not a DVC stage)."""
    flat = flatten("", params)
    tags = {"pipeline.stage": name, "mlflow.parentRunId": parent_run_id, **lineage_tags(name, cfg, root)}
    with _run(client, cfg, name, tags, root) as logger:
        logger.log_params(flat)
        yield logger


@contextmanager
def pipeline_run(cfg: Config, name: str, root: Path, client: MlflowClient | None = None,
                 launcher: str = "prefect") -> Iterator[RunLogger]:
    """The top-level run of one pipeline execution (``launcher`` prefect) or of a benchmark command."""
    client = client or client_for(tracking_uri(cfg, root))
    tags = {"pipeline.launcher": launcher, "pipeline.profile": cfg.profile, **lineage_tags(None, cfg, root),
            **host_tags()}
    with _run(client, cfg, name, tags, root) as logger:
        yield logger
