"""Real server processes on loopback for the integration suite: PostgreSQL, an S3-compatible endpoint, an MLflow
tracking server (PostgreSQL backend, S3 artifacts, basic auth), a Prefect server on PostgreSQL, Dask.

Each is started as its own process (group) and stopped by ``Processes.stop_all``; nothing is left running.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Wait until ``url`` answers (any HTTP status); fail with the server's log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback only
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url}: no answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@dataclass
class Processes:
    """Every process the suite started, each in its own session so that its children die with it."""

    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    cleanup: list[Path] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              user: str | None = None) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        if user:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", user, "--", *cmd]
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started (a crash, not a shutdown)."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, name: str, timeout: float = 60) -> int:
        """SIGTERM a process alone (a shutdown: what it started is its to stop); its exit code."""
        proc = self.procs.pop(name)
        proc.terminate()
        return proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql; install Debian's "
                           "postgresql package (make test does when it runs as root)")
    return Path(found[-1]).parent


@dataclass
class Postgres:
    port: int
    datadir: Path
    bindir: Path

    def url(self, db: str, driver: str = "") -> str:
        return f"postgresql{driver}://postgres@127.0.0.1:{self.port}/{db}"

    def create_databases(self, *names: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.url("postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()


def start_postgres(procs: Processes) -> Postgres:
    """initdb + postgres on a free loopback port (trust auth on loopback only: the suite's own throwaway cluster)."""
    bindir, port = pg_bindir(), free_port()
    user = "postgres" if os.geteuid() == 0 else None
    # The cluster lives outside pytest's (owner-only) temp tree so that the postgres user can reach it.
    home = Path(tempfile.mkdtemp(prefix="kdq-pg-"))
    procs.cleanup.append(home)
    datadir, sockets = home / "data", home / "sockets"
    for d in (home, datadir, sockets):
        d.mkdir(exist_ok=True)
        if user:
            pw = pwd.getpwnam(user)
            os.chown(d, pw.pw_uid, pw.pw_gid)
    cmd = [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    subprocess.run(["runuser", "-u", user, "--", *cmd] if user else cmd, check=True, capture_output=True)
    proc = procs.start("postgres", [str(bindir / "postgres"), "-D", str(datadir), "-p", str(port),
                                    "-k", str(sockets), "-c", "listen_addresses=127.0.0.1",
                                    "-c", "max_connections=200", "-c", "fsync=off"], user=user)
    deadline = time.monotonic() + 60
    while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not start:\n{procs.log('postgres').read_text()[-3000:]}")
        time.sleep(0.3)
    return Postgres(port, datadir, bindir)


@dataclass
class Stack:
    """Addresses and client environment of the running servers."""

    postgres: Postgres
    s3_url: str
    mlflow_url: str
    prefect_api: str
    admin_user: str
    admin_password: str
    aws: dict[str, str]

    def client_env(self, root: Path) -> dict[str, str]:
        """What a pipeline process (or a worker) needs: the servers, the credentials, the project on the path."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "PIPELINE_"))}
        env.update(self.aws)
        env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(root),
                    "MLFLOW_TRACKING_URI": self.mlflow_url, "MLFLOW_TRACKING_USERNAME": self.admin_user,
                    "MLFLOW_TRACKING_PASSWORD": self.admin_password, "PREFECT_API_URL": self.prefect_api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_S3_ENDPOINT_URL": self.s3_url})
        return env


def start_stack(procs: Processes, base: Path) -> Stack:
    pg = start_postgres(procs)
    pg.create_databases("mlflow", "mlflow_auth", "prefect")

    s3_port = free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    aws = {"AWS_ACCESS_KEY_ID": "integration", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = procs.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                       env={**os.environ, **aws})
    wait_http(s3_url, proc, procs.log("s3"))
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in aws.items() if k != "AWS_DEFAULT_REGION"},
                      region_name="us-east-1")
    for bucket in ("mlflow", "dvc"):
        s3.create_bucket(Bucket=bucket)

    password = secrets.token_urlsafe(16)
    auth_ini = base / "basic_auth.ini"
    auth_ini.write_text("[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = {pg.url('mlflow_auth', '+psycopg2')}\nadmin_username = admin\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                        "auth_cache_ttl_seconds = 60\n")   # as infra/mlflow: no PBKDF2 hash per request
    mlflow_port = free_port()
    env = {**os.environ, **aws, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as infra/mlflow: no GenAI job runner processes
    proc = procs.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                  "--backend-store-uri", pg.url("mlflow", "+psycopg2"),
                                  "--artifacts-destination", "s3://mlflow/artifacts", "--app-name", "basic-auth",
                                  "--workers", "2"], env=env)
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    wait_http(f"{mlflow_url}/health", proc, procs.log("mlflow"))

    prefect_port = free_port()
    home = base / "prefect-home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},   # a server, not a client of one
           "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "+asyncpg"), "PREFECT_UI_ENABLED": "false"}
    proc = procs.start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(prefect_port)], env=env)
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    wait_http(f"{prefect_api}/health", proc, procs.log("prefect"), timeout=180)
    return Stack(pg, s3_url, mlflow_url, prefect_api, "admin", password, aws)


def start_dask(procs: Processes, env: dict[str, str], cwd: Path, workers: int) -> tuple[str, list[str]]:
    """``dask scheduler`` and ``workers`` single-threaded ``dask worker`` processes; returns (address, names)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = procs.start("dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                          "--no-dashboard"], env=env, cwd=cwd)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(procs.log("dask-scheduler").read_text()[-3000:])
        time.sleep(0.3)
    names = [f"worker-{i}" for i in range(workers)]
    for name in names:
        procs.start(f"dask-{name}", [str(BIN / "dask"), "worker", address, "--name", name, "--nthreads", "1",
                                     "--nworkers", "1", "--no-dashboard"], env=env, cwd=cwd)
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, names
