from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tasks.tracking import PARENT_ENV, pipeline_run, stage_run


def test_stage_runs_nest_under_the_pipeline_run(config, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pipeline_run(config, "pipeline", tmp_path) as parent:
        monkeypatch.setenv(PARENT_ENV, parent.run_id)
        with stage_run("prepare_vision", config, {"data.vision": config.data.vision}) as child:
            child.log_metrics({"rows": 3.0})
    client = MlflowClient(mlflow_uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params["data.vision.val_size"] == "5000"
    assert len(run.data.tags["params.hash"]) == 64 and run.data.tags["git.commit"]
    assert run.data.metrics["rows"] == 3.0 and run.info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_failed_stage_is_marked_failed(config, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with stage_run("validate_vision", config, {}) as run:
            raise RuntimeError("boom")
    got = MlflowClient(mlflow_uri).get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["pipeline.launcher"] == "dvc"
