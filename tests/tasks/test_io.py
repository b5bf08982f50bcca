"""Small file helpers under concurrency: what several processes sharing a folder (a download cache) rely on."""
from __future__ import annotations

import threading

from tasks.io import write_atomic


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
