"""Where MLflow's tracking store and registry live and how this code reaches them: the URI (``$MLFLOW_TRACKING_URI``,
else ``tracking.uri`` in params.yaml, else ``sqlite:///mlflow.db``), bounded HTTP retries, a client (SQLite stores
created under a lock; a store of another MLflow version named in one line), the experiment, credentials kept out of
messages, and which failures are the server's."""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import Config
from tasks.errors import AccessDenied, PipelineError, ServiceUnavailable


def tracking_uri(cfg: Config, root: Path = Path(".")) -> str:
    """Where runs and the registry live; also bounds how long MLflow retries a server that does not answer. A SQLite
    store's relative path is made absolute (from the environment: against the working directory; from params:
    against the project): processes started in another folder (a restore's re-run, a sweep's recipes, a pipeline
    run's stages under ``--root``) log to the same store, not to a new one of their own."""
    bound_http_retries(cfg)
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return _absolute(uri, Path.cwd(), "$MLFLOW_TRACKING_URI")
    if cfg.tracking.uri:
        return _absolute(cfg.tracking.uri, root, "tracking.uri")
    return _absolute("sqlite:///mlflow.db", root, "the project's folder")


#: what SQLAlchemy decodes in a URL's database path (``make_url``): "%41" is "A", a lone "%" stays as it is
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _absolute(uri: str, base: Path, source: str) -> str:
    """``uri`` with a SQLite database path relative to ``base`` made absolute; a path SQLAlchemy would read as
    another (it cuts at "?" and decodes "%XX", a "%" and two hex digits: runs would go to another file, maybe another
    project's) is refused."""
    if not uri.startswith("sqlite:///"):
        return uri
    path, sep, query = uri.removeprefix("sqlite:///").partition("?")
    if path not in ("", ":memory:") and not path.startswith("/"):
        path = str((base / path).resolve())
        if "?" in path or _ESCAPE.search(path):
            raise PipelineError(f"{source}: the SQLite store's path {path} holds '?' or '%' and two hex digits, "
                                "which its URI cannot name (SQLAlchemy would open another file): move the project, "
                                "or set $MLFLOW_TRACKING_URI to a store elsewhere")
    return f"sqlite:///{path}{sep}{query}"


def bound_http_retries(cfg: Config) -> None:
    """MLflow's defaults retry an unreachable server for minutes; ``tracking.http`` bounds that (for this process
    and the stage processes it starts). A value already in the environment wins."""
    http = cfg.tracking.http
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", http.max_retries),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", http.backoff_factor),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", http.timeout_seconds)):
        os.environ.setdefault(name, str(value))


def redact(text: str) -> str:
    """``text`` (a URI, or a server's error naming the URL it called) with the password of every URL in it masked
    (``https://user:secret@host`` -> ``https://user:***@host``; a raw "@" in the user name or password too, and a
    "/" in the password: ``openssl rand -base64`` gives them)."""
    return _CREDENTIALS.sub(r"\1:***@", text)


#: user:password@ right after a scheme: the password up to the last "@" before the path (it may hold "@", ":", and
#: even a raw "#" or "?"; the user name may be empty, a token alone). An "@" in a query without a path before it
#: masks the host too: a host hidden rather than a password shown. No "@" before the first "/": the password holds
#: a "/" (base64 passwords do), masked up to the last "@" of the URI (its whitespace-delimited text), the host and
#: path before an "@" in the path too
_CREDENTIALS = re.compile(r"(?<=://)([^/\s:?#]*):(?:[^/\s]+|\S+)@")


class RequestRefused(PipelineError):
    """A server answered that the request itself is wrong (a name it does not accept, a state it is not in): the
    same request fails again, so it is not retried."""


#: MLflow error codes of a request the server refused as it was: none of them passes on a retry (not BAD_REQUEST:
#: MLflow's database store reports any database error so, a concurrent insert's conflict too, which a retry passes)
REFUSED = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
           "MALFORMED_REQUEST")


