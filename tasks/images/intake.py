"""An image family's intake (``tasks.intake``): labelled images that arrive in batches, as IDX files.

A batch is a folder of IDX files (``tasks.images.batches``): training images and labels, and in the snapshot's
first batch the fixed *golden* test set and validation images too; ``prepare_<family>`` holds out a share of a later
batch's images as test rows (the recent window). The published data set is the
bootstrap batch: the published data set's four IDX files (pinned by SHA-256; its ``t10k`` part is the test part),
or the user's image folder of ``data.<family>.image_folder`` (``tasks.image_folder``).

The contract checks a batch on its own and against the accepted images: labels in the class set, one image shape
(the accepted one), class names that agree, few images repeated byte for byte. The drift checks compare it with
the accepted images' profile: the class mix (L-infinity), the per-image mean intensity and share of inked pixels
(Jensen-Shannon), and the share of blank or near-constant images. ``replay`` releases the published training images
as an initial set (with the test images) and batches of ``ingest.<family>.replay.batch_rows``.
``image_intake(family)`` is the family's ``Intake``.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import DataFormatError
from tasks.expectations import expectation_types, suite
from tasks.images.batches import PARTS, Images, combine, read_batch, rows, write_batch
from tasks.images.prepare import digests, from_snapshot, split, split_sizes
from tasks.intake import Intake, Suites, jensen_shannon, linf, shares

INK_LEVEL = 25        # a pixel brighter than this (of 255) is ink, not background
MEAN_BINS = np.linspace(0.0, 255.0, 33)
INK_BINS = np.linspace(0.0, 1.0, 21)


def settings(family: str, cfg: Any) -> Any:
    return cfg.block("ingest", family)


def pins(family: str, cfg: Any, extra: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the published bootstrap was read from: the IDX files' pins, or the image folder's settings (an unpinned
    folder's path and the content digest it has now, left out where no folder is there: a snapshot pulled to a
    machine without it is kept); plus ``extra(cfg)``, what else the family says the images come from (a bootstrap is
    remade when any of it changes)."""
    from tasks.image_folder import folder_digest

    data = cfg.block("data", family)
    folder = data.image_folder
    more = extra(cfg) if extra is not None else {}
    if folder is not None and folder.sha256:   # a pinned folder is its content, wherever it lies
        return {"channels": folder.channels, "size": folder.size, "sha256": folder.sha256, **more}
    if folder is not None:   # unpinned: images added to it, or edited, remake the bootstrap (one without batches)
        # (a family's own pins that fix the content already, such as the digits' bundle: not hashed again)
        content = None if more else folder_digest(Path(folder.path), f"data.{family}.image_folder")
        return {"channels": folder.channels, "size": folder.size, "image_folder": folder.path,
                **({"content_sha256": content} if content else {}), **more}
    return {**data.sha256, "class_names": data.class_names, **more}


def bootstrap(family: str, cfg: Any, extra: Callable[[Any], dict[str, Any]] | None = None
              ) -> tuple[str, Images, dict[str, Any]]:
    """The published images (IDX files or the image folder) as one batch; an image folder's files that are no
    image it reads (no image extension) are listed under ``skipped`` (``tasks.snapshot`` records and prints them)."""
    from tasks.images.source import from_folder, from_idx

    data = cfg.block("data", family)
    skipped: list[str] = []
    if data.image_folder is not None:
        source, classes, parts, skipped = from_folder(data.image_folder, f"data.{family}.image_folder")
    else:   # the declared names only: a label past them is validate_<family>'s to refuse, not a class to name
        source, _, parts = from_idx(data, f"data.{family}")
        classes = data.class_names
    return source, {"classes": classes, **parts, **({"skipped": skipped} if skipped else {})}, \
        pins(family, cfg, extra)


def _member(digests: np.ndarray, known: set[str]) -> np.ndarray:
    """Which of ``digests`` are in ``known``, by hashing (``np.isin`` sorts object arrays: ~2 s a call for a 5,000-image
    batch against 40,000 accepted images; two calls were most of a batch's check)."""
    return np.fromiter((d in known for d in digests), dtype=bool, count=len(digests))


def _shape(x: np.ndarray) -> str:
    return "x".join(str(d) for d in x.shape[1:])


