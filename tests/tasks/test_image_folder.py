"""A user's own image folder through the vision stages: any channels, size and number of classes, the shapes and
classes taken from the data's manifest (never Fashion-MNIST's), and every bad folder named in one line."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from tasks.artifacts import load_model
from tasks.errors import ChecksumError, DataFormatError, DataSourceError
from tasks.image_training import Split
from tasks.images.prepare import prepare_images
from tasks.images.validate import load_arrays, validate_images
from tasks.io import read_manifest

CLASSES = ("cat", "dog", "fox")   # each class one dominant colour: a tiny net learns it in a few steps
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}
TINY = {"teacher": {"arch": {"stem": 8, "widths": [16, 32], "blocks": [1, 1]}, "epochs": 3, "batch_size": 32,
                    "threads": 1, "eval_batch_size": 64},
        "student": {"stem": 8, "stem_stride": 1, "widths": [16, 16], "strides": [2, 1], "kinds": ["fused", "separable"]}}


def image_folder(root, per_class=30, size=(12, 10), mode="RGB", seed=0):
    """``root/<class>/<i>.png``: noisy images of each class's colour (grey when ``mode`` is L)."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 30, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").convert(mode).save(root / name / f"{i}.png")
    return root


def folder_config(raw_params, root, **folder):
    from tasks.config import parse_config

    data = {**raw_params["data"]["vision"], "image_folder": {"path": str(root), **folder}, "pixels": None,
            "class_names": None, "subset": None}
    return parse_config({**raw_params, "data": {**raw_params["data"], "vision": data}})


def test_an_rgb_folder_is_prepared_and_validated_from_its_own_manifest(tmp_path, raw_params):
    root = image_folder(tmp_path / "photos")
    cfg = folder_config(raw_params, root)
    manifest = prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    image = manifest["image"]
    assert (image["channels"], image["height"], image["width"], image["classes"]) == (3, 12, 10, list(CLASSES))
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 65, "val": 7, "test": 18}
    assert image["mean"][0] > image["mean"][1] * 0.9 and len(image["std"]) == 3   # measured on the training split
    assert re.search(r"content sha256 [0-9a-f]{64}", manifest["source"])
    train = Split.load(tmp_path / "data", "train")
    assert train.image_shape == (3, 12, 10) and train.num_classes == 3
    inputs = train.inputs()
    assert inputs.shape == (65, 3, 12, 10)
    assert np.allclose(inputs.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)   # normalised with its own statistics
    arrays = load_arrays(tmp_path / "data", "vision")
    report = validate_images(arrays, cfg, "vision", manifest=read_manifest(tmp_path / "data", "prepare_vision"))
    assert report["success"]
    arrays["val"] = (arrays["val"][0][:, :1], arrays["val"][1])   # one channel where the manifest says three
    failed = {(c["suite"], c["expectation"]) for c in validate_images(arrays, cfg, "vision", manifest=manifest)["checks"]
              if not c["success"]}
    assert ("vision_rows_val", "expect_column_values_to_be_between") in failed


def test_given_splits_are_kept_grey_stays_one_channel_and_other_files_are_skipped(tmp_path, raw_params):
    image_folder(tmp_path / "scans/train", per_class=20, mode="L")
    image_folder(tmp_path / "scans/valid", per_class=4, mode="L", seed=2)
    image_folder(tmp_path / "scans/test", per_class=5, mode="L", seed=1)
    (tmp_path / "scans/train/cat/README.md").write_text("cats, scanned in 2019")
    sixteen = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)   # mode I;16
    sixteen.save(tmp_path / "scans/train/dog/deep.png")   # 16-bit grey: scaled to 8 bits, not clipped to white
    cfg = folder_config(raw_params, tmp_path / "scans", size=[8, 8])
    manifest = prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    assert manifest["image"]["channels"] == 1
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 61, "val": 12, "test": 15}
    assert manifest["skipped_files"] == ["train/cat/README.md"]
    assert np.load(tmp_path / "data/test_x.npy").shape == (15, 8, 8)   # resized to the size asked for
    train_x = np.load(tmp_path / "data/train_x.npy")
    assert any(0 < a.max() < 255 and a.min() == 0 for a in train_x)   # the 16-bit image kept its gradient


