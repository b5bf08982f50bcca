"""``make serve`` on a port it cannot serve on: refused in one line before the registry is asked for anything."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _serve(tmp_path, port: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.serve", "--root", str(ROOT), "--port", port], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.fault("promotion", "`make serve` with --port -1, --port 70000, or a port another process listens on",
                   "exit 2 with one line naming the port (and host), before the champion is fetched (before: the "
                   "champion was fetched, 'serving ... on http://127.0.0.1:-1/invocations' printed, then uvicorn "
                   "failed and MLflow's CLI printed a traceback, exit 1)")
@pytest.mark.parametrize("port", ["-1", "70000", "in use"])
def test_a_port_that_cannot_be_served_on_is_refused_before_anything_is_fetched(tmp_path, port):
    """Before: the port was first tried by uvicorn, after the champion was fetched from the registry (an empty store
    here: "no such version"; a real one: fetched, then a traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = str(taken.getsockname()[1]) if port == "in use" else port
        done = _serve(tmp_path, number)
    said = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    if port == "in use":
        assert said == [(f"error: PipelineError: --port {number}: 127.0.0.1:{number} is in use by another process; "
                         "stop it or choose another --port; nothing served")]
    else:   # argparse's usage, then one error line
        assert said[0].startswith("usage: ") and [line for line in said if "error" in line] == said[-1:]
        assert said[-1].endswith(f"argument --port: {port!r} is not a TCP port number (1-65535)")
    assert not (tmp_path / "mlflow.db").exists()   # the registry was not asked


def test_an_ipv6_host_is_free_beside_an_ipv4_listener_on_its_port():
    """Before: the probe bound IPv6 without IPV6_V6ONLY, which uvicorn's asyncio sets: ``--host ::`` was refused as
    in use when only 127.0.0.1 listened on the port, and the address was printed ``:::port``."""
    from flows.serve import check_port
    from tasks.errors import PipelineError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        check_port("::", number)
        with socket.socket(socket.AF_INET6) as also:
            also.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            also.bind(("::", number))
            also.listen()
            with pytest.raises(PipelineError, match=rf"^--port {number}: \[::\]:{number} is in use"):
                check_port("::", number)
