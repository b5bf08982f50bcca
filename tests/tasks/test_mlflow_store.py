"""Reaching the MLflow store: a store of another MLflow version, and credentials kept out of messages."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import EXIT_USER_ERROR, run_cli
from tasks.mlflow_store import StoreSchemaMismatch, _schema_mismatch, client_for, redact

ROOT = Path(__file__).resolve().parents[2]


def _at_revision(tmp_path, revision: str) -> str:
    """The URI of a real SQLite store whose schema says it is at alembic ``revision``: created by this MLflow in a
    process of its own (MLflow keeps the stores a process opened: this one would never read the schema again)."""
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    create = "import sys; from tasks.mlflow_store import client_for; client_for(sys.argv[1]).search_experiments()"
    subprocess.run([sys.executable, "-c", create, uri], cwd=ROOT, check=True, capture_output=True)
    with sqlite3.connect(database) as con:
        con.execute("update alembic_version set version_num = ?", (revision,))
    con.close()
    return uri


@pytest.mark.slow
@pytest.mark.fault("runs", "a SQLite (or other SQL) MLflow store with an older schema (MLflow upgraded since)",
                   "StoreSchemaMismatch in one line naming the store and `mlflow db upgrade <uri>` after a backup, "
                   "not retried (before: MLflow's exception, a 17-frame traceback, the stage retried as transient)")
def test_a_store_of_an_older_mlflow_says_how_to_upgrade_it(tmp_path, monkeypatch, capsys):
    """Before: MLflow's _verify_schema raised a bare MlflowException out of every entry point (flows.serve,
    flows.restore, each stage): a traceback, and a stage exit 1, retried as if the store might answer later."""
    uri = _at_revision(tmp_path, "0584bdc529eb")   # MLflow 2.x's schema
    with pytest.raises(StoreSchemaMismatch) as raised:
        client_for(uri)
    said = str(raised.value)
    assert not raised.value.transient and "\n" not in said
    assert said.startswith(f"tracking store {uri}: its database schema (revision 0584bdc529eb) is older than this "
                           "MLflow's")
    assert f"back the database up, then run `mlflow db upgrade {uri}`" in said and "***" not in said
    # a server's database: the command shown without its password
    said = str(_schema_mismatch("postgresql://kdq:Zx9/kQ==@db:5432/mlflow", "0584bdc529eb", "dc11669786a5"))
    assert "`mlflow db upgrade 'postgresql://kdq:***@db:5432/mlflow'` (the password where *** stands)" in said
    assert "Zx9" not in said
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:   # what a stage, flows.serve or flows.restore prints
        run_cli(lambda: client_for(uri))
    assert stopped.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: StoreSchemaMismatch: tracking store ") and err.count("\n") == 1 and "Trace" not in err


@pytest.mark.slow
@pytest.mark.fault("runs", "a SQLite MLflow store written by a later MLflow than the project's",
                   "StoreSchemaMismatch in one line: run with the MLflow that wrote it (no `mlflow db upgrade`, "
                   "which cannot go back)")
def test_a_store_of_a_later_mlflow_is_not_told_to_upgrade(tmp_path):
    uri = _at_revision(tmp_path, "fedcba987654")   # a revision this MLflow has no migration to
    with pytest.raises(StoreSchemaMismatch, match=r"^tracking store .*: its database schema \(revision fedcba987654\) "
                                                  r"is a later MLflow's than this one .*: run with the MLflow version "
                                                  r"that wrote it") as raised:
        client_for(uri)
    assert "db upgrade" not in str(raised.value)


@pytest.mark.fault("security", "a tracking URI whose password holds a '/' (a base64 password: openssl rand -base64)",
                   "the password is masked in every message (before: redact stopped at the '/' and left the whole "
                   "URI as it was)")
def test_a_password_holding_a_slash_is_masked():
    """Before: the password was read up to the first "/" only, so a base64 password (which may hold "/") did not
    match at all and the URI went into messages as it was."""
    assert redact("https://alice:pa/ss@host:5000") == "https://alice:***@host:5000"
    assert redact("postgresql+psycopg2://kdq:Zx9/kQ+4s3cretPW==@db:5432/mlflow") == \
        "postgresql+psycopg2://kdq:***@db:5432/mlflow"
    assert redact("tried http://u:Zx9/kQ@h:1/x and http://v:p/w@h2/p: refused") == \
        "tried http://u:***@h:1/x and http://v:***@h2/p: refused"   # each URI of a message, up to its own end
    # as before: an "@" of the path or query after a password without "/" is left where it is
    assert redact("https://alice:pw@host:5000/x?next=a@b") == "https://alice:***@host:5000/x?next=a@b"
    assert redact("http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed") == \
        "http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed"


def test_a_relative_sqlite_store_is_the_same_file_from_every_folder(tmp_path, monkeypatch, config):
    """Before: ``MLFLOW_TRACKING_URI=sqlite:///mlflow.db`` (or a relative ``tracking.uri``) was passed as it was to
    processes started in another folder (a restore's re-run in DEST, a sweep's recipes in their copies, stages under
    ``--root``), which each logged to a new, empty store of their own."""
    from tasks.mlflow_store import tracking_uri

    here, project = tmp_path / "here", tmp_path / "project"
    here.mkdir()
    project.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert tracking_uri(config, project) == f"sqlite:///{here / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///:memory:")
    assert tracking_uri(config, project) == "sqlite:///:memory:"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    stored = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": "sqlite:///s/m.db"})})
    assert tracking_uri(stored, project) == f"sqlite:///{project / 's' / 'm.db'}"
    assert tracking_uri(config, project) == f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")   # a server: as it is
    assert tracking_uri(stored, project) == "http://mlflow:5000"


@pytest.mark.fault("runs", "a project in a folder whose path holds '?' or '%' (its own SQLite store)",
                   "one line naming the path and what to do (before: SQLAlchemy cut the path at '?' or decoded '%41': "
                   "the runs went to another file, outside the project, maybe another project's store)")
@pytest.mark.parametrize("folder", ["a?b", "p%41"])
def test_a_project_path_its_sqlite_uri_cannot_name_is_refused(tmp_path, monkeypatch, config, folder):
    from tasks.errors import PipelineError
    from tasks.mlflow_store import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PipelineError, match=r"the project's folder: the SQLite store's path .* holds '\?' or '%' and"):
        tracking_uri(config, tmp_path / folder / "project")
    done = tmp_path / "100% done"   # a "%" SQLAlchemy keeps as it is: the project's store, where it always was
    assert tracking_uri(config, done) == f"sqlite:///{done / 'mlflow.db'}"
