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


def test_the_replay_summary_names_the_last_champions_golden_score_after_an_unchanged_batch():
    """An unchanged gate report carries no scores. Before: a replay whose last trained batch changed nothing showed
    no golden score for its champion ("–")."""
    from flows.replay_benchmark import _scores, summary

    promoted = {"champion": True, "candidate": {"val_auc": .8, "recent_auc": .79, "golden_auc": .81, "recent_rows": 200},
                "champion_before": None, "checks": []}
    unchanged = {"passed": True, "checks": [], "name": "m", "version": "2", "champion": False, "unchanged": True}
    rows = [{"decision": "promoted", "seconds": 10, **_scores(promoted, "auc")},
            {"decision": "unchanged", "seconds": 5, **_scores(unchanged, "auc")}]
    line = summary({"scratch": {"batches": rows}}, "auc").splitlines()[-1]
    assert line.split("|")[8].strip() == "0.8100", line
