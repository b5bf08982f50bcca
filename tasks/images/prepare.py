"""Stage ``prepare_<family>``: the raw snapshot of images -> verified, split arrays.

Input: ``<raw>``, the family's snapshot (``tasks.snapshot``, ``tasks.images.intake``): the published images (a
user's image folder or a published data set's IDX files, verified by checksum: ``tasks.images.source``) and every batch
``flows.ingest`` accepted. The first batch's test part is the test split's golden window; each later batch holds
out ``data.<family>.batch_test_fraction`` of its images as test rows too (the newest batch's are the recent window:
images no model was trained on), then gives validation the share the first batch's training images gave it (seeded
per batch, so a batch's split never moves); an image repeated from an earlier batch stays in the split its original
is in (a copy of a test image is refused at intake).
Outputs: ``<out>/{train,val,test}_{x,y}.npy`` (uint8 images, one channel as (N, H, W), more as (N, C, H, W)),
``<out>/windows.json`` (the test rows of each evaluation window, by position: ``golden``, ``recent``) and
``<out>/manifest.json`` (source, image shape, pixel statistics, class names, rows and class counts per split — of
the test split's held-out rows too — and rows per window).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.config import stage_args
from tasks.errors import DataFormatError
from tasks.images.data_config import ImageData, SplitSizes
from tasks.images.source import from_folder, from_idx
from tasks.io import WINDOWS, save_npy, write_json
from tasks.stratify import stratified_pick

if TYPE_CHECKING:
    from tasks.intake import Intake


def carve(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator
          ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(rest, carved): ``n`` rows drawn stratified from (x, y), and the others."""
    idx = stratified_pick(y, n, rng)
    rest = np.ones(len(y), dtype=bool)
    rest[idx] = False
    return (x[rest], y[rest]), (x[idx], y[idx])


Part = tuple[np.ndarray, np.ndarray]   # (images, labels)


def digests(x: np.ndarray) -> np.ndarray:
    """Each image's content digest (``x``: N images of any shape; none gives none)."""
    flat = np.ascontiguousarray(x).reshape(len(x), int(np.prod(x.shape[1:])))   # (-1 cannot size no images)
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat], dtype=object)


def hold_out(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator, seen: set[str],
             found: np.ndarray | None = None) -> tuple[Part, Part]:
    """(rest, held): ``n`` test rows drawn stratified from a later batch, never an image that is a copy of one
    ``seen`` before (the snapshot's earlier images) or of another in the batch: a repeat stays a training row, so
    no image is a test row in one place and a training row in another (the intake contract tolerates a few
    repeats). A batch without repeats is carved exactly as ``carve`` does. ``found``: the images' ``digests``."""
    found = digests(x) if found is None else found
    _, first, counts = np.unique(found, return_index=True, return_counts=True)
    single = np.zeros(len(y), dtype=bool)
    single[first[counts == 1]] = True
    repeat = ~single | np.fromiter((d in seen for d in found), dtype=bool, count=len(found))
    if not repeat.any():
        return carve(x, y, n, rng)
    pool = np.flatnonzero(~repeat)
    if len(pool) < n:
        raise DataFormatError(f"a batch of {len(y)} images holds only {len(pool)} seen neither before nor twice in it, "
                              f"fewer than the {n} test rows data.<family>.batch_test_fraction holds out of it")
    idx = pool[stratified_pick(y[pool], n, rng)] if n else np.zeros(0, dtype=np.int64)
    rest = np.ones(len(y), dtype=bool)
    rest[idx] = False
    return (x[rest], y[rest]), (x[idx], y[idx])


