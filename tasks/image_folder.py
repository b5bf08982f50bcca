"""A user's own labelled images, read from a folder: one sub-folder per class (``<root>/<class>/<image>``), or
``<root>/train/<class>/...`` with ``test/`` (and ``val/``, also spelt ``valid/`` or ``validation/``) beside it when
those splits are given.

Files with an image extension are decoded with Pillow (EXIF orientation applied; 16-bit grey scaled to 8 bits),
converted to the requested channels (1: grey, 3: RGB; none: grey only if every image is grey) and, when a size is
given, resized to it; otherwise all images must share one size. Other files (a README, ``Thumbs.db``) are skipped
and listed; hidden files are ignored. What cannot be read or does not fit stops with one line naming the file.
The folder's content digest (every file's path and bytes, hashed as it is read) may be pinned in params. ``key``
names the params block that points here (e.g. ``data.<family>.image_folder``) in those messages.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.errors import ChecksumError, DataFormatError, DataSourceError

MODES = {1: "L", 3: "RGB"}
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                        ".ppm", ".pbm", ".pnm"})   # each one Pillow registers (.jfif and .jpe: JPEG files too)
SPLITS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def visible(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def split_dirs(root: Path) -> dict[str, Path]:
    """{split: folder} when ``root`` holds ``train/`` (and ``test/``, ``val/``), else {"train": root}."""
    if not (root / "train").is_dir():
        return {"train": root}
    known = {alias: split for split, aliases in SPLITS.items() for alias in aliases}
    found: dict[str, Path] = {}
    for entry in visible(root):
        if entry.name not in known:
            raise DataFormatError(f"{entry}: beside {root / 'train'} only {', '.join(sorted(known))} may stand; "
                                  "put each class's folder inside the split folders")
        if known[entry.name] in found:
            raise DataFormatError(f"{entry}: a second {known[entry.name]} folder beside {found[known[entry.name]]}")
        found[known[entry.name]] = entry
    return found


def class_dirs(directory: Path) -> list[Path]:
    """The class sub-folders of ``directory``, sorted by name (the label of a class is its position)."""
    dirs = [p for p in visible(directory) if p.is_dir()]
    if not dirs:
        raise DataFormatError(f"{directory}: no class folders; put each class's images in a sub-folder named after it")
    for path in dirs:   # a class name labels the model's outputs, its reports and figures: text
        try:
            path.name.encode()
        except UnicodeEncodeError:
            raise DataFormatError(f"{directory}: class folder {os.fsencode(path.name)!r} has a name that is not UTF-8 "
                                  "text (from an archive made with another encoding?); rename it") from None
    return dirs


class FolderReader:
    """Reads the image files of class folders, hashing every file it reads into one content digest."""

    def __init__(self, root: Path, channels: int | None, size: Sequence[int] | None, key: str) -> None:
        self.root, self.channels, self.size, self.key = root, channels, size, key
        self.digest = hashlib.sha256()
        self.skipped: list[str] = []
        self.first: tuple[Path, tuple[int, ...]] | None = None

    def files(self, directory: Path) -> list[Path]:
        """The image files of a class folder; any other file is skipped (and listed), a sub-folder refused."""
        files = []
        for path in visible(directory):
            if path.is_dir():
                raise DataFormatError(f"{path}: a folder inside the class folder {directory}; put the class's images "
                                      "directly in it")
            if path.suffix.lower() in EXTENSIONS:
                files.append(path)
            else:
                self.skipped.append(path.relative_to(self.root).as_posix())
        return files

    def hash(self, path: Path) -> bytes:
        """The file's bytes, its path and content hashed into the folder's digest."""
        blob = path.read_bytes()
        # the name's bytes on disk: a Latin-1 name (from an unzipped Windows archive) is no UTF-8 text, and a UTF-8
        # one hashes as it always did
        self.digest.update(os.fsencode(path.relative_to(self.root).as_posix()) + b"\0"
                           + hashlib.sha256(blob).digest())
        return blob

    def decode(self, path: Path) -> np.ndarray:
        """One image as uint8 (H, W) for one channel or (H, W, 3)."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        blob = self.hash(path)
        try:
            with Image.open(io.BytesIO(blob)) as img:
                img = ImageOps.exif_transpose(img)
                if img.mode.startswith("I"):   # 16/32-bit grey: scale 16-bit values to 8 bits, not clip them
                    img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).round()
                                          .astype(np.uint8), "L")
                grey = img.mode in ("1", "L", "LA", "F")
                img = img.convert(MODES[self.channels] if self.channels else ("L" if grey else "RGB"))
                if self.size is not None and img.size != (self.size[1], self.size[0]):
                    img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                return np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise DataFormatError(f"{path}: not an image Pillow can read ({err})") from err

    def read(self, directory: Path, classes: list[str]) -> tuple[list[np.ndarray], list[int]]:
        images, labels = [], []
        for label, name in enumerate(classes):
            files = self.files(directory / name) if (directory / name).is_dir() else []
            if not files:
                raise DataFormatError(f"{directory / name}: class {name!r} has no images")
            for path in files:
                images.append(self.decode(path))
                labels.append(label)
                self.check_size(path, images[-1].shape[:2])
        return images, labels

    def check_size(self, path: Path, shape: tuple[int, ...]) -> None:
        if self.first is None:
            self.first = (path, shape)
        elif shape != self.first[1]:
            raise DataFormatError(f"{path}: an image of {shape[0]}x{shape[1]} pixels, but {self.first[0]} has "
                                  f"{self.first[1][0]}x{self.first[1][1]}; give {self.key}.size in params.yaml to "
                                  "resize every image to one size")


