from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from tasks.tracking import PARENT_ENV, pipeline_run, stage_run


@pytest.mark.slow
def test_stage_runs_nest_under_the_pipeline_run(config, mlflow_uri, tmp_path, monkeypatch):
    import torch  # a stage that computes with PyTorch (it imported it) records the host's facts below

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
    # the machine facts that change a stage's arithmetic (bf16 autocast, teacher_runtime: auto)
    from tasks.hardware import native_bf16

    assert run.data.tags["host.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert run.data.tags["host.native_bf16"] == str(native_bf16()).lower()
    assert run.data.tags["host.cuda_devices"] == str(torch.cuda.device_count())
    assert run.data.metrics["rows"] == 3.0 and run.info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def _lock_data(root, path: str, size: int, nfiles: int) -> str:
    """A dvc.lock in ``root`` recording the folder ``path`` as a stage output, as DVC writes it; its md5."""
    import yaml

    md5 = "a818818cfc78162d5a7363799bdfada8.dir"
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare_x": {
        "cmd": "true", "outs": [{"path": path, "hash": "md5", "md5": md5, "size": size, "nfiles": nfiles}]}}}))
    return md5


@pytest.mark.slow
def test_a_stage_run_names_the_data_it_read_as_mlflow_dataset_inputs(config, mlflow_uri, tmp_path, monkeypatch):
    import mlflow.data
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "teacher.pt").write_bytes(b"weights")   # an input, but a model, not data
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare_x": {"cmd": "true", "outs": ["data/x/processed"]},
        "distill_x": {"cmd": "true", "deps": ["data/x/processed", "models/teacher.pt"]},
        "evaluate_x": {"cmd": "true", "deps": ["data/x/processed"]}}}))
    md5 = _lock_data(tmp_path, "data/x/processed", size=1234, nfiles=5)
    with stage_run("distill_x", config, {}) as trained, stage_run("evaluate_x", config, {}) as evaluated, \
            stage_run("prepare_x", config, {}) as prepared:
        pass
    client = MlflowClient(mlflow_uri)
    (seen,) = client.get_run(trained.run_id).inputs.dataset_inputs
    assert (seen.dataset.name, seen.dataset.digest) == ("data/x/processed", md5)
    assert json.loads(seen.dataset.profile) == {"size": 1234, "nfiles": 5}
    assert {t.key: t.value for t in seen.tags}["mlflow.data.context"] == "training"
    assert mlflow.data.get_source(seen).uri == str(tmp_path / "data/x/processed")   # MLflow's own reader of it
    (scored,) = client.get_run(evaluated.run_id).inputs.dataset_inputs
    assert {t.key: t.value for t in scored.tags}["mlflow.data.context"] == "evaluation"
    assert not client.get_run(prepared.run_id).inputs.dataset_inputs   # it writes the data set, reads none
    with pipeline_run(config, "ablation", tmp_path, launcher="ablation") as other:   # a run that is not a stage
        other.log_data(["data/x/processed", "data/y/absent"], tmp_path, "training")
    assert [d.dataset.digest for d in client.get_run(other.run_id).inputs.dataset_inputs] == [md5]


