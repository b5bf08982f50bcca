"""Shared fixtures: real config, small real data, a real SQLite MLflow store, one Prefect test server."""
from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


# Under pytest-xdist (make test/check: one worker per core, a test file per worker at a time) the files that run
# whole pipelines go out first, longest first, so that no worker picks one up last.
FIRST = ("tests/integration/test_scaled_stack.py", "tests/e2e/test_smoke_pipeline.py", "tests/e2e/test_stage_commands.py",
         "tests/e2e/test_continuous_training.py", "tests/e2e/test_continuous_vision.py")
# as the Makefile sets it, for a plain `pytest` too: a flow a test starts before the session's Prefect server is up
# (the ``prefect_server`` fixture) brings up an ephemeral server of its own, whose 20 s default start-up limit is
# tight on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    # the cores are shared: torch and onnxruntime work in a test's own process gets its share (before torch is
    # imported; the stage processes a test starts keep their params' threads) ...
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    # ... and the Prefect servers of the worker (its session server, any ephemeral one) keep their SQLite database per
    # worker (two servers writing one database file at once risk "database is locked")
    os.environ["PREFECT_HOME"] = str(Path(tempfile.gettempdir()) / f"kdq-tests-prefect-{worker}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the session's Prefect server is ``slow``: starting one costs ~20 s, so ``make check``
    (``-m "not slow"``) leaves them to ``make test``. The files in FIRST go first (the sort is stable: each file's
    tests stay together and in order)."""
    for item in items:
        if "prefect_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    rank = {path: i for i, path in enumerate(FIRST)}
    # resolved: a test path given through a symlink to the checkout stopped the collection (ValueError)
    items.sort(key=lambda item: rank.get(item.path.resolve().relative_to(ROOT).as_posix(), len(rank)))


@pytest.fixture(scope="session", autouse=True)
def checkout_left_clean():
    """Tests keep their stores and artifacts in folders of their own. An MLflow experiment made without an artifact
    location puts its artifacts in ./mlruns of the working directory: the checkout (before: the gate tests left tens
    of MB there); one the project creates on a local store, in its ``tracking.artifact_root`` (./mlartifacts); and a
    default store is ./mlflow.db."""
    stores = [ROOT / name for name in ("mlruns", "mlartifacts", "mlflow.db")]
    before = {path for path in stores if path.exists()}
    yield
    made = [str(path) for path in stores if path.exists() and path not in before]
    assert not made, f"tests wrote MLflow stores or artifacts into the checkout ({', '.join(made)}): give them a " \
                     "tracking URI and an experiment artifact_location of their own"


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (starting one costs ~20 s). The flows that tests start
    in processes of their own (``make smoke``, the benchmark, the promotion and restore commands) report to it too,
    instead of each bringing up an ephemeral server of its own (20-30 s apiece on a busy machine)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_API_URL", PREFECT_API_URL.value())   # restored (or unset) as it was at the end
        yield


@pytest.fixture(scope="session")
def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def config(raw_params) -> Config:
    return parse_config(raw_params)


@pytest.fixture
def smoke_config(raw_params) -> Config:
    return parse_config({**raw_params, "profile": "smoke"})


def imported_by(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of the ``watched`` modules ``code`` imports, run in a fresh interpreter in the project (this process
    has imported most of them long ago)."""
    import subprocess
    import sys

    probe = f"import sys\n{code}\nprint(','.join(m for m in {watched!r} if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return [m for m in found.stdout.strip().split(",") if m]


def dvc_lock(project: Path):
    """DVC's repository lock of ``project``, taken as another DVC process holds it (DVC's own kind of lock file);
    ``close`` gives it back."""
    import zc.lockfile

    (project / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    return zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock"))


def release_after(lock, seconds: float, then: Callable[[], None] | None = None) -> threading.Timer:
    """A started timer that, after ``seconds``, runs ``then`` (what the holder finishes writing) and closes
    ``lock``; join it."""
    def release() -> None:
        if then is not None:
            then()
        lock.close()

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def synthetic_source(tmp_path, raw_params, monkeypatch):
    """A folder with four small, valid Fashion-MNIST-shaped IDX .gz files and params pinning their hashes.

    Returns (directory, Config) with ``source_dir`` pointing at it and the download URL unreachable. The working
    directory is ``tmp_path``: the download cache (``dl``, a folder the pipeline writes) must be inside it.
    """
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.repeat(np.arange(10, dtype=np.uint8), 60),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.repeat(np.arange(10, dtype=np.uint8), 20),
    }
    src = tmp_path / "fmnist"
    src.mkdir()
    pins = {}
    for name, arr in arrays.items():
        payload = idx_bytes(arr)
        (src / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
        pins[name] = hashlib.sha256(payload).hexdigest()
    data = {**raw_params["data"]["vision"], "source_dir": str(src), "system_dir": str(tmp_path / "absent"),
            "url": "http://127.0.0.1:9/", "download_cache": "dl", "sha256": pins,
            "val_size": 100, "subset": None}
    cfg = parse_config({**raw_params, "data": {**raw_params["data"], "vision": data}})
    return src, cfg


def movielens_tables(users: int = 30, items: int = 40, ratings: int = 700, seed: int = 0) -> dict[str, list[list]]:
    """Rows of a small MovieLens-shaped data set (every rating 1-5 present, unique (user, item) pairs)."""
    from tasks.recsys.movielens import GENRES

    rng = np.random.default_rng(seed)
    pairs = rng.choice(users * items, size=ratings, replace=False)
    return {
        "ratings": [[int(p // items) + 1, int(p % items) + 1, int(rng.integers(1, 6)), 880000000 + i * 97]
                    for i, p in enumerate(pairs)],
        "users": [[u, int(rng.integers(12, 70)), "MF"[u % 2], ["writer", "student", "other"][u % 3],
                   f"{rng.integers(10000, 99999)}"] for u in range(1, users + 1)],
        "items": [[i, 1970 + i % 30, sorted({GENRES[1 + i % 18], GENRES[1 + (i * 7) % 18]})] for i in range(1, items + 1)],
    }


@pytest.fixture
def synthetic_movielens(tmp_path, raw_params, monkeypatch):
    """The same small data set as RecBole atomic files and as a GroupLens zip, with params pinning both.

    Returns (RecBole folder, GroupLens folder, Config whose source_dir is the RecBole folder and whose other sources
    are unreachable). The working directory is ``tmp_path``, which holds the download cache ``dl``."""
    import zipfile

    monkeypatch.chdir(tmp_path)
    from tasks.recsys.movielens import GENRES

    rows = movielens_tables()
    recbole, grouplens = tmp_path / "recbole", tmp_path / "grouplens"
    recbole.mkdir()
    grouplens.mkdir()
    files = {
        "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                         + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows["ratings"]),
        "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                        + "".join("\t".join(map(str, u)) + "\n" for u in rows["users"]),
        "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                        + "".join(f"{i}\tMovie {i}\t{y}\t{' '.join(g)}\n" for i, y, g in rows["items"]),
    }
    for name, text in files.items():
        (recbole / name).write_text(text)
    members = {
        "u.data": "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows["ratings"]),
        "u.user": "".join("|".join(map(str, u)) + "\n" for u in rows["users"]),
        "u.item": "".join(f"{i}|Movie {i} ({y})|01-Jan-{y}||http://x|" + "|".join("1" if g in gs else "0" for g in GENRES)
                          + "\n" for i, y, gs in rows["items"]),
    }
    with zipfile.ZipFile(grouplens / "ml-100k.zip", "w") as zf:
        for name, text in members.items():
            zf.writestr(f"ml-100k/{name}", text)
    pins = {name: hashlib.sha256((recbole / name).read_bytes()).hexdigest() for name in files}
    pins["ml-100k.zip"] = hashlib.sha256((grouplens / "ml-100k.zip").read_bytes()).hexdigest()
    data = {**raw_params["data"]["recsys"], "source_dir": str(recbole), "url": "http://127.0.0.1:9/ml-100k.zip",
            "download_cache": "dl", "sha256": pins,
            "wheel": {**raw_params["data"]["recsys"]["wheel"], "version": "0.0.0.does-not-exist"}}
    validate = {"positive_fraction": 0.5, "positive_tolerance": 0.2, "min_kept_fraction": 0.5, "split_tolerance": 0.05,
                "min_rows": {"train": 100}}  # uniform ratings
    cfg = parse_config({**raw_params, "data": {**raw_params["data"], "recsys": data},
                        "validate": {**raw_params["validate"], "recsys": validate}})
    return recbole, grouplens, cfg


def older_and_grown(cfg, tmp_path):
    """The recommender's data prepared twice into ``tmp_path``: ``old``, two thirds of its users and items (and their
    ratings), and ``new``, all of them — a snapshot and the one it grew into; returns (old, new) folders."""
    from tasks.recsys.movielens import acquire
    from tasks.recsys.prepare import prepare_recsys

    source, tables = acquire(cfg.data.recsys)
    old = {**tables, "users": tables["users"].iloc[: len(tables["users"]) * 2 // 3],
           "items": tables["items"].iloc[: len(tables["items"]) * 2 // 3]}
    old["ratings"] = tables["ratings"][tables["ratings"].user_id.isin(old["users"].user_id)
                                       & tables["ratings"].item_id.isin(old["items"].item_id)]
    prepare_recsys(cfg.data.recsys, tmp_path / "old", (source, old))
    prepare_recsys(cfg.data.recsys, tmp_path / "new", (source, tables))
    return tmp_path / "old", tmp_path / "new"


def known_rows_only(cfg):
    """``cfg`` whose champion pairing leaves out the test rows a champion's vocabulary lacks a value of
    (``evaluate.recsys.cold_start_samples: 0``): the rows both models read as they are."""
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "recsys": cfg.evaluate.recsys.model_copy(update={"cold_start_samples": 0})})})


@pytest.fixture(scope="session")
def real_splits():
    """A stratified subset of the real Fashion-MNIST splits (needs the Debian package or source_dir)."""
    from tasks.images.prepare import split
    from tasks.images.source import from_idx

    cfg = load_config(ROOT / "params.yaml")
    data = cfg.data.vision.model_copy(update={"subset": cfg.data.vision.subset or _subset(1200, 300, 400)})
    return split(from_idx(data, "data.vision")[2], data.val_size, 0, data.seed, data.subset)[0]


def fashion_pixels():
    """The pixel statistics params.yaml gives Fashion-MNIST (what its stages normalise with)."""
    from tasks.image_training import Pixels

    stats = load_config(ROOT / "params.yaml").data.vision.pixels
    return Pixels(tuple(stats.mean), tuple(stats.std))


def write_processed(directory, splits):
    """``splits`` ({name: (x, y)} of Fashion-MNIST images) written as prepare_vision writes processed data: the
    arrays and a manifest with params.yaml's pixel statistics and class names."""
    import numpy as np

    from tasks.io import save_npy, write_json

    data = load_config(ROOT / "params.yaml").data.vision
    for name, (x, y) in splits.items():
        save_npy(directory / f"{name}_x.npy", x)
        save_npy(directory / f"{name}_y.npy", y)
    x = next(iter(splits.values()))[0]
    write_json(directory / "manifest.json", {
        "source": "test", "image": {"channels": 1, "height": int(x.shape[1]), "width": int(x.shape[2]),
                                    **data.pixels.model_dump(), "classes": data.class_names},
        "splits": {name: {"rows": len(y), "class_counts": np.bincount(y, minlength=10).tolist()}
                   for name, (_, y) in splits.items()}})


def briefly_trained(student, images, labels, steps: int):
    """``student`` after ``steps`` SGD steps on the first 256 of ``images`` (normalised) and ``labels``, in eval mode:
    an untrained student's logits tie, and a comparison of its INT8 and float forms would measure rounding noise."""
    import torch

    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        batch = slice(64 * step % 256, 64 * step % 256 + 64)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(student(images[batch]), labels[batch]).backward()
        opt.step()
    return student.eval()


def _subset(train: int, val: int, test: int):
    from tasks.images.data_config import SplitSizes

    return SplitSizes(train=train, val=val, test=test)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A real SQLite MLflow store on tmp_path, used by every stage through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    return uri
