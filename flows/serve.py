"""``make serve``: the registry's champion of a family over HTTP, with MLflow's own scoring server.

``mlflow models serve -m models:/<gate.<family>.registered_model>@champion --env-manager local`` against this
project's tracking store (``$MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the embedded SQLite store), in this
virtualenv (the ONNX flavor needs onnxruntime only). ``POST /invocations`` takes the signature's named tensors::

    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": {"fields": [[0, 943, 2626, 2633, 2653, 2738, 2782]], "genres": [[0, 0, 0, 1, 0, ...]]}}'

and answers ``{"predictions": {...}}``; a request of the wrong shape or dtype gets a 400 naming what is wrong, and
the server goes on serving. ``GET /ping`` is its health check.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.registry import registered_model
from tasks.config import Config, load_config
from tasks.errors import run_cli
from tasks.mlflow_store import tracking_uri


def serve_command(cfg: Config, root: Path, family: str | None, host: str, port: int,
                  alias: str = "champion") -> tuple[list[str], dict[str, str]]:
    """The ``mlflow models serve`` command line and environment that serve ``family``'s ``alias`` (default: the first
    of params.yaml's families)."""
    bin_dir = Path(sys.executable).parent
    model = registered_model(cfg, family)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg, root),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}   # the scoring server runs uvicorn from here
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{model}@{alias}", "--env-manager", "local",
           "--host", host, "--port", str(port)]
    return cmd, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None, help="default: the first of params.yaml's families")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--root", type=Path, default=Path("."), help="project root holding params.yaml")
    args = parser.parse_args()
    root = args.root.resolve()
    cmd, env = serve_command(load_config(root / "params.yaml"), root, args.family, args.host, args.port, args.alias)
    print(f"serving {cmd[4]} on http://{args.host}:{args.port}/invocations", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    run_cli(main)
