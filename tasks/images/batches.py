"""An image family's batch folders: labelled images as IDX files, read, written and combined (``tasks.intake``).

A batch is a folder with ``train-images-idx3-ubyte.gz`` (unsigned bytes, (N, H, W); ``idx4`` for (N, C, H, W)) and
``train-labels-idx1-ubyte.gz`` (the class of each image, 0, 1, ...), plain or gzipped, and optionally
``classes.json`` (the class names, in label order). The snapshot's first batch may also hold ``test-*`` (the fixed
*golden* test set) and ``val-*`` parts; a later batch brings ``train-*`` images only. File names, IDX structure,
sizes and shapes are checked here; labels and values by the contract (``tasks.images.intake``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import DataFormatError
from tasks.images.idx import gunzip, gzip_bytes, idx_bytes, read_idx
from tasks.io import write_atomic

PARTS = ("train", "val", "test")   # the order a snapshot's images are read in
CLASSES = "classes.json"

# A batch: {"classes": [names] | None, "train": (x, y), and in a first batch "val" / "test": (x, y)}
Images = dict[str, Any]


def _file(folder: Path, part: str, kind: str) -> Path | None:
    """The ``<part>-<kind>-idxN-ubyte[.gz]`` file of ``folder``; two spellings of one file are refused."""
    found = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(f"{part}-{kind}-idx")
             and p.name.removesuffix(".gz").endswith("-ubyte")]
    if len(found) > 1:
        raise DataFormatError(f"{folder}: {', '.join(sorted(p.name for p in found))} are one file twice; keep one")
    return found[0] if found else None


def _read(path: Path, ndims: tuple[int, ...]) -> np.ndarray:
    payload = path.read_bytes()
    if path.name.endswith(".gz"):
        payload = gunzip(payload, str(path))
    return read_idx(payload, str(path), ndims)


def read_batch(folder: Path) -> Images:
    """The images of a batch folder. File names, IDX structure, sizes and shapes are checked here (a file that does
    not fit names itself); labels and values by the contract."""
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: not a folder (a batch is a folder with train-images-idx3-ubyte.gz and "
                              "train-labels-idx1-ubyte.gz)")
    known = {CLASSES}
    batch: Images = {"classes": None}
    for part in PARTS:
        images, labels = _file(folder, part, "images"), _file(folder, part, "labels")
        if images is None and labels is None:
            if part == "train":
                raise DataFormatError(f"{folder}: has no train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
            continue
        if images is None or labels is None:
            raise DataFormatError(f"{folder}: {(images or labels).name} has no "
                                  f"{part}-{'labels' if labels is None else 'images'} file beside it")
        known |= {images.name, labels.name}
        x, y = _read(images, (3, 4)), _read(labels, (1,))
        if x.ndim == 4 and x.shape[1] not in (1, 3):
            raise DataFormatError(f"{images}: holds images of shape {x.shape[1:]}; an idx4 file is (N, C, H, W) with "
                                  "1 (grey) or 3 (RGB) channels first")
        if len(x) != len(y):
            raise DataFormatError(f"{folder}: {images.name} holds {len(x)} images but {labels.name} {len(y)} labels")
        batch[part] = (x, y)
    shapes = {part: batch[part][0].shape[1:] for part in PARTS if part in batch}
    if len(set(shapes.values())) > 1:
        raise DataFormatError(f"{folder}: its parts hold images of different shapes {shapes}; a model takes one")
    if extra := sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name not in known):
        raise DataFormatError(f"{folder}: {', '.join(extra)}: not part of a batch (the IDX files of train, val and "
                              f"test, and {CLASSES})")
    if (folder / CLASSES).is_file():
        try:
            classes = json.loads((folder / CLASSES).read_text())
        except (OSError, ValueError, RecursionError) as err:   # RecursionError: lists nested thousands deep
            raise DataFormatError(f"{folder / CLASSES}: cannot be read ({err})") from err
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) \
                or len(set(classes)) != len(classes):
            raise DataFormatError(f"{folder / CLASSES}: must be a list of distinct class names, got {classes!r}")
        batch["classes"] = classes
    return batch


def write_batch(batch: Images, folder: Path) -> None:
    """``batch`` as a batch folder (gzipped IDX files, written reproducibly, and its class names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if batch.get(part) is None:
            continue
        x, y = batch[part]
        if len(y) and int(np.max(y)) > 255:
            raise DataFormatError(f"{folder}: IDX labels are bytes; {int(np.max(y)) + 1} classes do not fit")
        write_atomic(folder / f"{part}-images-idx{x.ndim}-ubyte.gz", gzip_bytes(idx_bytes(np.asarray(x, np.uint8))))
        write_atomic(folder / f"{part}-labels-idx1-ubyte.gz", gzip_bytes(idx_bytes(np.asarray(y, np.uint8))))
    if batch.get("classes"):
        write_atomic(folder / CLASSES, (json.dumps(batch["classes"]) + "\n").encode())


def combine(batches: list[Images]) -> Images:
    """Every batch's training images in order; the class names and the val / test parts of the first batch that has
    them (the contract keeps them in the first batch); ``batches``: the batches themselves (which rows ``prepare``
    holds out as test depends on the batch each came in)."""
    def first(key: str) -> Any:
        return next((b[key] for b in batches if b.get(key) is not None), None)

    trains = [b["train"] for b in batches]
    return {"classes": first("classes"), "train": (np.concatenate([x for x, _ in trains]),
                                                   np.concatenate([y for _, y in trains])),
            **{part: first(part) for part in ("val", "test") if first(part) is not None}, "batches": batches}


def rows(batch: Images) -> dict[str, int]:
    return {part: len(batch[part][1]) for part in PARTS if batch.get(part) is not None}
