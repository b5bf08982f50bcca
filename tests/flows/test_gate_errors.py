"""What the gate and `flows.pipeline` answer when the registry, the artifact store or the project cannot give what
gating needs: one-line errors, retried only when a later try may pass."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline import chosen, gate_only
from flows.registry import RegistryError
from tasks.errors import ArtifactStoreError, PipelineError
from tests.flows.test_promotion import _gate, _lenient, project  # noqa: F401 - the fixture, used by name
from tests.flows.test_sweep import _two_stage_project


@pytest.mark.fault("promotion", "the champion's model gone from the artifact store (cleaned up, moved)",
                   "RegistryError naming the version and how to move champion, not retried; nothing registered "
                   "(before: MLflow's exception, the whole gate retried, then a traceback)")
def test_a_champion_whose_model_left_the_artifact_store_is_a_registry_error(project, raw_params,  # noqa: F811
                                                                             tmp_path):
    """Before: ``download_artifacts``' MlflowException (RESOURCE_DOES_NOT_EXIST) went out as it was: the promote
    task retried it as transient and the CLI printed a traceback."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _lenient(raw_params)
    report, client = _gate(project, cfg, uri)
    assert report["champion"]   # else there is no champion whose model could be gone
    name = cfg.gate.vision.registered_model
    run = client.get_run(client.get_model_version(name, report["version"]).run_id)
    shutil.rmtree(Path(urlparse(run.info.artifact_uri).path) / "model")
    with pytest.raises(RegistryError, match=rf"^{name} version 1, the champion: its model is not in the artifact "
                                            rf"store .*; nothing was registered; .*flows\.promotion --name {name} "
                                            r"--rollback") as raised:
        _gate(project, cfg, uri)
    assert not raised.value.transient
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]


@pytest.mark.fault("promotion", "the artifact store refuses the gate's writes (no space left on device)",
                   "ArtifactStoreError naming the model and the OS error, not retried (before: the OSError went out "
                   "as it was, the whole gate retried, then a traceback)")
def test_an_artifact_store_that_refuses_writes_is_an_artifact_store_error(project, raw_params, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    """Before: the OSError of ``log_artifacts`` went out as it was (retried as transient, a traceback)."""
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/store/artifacts/lineage")

    monkeypatch.setattr(MlflowClient, "log_artifacts", full)
    cfg = _lenient(raw_params)
    with pytest.raises(ArtifactStoreError, match=rf"^{cfg.gate.vision.registered_model}: a file was not written or "
                                                 r"read \(OSError: \[Errno 28\] No space left on device") as raised:
        _gate(project, cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not raised.value.transient


@pytest.mark.fault("promotion", "`flows.pipeline --gate-only` in a project where nothing ran yet (no dvc.lock)",
                   "a one-line PipelineError: nothing evaluated yet, run `dvc repro evaluate_<family>` or the "
                   "pipeline (before: FileNotFoundError of metrics/<family>/evaluation.json after two retries)")
def test_gating_alone_with_nothing_evaluated_is_refused(prefect_server, raw_params, tmp_path):
    """Before: with no dvc.lock every check was skipped and the gate read the missing evaluation file."""
    from tests.conftest import ROOT

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    with pytest.raises(PipelineError, match=r"^--gate-only: \S+: nothing evaluated yet for vision \(no dvc\.lock\): "
                                            r"run `dvc repro evaluate_vision` or the pipeline$"):
        gate_only.fn(str(tmp_path), ["vision"])


@pytest.mark.fault("promotion", "the gate of a family whose evaluation file is missing",
                   "a one-line PipelineError naming the file and the stage to run; nothing registered (before: "
                   "FileNotFoundError, retried as transient, then a traceback)")
def test_the_gate_without_the_evaluation_file_registers_nothing(project, raw_params, tmp_path):  # noqa: F811
    """Before: FileNotFoundError, read under the registry's lock (retried as transient, a traceback)."""
    (project / "metrics/vision/evaluation.json").unlink()
    with pytest.raises(PipelineError, match=r"nothing evaluated yet for vision \(no metrics/vision/evaluation\.json\): "
                                            r"run `dvc repro evaluate_vision` or the pipeline; nothing was registered"):
        _gate(project, _lenient(raw_params), f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.fault("promotion", "`flows.pipeline --gate-only` where DVC finds every stage up to date but the "
                   "evaluation file is missing (an evaluate stage that does not declare it)",
                   "a one-line PipelineError naming the missing file (before: FileNotFoundError after two retries)")
def test_gating_alone_without_the_evaluation_file_is_refused(prefect_server, raw_params, tmp_path):
    """Before: the gate read the missing evaluation file: FileNotFoundError, retried twice."""
    _two_stage_project(tmp_path, raw_params, evaluate="echo --metrics metrics/vision/evaluation.json > e.txt")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=tmp_path, check=True, capture_output=True)
    with pytest.raises(PipelineError, match=r"nothing evaluated yet for vision \(no metrics/vision/evaluation\.json\)"):
        gate_only.fn(str(tmp_path), ["vision"])


def test_a_family_named_twice_is_covered_once(config):
    """Before: ``--family vision --family vision`` kept both: the run asked the family's one-slot data lock twice
    (the second waited data_lock_timeout_seconds, then blamed another run) and gated it twice."""
    assert chosen(config, ["vision", "vision"]) == ["vision"]
    assert chosen(config, ["recsys", "vision", "recsys"]) == ["recsys", "vision"]   # in the order given
    assert chosen(config, None) == list(config.families)
