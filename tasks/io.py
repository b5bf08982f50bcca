"""Small file helpers: atomic writes so a killed stage never leaves a half-written output behind."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# libyaml's parser when PyYAML was built with it: ~10x the pure-Python one, and every stage reads params.yaml,
# dvc.yaml and dvc.lock
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the C parser where there is one (same types, same errors)."""
    return yaml.load(text, Loader=_YAML_LOADER)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or of a folder's visible files, symlinked folders followed (hidden files and
    folders, whose names start with a dot, are left out; any other file counts, a README too): each one's path inside
    it and its content's SHA-256, in sorted order. None: neither there."""
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return None
    files = []
    for folder, dirs, names in os.walk(path, followlinks=True):   # a symlinked class or split folder is read too
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder, n) for n in names if not n.startswith(".") and Path(folder, n).is_file()]
    digest = hashlib.sha256()
    for file in sorted(files):
        # the name's bytes (a Latin-1 name is no UTF-8 text; a UTF-8 one hashes as it always did)
        digest.update(os.fsencode(file.relative_to(path).as_posix()) + f"\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def digests(folder: Path, pattern: str) -> dict[str, str]:
    """SHA-256 of every file of ``folder`` matching ``pattern``, by stem: what a stage evaluated, for the gate to
    check that the file it registers is that file."""
    return {path.stem: file_digest(path) for path in sorted(folder.glob(pattern))}


def write_csv(path: Path, frame: Any) -> None:
    """A pandas frame as CSV (no index, ``\\n`` line ends), written atomically, every text field quoted: a bare
    carriage return in a field is a line break to a CSV reader unless it is quoted."""
    import csv

    write_atomic(path, frame.to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC).encode())


def read_csv(path: Path, **options: Any) -> Any:
    """A CSV that ``write_csv`` wrote, its text as written: only an empty field is missing ("NA", "None", "null" or
    "nan" is text like any other, as the intake that accepted it read it)."""
    import pandas as pd

    return pd.read_csv(path, keep_default_na=False, na_values=[""], **options)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()   # read once, at import (setting it is process-wide)


def tools_env() -> dict[str, str]:
    """This process's environment with this interpreter's folder first on PATH: the ``python``, ``dvc`` and
    ``mlflow`` a child process starts (a stage's command, a git hook of ``dvc install``, the scoring server) are this
    virtualenv's, activated or not."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file of its own beside ``path``, then move it into place: a reader (or another
    writer of the same file, such as two runs filling a shared download cache) never sees half a file."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)   # as open() makes a file (mkstemp's are the owner's only)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    # numpy scalars (e.g. an observed value of a validation report) are written as the numbers they hold
    text = json.dumps(obj, indent=2, sort_keys=True, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    write_atomic(path, (text + "\n").encode())


def read_manifest(data_dir: Path, stage: str) -> dict[str, Any]:
    """``<data_dir>/manifest.json`` as the prepare ``stage`` wrote it; unreadable, one line naming it and the stage
    to re-run."""
    return read_prepared(data_dir / "manifest.json", lambda path: json.loads(path.read_text()), stage)


def require(paths: list[Path], make: str) -> None:
    """Every one of ``paths`` is there (a file or folder), checked before the work that reads them starts; else one
    line naming those missing and ``make``, how to make them."""
    from tasks.errors import PipelineError

    if missing := [str(path) for path in paths if not path.exists()]:
        raise PipelineError(f"{', '.join(missing)}: no such file or folder; {make}")


def read_prepared(path: Path, read: Callable[[Path], Any], stage: str) -> Any:
    """``read(path)`` of a file the prepare ``stage`` wrote; missing or unreadable (a stage run before it, a wrong
    ``--data``, a file cut short), a DataFormatError naming the file and the stage to re-run, not a traceback."""
    from tasks.errors import CORRUPT_STREAM, DataFormatError

    try:
        return read(path)
    except (OSError, ValueError, *CORRUPT_STREAM) as err:   # (pandas' ParserError and EmptyDataError: ValueErrors)
        raise DataFormatError(f"{path}: cannot be read ({err}); re-run {stage}") from err


WINDOWS = "windows.json"   # beside prepared data: {window: positions in its test split} (golden, recent)


def read_windows(data_dir: Path) -> dict[str, np.ndarray]:
    """The evaluation windows of ``data_dir``'s test split, {window: row positions}; none when it has no
    ``windows.json`` (data prepared before windows were)."""
    found = Path(data_dir) / WINDOWS
    if not found.is_file():
        return {}
    return {name: np.asarray(rows, dtype=np.int64) for name, rows in json.loads(found.read_text()).items()}


def save_npy(path: Path, arr: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(arr), allow_pickle=False)
    write_atomic(path, buffer.getvalue())


def pip_wheel(cache: Path, package: str, version: str) -> Path | str:
    """``package==version``'s wheel in the download folder ``cache``, fetched with ``pip download --no-deps`` (which
    checks the index's hash) when missing, never installed; a string saying why when there is none. The wheel is
    downloaded beside the folder and moved in whole, so processes sharing the folder never read half a file."""
    import tempfile

    # a wheel's file name spells the project name with runs of "-", "_" and "." as one "_" (PEP 427 / 491)
    pattern = f"{re.sub(r'[-_.]+', '_', package)}-{version}-*.whl"
    if not list(cache.glob(pattern)):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-") as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                   "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                return f"pip download failed: {(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}"
            fetched = sorted(Path(tmp).glob("*.whl"))   # pip keeps the index's spelling of the name
            for wheel in fetched:
                os.replace(wheel, cache / wheel.name)
            if fetched:
                return cache / fetched[0].name
    found = sorted(cache.glob(pattern))
    return found[0] if found else f"no {pattern} in {cache}"
