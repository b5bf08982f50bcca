"""Small file helpers: atomic writes so a killed stage never leaves a half-written output behind."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_npy(path: Path, arr: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(arr), allow_pickle=False)
    write_atomic(path, buffer.getvalue())


def load_split(directory: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``<name>_x.npy`` (uint8 images) and ``<name>_y.npy`` (labels) as tensors."""
    x = np.load(directory / f"{name}_x.npy", allow_pickle=False)
    y = np.load(directory / f"{name}_y.npy", allow_pickle=False)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))