def server_error(err: Exception, what: str, outcome: str) -> PipelineError:
    """The error to raise for a failed call to a tracking, registry or artifact server: refused credentials are
    the user's to fix and a request refused as it was is the caller's (neither is retried); anything else is a
    server that did not answer (transient, retried). Credentials in the server's message are masked."""
    code = getattr(err, "error_code", None)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return AccessDenied(f"{what} refused the credentials ({code}): set MLFLOW_TRACKING_USERNAME and "
                            f"MLFLOW_TRACKING_PASSWORD for an account with access; {outcome}")
    message = redact(getattr(err, "message", str(err)))
    if code in REFUSED:
        return RequestRefused(f"{what} refused the request ({code}: {message[:300]}); {outcome}")
    if code == "BAD_REQUEST":   # what a database store says of any error of its database: a conflict passes later
        return ServiceUnavailable(f"{what} answered BAD_REQUEST ({message[:300]}); retried, as a concurrent "
                                  f"write's conflict passes on a later try; {outcome}")
    return ServiceUnavailable(f"{what} is not reachable after the bounded retries of tracking.http "
                              f"({type(err).__name__}: {redact(str(err))}); {outcome}")


def is_server_call_error(err: Exception) -> bool:
    """An error of a call to a server (MLflow REST, HTTP, S3), as opposed to a bug in this code."""
    return isinstance(err, MlflowException) or type(err).__module__.split(".")[0] in ("requests", "urllib3",
                                                                                      "botocore", "boto3")


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def registered_version(client: MlflowClient, name: str, version: str | None = None, alias: str = "champion"
                       ) -> Any | None:
    """Version ``version`` of registered model ``name``, else the one ``alias`` names; None when there is none (no
    such model, version or alias)."""
    try:
        return client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            return None
        raise


class StoreSchemaMismatch(PipelineError):
    """A SQL tracking store's database schema is another MLflow version's: an operator migrates it (or runs the
    MLflow that wrote it); every try fails alike, so it is not retried."""


#: what MLflow's SQL stores raise when the database's schema revision is not this MLflow's
#: (``mlflow.store.db.utils._verify_schema``): the revision found and the one expected
_SCHEMA = re.compile(r"^Detected out-of-date database schema \(found version (\S+), but expected (\S+)\)")


def client_for(uri: str) -> MlflowClient:
    """A client of the tracking store and registry at ``uri``; StoreSchemaMismatch, in one line saying how to
    migrate it, when its database's schema is another MLflow version's (MLflow's own error is a traceback)."""
    try:
        return _client(uri)
    except MlflowException as err:
        if not (found := _SCHEMA.match(err.message)):
            raise
        raise _schema_mismatch(uri, *found.groups()) from None


def _schema_mismatch(uri: str, found: str, expected: str) -> StoreSchemaMismatch:
    """What to do about a store at schema revision ``found`` where this MLflow expects ``expected``: upgrade an
    older one (after a backup: the migration is not undone), use the MLflow of a newer one (no downgrade exists)."""
    import shlex

    import mlflow
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from mlflow.store.db.utils import _get_alembic_config

    shown = redact(uri)
    what = f"tracking store {shown}: its database schema (revision {found})"
    try:   # ("None": tables without a recorded revision, as a store older than migrations left them)
        ScriptDirectory.from_config(_get_alembic_config("")).get_revision(None if found == "None" else found)
    except CommandError:   # a revision this MLflow has no migration to: written by a later MLflow
        return StoreSchemaMismatch(f"{what} is a later MLflow's than this one ({mlflow.__version__}, revision "
                                   f"{expected}): run with the MLflow version that wrote it; nothing read or written")
    password = " (the password where *** stands)" if shown != uri else ""
    return StoreSchemaMismatch(f"{what} is older than this MLflow's ({mlflow.__version__}, revision {expected}): "
                               f"back the database up, then run `mlflow db upgrade {shlex.quote(shown)}`{password}; "
                               "nothing read or written")


def _client(uri: str) -> MlflowClient:
    """MLflow opens (and on a new SQLite file creates and migrates) the store in the constructor; on SQLite that
    happens under an exclusive lock on a file beside the database, since runs starting together on a new store
    otherwise race on the migrations and all but one fail (alembic: "expected to match one row"; seen with 4
    concurrent runs)."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri, registry_uri=uri)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(uri, registry_uri=uri)
        client._get_registry_client()  # the registry store too: it runs the same migrations
        return client


def ensure_experiment(client: MlflowClient, cfg: Config, root: Path = Path(".")) -> str:
    """Id of the configured experiment, created (with a local artifact root on local stores) if missing."""
    try:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
    except MlflowException as err:  # the first call to the server: refused, timed out, or failed after retries
        raise server_error(err, f"tracking server {redact(client.tracking_uri)}", "nothing was recorded") from None
    if exp is not None:
        return exp.experiment_id
    location = (root / cfg.tracking.artifact_root).resolve().as_uri() if _is_local(client.tracking_uri) else None
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except MlflowException:  # created concurrently by another stage or run
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
