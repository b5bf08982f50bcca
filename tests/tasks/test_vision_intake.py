"""The vision family's intake on the real Fashion-MNIST: its training images released in batches pass the contract
and the drift limits, a broken or a shifted batch is named for what it is, and a snapshot of batches prepares into
splits that never move as batches arrive."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.batch_admission import check
from tasks.errors import DataFormatError
from tasks.images.idx import gzip_bytes, idx_bytes
from tasks.images.prepare import prepare_images
from tasks.images.validate import validate_images
from tasks.snapshot import BOOTSTRAP, add_batch, batch_tables, create, ensure, read
from tasks.vision.intake import INTAKE

IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, raw_params):
    from tasks.config import parse_config

    cfg = parse_config(raw_params)
    return cfg, INTAKE.replay(cfg, tmp_path_factory.mktemp("landing"))


@pytest.fixture(scope="module")
def initial(replayed):
    return INTAKE.read_batch(replayed[1][0])


@pytest.fixture(scope="module")
def later(replayed):
    """The two replayed batches after the initial set, as read."""
    return [INTAKE.read_batch(folder) for folder in replayed[1][1:3]]


def _failed(report: dict) -> set[str]:
    return {c["kwargs"].get("column", c["expectation"]) for part in ("contract", "drift")
            if report.get(part) for c in report[part]["checks"] if not c["success"]}


def _batch(replayed, tmp_path: Path, change=None, labels=None) -> Path:
    """A copy of the second replayed batch with its images (and labels) changed."""
    folder = tmp_path / "batch"
    shutil.copytree(replayed[1][1], folder)
    x, y = INTAKE.read_batch(folder)["train"]
    if change is not None:
        (folder / IMAGES).write_bytes(gzip_bytes(idx_bytes(change(x.copy()))))
    if labels is not None:
        (folder / LABELS).write_bytes(gzip_bytes(idx_bytes(labels(y.copy()))))
    return folder


@pytest.mark.slow
def test_the_replay_releases_the_training_images_as_an_initial_set_and_batches(replayed, initial):
    cfg, batches = replayed
    assert batches[0].name == "0000-initial" and len(batches) == 7
    assert INTAKE.rows(initial) == {"train": 30_000, "test": 10_000}
    later = [INTAKE.read_batch(b) for b in batches[1:]]
    assert [INTAKE.rows(b) for b in later] == [{"train": 5_000}] * 6   # training images only
    assert initial["classes"] == cfg.data.vision.class_names
    everything = INTAKE.combine([initial, *later])
    assert len(everything["train"][1]) == 60_000 and len(everything["test"][1]) == 10_000


@pytest.mark.slow
def test_every_replayed_batch_passes_its_contract_and_the_drift_limits(replayed, initial):
    cfg, batches = replayed
    accepted = [initial]
    for folder in batches[1:]:   # the checks only (their Data Docs are rendered in the other tests)
        batch = INTAKE.read_batch(folder)
        reason, report = check(INTAKE, cfg, batch, INTAKE.combine(accepted), None)
        assert reason == "", (folder.name, _failed(report))
        assert set(report["drift"]["distances"]) == {"class_linf", "mean_intensity_js", "ink_js", "blank_share"}
        accepted.append(batch)


@pytest.mark.fault("data", "an arriving batch of images with labels 11 and 200 and a 32x32 image shape",
                   "quarantined as invalid: the contract names the label set and the image shape")
def test_a_broken_batch_of_images_is_invalid_and_names_what_is_broken(replayed, initial, tmp_path):
    cfg, _ = replayed
    folder = _batch(replayed, tmp_path, change=lambda x: np.pad(x, ((0, 0), (2, 2), (2, 2))),
                    labels=lambda y: np.where(np.arange(len(y)) < 3, np.uint8(11), y).astype(np.uint8))
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), initial, tmp_path / "docs")
    assert reason == "invalid" and _failed(report) == {"label", "shape"}
    assert report["drift"] is None and (tmp_path / "docs" / "index.html").is_file()


@pytest.mark.fault("data", "an arriving batch that brings test images of its own, or repeats accepted images",
                   "quarantined as invalid: the golden test set stays fixed; the repeated share is named")
def test_a_later_batch_may_not_bring_test_images_or_repeat_accepted_ones(replayed, initial, tmp_path):
    cfg, _ = replayed
    folder = _batch(replayed, tmp_path, change=lambda x: np.concatenate([x[:4000], initial["train"][0][:1000]]))
    x, y = initial["test"]
    (folder / "test-images-idx3-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(x[:10])))
    (folder / "test-labels-idx1-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(y[:10])))
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), initial, tmp_path / "docs")
    assert reason == "invalid" and _failed(report) == {"part", "repeated"}


@pytest.mark.slow
@pytest.mark.fault("data", "an arriving batch whose classes.json names other classes than the accepted data's, or "
                   "than params' class_names where no accepted batch named them",
                   "quarantined as invalid: the contract names the classes (before: accepted when the first batch "
                   "had brought no names)")
def test_a_batch_naming_other_classes_is_refused_even_where_no_accepted_batch_named_them(replayed, initial, tmp_path):
    cfg, batches = replayed
    names = cfg.data.vision.class_names
    later = INTAKE.read_batch(batches[1])
    for accepted in (initial, {**initial, "classes": None}):   # named by the first batch; by params alone
        for given, ok in ((names, True), (list(reversed(names)), False), ([f"x{i}" for i in range(10)], False)):
            reason, report = check(INTAKE, cfg, {**later, "classes": given}, accepted, None)
            assert (reason == "") is ok and ("classes" in _failed(report)) is not ok, (given, reason)


def _blank_every_tenth(x: np.ndarray) -> np.ndarray:
    """Every tenth image near-constant grey (a dead sensor's noise: no two alike, so not repeats)."""
    noise = np.random.default_rng(0).integers(0, 3, size=x[::10].shape)
    x[::10] = (120 + noise).astype(np.uint8)
    return x


@pytest.mark.fault("data", "an arriving batch whose training images include 20 copies of golden test images",
                   "quarantined as invalid: a copy of a test image never reaches training (before: only copies of "
                   "training images were counted, and under 1 % passed)")
def test_a_batch_may_not_copy_a_test_image_into_training(replayed, initial, tmp_path):
    cfg, _ = replayed
    folder = _batch(replayed, tmp_path, change=lambda x: np.concatenate([x[:-20], initial["test"][0][:20]]))
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), initial, tmp_path / "docs")
    assert reason == "invalid" and _failed(report) == {"copies_a_test_image"}