def _across_test(data: Any, accepted: Images, batch: Images) -> set[str] | None:
    """Digests of the images that would be on both sides of the test split ``prepare`` makes of the accepted batches
    and ``batch`` (a test row in one place, a training or validation row in another: the golden test part, what it
    carves, and what it holds out of each later batch); None where no split can be made of them (another image
    shape, no test part: the contract's other checks name that)."""
    batches = [*(accepted.get("batches") or [accepted]), {"train": batch["train"]}]
    try:
        _, parts, later = from_snapshot(data, batches)
        splits, _ = split(parts, *split_sizes(data, parts, "the accepted images"), data.seed, None, later,
                          data.batch_test_fraction)
    except (DataFormatError, ValueError):
        return None
    trained = set(digests(splits["train"][0])) | set(digests(splits["val"][0]))
    return trained & set(digests(splits["test"][0]))


def contract(family: str, batch: Images, accepted: Images | None, cfg: Any) -> Suites:
    """The batch against the accepted images: class set and names, image shape, repeated images (never a copy of a
    test image: the first batch's, nor one ``prepare`` holds out of a later batch; ``prepare`` never holds out a
    repeat), and — after the first batch — training images only (the golden test set stays fixed); a first batch
    brings a test part and more training images than validation takes."""
    E = expectation_types()
    spec, data = settings(family, cfg), cfg.block("data", family)
    classes = (accepted or {}).get("classes") or batch.get("classes") or (
        data.class_names if data.image_folder is None else None)
    present = [part for part in PARTS if batch.get(part) is not None]
    found = {part: digests(batch[part][0]) for part in present}
    known = {part: set(digests(accepted[part][0])) for part in PARTS if (accepted or {}).get(part) is not None}
    accepted_digests = set().union(*known.values())
    tests = set(found.get("test", [])) | known.get("test", set())
    if accepted is not None and batch.get("train") is not None:
        tests |= _across_test(data, accepted, batch) or set()
    within = pd.Series(np.concatenate([found[p] for p in present])).duplicated(keep=False).to_numpy()
    frames, start = [], 0
    for part in present:
        x, y = batch[part]
        repeated = within[start:start + len(x)] | _member(found[part], accepted_digests)
        start += len(x)
        leak = np.zeros(len(x), bool) if part == "test" else _member(found[part], tests)
        frames.append(pd.DataFrame({"part": part, "label": y.astype(np.int64), "shape": _shape(x),
                                    "repeated": repeated.astype(np.int64), "copies_a_test_image": leak.astype(np.int64)}))
    frame = pd.concat(frames, ignore_index=True)
    checks = [E.ExpectTableRowCountToBeBetween(min_value=spec.min_rows),
              E.ExpectColumnMeanToBeBetween(column="repeated", min_value=0.0, max_value=spec.max_repeated_fraction),
              E.ExpectColumnValuesToBeInSet(column="copies_a_test_image", value_set=[0])]
    if classes:
        checks.append(E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(len(classes)))))
    if accepted:
        checks += [E.ExpectColumnValuesToBeInSet(column="shape", value_set=[_shape(accepted["train"][0])]),
                   E.ExpectColumnValuesToBeInSet(column="part", value_set=["train"])]
    else:   # the first batch brings the fixed test set every model is reported on, and enough to train on
        checks.append(E.ExpectColumnDistinctValuesToContainSet(column="part", value_set=["train", "test"]))
    out = [(suite("ingest_images", checks), frame)]
    if accepted is None and data.image_folder is None and batch.get("val") is None:
        out.append((suite("ingest_first_batch", [E.ExpectColumnValuesToBeBetween(
            column="training_images", min_value=data.val_size + 1)]),
            pd.DataFrame({"training_images": [len(batch["train"][1])]})))   # validation takes data.<family>.val_size
    # the names a batch's classes.json gives must be the accepted data's, or params' where that has none (a snapshot
    # started empty from a first batch without names); an image folder family's first batch names them
    names = (accepted or {}).get("classes") or (data.class_names if data.image_folder is None else None)
    if names and batch.get("classes"):
        out.append((suite("ingest_classes", [E.ExpectColumnValuesToBeInSet(
            column="classes", value_set=[json.dumps(list(names))])]),
            pd.DataFrame({"classes": [json.dumps(list(batch["classes"]))]})))
    return out


