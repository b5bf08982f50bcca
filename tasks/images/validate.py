"""Stage ``validate_<family>``: the Great Expectations gate on processed images.

Input: ``<data>/{train,val,test}_{x,y}.npy`` and ``<data>/manifest.json``. The contract: the published IDX data set's
split sizes and image shape (Fashion-MNIST's: 60,000 + 10,000 images of 28x28) for IDX files; for a user's image
folder, the sizes, shape and classes its manifest records (the folder is its own reference). Output: ``<report>`` (JSON, every expectation with its observed
value). A failed expectation stops the pipeline with a message naming it and the offending values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Config, stage_args
from tasks.errors import DataFormatError
from tasks.expectations import ephemeral_context, failure_message, publish_validation, run_suites  # noqa: F401 (failure_message: API)
from tasks.io import read_manifest

SHAPE = ("channels", "height", "width")
SPLITS = ("train", "val", "test")


def expected_rows(cfg: Config, family: str, batches: list[dict[str, int]] | None = None) -> dict[str, int]:
    """Rows per split of the snapshot whose batches hold ``batches`` rows per part (default: the published data)."""
    from tasks.images.prepare import planned_rows

    data = cfg.block("data", family)
    published = [{"train": data.published.train, "test": data.published.test}] if data.published else []
    return planned_rows(data, batches or published, "the raw snapshot")


def contract(cfg: Config, family: str, manifest: dict | None, snapshot: dict | None = None
             ) -> tuple[dict[str, int], dict]:
    """(rows per split, image: channels, height, width, classes) the processed data must have. Rows follow from the
    raw snapshot's manifest (``snapshot``; default: the published data alone); the image shape is the IDX files'
    when the snapshot starts with the published IDX files, else the one the data's manifest records (the intake
    contract kept every batch to the first one's)."""
    data = cfg.block("data", family)
    batches = [b["rows"] for b in snapshot["batches"]] if snapshot else None
    if data.image_folder:
        if manifest is None:
            raise DataFormatError("an image folder's data is checked against its manifest.json; none was given")
        rows = expected_rows(cfg, family, batches) if batches else {s: v["rows"] for s, v in manifest["splits"].items()}
        return rows, manifest["image"]
    # the declared classes (a label past them is named by its number in the data's classes, and fails the contract)
    classes = (manifest or {}).get("declared_classes") or data.class_names or \
        (manifest["image"]["classes"] if manifest else None)
    if not classes:
        raise DataFormatError(f"the IDX labels need data.{family}.class_names in params.yaml, or the data's manifest")
    published = snapshot is None or starts_published(snapshot)   # its shape
    if not published and manifest is None:
        raise DataFormatError("images that arrived in batches are checked against their manifest.json; none was given")
    shape = {"channels": 1, "height": data.published.height, "width": data.published.width} if published else \
        {k: manifest["image"][k] for k in SHAPE}
    return expected_rows(cfg, family, batches), {**shape, "classes": classes}


def load_arrays(data_dir: Path, family: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {}
    for split in SPLITS:
        try:
            arrays[split] = tuple(np.load(data_dir / f"{split}_{p}.npy", allow_pickle=False) for p in "xy")
        except (OSError, ValueError) as err:
            raise DataFormatError(f"{data_dir}/{split}_*.npy: cannot be read ({err}); re-run prepare_{family}") from err
    return arrays


def starts_published(snapshot: dict) -> bool:
    """Whether the raw snapshot's first batch is the published bootstrap (the only batch that records pins)."""
    return bool(snapshot["batches"]) and "pins" in snapshot["batches"][0]


def published_only(snapshot: dict | None) -> bool:
    """Whether the data is the published IDX data set alone (no snapshot given, or one of its bootstrap only)."""
    return snapshot is None or (len(snapshot["batches"]) == 1 and starts_published(snapshot))


def class_shares(cfg: Config, family: str, manifest: dict | None, num_classes: int, snapshot: dict | None = None
                 ) -> dict[str, list[float]]:
    """Each class's expected share of each split: equal for a published IDX data set balanced by publication
    (``data.<family>.published.balanced``; one that is not: its own mix, as for batches);
    else the data's own class mix — an image folder's over the splits carved from its training images (stratified),
    a split it gives (``test/``, ``val/``) its own, for images
    that arrived in batches the mix of the training and validation images (carved stratified per batch), while the
    test split is its own mix, or, when its first batch's fixed part is the published one, equal shares over those
    (golden) rows plus the mix of the rows later batches held out (stratified by each batch's own mix)."""
    equal = [1.0 / num_classes] * num_classes
    data = cfg.block("data", family)
    folder, balanced = data.image_folder, data.published is not None and data.published.balanced
    if manifest is None or (not folder and balanced and published_only(snapshot)):
        return dict.fromkeys(SPLITS, equal)

    def mix(*splits: str) -> list[float]:
        counts = np.sum([manifest["splits"][s]["class_counts"] for s in splits], axis=0)
        return (counts / counts.sum()).tolist()

    if folder:   # a split the folder gives: its own mix; the ones carved from train (stratified): theirs together
        given = manifest.get("given_splits", [])
        carved = [s for s in SPLITS if s not in given]
        return {s: mix(s) if s in given else mix(*carved) for s in SPLITS}
    if not (snapshot is not None and starts_published(snapshot)) or not balanced:
        return {"train": mix("train", "val"), "val": mix("train", "val"), "test": mix("test")}
    test = manifest["splits"]["test"]
    held = np.asarray(test.get("held_out_class_counts", [0] * num_classes), dtype=float)
    golden = test["rows"] - held.sum()
    return {"train": mix("train", "val"), "val": mix("train", "val"),
            "test": ((np.asarray(equal) * golden + held) / test["rows"]).tolist()}


def validate_images(arrays: dict[str, tuple[np.ndarray, np.ndarray]], cfg: Config, family: str,
                    docs: Path | None = None, manifest: dict | None = None, snapshot: dict | None = None
                    ) -> dict[str, Any]:
    """Run every suite (through GE Checkpoints, rendering Data Docs into ``docs`` when given); return the report
    (``success`` plus one entry per expectation). ``snapshot``: the raw snapshot's manifest the data came from."""
    context = ephemeral_context()
    import tasks.images.expectations as ve

    rules, (rows, image) = cfg.block("validate", family), contract(cfg, family, manifest, snapshot)
    shares = class_shares(cfg, family, manifest, len(image["classes"]), snapshot)
    batches = []
    for split, (x, y) in arrays.items():
        batches.append((ve.rows_suite(family, split, rows[split], image), ve.row_frame(x, y)))
        batches.append((ve.classes_suite(family, split), ve.class_frame(y, shares[split], rules.class_balance_tolerance)))
    for earlier, later in ve.LEAK_PAIRS:  # validation is what choices are made on: it must not leak either
        batches.append((ve.leak_suite(family, earlier, later, rules), ve.leak_frame(arrays[earlier][0], arrays[later][0])))
    return run_suites(context, family, batches, docs)


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--snapshot", "--report", "--docs")
    from tasks.snapshot import read
    from tasks.tracking import stage_run

    with stage_run(f"validate_{family}", cfg, {f"validate.{family}": cfg.block("validate", family)}) as run:
        report = validate_images(load_arrays(args.data, family), cfg, family, args.docs,
                                 read_manifest(args.data, f"prepare_{family}"), read(args.snapshot))
        report = publish_validation(run, report, args.report, args.docs)
    print(f"validation passed: {len(report['checks'])} expectations")

