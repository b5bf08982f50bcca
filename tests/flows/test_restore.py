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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _version(tmp_path: Path, params_hash: str | None = None) -> MlflowClient:
    """Version 1 of ``ctr`` in the store at $MLFLOW_TRACKING_URI, recording this project's HEAD; its run holds the
    lineage/ artifacts (HEAD's params.yaml) when ``params_hash`` is given, and that hash is the version's."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    client = MlflowClient()
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    tags = {"git.commit": head.stdout.strip()}
    if params_hash is not None:
        lineage = tmp_path / "lineage"
        lineage.mkdir()
        shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True,
                               check=True)
        (lineage / "params.yaml").write_text(shown.stdout)
        (lineage / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
        client.log_artifacts(run, str(lineage), "lineage")
        tags["params.hash"] = params_hash
    client.create_registered_model("ctr")
    client.create_model_version("ctr", f"runs:/{run}/model", run, tags=tags)
    return client


@pytest.mark.slow
@pytest.mark.fault("runs", "restoring a version whose run holds no lineage/ artifacts",
                   "a one-line PipelineError before anything is cloned: DEST (and the parent it would create) not "
                   "there, and the same command again gives the same answer (before: DEST left a full clone, and the "
                   "same command said \"not empty\")")
def test_a_version_without_lineage_is_refused_before_dest_is_made(mlflow_uri, tmp_path):
    """Before: the code was cloned into DEST first; the refusal that followed left the clone there."""
    _version(tmp_path)
    dest = tmp_path / "new" / "dest"   # its parent created by the clone too
    for _ in range(2):   # the same command again: the same refusal, not "not empty"
        with pytest.raises(PipelineError, match=r"^ctr version 1: its run \w+ holds no lineage/ artifacts"):
            restore(ROOT, "recsys", "ctr", "1", dest, run=False)
        assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.fault("runs", "restoring a version whose params resolve to another params.hash than it records (found "
                   "by DEST's own code, after the clone)",
                   "a one-line PipelineError and DEST as it was found: a new one removed, an empty one left there "
                   "and empty (before: DEST left a full clone, and the same command said \"not empty\")")
def test_a_restore_refused_after_the_clone_leaves_dest_as_it_was_found(mlflow_uri, tmp_path):
    """Before: a params.hash that differs was found by DEST's own code, after the clone, and the clone stayed."""
    _version(tmp_path, params_hash="0" * 64)
    empty, new = tmp_path / "empty", tmp_path / "new"
    empty.mkdir()
    for dest in (empty, new, empty):
        with pytest.raises(PipelineError, match=r"params\.yaml: resolves to params\.hash [0-9a-f]{12}…, the version "
                                                r"records 000000000000…$"):
            restore(ROOT, "recsys", "ctr", "1", dest, run=False)
    assert empty.is_dir() and not list(empty.iterdir()) and not new.exists()


@pytest.mark.slow
@pytest.mark.fault("runs", "python -m flows.restore into a DEST that is a file",
                   "a one-line PipelineError naming DEST, before the registry is asked (before: NotADirectoryError "
                   "and its traceback)")
def test_a_dest_that_is_a_file_is_refused_in_one_line(mlflow_uri, tmp_path):
    _version(tmp_path)
    dest = tmp_path / "afile"
    dest.write_text("mine")
    with pytest.raises(PipelineError, match=rf"^{dest}: a file, not a folder; restore writes into an empty or new "
                                            "folder$"):
        restore(ROOT, "recsys", "ctr", "1", dest, run=False)
    assert dest.read_text() == "mine"


@pytest.mark.fault("runs", "python -m flows.restore with a tracking store that does not exist (a SQLite file not "
                   "there), or --name with a --family params.yaml does not have",
                   "a one-line PipelineError naming the store or --family; no store created (before: an empty "
                   "mlflow.db and its lock created, then \"no such version\"; --family unchecked)")
def test_a_store_that_is_not_there_is_not_created_and_family_is_checked_with_name(tmp_path, monkeypatch):
    from flows.restore import main

    database = tmp_path / "none" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with pytest.raises(PipelineError, match=rf"^no tracking store at sqlite:///{database}: {database} does not "
                                            "exist; set MLFLOW_TRACKING_URI or tracking.uri to the store ctr version "
                                            "1 was registered in$"):
        restore(ROOT, "recsys", "ctr", "1", tmp_path / "dest", run=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "dest").exists()
    (tmp_path / "none").mkdir()
    database.touch()   # there, named with SQLAlchemy's options: asked, not refused as missing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}?timeout=30")
    with pytest.raises(PipelineError, match=r"^--version 1: ctr has no such version in sqlite:///"):
        restore(ROOT, "recsys", "ctr", "1", tmp_path / "dest", run=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    shutil.rmtree(tmp_path / "none")
    monkeypatch.setattr(sys, "argv", ["flows.restore", str(tmp_path / "dest"), "--version", "1", "--name", "ctr",
                                      "--family", "nope", "--root", str(ROOT), "--no-run"])
    with pytest.raises(PipelineError, match=r"^--family: 'nope' is not one of params\.yaml's families"):
        main()
    assert not (tmp_path / "none").exists()