def _per_image(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean intensity, share of inked pixels, standard deviation) of each image, in chunks."""
    means, ink, std = [], [], []
    for i in range(0, len(x), 8192):
        flat = x[i:i + 8192].reshape(len(x[i:i + 8192]), -1).astype(np.float32)
        means.append(flat.mean(axis=1))
        ink.append((flat > INK_LEVEL).mean(axis=1))
        std.append(flat.std(axis=1))
    return tuple(np.concatenate(v) if v else np.zeros(0, np.float32) for v in (means, ink, std))   # type: ignore[return-value]


def _histogram(values: np.ndarray, bins: np.ndarray) -> pd.Series:
    return pd.Series(np.histogram(values, bins=bins)[0].astype(float))


def _classes(y: np.ndarray, n: int) -> pd.Series:
    return shares(pd.Series(y.astype(np.int64)), list(range(n)))


def profile(family: str, accepted: Images, cfg: Any) -> dict[str, Any]:
    """The reference profile of the accepted images: what the drift checks compare a new batch with."""
    x, y = accepted["train"]
    means, ink, std = _per_image(x)
    n = len(accepted.get("classes") or []) or int(y.max()) + 1
    return {"images": len(y), "shape": _shape(x), "class_shares": _classes(y, n).round(6).to_dict(),
            "mean_intensity": round(float(means.mean()), 3), "ink_share": round(float(ink.mean()), 4),
            "blank_share": round(float((std < settings(family, cfg).blank_std).mean()), 6)}


def drift_stats(family: str, batch: Images, accepted: Images, cfg: Any) -> dict[str, float]:
    (bx, by), (ax, ay) = batch["train"], accepted["train"]
    n = max(len(accepted.get("classes") or []), int(max(by.max(initial=0), ay.max(initial=0))) + 1)
    (b_mean, b_ink, b_std), (a_mean, a_ink, _) = _per_image(bx), _per_image(ax)
    return {"class_linf": linf(_classes(by, n), _classes(ay, n)),
            "mean_intensity_js": jensen_shannon(_histogram(b_mean, MEAN_BINS), _histogram(a_mean, MEAN_BINS)),
            "ink_js": jensen_shannon(_histogram(b_ink, INK_BINS), _histogram(a_ink, INK_BINS)),
            "blank_share": float((b_std < settings(family, cfg).blank_std).mean()) if len(b_std) else 0.0}


def drift(family: str, batch: Images, accepted: Images, cfg: Any) -> tuple[dict[str, float], Suites]:
    """The batch's distances from the accepted images, and the suite that holds each under its threshold."""
    E = expectation_types()
    limits = settings(family, cfg).drift
    stats = drift_stats(family, batch, accepted, cfg)
    frame = pd.DataFrame({name: [value] for name, value in stats.items()})
    return stats, [(suite("ingest_drift", [E.ExpectColumnMaxToBeBetween(column=name, min_value=0.0,
                                                                         max_value=getattr(limits, name))
                                           for name in stats]), frame)]


def replay(family: str, cfg: Any, landing: Path) -> list[Path]:
    """The published training images in their published order: the first ``initial_fraction`` with the test (and
    val) part and the class names as batch ``0000-initial``, then batches of ``batch_rows`` (a short tail joins the
    last)."""
    spec = settings(family, cfg).replay
    if cfg.block("data", family).image_folder is not None:
        raise DataFormatError(f"data.{family}.image_folder: an image folder has no arrivals to replay (its images are "
                              "read class by class); replay releases a published data set's IDX files")
    _, published, _ = bootstrap(family, cfg)
    x, y = published["train"]
    cut = round(len(y) * spec.initial_fraction)
    starts = list(range(cut, len(y), spec.batch_rows))
    if len(starts) > 1 and len(y) - starts[-1] < spec.batch_rows:
        starts.pop()   # the short tail joins the last batch
    bounds = [(0, cut), *zip(starts, [*starts[1:], len(y)], strict=True)]
    written = []
    for n, (start, end) in enumerate(bounds):
        name = "0000-initial" if n == 0 else f"{n:04d}-images-{start}-{end - 1}"
        part = {"classes": published["classes"], "train": (x[start:end], y[start:end])} if n else \
            {**published, "train": (x[start:end], y[start:end])}
        write_batch(part, landing / name)
        written.append(landing / name)
    return written


@functools.cache
def image_intake(family: str, extra_pins: Callable[[Any], dict[str, Any]] | None = None,
                 pins_key: str | None = None) -> Intake:
    """The intake of image family ``family`` (its ``tasks/<family>/intake.py`` holds it as ``INTAKE``).
    ``extra_pins(cfg)``: what else the images come from, recorded with the bootstrap (``pins_key`` names where
    params pin it): a family that writes its image folder from a pinned source gives that pin, so a new source
    remakes the bootstrap even though the folder's path stays the same."""
    def bound(fn: Any) -> Any:
        return functools.partial(fn, family)

    return Intake(settings=bound(settings),
                  pins_key=pins_key or f"data.{family}.sha256 and class_names (or data.{family}.image_folder)",
                  pins=functools.partial(pins, family, extra=extra_pins),
                  bootstrap=functools.partial(bootstrap, family, extra=extra_pins), read_batch=read_batch, write_batch=write_batch,
                  combine=combine, rows=rows, contract=bound(contract), profile=bound(profile), drift=bound(drift),
                  replay=bound(replay))