@pytest.mark.slow
@pytest.mark.fault("data", "an image folder with files the reader leaves out (a notes.txt; JPEGs named .jfif), read "
                   "through the snapshot stage", ".jfif and .jpe are read as the JPEG files they are; the other files "
                   "are counted and named in snapshot.json, by the snapshot stage and in the prepared manifest "
                   "(before: dropped without a word on that path)")
def test_files_an_image_folder_leaves_out_are_named_through_the_snapshot_stage(tmp_path, raw_params, mlflow_uri,
                                                                               monkeypatch, capsys):
    """Before: the snapshot stage read the folder and threw its skipped files away (only prepare_images without a
    snapshot, which no stage calls, named them), and a JPEG named .jfif was one of them: 10 of a class's 20 images
    went missing ("0000-bootstrap (train 50)") and nothing said so."""
    from tasks.snapshot import bootstrap_skipped, read, stage_batches, stage_main
    from tasks.vision.intake import INTAKE

    root = image_folder(tmp_path / "photos", per_class=20, mode="L")
    for n, path in enumerate(sorted((root / "dog").iterdir())[:10]):
        with Image.open(path) as img:
            img.save(path.with_suffix(".jfif" if n % 2 else ".jpe"), "JPEG")
        path.unlink()
    (root / "cat/notes.txt").write_text("shot in 2019")
    cfg = folder_config(raw_params, root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["snapshot", "--snapshot", "raw"])
    stage_main("vision", INTAKE)
    said = capsys.readouterr().out
    assert "0000-bootstrap (train 60)" in said and "skipped 1 file(s) of its source that it does not read: " \
        "cat/notes.txt" in said, said
    assert read(tmp_path / "raw")["batches"][0]["skipped"] == {"count": 1, "files": ["cat/notes.txt"]}
    source, batches = stage_batches(tmp_path / "raw", INTAKE)
    manifest = prepare_images(cfg.data.vision, tmp_path / "data", "vision", (source, [t for _, t in batches]),
                              bootstrap_skipped(read(tmp_path / "raw")))
    assert (manifest["skipped_files"], manifest["skipped_count"]) == (["cat/notes.txt"], 1)
    assert sum(s["rows"] for s in manifest["splits"].values()) == 60
    assert "skipped 1 file(s) without an image extension: cat/notes.txt" in capsys.readouterr().out


@pytest.mark.fault("data", "images added to (or edited in) an unpinned image folder, the snapshot stage run again "
                   "(the folder a dvc.yaml dependency of it)",
                   "a snapshot of the folder alone is remade from it; one with accepted batches is kept, warned of "
                   "(the snapshot is the data's version; new images join as batches); a folder absent here, or one "
                   "pinned with the digest the stage printed, keeps the snapshot "
                   "(before: the old images kept, silently, and nothing re-trained)")
