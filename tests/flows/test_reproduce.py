"""``reproduce``: one ``dvc repro --single-item`` per stage, telling whether the stage ran, on a real DVC repo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.dvc_stage import reproduce


def _repo(root: Path, lines: int) -> dict[str, str]:
    root.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    (root / "dvc.yaml").write_text(
        "stages:\n  talk:\n"
        f"    cmd: python -c \"import sys; [print('epoch', i) for i in range({lines})]; open('out.txt', 'w').write('x')\"\n"
        "    outs: [out.txt]\n")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
def test_a_stage_that_prints_more_than_the_kept_tail_is_still_reported_as_ran(tmp_path):
    """Before: whether a stage ran was read from the last 400 lines of output, where DVC's "Running stage" line is
    no longer found once the stage prints more; it was reported as cached."""
    env = _repo(tmp_path / "repo", lines=1000)
    assert reproduce("talk", tmp_path / "repo", env, log=False) is True
    assert (tmp_path / "repo" / "out.txt").read_text() == "x"
    assert reproduce("talk", tmp_path / "repo", env, log=False) is False   # nothing changed: DVC skips it
