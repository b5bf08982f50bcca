"""The scaled setup for real, on loopback: PostgreSQL, an S3-compatible server, MLflow (PostgreSQL backend, S3
artifacts, basic auth), a Prefect server on PostgreSQL, a Dask scheduler with two worker processes. The smoke
pipeline, a sweep, concurrent promotions and the deployments run against them; every check goes through the
servers' own APIs. The module starts each process and stops all of them at the end."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.workspace import copy_project
from tests.integration.servers import Processes, Stack, start_dask, start_stack

pytestmark = pytest.mark.integration
CTR_MODEL = "smoke-ctr-student-int8"
RECIPES = 3   # the sweep's: one more than the workers, so that a recipe waits for the worker that is killed


def api(url: str, stack: Stack, body: dict | None = None) -> Any:
    """A JSON request with the MLflow admin's basic-auth credentials (the Prefect server ignores them)."""
    token = base64.b64encode(f"{stack.admin_user}:{stack.admin_password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Basic {token}",
                                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read() or b"null")


def mlflow(stack: Stack, endpoint: str, **query: str) -> Any:
    return api(f"{stack.mlflow_url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", stack)


def search_runs(stack: Stack, where: str) -> list[dict]:
    exp = mlflow(stack, "experiments/get-by-name", experiment_name="model-compression")["experiment"]
    body = {"experiment_ids": [exp["experiment_id"]], "filter": where, "max_results": 1000}
    return api(f"{stack.mlflow_url}/api/2.0/mlflow/runs/search", stack, body).get("runs", [])


