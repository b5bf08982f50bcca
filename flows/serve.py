"""``make serve``: the registry's champion of a family over HTTP, with MLflow's own scoring server.

The version ``<gate.<family>.registered_model>@champion`` names in this project's tracking store
(``$MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the embedded SQLite store) when it starts, fetched and checked
against the SHA-256s the version records (as the gate checks a champion before it runs one: a file altered in the
artifact store is refused), then ``mlflow models serve -m <that copy> --env-manager local`` in this virtualenv (the
ONNX flavor needs onnxruntime only). ``POST /invocations`` takes the signature's named tensors::

    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": {"fields": [[0, 943, 2626, 2633, 2653, 2738, 2782]], "genres": [[0, 0, 0, 1, 0, ...]]}}'

and answers ``{"predictions": {...}}``; a request of the wrong shape or dtype gets a 400 naming what is wrong, and
the server goes on serving. ``GET /ping`` is its health check. The copy lives in a new folder of this start's own
under the temporary directory; Ctrl-C, SIGTERM or SIGHUP stop the server (and every process it started) and remove it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException

from flows.registry import RegistryError, download_onnx, registered_model
from tasks.config import Config, load_config
from tasks.errors import run_cli
from tasks.mlflow_store import client_for, is_server_call_error, redact, server_error, tracking_uri


def serve_command(cfg: Config, root: Path, family: str | None, host: str, port: int, dest: Path,
                  alias: str = "champion") -> tuple[list[str], dict[str, str], str]:
    """The ``mlflow models serve`` command line and environment that serve ``family``'s ``alias`` (default: the first
    of params.yaml's families), and which version that is: the version's model fetched into ``dest`` (a folder of
    this start's own: no other user or server can write it between the check and the load) and checked
    (``flows.registry.download_onnx``); a RegistryError when the alias names none or a file differs from what the
    version records."""
    bin_dir = Path(sys.executable).parent
    model, uri = registered_model(cfg, family), tracking_uri(cfg, root)
    client = client_for(uri)
    try:
        version = client.get_model_version_by_alias(model, alias)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):   # a server that failed
            raise server_error(err, f"the registry at {redact(uri)}", "nothing served") from None
        raise RegistryError(f"{model}@{alias}: no such version in {redact(uri)}; nothing served") from None
    try:
        served = download_onnx(client, version, dest).parent
    except Exception as err:
        if isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{model} version {version.version}: its model is not in the artifact store "
                                f"({err.message[:200]}); nothing served") from None
        if not is_server_call_error(err):   # (an MlflowException is one)
            raise
        raise server_error(err, f"the artifact store of {model} version {version.version}", "nothing served") \
            from None
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}   # the scoring server runs uvicorn from here
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(served), "--env-manager", "local",
           "--host", host, "--port", str(port)]
    return cmd, env, f"{model}@{alias} (version {version.version})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None, help="default: the first of params.yaml's families")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--root", type=Path, default=Path("."), help="project root holding params.yaml")
    args = parser.parse_args()
    root = args.root.resolve()
    cfg = load_config(root / "params.yaml")
    server: list[subprocess.Popen] = []
    stop: list[int] = []   # a signal that came while the champion was being fetched

    def on_signal(signum: int, _frame: object) -> None:
        if not server:   # still fetching (MLflow's download threads would outlive an exception): stop after it
            stop.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):   # passed to the server and every process it started
            os.killpg(server[0].pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    dest = None
    try:
        dest = Path(tempfile.mkdtemp(prefix="kdq-serve-"))
        cmd, env, served = serve_command(cfg, root, args.family, args.host, args.port, dest, args.alias)
        if stop:
            sys.exit(128 + stop[0])
        print(f"serving {served} on http://{args.host}:{args.port}/invocations", file=sys.stderr, flush=True)
        # a process group of its own: its CLI starts the web server as another process, and both get the signal
        server.append(subprocess.Popen(cmd, env=env, process_group=0))
        if stop:   # came while it was being started
            os.killpg(server[0].pid, stop[0])
        code = server[0].wait()
        sys.exit(code if code >= 0 else 128 - code)   # stopped by a signal: the shell's convention
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # the clean-up is not cut short
            signal.signal(signum, signal.SIG_IGN)
        if server:   # a web server left behind by a CLI that died first
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server[0].pid, signal.SIGTERM)
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