def test_an_unpinned_folder_that_changed_remakes_its_bootstrap(tmp_path, raw_params, capsys):
    """Before: an unpinned folder's bootstrap recorded its path and settings alone, so the snapshot stage, re-run by
    DVC when the folder changed, found nothing changed and kept the old images (train 60 after 2 were added)."""
    import shutil

    from tasks.images.batches import write_batch
    from tasks.snapshot import BOOTSTRAP, add_batch, ensure
    from tasks.vision.intake import INTAKE

    root = image_folder(tmp_path / "photos", per_class=20, mode="L")
    cfg, snapshot = folder_config(raw_params, root), tmp_path / "raw"
    first = ensure(snapshot, "vision", INTAKE, cfg)["batches"][0]
    assert first["rows"] == {"train": 60} and first["pins"]["content_sha256"] in first["source"]   # read_folder's
    (root / "cat/notes.txt").write_text("not an image: not its content")
    assert ensure(snapshot, "vision", INTAKE, cfg)["batches"][0] == first
    image_folder(tmp_path / "more", per_class=1, mode="L", seed=7)
    for name in ("cat", "dog"):
        shutil.copy(tmp_path / "more" / name / "0.png", root / name / "new.png")
    again = ensure(snapshot, "vision", INTAKE, cfg)["batches"][0]
    assert again["rows"] == {"train": 62} and again["pins"]["content_sha256"] != first["pins"]["content_sha256"]

    x, y = INTAKE.read_batch(snapshot / BOOTSTRAP)["train"]
    write_batch({"train": (x[:6], y[:6])}, tmp_path / "0001-more")
    add_batch(snapshot, "0001-more", tmp_path / "0001-more", {"rows": {"train": 6}})
    # with batches taken since, the snapshot is the data's version: a changed folder is warned of, never re-read
    shutil.copy(tmp_path / "more/fox/0.png", root / "fox/new.png")
    kept = ensure(snapshot, "vision", INTAKE, cfg)
    assert [b["id"] for b in kept["batches"]] == [BOOTSTRAP, "0001-more"] and kept["batches"][0] == again
    assert "its bootstrap's image folder changed since it was read" in capsys.readouterr().out
    (root / "fox/new.png").unlink()
    # pinned as the snapshot stage advises (its digest as image_folder.sha256): the same images, kept
    pinned = folder_config(raw_params, root, sha256=again["pins"]["content_sha256"])
    assert [b["id"] for b in ensure(snapshot, "vision", INTAKE, pinned)["batches"]] == [BOOTSTRAP, "0001-more"]
    for name in ("cat", "dog", "fox"):   # a folder that no longer reads as one (its images moved on): not compared
        shutil.rmtree(root / name)
    assert [b["id"] for b in ensure(snapshot, "vision", INTAKE, cfg)["batches"]] == [BOOTSTRAP, "0001-more"]
    shutil.move(root, tmp_path / "elsewhere")   # a machine without the folder: the snapshot is the data's version
    assert [b["id"] for b in ensure(snapshot, "vision", INTAKE, cfg)["batches"]] == [BOOTSTRAP, "0001-more"]
    # a snapshot of the folder alone whose folder no longer reads: its error, not the old images kept unsaid
    other = image_folder(tmp_path / "other", per_class=4, mode="L")
    alone = folder_config(raw_params, other)
    ensure(tmp_path / "raw2", "vision", INTAKE, alone)
    for name in ("cat", "dog", "fox"):
        shutil.rmtree(other / name)
    with pytest.raises(DataFormatError, match=rf"{other}"):
        ensure(tmp_path / "raw2", "vision", INTAKE, alone)


def test_an_imbalanced_folder_passes_its_own_class_mix(tmp_path, raw_params):
    root = image_folder(tmp_path / "photos", per_class=30)
    for f in sorted((root / "fox").iterdir())[6:]:   # 30 cats, 30 dogs, 6 foxes
        f.unlink()
    cfg = folder_config(raw_params, root)
    manifest = prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    assert [v["class_counts"][2] for v in manifest["splits"].values()] == [4, 1, 1]
    assert validate_images(load_arrays(tmp_path / "data", "vision"), cfg, "vision", manifest=manifest)["success"]


def test_images_added_to_a_folder_split_it_otherwise_and_moving_it_does_not(tmp_path, raw_params):
    """Before: the data params digest hashed the folder's path, so images added to it kept a champion comparable
    while the seeded carve had moved images between splits; with the pixel statistics pinned, the gate scored the
    champion on images it may have trained on. Its content is hashed in place of the path: the same images in
    another folder keep the champion comparable. Hidden files are not images read, and change nothing."""
    import shutil

    from tasks.lineage import data_params, same_split

    root = image_folder(tmp_path / "photos", per_class=10)
    cfg = folder_config(raw_params, root)
    before = data_params(cfg, "vision")
    (root / ".DS_Store").write_bytes(b"finder")
    assert data_params(cfg, "vision") == before
    shutil.copytree(root, tmp_path / "elsewhere")
    assert data_params(folder_config(raw_params, tmp_path / "elsewhere"), "vision") == before
    image_folder(tmp_path / "more", per_class=1, seed=5)
    shutil.copy(tmp_path / "more/cat/0.png", root / "cat/new.png")
    assert not same_split(before, cfg, "vision")
    (root / "cat/new.png").unlink()
    shutil.copy(tmp_path / "more/cat/0.png", root / "cat/0.png")   # an image changed in place
    assert not same_split(before, cfg, "vision")
    shutil.move(root / "dog", tmp_path / "dogs")
    (root / "dog").symlink_to(tmp_path / "dogs")   # a class folder on another disk: read, and hashed, through it
    linked = data_params(cfg, "vision")
    shutil.copy(tmp_path / "more/dog/0.png", tmp_path / "dogs/new.png")
    assert data_params(cfg, "vision") != linked