@pytest.mark.slow
def test_a_stage_run_records_system_metrics_while_it_works(config, mlflow_uri, tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    sampled = config.model_copy(update={"tracking": config.tracking.model_copy(update={"system_metrics_seconds": 0.2})})
    wanted = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    with stage_run("train_teacher_vision", sampled, {}) as run:   # a run that works until MLflow's monitor has
        deadline = time.monotonic() + 60                          # published (a fixed 1 s was thin on a busy CPU)
        while not wanted <= set(MlflowClient(mlflow_uri).get_run(run.run_id).data.metrics) and time.monotonic() < deadline:
            time.sleep(0.2)
    recorded = MlflowClient(mlflow_uri).get_run(run.run_id).data.metrics
    assert wanted <= set(recorded)
    off = config.model_copy(update={"tracking": config.tracking.model_copy(update={"system_metrics_seconds": None})})
    with stage_run("train_teacher_vision", off, {}) as quiet:
        time.sleep(0.5)
    assert not [k for k in MlflowClient(mlflow_uri).get_run(quiet.run_id).data.metrics if k.startswith("system/")]


@pytest.mark.slow
def test_params_hash_means_the_whole_resolved_params_on_every_run(config, smoke_config, mlflow_uri, tmp_path,
                                                                   monkeypatch):
    """Before: a stage run hashed the params it logged, the registered version the whole config: one tag, two
    meanings, so equal tags could not tell equal configurations."""
    import shutil
    from pathlib import Path

    from flows.gating import lineage
    from tasks.lineage import params_hash

    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).resolve().parents[2] / "dvc.yaml", tmp_path / "dvc.yaml")   # the gate's paths
    with pipeline_run(config, "pipeline", tmp_path) as parent, \
            stage_run("prepare_vision", config, {"data.vision": config.data.vision}) as a, \
            stage_run("train_teacher_vision", config, {"teacher.vision": config.teacher.vision}) as b:
        pass
    tags = [MlflowClient(mlflow_uri).get_run(r.run_id).data.tags["params.hash"] for r in (parent, a, b)]
    assert set(tags) == {params_hash(config)} == {lineage(config, tmp_path, parent.run_id, "vision")["params.hash"]}
    assert params_hash(smoke_config) != params_hash(config)


@pytest.mark.slow
def test_a_stage_whose_outputs_are_not_committed_is_a_failed_run(config, mlflow_uri, tmp_path, monkeypatch):
    """The run is FINISHED once the stage's outputs are in place. Before: it was marked FINISHED as the stage's main
    returned, and an output then missing failed the stage beside a successful-looking run."""
    from tasks.errors import PipelineError
    from tasks.staging import atomic_outputs, staged

    monkeypatch.chdir(tmp_path)
    with (pytest.raises(PipelineError, match="the stage finished without writing"), atomic_outputs(),
          stage_run("validate_vision", config, {}) as run):
        staged(tmp_path / "report.json")   # given out, never written
    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "FAILED"
    with atomic_outputs():
        with stage_run("validate_vision", config, {}) as run:
            staged(tmp_path / "report.json").write_text("{}")
        assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "RUNNING"   # its outputs not yet in place
    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "FINISHED"
    # the command fails after the stage's run ended well: its outputs are not kept, nor is the run left RUNNING
    with pytest.raises(SystemExit), atomic_outputs():
        with stage_run("validate_vision", config, {}) as run:
            staged(tmp_path / "report.json").write_text("{}")
        raise SystemExit(2)
    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "FAILED"
    with atomic_outputs():   # a flow's own run has no outputs to wait for
        with pipeline_run(config, "gate", tmp_path) as flow_run:
            pass
        assert MlflowClient(mlflow_uri).get_run(flow_run.run_id).info.status == "FINISHED"


