from __future__ import annotations

import pytest

from tasks.artifacts import load_model
from tasks.errors import CheckpointError


@pytest.mark.parametrize("content", [b"", b"\n", b"not a model", b"PK\x03\x04truncated zip"])
def test_unreadable_model_files_fail_with_a_clear_error(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a model file of this pipeline"):
        load_model(path)
