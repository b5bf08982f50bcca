"""What the gate and `flows.pipeline` answer when the registry, the artifact store or the project cannot give what
gating needs: one-line errors, retried only when a later try may pass."""
from __future__ import annotations

import copy
import errno
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient

from flows.pipeline import chosen, gate_only
from flows.registry import RegistryError
from tasks.errors import ArtifactStoreError, PipelineError, ServiceUnavailable
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


def _reset_first_download(monkeypatch) -> list:
    """The artifact store's connection reset while the first file downloads (only that one); the list empties when
    it happened."""
    download, resets = LocalArtifactRepository._download_file, [None]

    def reset_once(self, remote_file_path, local_path):
        if resets and resets.pop() is None:
            raise requests.ConnectionError("Connection reset by peer")
        return download(self, remote_file_path, local_path)

    monkeypatch.setattr(LocalArtifactRepository, "_download_file", reset_once)
    return resets


@pytest.mark.fault("promotion", "the artifact store fails while the champion's model is downloaded (a connection "
                   "reset: MLflow's runs:/ download reports any failure as RESOURCE_DOES_NOT_EXIST)",
                   "ServiceUnavailable, retried, the champion left as it is; the next try gates the candidate against "
                   "it (before: a RegistryError telling the operator to roll back a healthy champion)")
