"""Where an image family's published images come from: a user's image folder (``data.<family>.image_folder``, read
by ``tasks.image_folder``), else a published data set's four IDX ``.gz`` files (Fashion-MNIST's, for one) from the
first source that has them (``data.<family>.source_dir``, ``system_dir`` such as a Debian package's folder, the
official URL into a download cache),
each file's decompressed IDX payload matching its SHA-256 pinned in params.yaml (payload, not ``.gz``: Debian
recompressed the files), the files checked to fit together."""
from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import numpy as np

from tasks.errors import ChecksumError, DataFormatError, DataSourceError
from tasks.image_folder import read_folder
from tasks.images.data_config import IDX_FILES, ImageData, ImageFolder
from tasks.images.idx import gunzip, parse_idx
from tasks.io import write_atomic

NDIM = {"images": 3, "labels": 1}
TRAIN, TEST = IDX_FILES[:2], IDX_FILES[2:]  # (images, labels) of each part


def _read_dir(directory: Path) -> dict[str, bytes] | str:
    """The four ``.gz`` files of ``directory``, or the reason they are not there."""
    missing = [f"{n}.gz" for n in IDX_FILES if not (directory / f"{n}.gz").is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    return {n: (directory / f"{n}.gz").read_bytes() for n in IDX_FILES}


def _download(url: str, cache: Path) -> dict[str, bytes] | str:
    """Fetch missing files from ``url`` into ``cache``; the reason on failure."""
    cache.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        target = cache / f"{name}.gz"
        if target.is_file():
            continue
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/{name}.gz", timeout=30) as resp:
                write_atomic(target, resp.read())
        except OSError as err:
            return f"download of {name}.gz failed: {err}"
    return _read_dir(cache)


def acquire(cfg: ImageData, key: str) -> tuple[str, dict[str, bytes]]:
    """Return (source description, raw ``.gz`` bytes per file) from the first source that has all four; ``key``:
    where ``cfg`` lies in params.yaml (``data.<family>``)."""
    tried: list[str] = []
    system = f"Debian {cfg.system_package}" if cfg.system_package else f"params {key}.system_dir"
    candidates = [(f"params {key}.source_dir", cfg.source_dir), (system, cfg.system_dir)]
    for label, directory in candidates:
        if directory is None:
            tried.append(f"{label}: not set")
            continue
        found = _read_dir(Path(directory))
        if isinstance(found, dict):
            return f"{label} ({directory})", found
        tried.append(f"{label} ({directory}): {found}")
    if cfg.url is None:
        tried.append(f"params {key}.url: not set")
    else:
        assert cfg.download_cache is not None   # ImageData requires it beside a url
        found = _download(cfg.url, Path(cfg.download_cache))
        if isinstance(found, dict):
            return f"download {cfg.url} (cached in {cfg.download_cache})", found
        tried.append(f"official URL {cfg.url}: {found}")
    raise DataSourceError("no source has the IDX files; tried, in order:\n  " + "\n  ".join(tried) +
                          (f"\nInstall the Debian package (apt-get install {cfg.system_package}) or set "
                           if cfg.system_package else "\nSet ") +
                          f"{key}.source_dir in params.yaml to a folder with the four .gz files.")


def decode(raw: dict[str, bytes], pinned: dict[str, str], source: str, key: str) -> dict[str, np.ndarray]:
    """Decompress, verify each payload's SHA-256 and parse the IDX arrays."""
    arrays = {}
    for name, blob in raw.items():
        payload = gunzip(blob, f"{source}: {name}.gz")
        actual = hashlib.sha256(payload).hexdigest()
        if actual != pinned[name]:
            raise ChecksumError(f"{source}: {name}.gz: SHA-256 of its content is {actual}, expected {pinned[name]} "
                                f"({key}.sha256 in params.yaml); the file is not the published data set")
        arrays[name] = parse_idx(payload, f"{name}.gz", NDIM[name.split("-")[1]])
    return arrays


def check_consistent(arrays: dict[str, np.ndarray], val_size: int, source: str, key: str) -> None:
    """Raise DataFormatError unless the decoded files fit together.

    ``parse_idx`` checked each file alone (3-D images, 1-D labels, declared sizes); files from different releases
    or cut short pass that, then failed in ``split`` (IndexError) or were written misaligned."""
    for images, labels in (TRAIN, TEST):
        n_images, n_labels = len(arrays[images]), len(arrays[labels])
        if n_images != n_labels:
            raise DataFormatError(f"{source}: {images}.gz has {n_images} images but {labels}.gz has {n_labels} "
                                  "labels; the two must come from the same release")
        if not n_images:
            raise DataFormatError(f"{source}: {images}.gz and {labels}.gz hold no rows")
    (train_h, train_w), (test_h, test_w) = arrays[TRAIN[0]].shape[1:], arrays[TEST[0]].shape[1:]
    if (train_h, train_w) != (test_h, test_w):
        raise DataFormatError(f"{source}: {TEST[0]}.gz holds {test_h}x{test_w} images but {TRAIN[0]}.gz "
                              f"{train_h}x{train_w}; a model takes one image size")
    n_train = len(arrays[TRAIN[1]])
    if val_size >= n_train:  # stratified_pick would fail, or leave no training rows
        raise DataFormatError(f"{source}: {key}.val_size ({val_size}) in params.yaml must be smaller than the "
                              f"{n_train} rows of {TRAIN[1]}.gz; lower it or use the full files")


def from_idx(cfg: ImageData, key: str) -> tuple[str, list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(source, class names, train and test parts) of the IDX files of ``cfg`` (``key``: ``data.<family>``),
    verified."""
    source, raw = acquire(cfg, key)
    arrays = decode(raw, cfg.sha256, source, key)
    assert cfg.val_size is not None   # ImageData requires it for IDX files
    check_consistent(arrays, cfg.val_size, source, key)
    n_labels = int(max(arrays[TRAIN[1]].max(), arrays[TEST[1]].max())) + 1
    names = cfg.class_names or []
    # a label past the named classes is written as it is (named by its number): validate_<family>, whose contract is
    # the named classes, stops the pipeline on it and its Data Docs show the offending values
    classes = [*names, *(str(i) for i in range(len(names), n_labels))]
    return source, classes, {"train": (arrays[TRAIN[0]], arrays[TRAIN[1]]), "test": (arrays[TEST[0]], arrays[TEST[1]])}


def from_folder(cfg: ImageFolder, key: str
                ) -> tuple[str, list[str], dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """(source, class names, parts, skipped files) of the image folder of ``cfg`` (``key``:
    ``data.<family>.image_folder``)."""
    root = Path(cfg.path)
    digest, classes, parts, skipped = read_folder(root, cfg.channels, cfg.size, cfg.sha256, key)
    return f"image folder {root} (content sha256 {digest})", classes, parts, skipped
