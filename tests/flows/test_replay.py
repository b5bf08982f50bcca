"""``python -m flows.replay``: a landing path it cannot write batches into is a one-line error."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("what", ["a file", "a folder holding a batch"])
def test_a_landing_path_replay_cannot_write_into_is_a_one_line_error(tmp_path, what):
    """Before: a file there ended in NotADirectoryError's traceback."""
    landing = tmp_path / "landing"
    if what == "a file":
        landing.write_text("not a folder")
    else:
        (landing / "0000-initial").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "flows.replay", "--family", "recsys", str(landing)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    reason = "not a folder" if what == "a file" else "not empty"
    line = f"error: PipelineError: {landing}: {reason}; replay writes into an empty or new folder"
    assert done.stderr.strip().splitlines() == [line]
