"""Malformed MovieLens files that still match their pins (re-pinned, as a user editing params would) are stopped
while being read, with the file and the problem named, and nothing is written."""
from __future__ import annotations

import hashlib
import re

import pytest

from tasks.errors import DataFormatError
from tasks.recsys.prepare import prepare_recsys


def _drop_column(text: str) -> str:
    return "\n".join("\t".join(line.split("\t")[:3]) for line in text.splitlines()) + "\n"  # no timestamp


@pytest.mark.parametrize("name,rewrite,pattern", [
    pytest.param("ml-100k.inter", _drop_column, r"ml-100k\.inter has no column timestamp \(its columns: user_id, "
                 r"item_id, rating\)", id="missing-column",
                 marks=pytest.mark.fault("data", "a ratings file without its timestamp column",
                                         "DataFormatError naming the file, the missing column and the columns found; "
                                         "no output")),
    pytest.param("ml-100k.user", lambda text: "", r"ml-100k\.user is empty", id="empty-file",
                 marks=pytest.mark.fault("data", "an empty users file", "DataFormatError naming the empty file; "
                                         "no output")),
    pytest.param("ml-100k.inter", lambda text: text.splitlines()[0] + "\n",
                 r"no rows in the ratings table", id="header-only",
                 marks=pytest.mark.fault("data", "a ratings file with a header and no rows",
                                         "DataFormatError: no rows in the ratings table; no output")),
])
def test_malformed_movielens_files_are_named(synthetic_movielens, tmp_path, name, rewrite, pattern):
    recbole, _, cfg = synthetic_movielens
    (recbole / name).write_text(rewrite((recbole / name).read_text()))
    pins = {**cfg.data.recsys.sha256, name: hashlib.sha256((recbole / name).read_bytes()).hexdigest()}
    data = cfg.data.recsys.model_copy(update={"sha256": pins})
    with pytest.raises(DataFormatError, match=rf"source_dir \({re.escape(str(recbole))}\): {pattern}"):
        prepare_recsys(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