def test_failed_stage_is_marked_failed(config, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with stage_run("validate_vision", config, {}) as run:
            raise RuntimeError("boom")
    got = MlflowClient(mlflow_uri).get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["pipeline.launcher"] == "dvc"


_WORKER = """
import sys
from pathlib import Path

from tasks.config import load_config
from tasks.tracking import stage_run

cfg = load_config(Path(sys.argv[1]))
for i in range(3):
    with stage_run(f"worker{sys.argv[2]}-stage{i}", cfg, {"worker": sys.argv[2], "i": i}) as run:
        run.log_metrics({"value": float(i)})
        run.log_text(f"worker {sys.argv[2]} stage {i}", "note.txt")
"""


@pytest.mark.slow
@pytest.mark.fault("load", "4 local runs at once on a new embedded SQLite store",
                   "no run lost: the store's creation is serialised by a file lock (without it 3 of 4 runs died in "
                   "the schema migrations); all 12 runs FINISHED with their params, metrics and artifacts")
def test_four_concurrent_runs_on_a_new_sqlite_store_lose_nothing(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(ROOT / "params.yaml"), str(w)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    assert sorted(r.info.run_name for r in runs) == sorted(f"worker{w}-stage{i}" for w in range(4) for i in range(3))
    assert all(r.info.status == "FINISHED" and r.data.metrics["value"] == float(r.data.params["i"]) for r in runs)
    assert all([a.path for a in client.list_artifacts(r.info.run_id)] == ["note.txt"] for r in runs)


_DATA_WORKER = """
import sys
import time
from pathlib import Path

from tasks.config import load_config
from tasks.tracking import RunLogger
from tasks.mlflow_store import client_for, ensure_experiment, tracking_uri

cfg = load_config(Path(sys.argv[1]))
client = client_for(tracking_uri(cfg))
experiment = ensure_experiment(client, cfg)
run = client.create_run(experiment)
while time.time() < float(sys.argv[2]):   # all at once
    time.sleep(0.001)
RunLogger(client, run.info.run_id, experiment).log_data(["data/x"], Path("."), "training")
"""


@pytest.mark.slow
def test_runs_logging_the_same_new_data_set_at_once_all_log_it(tmp_path):
    """MLflow keys a data set on (experiment, name, digest): of runs creating its row at the same moment on SQLite,
    all but one hit the unique constraint. Before: that run failed ("tracking server ... not reachable")."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    md5 = _lock_data(tmp_path, "data/x", size=1, nfiles=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, registry_uri=uri).search_experiments()   # the store exists before the race
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    start = str(time.time() + 20)
    procs = [subprocess.Popen([sys.executable, "-c", _DATA_WORKER, str(ROOT / "params.yaml"), start], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 4
    assert all([d.dataset.digest for d in client.get_run(r.info.run_id).inputs.dataset_inputs] == [md5] for r in runs)


def _runs_on(url: str) -> list[dict]:
    import json
    import urllib.request

    body = json.dumps({"experiment_ids": ["0", "1"], "max_results": 10}).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read()).get("runs", [])


@pytest.mark.slow
@pytest.mark.fault("runs", "the tracking server killed in the middle of a training stage",
                   "ServiceUnavailable naming the server and what could not be logged, exit 75 (transient: the "
                   "flow retries it); no model or metrics file written, nothing staged left")
def test_a_tracking_server_lost_mid_run_fails_the_stage_cleanly(synthetic_movielens, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tasks.recsys.prepare import prepare_recsys
    from tests.conftest import ROOT
    from tests.integration.servers import free_port

    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "data")
    params = cfg.model_dump(by_alias=True)
    params["teacher"]["recsys"]["epochs"] = 400  # long enough to lose the server in the middle
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runners
                              start_new_session=True)
    try:
        def runs() -> list[dict] | None:
            try:
                return _runs_on(url)
            except OSError:   # not up yet, or slow to answer on a busy machine
                return None

        deadline = time.monotonic() + 300
        while runs() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert runs() is not None, f"the MLflow server at {url} never answered"
        # a request may take long on a busy machine before the kill; after it, refused connections fail at once
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": url,
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
        env.pop("PIPELINE_PARENT_RUN_ID", None)
        stage = subprocess.Popen([sys.executable, "-m", "tasks.recsys.train_teacher", "--data", "data",
                                  "--model", "out/teacher.pt", "--metrics", "out/teacher.json",
                                  "--plots", "out/history.csv"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        while not any(r["data"].get("metrics") for r in runs() or []) and stage.poll() is None:
            time.sleep(0.1)  # until the stage has logged its first epoch
        assert stage.poll() is None, "the stage ended before the server could be stopped"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    _, err = stage.communicate(timeout=300)
    assert stage.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: ServiceUnavailable: tracking server {url} is not reachable") and "log metrics" in last
    assert not (tmp_path / "out" / "teacher.pt").exists() and not (tmp_path / "out" / "teacher.json").exists()
    assert not list(tmp_path.rglob(".staging"))


@pytest.mark.fault("security", "the tracking server's password in its URI, the server unreachable",
                   "the one-line error names the server with the password masked, in its own words too, a raw '@' in "
                   "it or the user name too (before: MLflow's message, quoted, carried the URI with the password)")
def test_a_servers_own_message_never_carries_the_password(config, monkeypatch):
    from tasks.errors import ServiceUnavailable
    from tasks.mlflow_store import ensure_experiment

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    for user, password in (("alice", "s3cretPW"), ("alice", "s3c@ret:PW"), ("alice@corp", "s3c@retPW"), ("", "s3cPW"),
                           ("alice", "s3c#ret?PW")):
        with pytest.raises(ServiceUnavailable) as refused:   # (a raw "@" in either: before, the rest of it showed)
            ensure_experiment(MlflowClient(f"http://{user}:{password}@127.0.0.1:9"), config)
        said = str(refused.value)
        assert "s3c" not in said and "PW" not in said and f"{user}:***@127.0.0.1:9" in said, said
    from tasks.mlflow_store import redact

    assert redact("https://alice:pw@host:5000/x?next=a@b") == "https://alice:***@host:5000/x?next=a@b"


def test_a_request_the_store_refuses_as_it_is_is_no_unreachable_server(mlflow_uri):
    """Before: every MLflow error read as "not reachable" (transient): a metric name the store refuses was retried
    as an outage."""
    from mlflow.exceptions import MlflowException

    from tasks.mlflow_store import RequestRefused, server_error

    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("e")).info.run_id
    with pytest.raises(MlflowException) as raised:
        client.log_metric(run, "acc\nshoes", 1.0)
    error = server_error(raised.value, "tracking server x", "could not log")
    assert isinstance(error, RequestRefused) and not error.transient
    assert str(error).startswith("tracking server x refused the request (INVALID_PARAMETER_VALUE: ")
    # a database store's error (a concurrent insert's conflict among them) passes on a later try: not refused
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    conflict = server_error(MlflowException("(IntegrityError) UNIQUE constraint failed", error_code=BAD_REQUEST),
                            "tracking server x", "could not log")
    assert conflict.transient and "answered BAD_REQUEST ((IntegrityError) UNIQUE constraint failed)" in str(conflict)


@pytest.mark.slow
def test_a_run_records_who_ran_it_and_from_what(config, mlflow_uri, tmp_path, monkeypatch):
    """What MLflow's own ``start_run`` records and its UI shows in the User and Source columns. Before: runs made with
    ``create_run`` had none of it: every run's user was "unknown"."""
    import getpass
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/project/tasks/vision/validate.py", "--data", "x"])
    with stage_run("validate_vision", config, {}) as run:
        pass
    got = MlflowClient(mlflow_uri).get_run(run.run_id)
    assert got.info.user_id == getpass.getuser() == got.data.tags["mlflow.user"]
    assert got.data.tags["mlflow.source.name"] == "/project/tasks/vision/validate.py"
    assert got.data.tags["mlflow.source.type"] == "LOCAL"

    def no_entry():   # a pod's runAsUser: a uid with no passwd entry
        raise KeyError("getpwuid(): uid not found: 1000650000")

    monkeypatch.setattr(getpass, "getuser", no_entry)
    monkeypatch.setenv("USER", "pipeline")
    with stage_run("validate_vision", config, {}) as run:
        pass
    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.user_id == "pipeline"


def test_a_stage_run_logs_every_param_dvc_re_runs_it_for(config, smoke_config, mlflow_uri, tmp_path, monkeypatch):
    """Before: a run logged the blocks its code named: validate_vision not the data params it checks the split with,
    distill_vision not the teacher architecture it reads, so two runs DVC ran for different params looked alike in
    MLflow. Values are the ones the stage reads (the profile applied); what the stage logs itself wins."""
    import shutil

    from tests.conftest import ROOT

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    with stage_run("validate_vision", smoke_config, {"validate.vision": smoke_config.validate_.vision}) as run:
        pass
    params = MlflowClient(mlflow_uri).get_run(run.run_id).data.params
    assert params["data.vision.val_size"] == str(smoke_config.data.vision.val_size)
    assert params["data.vision.subset.train"] == "3000" == str(smoke_config.data.vision.subset.train)   # smoke's
    assert not [key for key in params if key.startswith(("profile", "profiles."))]

    with stage_run("distill_vision", config, {"distill.vision": config.distill.vision}) as run:
        pass
    params = MlflowClient(mlflow_uri).get_run(run.run_id).data.params
    assert json.loads(params["teacher.vision.arch.widths"]) == config.teacher.vision.arch.widths   # the teacher read
    assert params["distill.vision.temperature"] == str(config.distill.vision.temperature)
