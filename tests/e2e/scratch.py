"""Scratch copies of the project for the e2e tests, and ``dvc`` run in one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from flows.workspace import copy_project


def make_repo(dest: Path, **overrides) -> Path:
    """A scratch git + DVC copy of the project on the smoke profile, with dotted-key params ``overrides``."""
    return copy_project(dest, {"profile": "smoke", **overrides})


def repo_env(repo: Path) -> dict[str, str]:
    """The environment of a command run in ``repo``: this interpreter's tools first, the repo's code and its own
    SQLite tracking store."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=repo_env(repo), capture_output=True,
                          text=True)


def locked_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in lock.values() for o in s.get("outs", [])}


def ingest_runs(repo: Path, family: str) -> list:
    """The ``ingest_<family>`` MLflow runs of ``repo``'s store, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("model-compression")
    return client.search_runs([experiment.experiment_id], f"tags.`ingest.family` = '{family}'",
                              order_by=["attributes.start_time ASC"])


def dataset_inputs(repo: Path, run_id: str) -> dict:
    """{context: MLflow dataset} of a run's dataset inputs."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id)
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
            for d in run.inputs.dataset_inputs}


def replayed_repo(tmp_path: Path, monkeypatch, family: str, **overrides) -> tuple[Path, list[Path], Path]:
    """A scratch copy whose ``family`` snapshot starts empty, its own MLflow store in this process, the family's
    published data replayed by ``flows.replay`` into ``tmp_path/all``: (repo, batch folders, an empty landing)."""
    repo = make_repo(tmp_path / "repo", **{f"ingest.{family}.bootstrap": "empty", **overrides})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    replay = subprocess.run([sys.executable, "-m", "flows.replay", "--family", family, str(tmp_path / "all")],
                            cwd=repo, env=repo_env(repo), capture_output=True, text=True, check=False)
    assert replay.returncode == 0, replay.stderr
    landing = repo / "landing"
    landing.mkdir()
    return repo, sorted((tmp_path / "all").iterdir()), landing