@pytest.mark.slow
@pytest.mark.fault("data", "an arriving batch that copies 20 images prepare held out of an earlier batch as test rows",
                   "quarantined as invalid: no image is a test row in one place and a training row in another "
                   "(before: only the first batch's test part was known as test, and under 1 % repeats passed)")
def test_a_batch_may_not_copy_a_held_out_test_image(replayed, initial, later, tmp_path):
    cfg, _ = replayed
    (first, second, third), data = (initial, *later), cfg.data.vision
    accepted = INTAKE.combine([first, second])
    assert check(INTAKE, cfg, third, accepted, None)[0] == ""   # as replayed: accepted
    splits = _split(data, first, second)
    test_rows = {x.tobytes() for x in splits["test"][0][len(first["test"][1]):]}   # what the second held out
    copies = np.stack([x for x in second["train"][0] if x.tobytes() in test_rows][:20])
    third_x, third_y = third["train"]
    copying = {"train": (np.concatenate([third_x[:-20], copies]), third_y)}
    reason, report = check(INTAKE, cfg, copying, accepted, tmp_path / "docs")
    assert reason == "invalid" and _failed(report) == {"copies_a_test_image"}


@pytest.mark.slow
@pytest.mark.fault("data", "an arriving batch repeating 40 accepted training images (under max_repeated_fraction), "
                   "some where prepare would otherwise hold out its test rows",
                   "accepted, and every repeat stays a training row: prepare never holds out a copy of an image seen "
                   "before or twice in its batch (before: a repeat could become a test row beside its training twin)")
