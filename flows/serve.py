"""``make serve``: the registry's champion of a family over HTTP, with MLflow's own scoring server.

The version ``<gate.<family>.registered_model>@champion`` names in this project's tracking store
(``$MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the embedded SQLite store) when it starts, fetched and checked
against the SHA-256s the version records (as the gate checks a champion before it runs one: a file altered in the
artifact store is refused), then ``mlflow models serve -m <a folder made from the checked model.onnx alone>
--env-manager local`` in this virtualenv (the ONNX flavor needs onnxruntime only; the stored MLmodel, which names the
file and the code the server loads and which no SHA-256 pins, is not used). ``POST /invocations`` takes the
signature's named tensors::

    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": {"fields": [[0, 943, 2626, 2633, 2653, 2738, 2782]], "genres": [[0, 0, 0, 1, 0, ...]]}}'

and answers ``{"predictions": {...}}``. A missing input, a wrong shape or a value that cannot be cast to the input's
type (a word, a null) gets a 400 naming what is wrong, and the server goes on serving; what MLflow can cast it casts
and answers (a float id truncated, a string of digits parsed, a bool as 0/1), and ids are not range-checked (past a
table's end: onnxruntime's 400; a negative one counts back from its end and is answered). ``GET /ping`` is its
health check. The folder is a new one of this start's own under the temporary directory; Ctrl-C, SIGTERM or SIGHUP
stop the server (and every process it started) and remove it.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from flows.registry import (
    MODEL_FILE,
    RegistryError,
    declared_shape,
    download_onnx,
    model_gone,
    registered_model,
    requirements,
)
from tasks.config import Config, load_config
from tasks.errors import PipelineError, ServiceUnavailable, run_cli
from tasks.io import tools_env
from tasks.mlflow_store import client_for, is_server_call_error, redact, server_error, tracking_uri


def serve_command(cfg: Config, root: Path, family: str | None, host: str, port: int, dest: Path,
                  alias: str = "champion") -> tuple[list[str], dict[str, str], str]:
    """The ``mlflow models serve`` command line and environment that serve ``family``'s ``alias`` (default: the first
    of params.yaml's families), and which version that is: the version's model fetched into ``dest`` (a folder of
    this start's own: no other user or server can write it between the check and the load), checked
    (``flows.registry.download_onnx``) and served from a folder made of the checked file alone (``served_copy``); a
    RegistryError when the alias names none or a file differs from what the version records."""
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
        checked = download_onnx(client, version, dest / "fetched")
    except Exception as err:
        if isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST":
            if model_gone(client, version):
                raise RegistryError(f"{model} version {version.version}: its model is not in the artifact store "
                                    f"({redact(err.message)[:200]}); nothing served") from None
            raise ServiceUnavailable(f"the artifact store of {model} version {version.version} lists its model but "
                                     f"did not give it ({redact(err.message)[:200]}); nothing served") from None
        if not is_server_call_error(err):   # (an MlflowException is one)
            raise
        raise server_error(err, f"the artifact store of {model} version {version.version}", "nothing served") \
            from None
    served = served_copy(checked, dest / "model")
    shutil.rmtree(dest / "fetched")
    env = {**tools_env(), "MLFLOW_TRACKING_URI": uri}   # the scoring server runs uvicorn from this virtualenv
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(served), "--env-manager", "local",
           "--host", host, "--port", str(port)]
    return cmd, env, f"{model}@{alias} (version {version.version})"


def served_copy(checked: Path, folder: Path) -> Path:
    """``folder``: what the scoring server loads, made here from the checked ONNX file alone, with an MLmodel written
    by this environment's ``mlflow.onnx`` and the graph's inputs as its signature. The stored folder's own MLmodel is
    not used: it names the file the server loads, the module that loads it, code to import and onnxruntime's options,
    and no SHA-256 pins it: pointed at an added file, it would have the server load that file unchecked."""
    import mlflow.onnx
    import onnx

    model = onnx.load(str(checked), load_external_data=False)
    mlflow.onnx.save_model(model, str(folder), signature=graph_inputs(model), save_as_external_data=False,
                           pip_requirements=requirements())
    shutil.copyfile(checked, folder / MODEL_FILE)   # the checked bytes themselves, not onnx's re-serialisation
    return folder


def graph_inputs(model: Any) -> Any:
    """The signature the scoring server checks a request against: each input the ONNX graph declares (its name,
    element type and shape, an open axis -1), as ``flows.registry.graph_signature`` registered it."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    weights = {w.name for w in model.graph.initializer}   # (older exporters list the weights as inputs too)
    return ModelSignature(Schema([
        TensorSpec(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type), tuple(declared_shape(v)), v.name)
        for v in model.graph.input if v.name not in weights]))


def check_port(host: str, port: int) -> None:
    """``host:port`` is free for the scoring server: each address ``host`` names is bound and released as uvicorn will
    bind it (SO_REUSEADDR), before the champion is fetched; a one-line PipelineError when one cannot be. Before, a port
    in use was found by uvicorn after the fetch, and MLflow's CLI died with a traceback."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:   # as asyncio binds it: IPv6 alone (an IPv4 listener is no clash)
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as err:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:
            raise PipelineError(f"--port {port}: {where} is in use by another process; stop it or choose "
                                "another --port; nothing served") from None
        raise PipelineError(f"--host {host} --port {port}: cannot serve on {where} ({err.strerror or err}); "
                            "nothing served") from None


def _port(text: str) -> int:
    """A TCP port number, 1-65535 (argparse's type for --port)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port number (1-65535)")
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None, help="default: the first of params.yaml's families")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=5001)
    parser.add_argument("--root", type=Path, default=Path("."), help="project root holding params.yaml")
    args = parser.parse_args()
    root = args.root.resolve()
    cfg = load_config(root / "params.yaml")
    check_port(args.host, args.port)
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