def test_a_test_folder_of_another_class_mix_than_training_passes_the_data_gate(tmp_path, raw_params):
    """Before: every split of an image folder was held to the class mix of all its images, so a test/ folder
    the user gave with another mix than train/ (here balanced, where training is 30:30:6) stopped validate_<family>
    on class balance. A split the folder gives is held to its own mix; the carved ones (stratified) to theirs."""
    root = tmp_path / "photos"
    image_folder(root / "train", per_class=30)
    for f in sorted((root / "train/fox").iterdir())[6:]:
        f.unlink()
    image_folder(root / "test", per_class=8, seed=3)
    cfg = folder_config(raw_params, root)
    manifest = prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    assert manifest["given_splits"] == ["test"]
    report = validate_images(load_arrays(tmp_path / "data", "vision"), cfg, "vision", manifest=manifest)
    assert report["success"], [c for c in report["checks"] if not c["success"]]


@pytest.mark.fault("data", "an image folder that is not usable (unreadable image, mixed sizes, one class, a nested or "
                           "unknown folder, a class missing from a split, a content digest that differs from its pin)",
                   "a one-line error naming the file or folder")
def test_bad_folders_are_named(tmp_path, raw_params):
    root = image_folder(tmp_path / "photos", per_class=4)
    (root / "dog" / "notes.png").write_text("not an image")
    with pytest.raises(DataFormatError, match=r"dog/notes\.png: not an image Pillow can read"):
        prepare_images(folder_config(raw_params, root).data.vision, tmp_path / "out", "vision")
    (root / "dog" / "notes.png").unlink()
    Image.new("RGB", (20, 20)).save(root / "fox" / "big.png")
    with pytest.raises(DataFormatError, match=r"fox/big\.png: an image of 20x20 pixels.*image_folder\.size"):
        prepare_images(folder_config(raw_params, root).data.vision, tmp_path / "out", "vision")
    with pytest.raises(ChecksumError, match="photos: content digest .* is not the pinned 0{64}"):
        prepare_images(folder_config(raw_params, root, sha256="0" * 64, size=[12, 10]).data.vision, tmp_path / "out", "vision")
    with pytest.raises(DataSourceError, match="absent: data.vision.image_folder.path in params.yaml is not a folder"):
        prepare_images(folder_config(raw_params, tmp_path / "absent").data.vision, tmp_path / "out", "vision")
    single = image_folder(tmp_path / "one", per_class=2)
    for name in CLASSES[1:]:
        for f in (single / name).iterdir():
            f.unlink()
        (single / name).rmdir()
    with pytest.raises(DataFormatError, match="one class folder"):
        prepare_images(folder_config(raw_params, single).data.vision, tmp_path / "out", "vision")
    nested = image_folder(tmp_path / "nested", per_class=2)
    (nested / "cat" / "more").mkdir()
    with pytest.raises(DataFormatError, match=r"cat/more: a folder inside the class folder"):
        prepare_images(folder_config(raw_params, nested).data.vision, tmp_path / "out", "vision")
    splits = tmp_path / "splits"
    image_folder(splits / "train", per_class=3)
    image_folder(splits / "holdout", per_class=1)
    with pytest.raises(DataFormatError, match=r"holdout: beside .*train only test, train, val, valid, validation"):
        prepare_images(folder_config(raw_params, splits).data.vision, tmp_path / "out", "vision")
    few = image_folder(tmp_path / "few", per_class=2)
    with pytest.raises(DataFormatError, match=r"no image of class .* in the val split"):
        prepare_images(folder_config(raw_params, few).data.vision, tmp_path / "out", "vision")
    assert not (tmp_path / "out").exists()


@pytest.mark.fault("data", "an image folder whose file names are Latin-1 bytes (as unzip leaves a Windows archive's "
                           "accented names)",
                   "prepared, and its content digest hashes the names' bytes (before: a UnicodeEncodeError traceback "
                   "from the digest)")
