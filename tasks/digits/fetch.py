"""Stage ``fetch_digits``: scikit-learn's bundled handwritten digits written out as a user's image folder would be.

Input: ``sklearn/datasets/data/digits.csv.gz`` of the installed scikit-learn (the UCI optical digits test set: 1,797
images of 8x8 ink levels 0-16 and a label each), its decompressed content checked against
``data.digits.bundle.sha256``; nothing is downloaded and scikit-learn is not imported. Output: ``<out>/<label>/
<row>.png``, one 8-bit grey PNG an image (ink levels scaled to 0-255), the folder ``data.digits.image_folder`` reads.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np

from tasks.config import stage_args
from tasks.errors import CORRUPT_STREAM, ChecksumError, DataFormatError, DataSourceError, run_cli

LEVELS = 16   # the bundle's ink levels run 0..16


def bundle_path() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataSourceError("fetch_digits: scikit-learn is not installed; it ships the digits (pip install "
                              "scikit-learn)")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def read_bundle(path: Path, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) uint8 0-255, labels (N,)) of the bundle at ``path``, verified against ``sha256``."""
    try:
        payload = gzip.decompress(path.read_bytes())
    except (OSError, *CORRUPT_STREAM) as err:   # gzip.BadGzipFile is an OSError
        raise DataSourceError(f"{path}: cannot be read ({err})") from err
    if (actual := hashlib.sha256(payload).hexdigest()) != sha256:
        raise ChecksumError(f"{path}: SHA-256 of its content is {actual}, expected {sha256} (data.digits.bundle.sha256 "
                            "in params.yaml); not the digits scikit-learn publishes")
    rows = np.loadtxt(io.StringIO(payload.decode("ascii")), delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 65 or rows[:, :64].min() < 0 or rows[:, :64].max() > LEVELS:
        raise DataFormatError(f"{path}: expected rows of 64 ink levels 0-{LEVELS} and a label, got {rows.shape}")
    images = np.round(rows[:, :64].reshape(-1, 8, 8) * (255 / LEVELS)).astype(np.uint8)
    return images, rows[:, 64]


def write_folder(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png", optimize=False)


def main() -> None:
    args, cfg = stage_args(__doc__, "--out")
    from tasks.tracking import stage_run

    data = cfg.data.digits   # type: ignore[attr-defined]
    with stage_run("fetch_digits", cfg, {"data.digits.bundle": data.bundle}) as run:
        images, labels = read_bundle(bundle_path(), data.bundle.sha256)
        write_folder(images, labels, args.out)
        classes = len(np.unique(labels))
        run.log_metrics({"images": len(labels), "classes": classes})
    print(f"{len(labels)} digits of {classes} classes written to {args.out}")


if __name__ == "__main__":
    run_cli(main)