def test_a_champion_download_that_failed_is_transient_not_a_model_gone(project, raw_params, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """Before: ``RunsArtifactRepository.download_artifacts`` swallows the store's error (here requests'
    ConnectionError) and raises RESOURCE_DOES_NOT_EXIST, which the gate took for a model gone: not retried, and the
    fix it named was a rollback of a champion whose model was there all along."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _lenient(raw_params)
    report, client = _gate(project, cfg, uri)
    assert report["champion"]
    name = cfg.gate.vision.registered_model
    resets = _reset_first_download(monkeypatch)
    with pytest.raises(ServiceUnavailable, match=rf"^the artifact store of {name} version 1 lists its model but did "
                                                 r"not give it \(.*\); nothing was registered$") as raised:
        _gate(project, cfg, uri)
    assert raised.value.transient and not resets
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    again, _ = _gate(project, cfg, uri)   # what the retry does: the champion is there, the candidate compared with it
    assert again["version"] == "2" and again["champion_before"]["version"] == "1"


@pytest.mark.fault("promotion", "the artifact store fails while `make serve` downloads the champion's model (a "
                   "connection reset), then the model is really gone from it",
                   "ServiceUnavailable saying the store lists the model but did not give it, then a RegistryError "
                   "saying it is not in the store; nothing served either way (before: a failed download was also "
                   "reported as a model not in the artifact store)")
def test_make_serve_tells_a_download_that_failed_from_a_model_gone(project, raw_params, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    from flows.serve import serve_command

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = _lenient(raw_params)
    report, client = _gate(project, cfg, uri)
    assert report["champion"]
    name = cfg.gate.vision.registered_model
    with monkeypatch.context() as patched:
        resets = _reset_first_download(patched)
        with pytest.raises(ServiceUnavailable, match=rf"^the artifact store of {name} version 1 lists its model but "
                                                     r"did not give it \(.*\); nothing served$") as raised:
            serve_command(cfg, tmp_path, "vision", "127.0.0.1", 5001, dest=tmp_path / "serve")
    assert raised.value.transient and not resets
    run = client.get_run(client.get_model_version(name, "1").run_id)
    shutil.rmtree(Path(urlparse(run.info.artifact_uri).path) / "model")
    with pytest.raises(RegistryError, match=rf"^{name} version 1: its model is not in the artifact store \(.*\); "
                                            r"nothing served$"):
        serve_command(cfg, tmp_path, "vision", "127.0.0.1", 5001, dest=tmp_path / "again")


@pytest.mark.fault("promotion", "the artifact store refuses the gate's writes (no space left on device)",
                   "ArtifactStoreError naming the model and the OS error, not retried (before: the OSError went out "
                   "as it was, the whole gate retried, then a traceback)")
@pytest.mark.parametrize("store", ["/store/artifacts", "mlartifacts"], ids=["elsewhere", "in-the-project"])
def test_an_artifact_store_that_refuses_writes_is_an_artifact_store_error(project, raw_params, tmp_path,  # noqa: F811
                                                                           monkeypatch, store):
    """Before: the OSError of ``log_artifacts`` went out as it was (retried as transient, a traceback). The default
    local store (``tracking.artifact_root``) is a folder of the project, and still the store."""
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(project / store / "lineage"))

    monkeypatch.setattr(MlflowClient, "log_artifacts", full)
    cfg = _lenient(raw_params)
    with pytest.raises(ArtifactStoreError, match=rf"^{cfg.gate.vision.registered_model}: a file was not written or "
                                                 r"read \(OSError: \[Errno 28\] No space left on device") as raised:
        _gate(project, cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not raised.value.transient and str(raised.value).endswith("by the next run, once that is fixed (not "
                                                                      "retried)")


@pytest.mark.fault("promotion", "the connection to the artifact store reset (or timed out) while the gate writes",
                   "ServiceUnavailable, retried: its registration is gated and registered again by the next try "
                   "(before: an ArtifactStoreError, not retried, saying the next try would register it)")
def test_a_connection_reset_while_gating_is_transient(project, raw_params, tmp_path, monkeypatch):  # noqa: F811
    """Before: a ConnectionResetError is an OSError: it became an ArtifactStoreError (not retried) whose message
    promised a next try."""
    def reset(self, *args, **kwargs):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(MlflowClient, "log_artifacts", reset)
    with pytest.raises(ServiceUnavailable, match=r"^the registry at sqlite:///\S+ is not reachable after the "
                                                 r"bounded retries of tracking\.http \(ConnectionResetError: .*"
                                                 r"Connection reset by peer\); a registration it stopped is gated and "
                                                 r"registered again by the next try$") as raised:
        _gate(project, _lenient(raw_params), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert raised.value.transient


@pytest.mark.fault("promotion", "the candidate file missing from the project when the gate reads it (deleted after "
                   "its evaluation)", "a PipelineError naming the file, not retried; nothing registered (before: an "
                   "ArtifactStoreError blaming the artifact store)")
def test_a_missing_candidate_file_is_named_not_blamed_on_the_store(project, raw_params, tmp_path):  # noqa: F811
    """Before: any OSError in the gate was an ArtifactStoreError ("a file was not written or read"), the project's
    own missing file too."""
    candidate = project / "models/vision/onnx/student_int8.onnx"
    candidate.unlink()
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(candidate))}: No such file or directory "
                                            r"\(FileNotFoundError\); the gate of \S+ stopped; .*not retried\)$") \
            as raised:
        _gate(project, _lenient(raw_params), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert type(raised.value) is PipelineError and not raised.value.transient
    assert not MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_registered_models()


@pytest.mark.fault("promotion", "`flows.pipeline --gate-only` in a project where nothing ran yet (no dvc.lock)",
                   "a one-line PipelineError: nothing evaluated yet, run `dvc repro evaluate_<family>` or the "
                   "pipeline (before: FileNotFoundError of metrics/<family>/evaluation.json after two retries)")
def test_gating_alone_with_nothing_evaluated_is_refused(prefect_server, raw_params, tmp_path):
    """Before: with no dvc.lock every check was skipped and the gate read the missing evaluation file."""
    from tests.conftest import ROOT

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    with pytest.raises(PipelineError, match=r"^--gate-only: \S+: nothing evaluated yet for vision \(no "
                                            r"metrics/vision/evaluation\.json\): run `dvc repro evaluate_vision` or "
                                            r"the pipeline$"):
        gate_only.fn(str(tmp_path), ["vision"])


@pytest.mark.fault("promotion", "`flows.pipeline --gate-only` in a project without a dvc.lock whose candidate was "
                   "evaluated (a copy of a project, its lock left out: the scaled stack's concurrent promotions)",
                   "gated and registered (a project without a dvc.lock records nothing to check); only a missing "
                   "evaluation file is refused (before: refused for want of a dvc.lock)")
def test_gating_alone_without_a_dvc_lock_gates_the_evaluated_candidate(project, raw_params, mlflow_uri):  # noqa: F811
    """Before: ``--gate-only`` refused any project without a dvc.lock, "nothing evaluated yet", though its
    evaluation file was there (the scaled stack gates 8 such copies at once)."""
    params = copy.deepcopy(raw_params)   # the gate `_lenient` sets: passed by the untrained fixture models
    params["gate"]["vision"]["floors"].update(min_accuracy=0.0, max_p95_latency_ms=1000.0)
    params["gate"]["vision"]["vs_teacher"].update(max_accuracy_drop=1.0, min_speedup=0.01)
    params["evaluate"]["vision"].update(warmup=1, repeats=10, throughput_repeats=3)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert not (project / "dvc.lock").exists()
    gated = gate_only.fn(str(project), ["vision"])["gates"]["vision"]
    assert gated["version"] == "1" and gated["passed"] and gated["champion"]


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