def test_a_repeated_training_image_is_never_held_out_as_test(replayed, initial, later, tmp_path):
    cfg, _ = replayed
    (first, second, third), data = (initial, *later), cfg.data.vision
    third_x, third_y = third["train"]
    held = {x.tobytes() for x in _split(data, first, second, {"train": (third_x, third_y)})["test"][0]}
    at = [i for i, x in enumerate(third_x) if x.tobytes() in held][:40]   # where its test rows were drawn
    x = third_x.copy()
    x[at] = first["train"][0][:40]   # 40 accepted training (or validation) images
    reason, report = check(INTAKE, cfg, {"train": (x, third_y)}, INTAKE.combine([first, second]), tmp_path / "docs")
    assert reason == "", _failed(report)
    splits = _split(data, first, second, {"train": (x, third_y)})
    tested = {i.tobytes() for i in splits["test"][0]}
    assert not tested & {i.tobytes() for i in np.concatenate([splits["train"][0], splits["val"][0]])}
    assert len(splits["test"][1]) == len(first["test"][1]) + 2 * round(5_000 * data.batch_test_fraction)


def _split(data, first: dict, *later: dict) -> dict:
    """The splits prepare makes of a snapshot of these batches (no subset)."""
    from tasks.images.prepare import from_snapshot, split, split_sizes

    _, parts, rest = from_snapshot(data, [first, *later])
    return split(parts, *split_sizes(data, parts, "test"), data.seed, None, rest, data.batch_test_fraction)[0]


@pytest.mark.fault("data", "an arriving batch folder of well-formed IDX files that hold no images",
                   "quarantined as invalid by the row count (before: a numpy reshape error stopped the ingestion, and "
                   "every later one, on that folder)")
def test_an_empty_batch_of_images_is_invalid_not_a_crash(replayed, initial, tmp_path):
    cfg, _ = replayed
    INTAKE.write_batch({"classes": initial["classes"], "train": (np.zeros((0, 28, 28), np.uint8),
                                                                 np.zeros(0, np.uint8))}, tmp_path / "empty")
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(tmp_path / "empty"), initial, tmp_path / "docs")
    assert reason == "invalid" and "expect_table_row_count_to_be_between" in _failed(report)


@pytest.mark.fault("data", "a first batch of images with fewer training images than validation takes (600 for "
                   "data.vision.val_size 5,000), or an idx4 file stored channels last",
                   "quarantined as invalid naming the count; the idx4 file refused as unreadable, naming its shape")
def test_a_first_batch_too_small_to_split_or_stored_channels_last_is_refused(replayed, initial, tmp_path):
    cfg, batches = replayed
    small = {**initial, "train": tuple(a[:600] for a in initial["train"])}
    reason, report = check(INTAKE, cfg, small, None, tmp_path / "docs")
    assert reason == "invalid" and _failed(report) == {"training_images"}
    folder = tmp_path / "rgb"
    shutil.copytree(batches[1], folder)
    (folder / IMAGES).unlink()
    (folder / "train-images-idx4-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(np.zeros((5000, 28, 28, 3), np.uint8))))
    with pytest.raises(DataFormatError, match=r"idx4-ubyte\.gz: holds images of shape \(28, 28, 3\); an idx4 file is "
                                              r"\(N, C, H, W\)"):
        INTAKE.read_batch(folder)


@pytest.mark.slow   # 5-8 s each (2-core AVX2)
@pytest.mark.parametrize("bootstrap", ["empty", "published"])
def test_batches_with_another_class_mix_within_the_drift_limit_still_validate(replayed, tmp_path, bootstrap):
    """Before: validation held every split to equal class shares (Fashion-MNIST's published balance), so two
    accepted batches heavy in one class (each within the drift limit) failed every later run. And again once later
    batches held out test rows: on the published bootstrap the whole test split was held to equal shares."""
    cfg, batches = replayed
    pool = INTAKE.combine([INTAKE.read_batch(b) for b in batches[1:]])["train"]
    if bootstrap == "published":   # the replayed images are the bootstrap's own: brightened by one, new images
        pool = (np.minimum(pool[0], 254) + 1, pool[1])
    rng = np.random.default_rng(0)
    quota = {0: 725, 9: 275, **dict.fromkeys(range(1, 9), 500)}   # class 0 at 14.5 %, class 9 at 5.5 %
    picks = {c: rng.permutation(np.flatnonzero(pool[1] == c)) for c in quota}
    snapshot = tmp_path / "raw"
    create(snapshot, "vision", INTAKE, cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={
        "vision": cfg.ingest.vision.model_copy(update={"bootstrap": bootstrap})})}))
    if bootstrap == "empty":
        add_batch(snapshot, batches[0].name, batches[0], {"rows": INTAKE.rows(INTAKE.read_batch(batches[0]))})
    for n in range(2):
        rows = np.sort(np.concatenate([picks[c][n * q:(n + 1) * q] for c, q in quota.items()]))
        folder = tmp_path / f"skewed{n}"
        INTAKE.write_batch({"classes": None, "train": (pool[0][rows], pool[1][rows])}, folder)
        batch = INTAKE.read_batch(folder)
        if bootstrap == "empty":   # (brightened images are drift against the published ones: added as they are)
            accepted = INTAKE.combine([t for _, t in batch_tables(snapshot, INTAKE)])
            reason, report = check(INTAKE, cfg, batch, accepted, tmp_path / f"docs{n}")
            assert reason == "", _failed(report)
        add_batch(snapshot, folder.name, folder, {"rows": INTAKE.rows(batch)})
    out = tmp_path / "out"
    manifest = prepare_images(cfg.data.vision, out, "vision", ("snapshot", [t for _, t in batch_tables(snapshot, INTAKE)]))
    arrays = {s: (np.load(out / f"{s}_x.npy"), np.load(out / f"{s}_y.npy")) for s in ("train", "val", "test")}
    report = validate_images(arrays, cfg, "vision", manifest=manifest, snapshot=read(snapshot))
    assert report["success"], [c["kwargs"] for c in report["checks"] if not c["success"]]


