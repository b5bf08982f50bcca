"""The flows' command lines refuse a bad argument in one line before their flow starts Prefect."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: a Prefect API nothing answers: a command that got as far as its flow fails on it (and never starts a server)
NO_PREFECT = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_CLIENT_MAX_RETRIES": "0"}


def refusal(command: list[str]) -> str:
    """The one stderr line of ``python -m <command>`` run in the project, which must exit 2 with nothing else."""
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env={**os.environ, **NO_PREFECT},
                          capture_output=True, text=True, timeout=300, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in said and "temporary server" not in said, said[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not done.stdout, said[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.fault("params", "`flows.pipeline`, `flows.ingest` or `flows.sweep` given a --root that is no project, "
                   "a family params.yaml does not name, or a batch or landing folder that does not exist",
                   "one `error:` line naming the argument, exit 2, before Prefect is reached (before: a Prefect "
                   "temporary server started, ~15 s, and its log printed the refusal's traceback)")
@pytest.mark.parametrize("command, message", [
    (["flows.pipeline", "--root", "{empty}"], "{empty}/params.yaml: not found"),
    (["flows.pipeline", "--root", "{params_only}"], "{params_only}/dvc.yaml: no such file"),
    (["flows.pipeline", "--family", "nope"], "families: unknown ['nope']"),
    (["flows.pipeline", "--gate-only", "--family", "nope"], "families: unknown ['nope']"),
    (["flows.ingest", "--family", "nope", "{empty}"], "--family: 'nope' is not one of families"),
    (["flows.ingest", "--root", "{empty}", "--family", "recsys", "{empty}"], "{empty}/params.yaml: not found"),
    (["flows.ingest", "--family", "recsys", "{empty}", "{missing}"], "not a batch folder: {missing}"),
    (["flows.ingest", "--family", "recsys", "--run", "--landing", "{missing}"], "{missing}: no such landing folder"),
    (["flows.sweep", "--family", "nope"], "--family: 'nope' has no sweep.space entry"),
    (["flows.sweep", "--root", "{empty}"], "{empty}/params.yaml: not found"),
])
def test_a_flow_command_refuses_a_bad_argument_before_prefect_starts(command, message, tmp_path):
    """Before: each of these was checked inside the flow only: Prefect started first (a temporary server, 10-20 s),
    logged the refusal's full traceback, and then the `error:` line came."""
    folders = {"empty": tmp_path / "empty", "params_only": tmp_path / "params_only", "missing": tmp_path / "missing"}
    folders["empty"].mkdir()
    folders["params_only"].mkdir()
    (folders["params_only"] / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    named = {name: str(path) for name, path in folders.items()}
    line = refusal([word.format(**named) for word in command])
    assert message.format(**named) in line, line


def test_the_checks_before_a_run_pass_a_project():
    """The command's own checks take the project as it is (every family, and one of them)."""
    from flows.pipeline import preflight

    preflight(Path(ROOT), None)
    preflight(Path(ROOT), ["recsys"], gate_only=True)
