"""Restoring a registered version: a registry that does not answer is a transient error without the password, the
re-run registers where the project does, and the data comes from the project's remote as it is configured."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from flows import restore as restore_module
from flows.restore import rerun, restore, restore_data, restore_lineage
from tasks.errors import PipelineError, ServiceUnavailable
from tasks.mlflow_store import RequestRefused
from tests.conftest import ROOT

DOWN = "http://admin:s3cret@127.0.0.1:9"   # nothing listens on port 9
SECRET = "restore-secret-key-0451"


@pytest.fixture
def unreachable(monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    return DOWN


@pytest.mark.fault("runs", "the registry does not answer while a version is restored",
                   "a transient error (exit 75) without the URI's password (before: \"no such version\" / \"holds no "
                   "lineage/ artifacts\", exit 2, MLflow's message with the password in it)")
def test_a_registry_that_does_not_answer_is_transient_and_keeps_its_password(unreachable, tmp_path):
    version = SimpleNamespace(name="ctr", version="3", run_id="0123abcd")
    with pytest.raises(ServiceUnavailable) as down:
        restore_lineage(MlflowClient(unreachable), version, tmp_path)
    assert "s3cret" not in str(down.value) and "127.0.0.1:9" in str(down.value)
    with pytest.raises(ServiceUnavailable) as down:
        restore(ROOT, "recsys", "ctr", "3", tmp_path / "restored", run=False)
    assert "s3cret" not in str(down.value) and down.value.transient


def test_a_version_or_lineage_that_is_not_there_is_still_the_users_error(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("ctr")
    with pytest.raises(PipelineError, match="ctr has no such version") as missing:
        restore(ROOT, "recsys", "ctr", "7", tmp_path / "restored", run=False)
    assert not missing.value.transient
    with pytest.raises(RequestRefused):   # not a version number: refused as it is, not retried
        restore(ROOT, "recsys", "ctr", "seven", tmp_path / "restored", run=False)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri()))
    version = SimpleNamespace(name="ctr", version="1", run_id=run.info.run_id)
    with pytest.raises(PipelineError, match="holds no lineage/ artifacts") as missing:
        restore_lineage(client, version, tmp_path)
    assert not missing.value.transient


def test_the_re_run_registers_into_the_projects_tracking_store(tmp_path, monkeypatch):
    """Before: the re-run got no MLFLOW_TRACKING_URI and, on default settings, registered into a new store of its own
    in DEST, where the version it rebuilt was never found."""
    dest = tmp_path / "dest"
    (dest / "flows").mkdir(parents=True)
    (dest / "flows" / "__init__.py").write_text("")
    (dest / "flows" / "pipeline.py").write_text(   # DEST's pipeline, as far as this test needs it
        "import os, sys\nseen = [os.environ.get('MLFLOW_TRACKING_URI', ''), *sys.argv[1:]]\n"
        "open('seen', 'w').write(' '.join(seen))\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    assert rerun(dest, "recsys", project) == 0
    assert (dest / "seen").read_text() == f"{project} --family recsys --no-promote"


def _dvc(cwd: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def s3(monkeypatch) -> str:
    """An S3 endpoint (moto's server) with a bucket ``dvc``; its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="dvc")
    yield url
    server.stop()


@pytest.mark.fault("data", "restoring a version on a machine whose default DVC remote is S3 on MinIO (endpointurl "
                   "set with `dvc remote modify --local`)",
                   "DEST's pull uses the remote with all its settings; a failed pull says DVC's reason (before: the "
                   "URL alone was copied, the pull went to AWS, and --quiet left the message empty)")
def test_data_is_pulled_from_the_projects_remote_with_all_its_settings(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    _dvc(root, "init", "--quiet")
    (root / "data").mkdir()
    (root / "dvc.yaml").write_text("stages:\n  snapshot_recsys:\n    cmd: python -c \"open('data/x.txt', 'w')"
                                   ".write('rows')\"\n    outs: [data/x.txt]\n")
    _dvc(root, "repro", "--quiet")
    _dvc(root, "remote", "add", "--local", "--default", "storage", "s3://dvc/cache")
    _dvc(root, "remote", "modify", "--local", "storage", "endpointurl", s3)
    _dvc(root, "remote", "modify", "--local", "storage", "access_key_id", "AKIDRESTORE")
    _dvc(root, "remote", "modify", "--local", "storage", "secret_access_key", SECRET)
    _dvc(root, "push", "--quiet")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "p"], cwd=root,
                   check=True)
    dest = tmp_path / "dest"
    subprocess.run(["git", "clone", "--quiet", str(root), str(dest)], check=True)   # no local config, no cache
    for cache in (root / ".dvc" / "cache", root / "data"):
        shutil.rmtree(cache)   # on the remote only
    commands = []
    real_run = restore_module._run
    monkeypatch.setattr(restore_module, "_run", lambda args, *rest: commands.append(args) or real_run(args, *rest))
    assert restore_data(root, dest, "recsys") == "s3://dvc/cache"
    assert (dest / "data" / "x.txt").read_text() == "rows"
    # the secret reaches DVC in DEST's local config, readable by its owner only, and on no command line (before:
    # `dvc remote modify ... secret_access_key <secret>`, which `ps` shows every user of the machine)
    assert not [args for args in commands if any(SECRET in arg for arg in args)]
    local = dest / ".dvc" / "config.local"
    assert SECRET in local.read_text() and local.stat().st_mode & 0o077 == 0
    (dest / "dvc.lock").write_text((dest / "dvc.lock").read_text().replace("md5: ", "md5: 0"))   # in no store
    with pytest.raises(PipelineError, match="is in no DVC remote or cache tried") as nowhere:
        restore_data(root, dest, "recsys")
    reasons = str(nowhere.value).split("; ")   # DVC's, for each place tried (before: none, as of --quiet)
    assert len(reasons) == 3 and all("Checkout failed for following targets: data/x.txt" in r for r in reasons)
    assert "from s3://dvc/cache failed" in reasons[1]


def test_a_remote_urls_password_is_masked_where_restore_names_it(tmp_path, monkeypatch):
    """Before: a pull that failed named the project's remote URL as it is, password and all."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    _dvc(root, "init", "--quiet")
    (root / "dvc.yaml").write_text("stages:\n  snapshot_recsys:\n    cmd: python -c \"open('x.txt', 'w').write('r')\"\n"
                                   "    outs: [x.txt]\n")
    _dvc(root, "repro", "--quiet")
    _dvc(root, "remote", "add", "--local", "--default", "storage", "https://user:s3cret@127.0.0.1:9/dvc")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "p"], cwd=root,
                   check=True)
    subprocess.run(["git", "clone", "--quiet", str(root), str(tmp_path / "dest")], check=True)
    shutil.rmtree(root / ".dvc" / "cache")
    with pytest.raises(PipelineError, match="is in no DVC remote or cache tried") as nowhere:
        restore_data(root, tmp_path / "dest", "recsys")
    assert "s3cret" not in str(nowhere.value) and "https://user:***@127.0.0.1:9/dvc" in str(nowhere.value)