@pytest.mark.fault("data", "arriving images that are valid but shifted: inverted (white background), or a tenth "
                   "of them near-constant grey, or all of one class",
                   "quarantined as drift, not as invalid: the intensity, ink, blank-share and class-mix distances "
                   "named")
@pytest.mark.parametrize("change, labels, named", [
    (lambda x: 255 - x, None, {"mean_intensity_js", "ink_js"}),
    (lambda x: _blank_every_tenth(x), None, {"blank_share", "ink_js"}),   # grey ink everywhere, too
    (None, lambda y: np.zeros_like(y), {"class_linf"}),
], ids=["inverted", "blank", "one-class"])
def test_a_valid_but_shifted_batch_of_images_is_drift_not_corruption(replayed, initial, tmp_path, change, labels,
                                                                     named):
    cfg, _ = replayed
    folder = _batch(replayed, tmp_path, change=change, labels=labels)
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), initial, tmp_path / "docs")
    assert reason == "drift" and report["contract"]["success"]
    assert _failed(report) == named
    assert report["profile"]["images"] == 30_000 and report["profile"]["shape"] == "28x28"


@pytest.mark.fault("data", "an arriving batch folder with 5,000 images but 4,999 labels, a stray file, or no labels",
                   "refused as unreadable, naming the files")
def test_a_batch_folder_that_does_not_fit_together_is_unreadable_and_named(replayed, tmp_path):
    folder = _batch(replayed, tmp_path, labels=lambda y: y[:-1])
    with pytest.raises(DataFormatError, match=rf"{IMAGES} holds 5000 images but {LABELS} 4999 labels"):
        INTAKE.read_batch(folder)
    (folder / LABELS).unlink()
    with pytest.raises(DataFormatError, match=f"{IMAGES} has no train-labels file beside it"):
        INTAKE.read_batch(folder)
    folder = _batch(replayed, tmp_path / "2")
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DataFormatError, match=r"notes\.txt: not part of a batch"):
        INTAKE.read_batch(folder)
    (folder / "notes.txt").unlink()
    (folder / IMAGES).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 8))
    with pytest.raises(DataFormatError, match=IMAGES):
        INTAKE.read_batch(folder)


@pytest.mark.fault("data", "an arriving batch whose classes.json nests a list 100,000 deep",
                   "refused as unreadable, naming classes.json (before: a RecursionError traceback stopped the "
                   "ingestion, and every later one, on that folder)")
