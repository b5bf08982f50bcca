"""Stage ``prepare_vision``: raw Fashion-MNIST IDX files -> verified, split arrays.

Inputs: the four ``.gz`` files from the first source that has them (``data.vision.source_dir``, the Debian
package ``dataset-fashion-mnist``, the official URL into a download cache). Each file's decompressed IDX payload
must match its SHA-256 pinned in params.yaml (payload, not ``.gz``: Debian recompressed the files).
Outputs: ``<out>/{train,val,test}_{x,y}.npy`` (uint8) and ``<out>/manifest.json``.
"""
from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np

from tasks.config import stage_args
from tasks.errors import ChecksumError, DataFormatError, DataSourceError, run_cli
from tasks.idx import gunzip, parse_idx
from tasks.io import save_npy, write_atomic, write_json
from tasks.vision_config import VISION_FILES, VisionData

NDIM = {"images": 3, "labels": 1}
TRAIN, TEST = VISION_FILES[:2], VISION_FILES[2:]  # (images, labels) of each part


def _read_dir(directory: Path) -> dict[str, bytes] | str:
    """The four ``.gz`` files of ``directory``, or the reason they are not there."""
    missing = [f"{n}.gz" for n in VISION_FILES if not (directory / f"{n}.gz").is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    return {n: (directory / f"{n}.gz").read_bytes() for n in VISION_FILES}


def _download(url: str, cache: Path) -> dict[str, bytes] | str:
    """Fetch missing files from ``url`` into ``cache``; the reason on failure."""
    cache.mkdir(parents=True, exist_ok=True)
    for name in VISION_FILES:
        target = cache / f"{name}.gz"
        if target.is_file():
            continue
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/{name}.gz", timeout=30) as resp:
                write_atomic(target, resp.read())
        except OSError as err:
            return f"download of {name}.gz failed: {err}"
    return _read_dir(cache)


def acquire(cfg: VisionData) -> tuple[str, dict[str, bytes]]:
    """Return (source description, raw ``.gz`` bytes per file) from the first source that has all four."""
    tried: list[str] = []
    candidates = [("params data.vision.source_dir", cfg.source_dir), ("Debian dataset-fashion-mnist", cfg.system_dir)]
    for label, directory in candidates:
        if directory is None:
            tried.append(f"{label}: not set")
            continue
        found = _read_dir(Path(directory))
        if isinstance(found, dict):
            return f"{label} ({directory})", found
        tried.append(f"{label} ({directory}): {found}")
    found = _download(cfg.url, Path(cfg.download_cache))
    if isinstance(found, dict):
        return f"download {cfg.url} (cached in {cfg.download_cache})", found
    tried.append(f"official URL {cfg.url}: {found}")
    raise DataSourceError("no source has the Fashion-MNIST files; tried, in order:\n  " + "\n  ".join(tried) +
                          "\nInstall the Debian package (apt-get install dataset-fashion-mnist) or set "
                          "data.vision.source_dir in params.yaml to a folder with the four .gz files.")


def decode(raw: dict[str, bytes], pinned: dict[str, str], source: str) -> dict[str, np.ndarray]:
    """Decompress, verify each payload's SHA-256 and parse the IDX arrays."""
    arrays = {}
    for name, blob in raw.items():
        payload = gunzip(blob, f"{source}: {name}.gz")
        actual = hashlib.sha256(payload).hexdigest()
        if actual != pinned[name]:
            raise ChecksumError(f"{source}: {name}.gz: SHA-256 of its content is {actual}, expected {pinned[name]} "
                                "(data.vision.sha256 in params.yaml); the file is not the published data set")
        arrays[name] = parse_idx(payload, f"{name}.gz", NDIM[name.split("-")[1]])
    return arrays


def check_consistent(arrays: dict[str, np.ndarray], val_size: int, source: str) -> None:
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
        raise DataFormatError(f"{source}: data.vision.val_size ({val_size}) in params.yaml must be smaller than the "
                              f"{n_train} rows of {TRAIN[1]}.gz; lower it or use the full files")


def stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` rows drawn per class in proportion to the class sizes, sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts / counts.sum() * n).astype(int)
    quotas[: n - quotas.sum()] += 1  # hand out the rounding remainder to the first classes
    picks = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quotas, strict=True)]
    return np.sort(np.concatenate(picks))


def split(arrays: dict[str, np.ndarray], cfg: VisionData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train / seeded stratified validation carved from train / test; optionally a seeded subset of each."""
    rng = np.random.default_rng(cfg.seed)
    x, y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    val_idx = stratified_pick(y, cfg.val_size, rng)
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[val_idx] = False
    splits = {"train": (x[train_mask], y[train_mask]), "val": (x[val_idx], y[val_idx]),
              "test": (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])}
    if cfg.subset:
        sizes = cfg.subset.model_dump()
        for name, (sx, sy) in splits.items():
            keep = stratified_pick(sy, min(sizes[name], len(sy)), rng)
            splits[name] = (sx[keep], sy[keep])
    return splits


def prepare_vision(cfg: VisionData, out_dir: Path) -> dict:
    """Acquire, verify and split Fashion-MNIST into ``out_dir``; return the manifest."""
    source, raw = acquire(cfg)
    arrays = decode(raw, cfg.sha256, source)
    check_consistent(arrays, cfg.val_size, source)
    splits = split(arrays, cfg)
    manifest = {"source": source, "splits": {}}
    for name, (x, y) in splits.items():
        for part, arr in (("x", x), ("y", y)):
            save_npy(out_dir / f"{name}_{part}.npy", arr)
        manifest["splits"][name] = {"rows": int(len(y)), "class_counts": np.bincount(y, minlength=10).tolist()}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def main() -> None:
    args, cfg = stage_args(__doc__, "--out")
    from tasks.tracking import stage_run

    with stage_run("prepare_vision", cfg, params={"data.vision": cfg.data.vision}) as run:
        manifest = prepare_vision(cfg.data.vision, args.out)
        run.log_metrics({f"{s}_rows": v["rows"] for s, v in manifest["splits"].items()})
        run.set_tag("data.source", manifest["source"])
        run.log_artifact(args.out / "manifest.json")
    print(json.dumps({s: v["rows"] for s, v in manifest["splits"].items()}), f"from {manifest['source']}")


if __name__ == "__main__":
    run_cli(main)
