"""A user's own labelled images, read from a folder: one sub-folder per class (``<root>/<class>/<image>``), or
``<root>/train/<class>/...`` beside ``<root>/test/<class>/...`` when the test split is given.

Every image is decoded with Pillow, converted to the requested channels (1: grey, 3: RGB; none: the first image's)
and, when a size is given, resized to it; otherwise all images must share one size. What cannot be read or does not
fit stops with one line naming the file. The folder's content digest (``folder_digest``) may be pinned in params.
``key`` names the params block that points here (e.g. ``data.<family>.image_folder``) in those messages.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.errors import ChecksumError, DataFormatError, DataSourceError

MODES = {1: "L", 3: "RGB"}
SPLIT_DIRS = ("train", "test")


def image_files(directory: Path) -> list[Path]:
    """The files under ``directory`` (recursively, hidden ones skipped), sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(directory).parts))


def class_dirs(root: Path) -> list[Path]:
    """The class sub-folders of ``root``, sorted by name (the label of a class is its position)."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataFormatError(f"{root}: no class folders; put each class's images in a sub-folder named after it")
    return dirs


def folder_digest(root: Path) -> str:
    """SHA-256 over every file's path (relative to ``root``) and content, in sorted order."""
    digest = hashlib.sha256()
    for path in image_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def decode(path: Path, channels: int | None, size: Sequence[int] | None) -> np.ndarray:
    """One image as uint8 (H, W) for one channel or (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = MODES[channels] if channels else ("L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB")
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataFormatError(f"{path}: not an image Pillow can read ({err})") from err
    return array if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def read_classes(root: Path, classes: list[str], channels: int | None, size: Sequence[int] | None, key: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) or (N, C, H, W) and labels of ``root/<class>/*`` for each of ``classes`` (label = index)."""
    images, labels, first = [], [], None
    for label, name in enumerate(classes):
        files = image_files(root / name) if (root / name).is_dir() else []
        if not files:
            raise DataFormatError(f"{root / name}: class {name!r} has no images")
        for path in files:
            array = decode(path, channels, size)
            if first is None:
                first = (path, array.shape)
                channels = channels or (1 if array.ndim == 2 else 3)
            elif array.shape != first[1]:
                raise DataFormatError(f"{path}: image of shape {array.shape}, but {first[0]} has {first[1]}; give "
                                      f"{key}.size in params.yaml to resize every image to one size")
            images.append(array)
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.uint8 if len(classes) <= 256 else np.int64)


def read_folder(root: Path, channels: int | None, size: Sequence[int] | None, pinned: str | None, key: str
                ) -> tuple[str, list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(content digest, class names, {"train": (x, y)} or {"train": ..., "test": ...}) of an image folder."""
    if not root.is_dir():
        raise DataSourceError(f"{root}: {key}.path in params.yaml is not a folder")
    if pinned is not None and (actual := folder_digest(root)) != pinned:
        raise ChecksumError(f"{root}: content digest {actual} is not the pinned {pinned} "
                            f"({key}.sha256 in params.yaml)")
    given = all((root / d).is_dir() for d in SPLIT_DIRS)
    parts = {d: root / d for d in SPLIT_DIRS} if given else {"train": root}
    classes = [p.name for p in class_dirs(parts["train"])]
    if given and (test_classes := [p.name for p in class_dirs(parts["test"])]) != classes:
        raise DataFormatError(f"{parts['test']}: classes {test_classes} differ from {parts['train']}'s {classes}")
    if len(classes) < 2:
        raise DataFormatError(f"{parts['train']}: one class folder ({classes}); classification needs at least two")
    arrays = {}
    for name, directory in parts.items():
        arrays[name] = read_classes(directory, classes, channels, size, key)
        channels = channels or (1 if arrays[name][0].ndim == 3 else 3)
    if given and (train := arrays["train"][0].shape[1:]) != (test := arrays["test"][0].shape[1:]):
        raise DataFormatError(f"{parts['test']}: images of shape {test}, but {parts['train']} holds {train}; give "
                              f"{key}.size in params.yaml to resize every image to one size")
    return folder_digest(root), classes, arrays