def tags(run_or_version: dict) -> dict[str, str]:
    holder = run_or_version.get("data", run_or_version)
    return {t["key"]: t["value"] for t in holder.get("tags", [])}


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``cmd`` to its end; the timeout stops a hang, inside CI's budget (the sweep took 16 min beside the e2e suite)."""
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("stack")
    (base / "logs").mkdir()
    procs = Processes(base / "logs")
    try:
        yield procs, start_stack(procs, base)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def pipeline(stack, tmp_path_factory):
    """The smoke pipeline of the recommender, run by the CLI against the servers. (The servers see the same calls
    from either family; the vision family's run through the same generic stages is the e2e suite's.)"""
    _, st = stack
    repo = copy_project(tmp_path_factory.mktemp("scaled") / "repo", {"profile": "smoke"})
    env = st.client_env(repo)
    proc = run([sys.executable, "-m", "flows.pipeline", "--root", str(repo), "--family", "recsys"], env, repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    parent = proc.stdout.split("MLflow parent run ")[1].split()[0]
    return repo, env, parent


def test_pipeline_runs_tracks_and_registers_through_the_servers(stack, pipeline):
    _, st = stack
    repo, _, parent = pipeline
    # Prefect (PostgreSQL): the flow run and one completed task run per stage and per family gate
    flows = api(f"{st.prefect_api}/flow_runs/filter", st,
                {"flows": {"name": {"any_": ["compression-pipeline"]}}})
    assert [f["state_type"] for f in flows] == ["COMPLETED"]
    stages = [s for s in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"] if s.endswith("_recsys")]
    deadline = time.monotonic() + 60   # task states reach the server's database as events, a moment after the flow
    while True:
        task_runs = api(f"{st.prefect_api}/task_runs/filter", st, {"flow_runs": {"id": {"any_": [flows[0]["id"]]}}})
        settled = {t["name"] for t in task_runs} == {*stages, "promote_recsys"} \
            and {t["state_type"] for t in task_runs} == {"COMPLETED"}
        if settled or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {t["name"] for t in task_runs} == {*stages, "promote_recsys"}
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}
    # the flow run's artifacts: the gate table and a link to the MLflow parent run on the tracking server
    artifacts = {a["key"]: a for a in api(f"{st.prefect_api}/artifacts/filter", st,
                                          {"flow_runs": {"id": {"any_": [flows[0]["id"]]}}})}
    assert "Gate: **PASS**" in artifacts["recsys-gate"]["data"]
    assert artifacts["mlflow-run"]["data"].startswith(f"[MLflow parent run {parent}]({st.mlflow_url}/#/experiments/")
    # MLflow (PostgreSQL): the parent run and its children, one per stage and gate
    children = search_runs(st, f"tags.mlflow.parentRunId = '{parent}'")
    assert {c["info"]["run_name"] for c in children} == {*stages, "promote_recsys"}
    assert {c["info"]["status"] for c in children} == {"FINISHED"}
    # the registry: the champion, with gate, lineage and audit tags
    champion = mlflow(st, "registered-models/alias", name=CTR_MODEL, alias="champion")["model_version"]
    t = tags(champion)
    assert t["gate.passed"] == "true" and t["audit.decision"] == "champion" and t["parent_run_id"] == parent
    listed = mlflow(st, "artifacts/list", run_id=champion["run_id"], path="model")["files"]
    assert {"model/MLmodel", "model/model.onnx"} <= {f["path"] for f in listed}
    # artifacts went through the server to S3
    import boto3

    s3 = boto3.client("s3", endpoint_url=st.s3_url, region_name="us-east-1",
                      aws_access_key_id=st.aws["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=st.aws["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])]
    assert any(k.endswith("model/model.onnx") for k in keys) and any(k.endswith("gate.json") for k in keys)
    # no secret was recorded as a param or tag of any run
    recorded = json.dumps(search_runs(st, ""))
    for secret in (st.admin_password, st.aws["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in recorded


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_champion_serves_over_http_with_mlflows_scoring_server(stack, pipeline):
    """``make serve`` (``python -m flows.serve``): the version <model>@champion names, fetched from the MLflow server
    and S3 and checked, answered by MLflow's scoring server; real test rows get the evaluation's probabilities, bad
    requests a 400."""
    import numpy as np

    from tasks.ctr.ctr_onnx import onnx_probabilities
    from tasks.ctr.ctr_training import CtrSplit
    from tests.integration.servers import free_port, wait_http

    procs, _ = stack
    repo, env, _ = pipeline
    port = free_port()
    proc = procs.start("serve", [sys.executable, "-m", "flows.serve", "--family", "recsys", "--root", str(repo),
                                 "--port", str(port)], env=env, cwd=repo)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ping", proc, procs.log("serve"))
    test = CtrSplit.load(repo / "data/recsys/processed", "test")
    rows = CtrSplit(test.fields[:200], test.genres[:200], test.y[:200])
    expected = onnx_probabilities(repo / "models/recsys/onnx/student_int8.onnx", rows)   # as evaluate_recsys scores
    body = {"inputs": {"fields": rows.fields.tolist(), "genres": rows.genres.tolist()}}
    status, answer = _post(f"{url}/invocations", body)
    assert status == 200, answer
    assert np.allclose(np.asarray(answer["predictions"]["probability"]).ravel(), expected.ravel(), atol=1e-6)
    # a wrong shape, then a wrong dtype: a 4xx naming the problem, and the server keeps serving
    status, answer = _post(f"{url}/invocations", {"inputs": {"fields": [[1, 2, 3]], "genres": body["inputs"]["genres"][:1]}})
    assert 400 <= status < 500 and "does not match expected shape" in answer["message"], answer
    status, answer = _post(f"{url}/invocations", {"inputs": {"fields": [["user-1"] * 7], "genres": body["inputs"]["genres"][:1]}})
    assert 400 <= status < 500 and "user-1" in answer["message"], answer
    status, answer = _post(f"{url}/invocations", body)
    assert status == 200 and proc.poll() is None
    # SIGTERM stops the scoring server too (before: the test SIGKILLed `flows.serve`, whose server, in a process group
    # of its own, went on serving after the suite)
    procs.stop("serve")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/ping", timeout=5)


def test_dvc_pushes_the_pipeline_outputs_to_the_s3_remote(stack, pipeline):
    _, st = stack
    repo, env, _ = pipeline
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["remote", "modify", "--local", "storage", "url", "s3://dvc/cache"],
                 ["remote", "modify", "--local", "storage", "endpointurl", st.s3_url]):
        assert run([*dvc, *args], env, repo).returncode == 0
    pushed = run([*dvc, "push", "-r", "storage"], env, repo)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    status = run([*dvc, "status", "--cloud", "-r", "storage", "--json"], env, repo)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout[-2000:]


def _kill_when_busy(procs: Processes, st: Stack, done: threading.Event) -> dict:
    """Kill the worker (SIGKILL, with its stage processes) that runs a recipe, once another recipe finished: whichever
    worker that is (which one gets the third recipe is Dask's choice), and only if it still runs it a moment later."""
    def recipe_runs() -> list[dict]:
        try:
            return search_runs(st, "tags.`sweep.recipe` LIKE 'recipe-%'")
        except Exception:  # the experiment may not exist yet
            return []

    seen: dict = {"killed": False}
    while not done.is_set():
        recipes = recipe_runs()
        busy = [r for r in recipes if r["info"]["status"] == "RUNNING"]
        if busy and any(r["info"]["status"] == "FINISHED" for r in recipes):
            time.sleep(3)  # well inside its stages
            name = tags(busy[0])["sweep.recipe"]
            still = [r for r in recipe_runs() if r["info"]["status"] == "RUNNING" and tags(r)["sweep.recipe"] == name]
            if still:
                worker = tags(still[0])["sweep.worker"]
                procs.kill(f"dask-{worker}")
                seen.update(killed=True, recipe=name, worker=worker)
                return seen
        time.sleep(1)
    return seen


@pytest.fixture(scope="module")
def sweep(stack, pipeline):
    """A 3-recipe sweep on a real scheduler and two worker processes; one worker is killed in the middle."""
    procs, st = stack
    repo, env, _ = pipeline
    address, names = start_dask(procs, env, repo, workers=2)
    done = threading.Event()
    seen: dict = {}
    watcher = threading.Thread(target=lambda: seen.update(_kill_when_busy(procs, st, done)))
    watcher.start()
    try:
        proc = run([sys.executable, "-m", "flows.sweep", "--root", str(repo), "--family", "recsys", "--address",
                    address, "--recipes", str(RECIPES)], env, repo)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return repo, json.loads((repo / "reports" / "sweep" / "recsys" / "sweep.json").read_text()), seen, names


@pytest.mark.fault("runs", "a Dask worker SIGKILLed in the middle of a sweep",
                   "its recipe reruns on the other worker; abandoned MLflow runs marked KILLED; every recipe ends ok")
def test_sweep_fans_out_on_dask_workers_and_survives_a_killed_one(stack, sweep):
    _, st = stack
    repo, report, seen, names = sweep
    assert seen.get("killed"), "the watcher never found a worker busy with a recipe after another had finished"
    assert [o["status"] for o in report["outcomes"]] == ["ok"] * RECIPES   # the killed worker's recipe ran again
    assert report["pareto"] and report["best"] in {o["name"] for o in report["outcomes"]}
    assert (repo / "reports" / "sweep" / "recsys" / "pareto.png").stat().st_size > 10_000
    recipe_runs = search_runs(st, "tags.`sweep.recipe` LIKE 'recipe-%'")
    assert {tags(r)["sweep.worker"] for r in recipe_runs} == set(names)   # both workers ran recipes
    killed = [r for r in recipe_runs if r["info"]["status"] == "KILLED"]
    assert [tags(r)["sweep.recipe"] for r in killed] == [seen["recipe"]]
    assert len([r for r in recipe_runs if r["info"]["status"] == "FINISHED"]) == RECIPES
    sweep_run = recipe_runs[0]["data"]["tags"]
    parent = next(t["value"] for t in sweep_run if t["key"] == "mlflow.parentRunId")
    assert len({tags(r)["mlflow.parentRunId"] for r in recipe_runs}) == 1
    registered = json.loads(tags(mlflow(st, "runs/get", run_id=parent)["run"])["sweep.registered"])
    version = mlflow(st, "model-versions/get", name=CTR_MODEL, version=registered["version"])["model_version"]
    assert tags(version)["audit.decision"] == "challenger" and tags(version)["sweep.run_id"] == parent
    challenger = mlflow(st, "registered-models/alias", name=CTR_MODEL, alias="challenger")["model_version"]
    assert challenger["version"] == registered["version"]


def _distinct_candidates(recipe_dirs: list[Path], dest: Path, count: int) -> list[Path]:
    """``count`` copies of the sweep's recipe folders, each with a distinct candidate file (same model, its own
    ONNX doc string) and an evaluation that records that file, as if ``count`` recipes had been run."""
    import shutil

    import onnx

    from tasks.io import file_digest, write_json

    made = []
    for i in range(count):
        root = dest / f"candidate-{i}"
        shutil.copytree(recipe_dirs[i % len(recipe_dirs)], root, symlinks=True)
        (root / "dvc.lock").unlink(missing_ok=True)  # no DVC hash: each is a new candidate to the registry
        path = root / "models/recsys/onnx/student_int8.onnx"
        model = onnx.load(str(path))
        model.doc_string = f"candidate {i}"
        onnx.save(model, str(path))
        evaluation = json.loads((root / "metrics/recsys/evaluation.json").read_text())
        evaluation["sha256"]["student_int8"] = file_digest(path)
        write_json(root / "metrics/recsys/evaluation.json", evaluation)
        made.append(root)
    return made


@pytest.mark.fault("load", "8 promotions of 8 candidates at once against the PostgreSQL-backed registry",
                   "they run one after another under the registry lock: 8 new versions, each with gate, audit and "
                   "model.sha256 tags, each compared with the champion of its moment; exactly one champion")
def test_eight_promotions_at_once_end_with_one_champion_and_a_consistent_history(stack, sweep, tmp_path):
    _, st = stack
    repo, report, _, _ = sweep
    env = st.client_env(repo)
    dirs = _distinct_candidates([Path(o["dir"]) for o in report["outcomes"] if o["status"] == "ok"], tmp_path, 8)
    before = {v["version"] for v in _versions(st)}
    champion_before = mlflow(st, "registered-models/alias", name=CTR_MODEL, alias="champion")["model_version"]
    cmd = [sys.executable, "-m", "flows.pipeline", "--gate-only", "--family", "recsys", "--root"]
    logs = [tmp_path / f"promotion-{i}.log" for i in range(len(dirs))]   # files, not pipes: a full pipe would stall
    outputs = [log.open("w") for log in logs]                            # a lock holder, and all behind it
    procs = [subprocess.Popen([*cmd, str(d)], env=env, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
             for d, out in zip(dirs, outputs, strict=True)]
    try:
        codes = [p.wait(timeout=1200) for p in procs]   # 6 min beside the e2e suite
    finally:
        for p in procs:
            if p.poll() is None:   # a hang: leave no promotion running behind the failure
                p.kill()
        for out in outputs:
            out.close()
    assert codes == [0] * 8, [log.read_text()[-3000:] for log in logs]
    new = sorted((v for v in _versions(st) if v["version"] not in before), key=lambda v: int(v["version"]))
    assert len(new) == 8
    champion = champion_before["version"]
    for version in new:  # one after the other: each was compared with the champion of its moment
        assert version["tags"]["audit.champion_before"] == champion
        assert {"gate.passed", "model.sha256", "audit.registered_at", "audit.flow_run_id"} <= set(version["tags"])
        if version["tags"]["audit.decision"] == "champion":
            champion = version["version"]
    assert mlflow(st, "registered-models/alias", name=CTR_MODEL, alias="champion")["model_version"]["version"] == champion


def _versions(st: Stack) -> list[dict]:
    found = mlflow(st, "model-versions/search", filter=f"name='{CTR_MODEL}'", max_results="1000")["model_versions"]
    return [{**v, "tags": tags(v)} for v in found]


def test_deployments_register_and_a_worker_runs_the_rollback(stack, pipeline, sweep):
    procs, st = stack
    repo, env, _ = pipeline
    prefect = [str(Path(sys.executable).parent / "prefect")]
    made = run([*prefect, "work-pool", "create", "kdq-process", "--type", "process", "--overwrite"], env, repo)
    assert made.returncode == 0, made.stdout + made.stderr
    # deployed from a shell that knows nothing of where the worker keeps the project: the worker says, at run time
    deploying = {k: v for k, v in env.items() if k != "KDQ_PROJECT_DIR"}
    deployed = run([*prefect, "--no-prompt", "deploy", "--all"], deploying, repo)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    deployments = {d["name"]: d for d in api(f"{st.prefect_api}/deployments/filter", st, {})}
    assert set(deployments) == {"nightly-vision", "nightly-recsys", "continuous-recsys", "continuous-vision", "sweep",
                                "promote", "rollback"}
    assert str(repo) not in json.dumps(deployments["rollback"]["pull_steps"])   # nothing frozen at deploy time
    env = {**env, "KDQ_PROJECT_DIR": str(repo)}
    for name in ("nightly-vision", "nightly-recsys"):
        schedule = deployments[name]["schedules"][0]["schedule"]
        assert schedule["cron"] and schedule["timezone"] == "Europe/Berlin"
    assert deployments["nightly-recsys"]["parameters"]["families"] == ["recsys"]

    current = mlflow(st, "registered-models/alias", name=CTR_MODEL, alias="champion")["model_version"]
    expected = tags(current)["audit.champion_before"]
    triggered = run([*prefect, "deployment", "run", "rollback-champion/rollback", "-p", f"name={CTR_MODEL}",
                     "-p", "reason=integration test"], env, repo)
    assert triggered.returncode == 0, triggered.stdout + triggered.stderr
    # started elsewhere: the flow run finds the project through the worker's KDQ_PROJECT_DIR alone
    worker = run([*prefect, "worker", "start", "--pool", "kdq-process", "--run-once"], env, repo.parent, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    runs = api(f"{st.prefect_api}/flow_runs/filter", st, {"flows": {"name": {"any_": ["rollback-champion"]}}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    after = mlflow(st, "registered-models/alias", name=CTR_MODEL, alias="champion")["model_version"]
    assert after["version"] == expected and tags(after)["champion.reason"] == "integration test"


@pytest.mark.fault("security", "wrong credentials for the authenticated MLflow server",
                   "AccessDenied naming the server and UNAUTHENTICATED, exit 2 (a user error: not retried); the "
                   "password is never printed; nothing registered")
def test_refused_credentials_are_a_user_error_and_never_printed(stack, pipeline):
    _, st = stack
    repo, env, _ = pipeline
    before = len(_versions(st))
    wrong = {**env, "MLFLOW_TRACKING_PASSWORD": "not-the-password-4711"}
    proc = run([sys.executable, "-m", "flows.pipeline", "--gate-only", "--family", "recsys", "--root", str(repo)],
               wrong, repo, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: AccessDenied: tracking server http://127.0.0.1:") and "(UNAUTHENTICATED)" in last
    assert "not-the-password-4711" not in proc.stdout + proc.stderr and st.admin_password not in proc.stderr
    assert len(_versions(st)) == before


@pytest.mark.fault("runs", "the tracking server unreachable when a run starts",
                   "bounded retries, then ServiceUnavailable naming the URI, exit 75; nothing registered")
def test_an_unreachable_tracking_server_fails_fast_and_registers_nothing(stack, pipeline):
    _, st = stack
    repo, env, _ = pipeline
    before = len(_versions(st))
    dead = {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}   # the discard port: nothing listens
    proc = run([sys.executable, "-m", "flows.pipeline", "--gate-only", "--family", "recsys", "--root", str(repo)],
               dead, repo, timeout=300)
    assert proc.returncode != 0
    assert "http://127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr.splitlines()[-1]
    assert len(_versions(st)) == before
