"""What a sweep hands Prefect: the recipes' subflow (``fan_out``) is a flow run of its own, whose parameters Prefect
stores verbatim and shows in its UI, so none of them may carry the tracking server's password."""
from __future__ import annotations

import inspect
import json
import shutil

import pytest
import yaml

from flows.sweep import fan_out
from flows.workspace import PROJECT

PASSWORD = "Zq7-s3cret"
URIS = (f"https://alice:{PASSWORD}@mlflow.example.org", f"postgresql://kdq:{PASSWORD}@db:5432/mlflow")


@pytest.fixture(autouse=True)
def http_retries_left_as_they_were(monkeypatch):
    """tracking_uri sets MLflow's HTTP retry bounds in the environment when unset: undone after each test."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(name, value)


def project_with_tracking_uri(tmp_path, uri: str | None):
    """A project folder whose params.yaml is the project's own with ``tracking.uri`` set to ``uri``."""
    shutil.copy2(PROJECT / "params.yaml", tmp_path / "params.yaml")
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["tracking"]["uri"] = uri
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


@pytest.mark.fault("security", "the MLflow tracking URI holds a password (https://user:pw@host, "
                   "postgresql://user:pw@host/db) and a recipe sweep runs",
                   "the recipes' subflow takes no parameter carrying it: nothing of it is stored by Prefect or shown "
                   "in its UI (before: fan_out's `uri` parameter, stored verbatim with the subflow run)")
@pytest.mark.parametrize("uri", URIS)
def test_the_recipes_subflows_parameters_never_carry_the_tracking_password(uri, tmp_path):
    """Every parameter fan_out takes, filled with what recipe_sweep has at hand when it calls it (the tracking URI
    among them), serialized as Prefect stores a subflow run's parameters. Before: ``uri`` was one of them, and the
    password was in Prefect's database and UI."""
    at_hand = {"recipes": [{"distill.temperature": 4.0}], "family": "recsys", "root": str(tmp_path),
               "work": str(tmp_path / "sweeps" / "run"), "uri": uri, "tracking_uri": uri, "sweep_run_id": "0" * 32,
               "upstream_outs": ["data/processed/recsys"], "stages": ["distill_recsys"], "threads": 1,
               "retry_delays": [1.0]}
    names = list(inspect.signature(fan_out.fn).parameters)
    assert set(names) <= set(at_hand), f"fan_out takes {sorted(set(names) - set(at_hand))}: add them here"
    stored = json.dumps(fan_out.serialize_parameters({name: at_hand[name] for name in names}))
    assert PASSWORD not in stored, stored
    assert str(tmp_path) in stored   # the serialization does store what it is given


@pytest.mark.parametrize("uri", URIS)
def test_the_recipes_still_get_the_tracking_uri_with_its_password(uri, tmp_path, monkeypatch):
    """fan_out derives the URI its recipes log to from the project, as recipe_sweep does: from
    ``$MLFLOW_TRACKING_URI`` when set, else from ``tracking.uri``; the password is kept (the runs need it)."""
    from flows.sweep import project_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert project_tracking_uri(project_with_tracking_uri(tmp_path, None)) == uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert project_tracking_uri(project_with_tracking_uri(tmp_path, uri)) == uri
    local = project_tracking_uri(project_with_tracking_uri(tmp_path, None))   # the embedded store of that project
    assert local == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