def folder_digest(root: Path, key: str) -> str | None:
    """The content digest ``read_folder`` gives the folder (its image files' paths and bytes, in the order it reads
    them), without decoding an image: what an unpinned folder's snapshot is compared with; None: no folder there."""
    if not root.is_dir():
        return None
    dirs = split_dirs(root)
    classes = [p.name for p in class_dirs(dirs["train"])]
    reader = FolderReader(root, None, None, key)
    for directory in dirs.values():
        for name in classes:
            for path in reader.files(directory / name) if (directory / name).is_dir() else []:
                reader.hash(path)
    return reader.digest.hexdigest()


def as_channels_first(images: list[np.ndarray]) -> np.ndarray:
    """(N, H, W) when every image is grey, else (N, 3, H, W) (grey images repeated into three channels)."""
    if all(a.ndim == 2 for a in images):
        return np.stack(images)
    return np.stack([np.repeat(a[None], 3, 0) if a.ndim == 2 else a.transpose(2, 0, 1) for a in images])


def read_folder(root: Path, channels: int | None, size: Sequence[int] | None, pinned: str | None, key: str
                ) -> tuple[str, list[str], dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """(content digest, class names, {split: (x, y)} for "train" and the given "val"/"test", skipped files)."""
    if not root.is_dir():
        raise DataSourceError(f"{root}: {key}.path in params.yaml is not a folder")
    dirs = split_dirs(root)
    classes = [p.name for p in class_dirs(dirs["train"])]
    if len(classes) < 2:
        hint = " (a train/ folder? its classes go inside it)" if classes[0] in SPLITS["test"] + SPLITS["val"] else ""
        raise DataFormatError(f"{dirs['train']}: one class folder ({classes[0]!r}){hint}; classification needs at "
                              "least two")
    for name, directory in dirs.items():
        if name != "train" and (found := [p.name for p in class_dirs(directory)]) != classes:
            raise DataFormatError(f"{directory}: classes {found} differ from {dirs['train']}'s {classes}")
    reader = FolderReader(root, channels, size, key)
    read = {name: reader.read(directory, classes) for name, directory in dirs.items()}
    images = [a for part, _ in read.values() for a in part]
    x = as_channels_first(images)
    parts, start = {}, 0
    for name, (part, labels) in read.items():
        parts[name] = (x[start:start + len(part)], np.asarray(labels, dtype=np.uint8 if len(classes) <= 256
                                                              else np.int64))
        start += len(part)
    digest = reader.digest.hexdigest()
    if pinned is not None and digest != pinned:
        raise ChecksumError(f"{root}: content digest {digest} is not the pinned {pinned} ({key}.sha256 in "
                            "params.yaml); pin the new digest if these are the images you mean to train on")
    return digest, classes, parts, reader.skipped
