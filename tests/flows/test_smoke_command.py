"""``make smoke`` replaces only a folder it made itself."""
from __future__ import annotations

import pytest

from flows.smoke import smoke
from tasks.errors import PipelineError


def test_a_folder_that_is_not_a_smoke_copy_is_never_removed(tmp_path):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "params.yaml").write_text("mine")
    with pytest.raises(PipelineError, match="is not a smoke copy"):
        smoke(precious)
    assert (precious / "params.yaml").read_text() == "mine"