def carve_validation(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator, trained: set[str],
                     validated: set[str]) -> tuple[Part, Part]:
    """(rest, val): ``n`` validation rows of a later batch (once its test rows left it), no image of them a training
    row elsewhere: a copy of an earlier validation image is one of them (up to ``n``: more stay training rows, as the
    rows each split holds are planned; the intake's ``max_repeated_fraction`` keeps repeats far below a batch's
    validation share), the others are drawn stratified from the images seen neither before nor twice in the batch; a
    copy of an earlier training image, or an image the batch holds twice, stays a training row (the intake contract
    tolerates a few repeats). A batch without repeats is carved exactly as ``carve`` does."""
    found = digests(x)
    copies = np.fromiter((d in validated for d in found), dtype=bool, count=len(found))
    _, inverse, counts = np.unique(found, return_inverse=True, return_counts=True)
    kept = (counts[inverse] > 1) | np.fromiter((d in trained for d in found), dtype=bool, count=len(found))
    if not (copies | kept).any():
        return carve(x, y, n, rng)
    given = np.flatnonzero(copies)[:n]
    pool = np.flatnonzero(~(copies | kept))
    if len(pool) < n - len(given):
        raise DataFormatError(f"a batch of {len(y)} training images holds only {len(pool)} seen neither before nor "
                              f"twice in it, fewer than the {n - len(given)} validation rows it owes")
    picked = pool[stratified_pick(y[pool], n - len(given), rng)] if n > len(given) else given[:0]
    idx = np.sort(np.concatenate([given, picked]))
    rest = np.ones(len(y), dtype=bool)
    rest[idx] = False
    return (x[rest], y[rest]), (x[idx], y[idx])


def _joined(parts: list[Part]) -> Part:
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def split(parts: dict[str, Part], val_size: int, test_size: int, seed: int, subset: SplitSizes | None,
          later: list[Part] | None = None, test_share: float = 0.0) -> tuple[dict[str, Part], dict[str, list[int]]]:
    """(splits, windows). Train / validation / test: the given ones, the others carved from train, seeded and
    stratified (test first, then validation); images of ``later`` batches (training images that arrived since) each
    hold out ``test_share`` of them as test rows, then give validation the share the first batch gave it, both drawn
    with the batch's own seeds (a batch's split never moves as more arrive); optionally a seeded subset of each (of
    the test split: of the first batch's part). Windows: the test positions of the first batch's part (``golden``)
    and, once a batch arrived after it, of the newest batch's (``recent``)."""
    rng = np.random.default_rng(seed)
    train = parts["train"]
    test = parts.get("test")
    if test is None:
        train, test = carve(*train, test_size, rng)
    val = parts.get("val")
    if val is None:
        train, val = carve(*train, val_size, rng)
    trains, vals, tests = [train], [val], [test]
    share = len(val[1]) / (len(val[1]) + len(train[1]))
    trained, validated = (set(digests(part[0])) if later else set() for part in (train, val))
    seen = trained | validated | (set(digests(test[0])) if later else set())
    for n, (x, y) in enumerate(later or [], start=1):
        batch = digests(x)
        (x, y), held = hold_out(x, y, round(len(y) * test_share), np.random.default_rng([seed, n, 1]), seen, batch)
        # its validation rows never copies of training images, nor copies of validation images training rows: the
        # scores recipes are chosen on would read them as unseen (a batch without repeats: carved as it always was)
        rest, carved = carve_validation(x, y, round(len(y) * share), np.random.default_rng([seed, n]), trained,
                                        validated)
        seen.update(batch)
        trained.update(digests(rest[0]))
        validated.update(digests(carved[0]))
        trains.append(rest)
        vals.append(carved)
        tests.append(held)
    splits = {"train": _joined(trains), "val": _joined(vals), "test": tests[0]}
    if subset:
        sizes = subset.model_dump()
        for name, (sx, sy) in splits.items():
            keep = stratified_pick(sy, min(sizes[name], len(sy)), rng)
            splits[name] = (sx[keep], sy[keep])
    golden = len(splits["test"][1])
    splits["test"] = _joined([splits["test"], *tests[1:]])
    windows = {"golden": list(range(golden))}
    if later:
        windows["recent"] = list(range(len(splits["test"][1]) - len(tests[-1][1]), len(splits["test"][1])))
    return splits, windows