def test_a_classes_file_nested_too_deep_to_parse_is_unreadable_and_named(replayed, tmp_path):
    folder = _batch(replayed, tmp_path)
    (folder / "classes.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataFormatError, match=r"classes\.json: cannot be read \(maximum recursion depth exceeded"):
        INTAKE.read_batch(folder)


@pytest.mark.slow
def test_the_published_snapshot_prepares_exactly_what_the_published_files_did(config, tmp_path):
    """The snapshot is Fashion-MNIST, stored: training on it changes no number."""
    snapshot = tmp_path / "raw"
    manifest = ensure(snapshot, "vision", INTAKE, config)
    assert [b["id"] for b in manifest["batches"]] == [BOOTSTRAP]
    assert manifest["batches"][0]["rows"] == {"train": 60_000, "test": 10_000}
    batches = [t for _, t in batch_tables(snapshot, INTAKE)]
    prepare_images(config.data.vision, tmp_path / "from_snapshot", "vision", ("snapshot", batches))
    prepare_images(config.data.vision, tmp_path / "from_source", "vision")
    for path in sorted((tmp_path / "from_source").glob("*.npy")):
        assert path.read_bytes() == (tmp_path / "from_snapshot" / path.name).read_bytes(), path.name


@pytest.mark.slow
def test_arriving_batches_grow_every_split_hold_out_a_recent_window_and_no_image_changes_split(replayed, tmp_path):
    cfg, batches = replayed
    assert cfg.data.vision.batch_test_fraction == 0.15
    empty = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={
        "vision": cfg.ingest.vision.model_copy(update={"bootstrap": "empty"})})})
    snapshot = tmp_path / "raw"
    create(snapshot, "vision", INTAKE, empty)
    splits, windows, added = {}, {}, 0
    for n in (2, 3):   # the initial set and one batch, then one more batch
        for folder in batches[added:n]:
            add_batch(snapshot, folder.name, folder, {"rows": INTAKE.rows(INTAKE.read_batch(folder))})
        added = n
        out = tmp_path / f"out{n}"
        manifest = prepare_images(cfg.data.vision, out, "vision", ("snapshot", [t for _, t in batch_tables(snapshot, INTAKE)]))
        arrays = {f"{s}_{p}": np.load(out / f"{s}_{p}.npy") for s in ("train", "val", "test") for p in "xy"}
        report = validate_images({s: (arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in ("train", "val", "test")}, cfg, "vision",
                                 manifest=manifest, snapshot=read(snapshot))
        assert report["success"], [c for c in report["checks"] if not c["success"]]
        splits[n], windows[n] = arrays, json.loads((out / "windows.json").read_text())
        assert manifest["windows"] == {name: len(rows) for name, rows in windows[n].items()}
    # a batch of 5,000 holds out 750 test images (the recent window); the initial 30,000 gave validation val_size
    # (5,000), so the other 4,250 give it the same share, 1/6
    assert {s: len(splits[2][f"{s}_y"]) for s in ("train", "val", "test")} == {"train": 28_542, "val": 5_708,
                                                                              "test": 10_750}
    assert (len(splits[3]["val_y"]), len(splits[3]["test_y"])) == (5_708 + 708, 10_750 + 750)
    for name in ("train_x", "val_x", "test_x"):   # what was in a split stays in it, in order, as batches arrive
        assert np.array_equal(splits[3][name][:len(splits[2][name])], splits[2][name])
    # golden: the published test images, always; recent: the newest batch's held-out images, stratified by class
    assert windows[2]["golden"] == windows[3]["golden"] == list(range(10_000))
    assert windows[2]["recent"] == list(range(10_000, 10_750)) and windows[3]["recent"] == list(range(10_750, 11_500))
    assert np.bincount(splits[3]["test_y"][windows[3]["recent"]]).min() >= 70
    third = INTAKE.read_batch(batches[2])["train"][0]   # the recent window holds the third batch's images
    recent = {x.tobytes() for x in splits[3]["test_x"][windows[3]["recent"]]}
    assert recent <= {x.tobytes() for x in third}
    assert not recent & {x.tobytes() for x in np.concatenate([splits[3]["train_x"], splits[3]["val_x"]])}


@pytest.mark.fault("data", "a first batch of images without a test part (nothing to report every model on)",
                   "quarantined as invalid by the contract; prepare_vision names the missing test files")
def test_a_first_batch_without_test_images_is_refused(replayed, tmp_path):
    cfg, _ = replayed
    folder = _batch(replayed, tmp_path)
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), None, tmp_path / "docs")
    assert reason == "invalid" and _failed(report) == {"part", "training_images"}   # 5,000: all validation's
    with pytest.raises(DataFormatError, match="the first batch has no test part; give it test-images-idx3-ubyte.gz"):
        prepare_images(cfg.data.vision, tmp_path / "out", "vision", ("snapshot", [INTAKE.read_batch(folder)]))
    assert json.loads((replayed[1][0] / "classes.json").read_text()) == cfg.data.vision.class_names
