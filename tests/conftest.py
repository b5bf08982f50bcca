"""Shared fixtures: real config, small real data, a real SQLite MLflow store, one Prefect test server."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (starting one costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
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


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def synthetic_source(tmp_path, raw_params):
    """A folder with four small, valid Fashion-MNIST-shaped IDX .gz files and params pinning their hashes.

    Returns (directory, Config) with ``source_dir`` pointing at it and the download URL unreachable.
    """
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
            "url": "http://127.0.0.1:9/", "download_cache": str(tmp_path / "dl"), "sha256": pins,
            "val_size": 100, "subset": None}
    cfg = parse_config({**raw_params, "data": {"vision": data}})
    return src, cfg


@pytest.fixture(scope="session")
def real_splits():
    """A stratified subset of the real Fashion-MNIST splits (needs the Debian package or source_dir)."""
    from tasks.prepare_vision import acquire, decode, split

    cfg = load_config(ROOT / "params.yaml")
    data = cfg.data.vision.model_copy(update={"subset": cfg.data.vision.subset or _subset(1200, 300, 400)})
    source, raw = acquire(data)
    return split(decode(raw, data.sha256, source), data)


def _subset(train: int, val: int, test: int):
    from tasks.config import SplitSizes

    return SplitSizes(train=train, val=val, test=test)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A real SQLite MLflow store on tmp_path, used by every stage through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    return uri