def planned_rows(cfg: ImageData, batches: list[dict[str, int]], source: str) -> dict[str, int]:
    """The rows ``split`` gives each split of a snapshot whose batches hold ``batches`` rows per part (what the data
    contract expects of prepared data, from the snapshot's manifest)."""
    first = batches[0]
    val, test = carve_sizes(cfg, first, source)
    train = first["train"] - val - test
    val, test = first.get("val", val), first.get("test", test)
    share, held_out = val / (val + train), 0
    for later in batches[1:]:
        held = round(later["train"] * cfg.batch_test_fraction)
        carved = round((later["train"] - held) * share)
        train, val, held_out = train + later["train"] - held - carved, val + carved, held_out + held
    planned = {"train": train, "val": val, "test": test}
    if cfg.subset:
        planned = {name: min(rows, getattr(cfg.subset, name)) for name, rows in planned.items()}
    return planned | {"test": planned["test"] + held_out}


def pixel_stats(x: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of pixel/255 over ``x`` (N, H, W) or (N, C, H, W), summed in chunks."""
    channels = 1 if x.ndim == 3 else x.shape[1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for i in range(0, len(x), 4096):
        chunk = x[i:i + 4096].astype(np.float64) / 255.0
        chunk = chunk[:, None] if x.ndim == 3 else chunk
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(max(float(v), 1e-3), 6) for v in std]}


def carve_sizes(cfg: ImageData, rows: dict[str, int], source: str) -> tuple[int, int]:
    """(validation, test) rows to carve from the first batch's ``rows["train"]`` images (0 for a split it gives)."""
    folder, n = cfg.image_folder, rows["train"]
    if folder is None:
        if "test" not in rows:
            raise DataFormatError(f"{source}: the first batch has no test part; give it test-images-idx3-ubyte.gz and "
                                  "test-labels-idx1-ubyte.gz (the fixed test set every model is reported on)")
        test, val = 0, 0 if "val" in rows else cfg.val_size
    else:
        test = 0 if "test" in rows else max(1, round(n * folder.test_fraction))
        val = 0 if "val" in rows else max(1, round((n - test) * folder.val_fraction))
    if n - test - val < 1:
        raise DataFormatError(f"{source}: {n} training images leave none to train on after {test} test and {val} "
                              "validation images")
    return val, test


def split_sizes(cfg: ImageData, parts: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> tuple[int, int]:
    """(validation, test) rows to carve from the training images (0 for a split the source gives)."""
    return carve_sizes(cfg, {name: len(y) for name, (_, y) in parts.items()}, source)


def check_every_class_in_every_split(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                                     source: str) -> None:
    for name, (_, y) in splits.items():
        counts = np.bincount(y, minlength=len(classes))
        if (missing := [classes[c] for c in np.flatnonzero(counts == 0)]):
            raise DataFormatError(f"{source}: no image of class {', '.join(map(repr, missing))} in the {name} split; "
                                  "give each class at least a few images per split")


def from_snapshot(cfg: ImageData, batches: list[dict]
                  ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """(class names, the first batch's parts, the training images of every later batch) of a snapshot's batches
    (``tasks.images.intake``). Class names: the first batch's (``classes.json``), else the IDX labels' names in
    params, else the label numbers."""
    first = batches[0]
    parts = {name: first[name] for name in ("train", "val", "test") if first.get(name) is not None}
    later = [b["train"] for b in batches[1:]]
    n_labels = int(max(int(y.max(initial=0)) for _, y in [*parts.values(), *later])) + 1
    names = declared_classes(cfg, first)
    # a label past the named classes is kept (named by its number): validate_<family>, whose contract is the named
    # classes, stops the pipeline on it and its Data Docs show the offending values
    return [*names, *(str(i) for i in range(len(names), n_labels))], parts, later


def declared_classes(cfg: ImageData, first: dict) -> list[str]:
    """The class names the data declares: the first batch's ``classes.json``, else the IDX labels' names in params
    (the published bootstrap's ``classes.json`` holds those: params pin them)."""
    return first.get("classes") or (cfg.class_names if cfg.image_folder is None else None) or []


def prepare_images(cfg: ImageData, out_dir: Path, family: str, snapshot: tuple[str, list[dict]] | None = None,
                   skipped: dict | None = None) -> dict:
    """Split a snapshot's images (``(source, batches)``; default: the published images, read and verified now, as
    its one batch) into ``out_dir``; return the manifest. ``cfg`` is ``data.<family>``; ``skipped``: the files of the
    snapshot's image folder that were not read (``{"count", "files"}``, ``tasks.snapshot.bootstrap_skipped``), named
    in the manifest as when the folder is read here."""
    if snapshot is None:
        skipped = None
        if cfg.image_folder:
            source, classes, parts, names = from_folder(cfg.image_folder, f"data.{family}.image_folder")
            skipped = {"count": len(names), "files": names} if names else None
        else:
            source, classes, parts = from_idx(cfg, f"data.{family}")
        later: list[tuple[np.ndarray, np.ndarray]] = []
        declared = classes if cfg.image_folder else (cfg.class_names or [])
    else:
        source, batches = snapshot
        classes, parts, later = from_snapshot(cfg, batches)
        declared = declared_classes(cfg, batches[0])
    splits, windows = split(parts, *split_sizes(cfg, parts, source), cfg.seed, cfg.subset, later,
                            cfg.batch_test_fraction)
    if cfg.image_folder:   # the IDX data set's contract (validate_<family>) checks its published classes instead
        check_every_class_in_every_split(splits, classes, source)
    x_train = splits["train"][0]
    pinned = cfg.image_folder.pixels if cfg.image_folder else cfg.pixels
    pixels = pinned.model_dump() if pinned else pixel_stats(x_train)
    channels = 1 if x_train.ndim == 3 else x_train.shape[1]
    if len(pixels["mean"]) != channels:
        raise DataFormatError(f"{source}: the images have {channels} channel(s) but the pixel statistics in params.yaml "
                              f"give {len(pixels['mean'])}")
    manifest = {"source": source, "image": {"channels": channels, "height": int(x_train.shape[-2]),
                                            "width": int(x_train.shape[-1]), **pixels, "classes": classes},
                "splits": {}, "windows": {name: len(rows) for name, rows in windows.items()},
                "given_splits": [name for name in ("val", "test") if name in parts],   # the others were carved
                **({"declared_classes": declared} if declared else {}),
                **({"skipped_files": skipped["files"], "skipped_count": skipped["count"]} if skipped else {})}
    for name, (x, y) in splits.items():
        for part, arr in (("x", x), ("y", y)):
            save_npy(out_dir / f"{name}_{part}.npy", arr)
        manifest["splits"][name] = {"rows": len(y),
                                    "class_counts": np.bincount(y, minlength=len(classes)).tolist()}
    # the test rows later batches held out (after the golden ones): stratified by their batch's own class mix
    held_out = splits["test"][1][len(windows["golden"]):]
    manifest["splits"]["test"]["held_out_class_counts"] = np.bincount(held_out, minlength=len(classes)).tolist()
    write_json(out_dir / WINDOWS, windows)
    write_json(out_dir / "manifest.json", manifest)
    if skipped:
        print(f"skipped {skipped['count']} file(s) without an image extension: {', '.join(skipped['files'][:5])}"
              + (" ..." if skipped["count"] > 5 else ""))
    return manifest


def main(family: str, intake: Intake) -> None:
    """The stage of image family ``family`` whose batches ``intake`` reads (its ``tasks/<family>/intake.py``)."""
    args, cfg = stage_args(__doc__, "--raw", "--out")
    from tasks.snapshot import bootstrap_skipped, read, stage_batches
    from tasks.tracking import stage_run

    data = cfg.block("data", family)
    with stage_run(f"prepare_{family}", cfg, params={f"data.{family}": data}) as run:
        source, batches = stage_batches(args.raw, intake)
        manifest = prepare_images(data, args.out, family, (source, [t for _, t in batches]),
                                  bootstrap_skipped(read(args.raw)))
        run.log_metrics({f"{s}_rows": v["rows"] for s, v in manifest["splits"].items()}
                        | {f"{w}_test_rows": n for w, n in manifest["windows"].items()})
        run.set_tag("data.source", manifest["source"])
        run.log_artifact(args.out / "manifest.json")
    print(json.dumps({s: v["rows"] for s, v in manifest["splits"].items()}), f"from {manifest['source']}")