def test_a_file_name_that_is_not_utf8_is_read_and_hashed_as_its_bytes(tmp_path, raw_params):
    import os

    from tasks.lineage import data_params

    root = image_folder(tmp_path / "photos")
    cfg = folder_config(raw_params, root)
    utf8 = prepare_images(cfg.data.vision, tmp_path / "utf8", "vision")["source"]
    before = data_params(cfg, "vision")
    (root / "cat" / "0.png").rename(root / "cat" / os.fsdecode(b"caf\xe9.png"))
    (root / "fox" / os.fsdecode(b"caf\xe9.txt")).write_text("")   # skipped, and listed
    manifest = prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    assert manifest["source"] != utf8 and len(manifest["skipped_files"]) == 1
    assert data_params(cfg, "vision") != before
    # a class is named by its folder, and the name labels the model's outputs, reports and figures: it must be text
    # (before: prepared, then the evaluation's figure stopped with a TypeError after every training stage had run)
    (root / "fox").rename(root / os.fsdecode(b"f\xe9x"))
    with pytest.raises(DataFormatError, match=r"class folder b'f\\xe9x' .*is not UTF-8 text"):
        prepare_images(cfg.data.vision, tmp_path / "latin", "vision")


def run(monkeypatch, module, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    module.main("vision")


@pytest.mark.slow   # every stage in process (~25 s): make test runs it, make check does not
def test_a_three_class_rgb_folder_runs_from_teacher_to_an_int8_onnx_file(tmp_path, raw_params, mlflow_uri,
                                                                         monkeypatch):
    """Every stage takes the data's shape and classes: the teacher, the distilled and QAT students and the four ONNX
    files take (N, 3, 12, 10) images and give three logits, and the INT8 student learned the colours."""
    import tasks.images.distill as distill_vision
    import tasks.images.evaluate as evaluate_vision
    import tasks.images.export as export_vision
    import tasks.images.qat as qat_vision
    import tasks.images.train_teacher as train_teacher_vision

    monkeypatch.chdir(tmp_path)
    cfg = folder_config(raw_params, image_folder(tmp_path / "photos", per_class=40))
    params = cfg.model_dump(by_alias=True)
    params["teacher"]["vision"] |= TINY["teacher"]
    fast = {"epochs": 2, "batch_size": 32, "threads": 1, "eval_batch_size": 64}
    params["distill"]["vision"] |= {**fast, "student": TINY["student"], "feature_pairs": [{"teacher": 1, "student": 1}]}
    params["qat"]["vision"] |= {**fast, "freeze_observers_after": 1, "freeze_bn_after": 1, "float_modules": []}
    params["export"]["vision"] |= {"calibration_size": 16}
    params["evaluate"]["vision"] |= {"warmup": 1, "repeats": 10, "throughput_repeats": 3, "throughput_batch": 8}
    params["recipe"]["vision"] = ["distill", "qat"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    torch.manual_seed(0)
    run(monkeypatch, train_teacher_vision, "--data", "data", "--checkpoint", "ckpt/t/last.pt", "--model", "teacher.pt",
        "--metrics", "teacher.json", "--plots", "teacher.csv")
    student = ("--data", "data", "--teacher", "teacher.pt")
    run(monkeypatch, distill_vision, *student, "--checkpoint", "ckpt/s/last.pt", "--model", "kd.pt",
        "--metrics", "kd.json", "--plots", "kd.csv")
    run(monkeypatch, qat_vision, *student, "--student", "kd.pt", "--checkpoint", "ckpt/q/last.pt", "--model", "qat.pt",
        "--metrics", "qat.json", "--plots", "qat.csv")
    run(monkeypatch, export_vision, *student, "--student-fp32", "kd.pt", "--student", "qat.pt", "--out", "onnx",
        "--metrics", "export.json")
    run(monkeypatch, evaluate_vision, "--data", "data", "--onnx", "onnx", "--teacher", "teacher.pt",
        "--student-fp32", "kd.pt", "--student", "qat.pt", "--metrics", "evaluation.json")
    assert load_model(tmp_path / "qat.pt").input_shape == (3, 12, 10)
    for name in ("teacher_fp32", "student_fp32", "student_int8", "student_ptq_int8"):
        graph = onnx.load(str(tmp_path / "onnx" / f"{name}.onnx")).graph
        dims = [[d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim] for t in (graph.input[0], graph.output[0])]
        assert dims == [["batch", 3, 12, 10], ["batch", 3]], name
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["models"]["student_int8"]["test_accuracy"] >= 0.9, evaluation["models"]["student_int8"]


@pytest.mark.slow
def test_images_small_enough_to_leave_one_pixel_before_the_head_still_export_to_int8(tmp_path, raw_params):
    """Before: on 8x8 images (scikit-learn's digits) the default student's last map is 1x1, and torch's INT8 model
    cannot take the mean of a 1x1 quantized map: export_vision died ("required rank 4 tensor to use channels_last
    format") on the full profile's architecture."""
    from tasks.config import parse_config
    from tasks.images.models import MobileStudent
    from tasks.onnx_models import export_int8, session
    from tasks.quantization import prepare_qat

    cfg = parse_config(raw_params)
    qat = cfg.qat.vision
    torch.backends.quantized.engine = "x86"
    student = MobileStudent(cfg.distill.vision.student, 10, (1, 8, 8))
    model = prepare_qat(student, 8, torch.zeros(2, 1, 8, 8), list(qat.float_modules), qat.weight_bits).train()
    model(torch.randn(16, 1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    path = export_int8(model.eval(), tmp_path / "small.onnx")
    out = session(path).run(None, {"image": x.numpy()})[0]
    assert out.shape == (4, 10)
    with torch.no_grad():
        assert np.abs(out - model(x).numpy()).max() < 0.1


def test_throughput_counts_the_images_that_ran_when_the_test_split_is_smaller_than_the_batch(tmp_path, monkeypatch):
    """Before: 64 / time even when only 5 test images made the batch (a small folder), a 13x overstatement."""
    import tasks.images.evaluate as evaluate_vision
    from tasks.config import load_config
    from tasks.images.models import MobileStudent
    from tasks.onnx_models import export_fp32
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "params.yaml").evaluate.vision.model_copy(update={"throughput_batch": 64, "warmup": 1,
                                                                               "repeats": 10, "throughput_repeats": 3})
    student = MobileStudent(load_config(ROOT / "params.yaml").distill.vision.student, 3, (3, 12, 10))
    path = export_fp32(student, tmp_path / "s.onnx")
    monkeypatch.setattr(evaluate_vision, "timed_runs", lambda sess, feeds, warmup, repeats: np.full(repeats, 0.01))
    split = Split(torch.zeros(5, 3, 12, 10, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64))
    assert evaluate_vision.latency(path, split, cfg)["throughput_b64_ips"] == pytest.approx(500)


def test_a_last_batch_of_one_image_joins_the_batch_before_it(raw_params):
    """Before: with one training image past a whole number of batches, the epoch's last batch held one image, and a
    student whose last map is 1x1 (8x8 images) stopped in its batch norm ("Expected more than 1 value per channel
    when training"): one data version in every ``batch_size`` of a growing folder. That image now joins the batch
    before it; every image is still seen once an epoch."""
    from tasks.config import parse_config
    from tasks.image_training import Split, train_epoch
    from tasks.images.models import MobileStudent
    from tasks.training import cross_entropy_loss, make_optimizer, make_scheduler

    spec = parse_config(raw_params).distill.vision.model_copy(update={"batch_size": 8, "bf16": False})
    spec = spec.model_copy(update={"augmentation": spec.augmentation.model_copy(update={"crop_padding": 0})})
    model = MobileStudent(spec.student, 3, (1, 8, 8))
    train = Split(torch.randint(0, 256, (17, 8, 8), dtype=torch.uint8), torch.arange(17) % 3)
    opt = make_optimizer(model, spec.optimizer)
    metrics = train_epoch(model, train, spec, opt, make_scheduler(opt, spec.schedule, 2), torch.Generator(),
                          cross_entropy_loss(0.0), "test", torch.device("cpu"))
    assert abs(metrics["train_accuracy"] * 17 - round(metrics["train_accuracy"] * 17)) < 1e-9   # of all 17
