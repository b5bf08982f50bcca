"""The vision compression stages' CLIs, chained on tiny real-format data in-process: what each one publishes must be
what the next one (and export) can load, and what QAT ships must be what it trained."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from torch.ao.quantization import FakeQuantizeBase

from tasks.artifacts import load_model, model_meta, save_model
from tasks.config import load_config
from tasks.image_training import Split, evaluate
from tasks.images.arch_config import MobileArch, ResNetArch
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.images.prepare import prepare_images

TEACHER = ResNetArch(stem=8, widths=[16, 32], blocks=[1, 1])
STUDENT = MobileArch(stem=8, stem_stride=2, widths=[16, 16, 32], strides=[1, 2, 1], kinds=["fused", "separable", "separable"])
FAST = {"epochs": 2, "batch_size": 128, "threads": 1, "eval_batch_size": 256}


@pytest.fixture
def project(synthetic_source, raw_params, mlflow_uri, tmp_path):
    """Processed data, a tiny teacher and student, and a params.yaml of short schedules (working dir: tmp_path)."""
    _, cfg = synthetic_source
    prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    torch.manual_seed(0)
    save_model(ResNetTeacher(TEACHER), "resnet_teacher", TEACHER, tmp_path / "teacher.pt")
    save_model(MobileStudent(STUDENT), "mobile_student", STUDENT, tmp_path / "student.pt")
    params = cfg.model_dump(by_alias=True)
    params["distill"]["vision"] |= {"student": STUDENT.model_dump(), "feature_pairs": [{"teacher": 1, "student": 1}]}
    params["prune"]["vision"] |= {**FAST, "mode": "structured", "steps": 1, "epochs_per_step": 1, "final_sparsity": 0.5}
    params["qat"]["vision"] |= {**FAST, "freeze_observers_after": 1, "freeze_bn_after": 1}
    params["share"]["vision"] |= {**FAST, "epochs": 1, "clusters": 8}
    params["export"]["vision"] |= {"calibration_size": 64}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def run_stage(monkeypatch, project, module, recipe: list[str], student: str, out: str) -> None:
    """A compression stage's ``main()`` as ``dvc repro`` calls it, with ``recipe.vision`` set to ``recipe``."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["recipe"]["vision"] = recipe
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(sys, "argv", [module.__name__, "--data", "data", "--teacher", "teacher.pt", "--student", student,
                                      "--checkpoint", f"ckpt/{out}/last.pt", "--model", f"{out}.pt",
                                      "--metrics", f"{out}.json", "--plots", f"{out}.csv"])
    module.main("vision")


def _observing(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase) and m.observer_enabled.item()]


@pytest.mark.slow
def test_structured_pruning_then_qat_share_and_export_load_the_narrower_student(project, monkeypatch, mlflow_uri):
    """Before: qat_vision published the un-pruned architecture, so loading its model failed (state_dict size
    mismatch) in share, export and evaluate after structured pruning. And prune and share, which train with the
    distillation loss, logged only ``distill.vision.teacher_runtime`` of it: their runs now log the block, as QAT's."""
    import tasks.images.prune as prune_vision
    import tasks.images.qat as qat_vision
    import tasks.images.share as share_vision
    from tasks.images.export import export_images

    recipe = ["distill", "prune", "qat", "share"]
    run_stage(monkeypatch, project, prune_vision, recipe, "student.pt", "pruned")
    from tasks.layer_widths import channel_widths

    pruned = model_meta(project / "pruned.pt")   # the student's architecture, and its narrower layer widths
    full = channel_widths(load_model(project / "student.pt"))
    assert pruned["arch"] == STUDENT and sum(w[0] for w in pruned["channels"].values()) < sum(w[0] for w in full.values())
    assert channel_widths(load_model(project / "pruned.pt")) == pruned["channels"]
    run_stage(monkeypatch, project, qat_vision, recipe, "pruned.pt", "qat")
    assert {k: model_meta(project / "qat.pt")[k] for k in ("arch", "channels")} == {k: pruned[k] for k in ("arch", "channels")}
    qat = load_model(project / "qat.pt")
    assert json.loads((project / "qat.json").read_text())["parameters"] == sum(p.numel() for p in qat.parameters())
    run_stage(monkeypatch, project, share_vision, recipe, "qat.pt", "shared")
    assert model_meta(project / "shared.pt")["channels"] == pruned["channels"]
    load_model(project / "shared.pt")
    export = load_config(project / "params.yaml").export.vision
    # random images: the students' logits tie, so agreement measures rounding noise; loading and exporting is the point
    cfg = export.model_copy(update={"parity": export.parity.model_copy(update={"min_top1_agreement": 0.01,
                                                                             "max_accuracy_delta": 1.0})})
    checks = export_images(cfg, load_config(project / "params.yaml").qat.vision, project / "data",
                           project / "teacher.pt", project / "student.pt",
                           project / "shared.pt", project / "onnx")
    assert set(checks) == {"teacher_fp32", "student_fp32", "student_int8", "student_ptq_int8"}
    metrics = json.loads((project / "pruned.json").read_text())
    assert metrics["parameters"] < metrics["parameters_before"] and metrics["sparsity"] < 0.05  # narrower, not sparser
    shared = json.loads((project / "shared.json").read_text())  # what ships: the INT8 file, measured
    assert shared["shipped_bytes_saved"] == shared["onnx_int8_bytes_before"] - shared["onnx_int8_bytes"]
    assert shared["shipped_gzip_bytes_saved"] > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = {r.data.tags.get("pipeline.stage"): r.data.params
            for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    kd = {k: v for k, v in runs["qat_vision"].items() if k.startswith("distill.vision.")}
    assert "distill.vision.temperature" in kd
    assert all(kd.items() <= runs[stage].items() for stage in ("prune_vision", "share_vision"))


@pytest.mark.slow
def test_qat_follows_the_recipes_distill_flag(project, monkeypatch):
    """Before: QAT read its own ``qat.vision.distill`` (true), so the CE-only recipe was distilled during QAT."""
    import tasks.images.qat as qat_vision

    cfg = load_config(project / "params.yaml")
    run_stage(monkeypatch, project, qat_vision, ["qat"], "student.pt", "ce")
    args = (cfg.qat.vision, cfg.distill.vision)
    paths = (project / "data", project / "teacher.pt", project / "student.pt")
    labels_only = qat_vision.qat_images(*args, False, *paths, project / "ckpt" / "a" / "last.pt")[0]
    distilled = qat_vision.qat_images(*args, True, *paths, project / "ckpt" / "b" / "last.pt")[0]
    shipped = load_model(project / "ce.pt").state_dict()
    same = lambda state: all(torch.equal(shipped[k], v) for k, v in state.items())  # noqa: E731
    assert same(labels_only.state_dict()) and not same(distilled.state_dict())


@pytest.mark.slow
def test_qat_ships_frozen_ranges_that_no_evaluation_moves(project, monkeypatch):
    """Before: observers stayed on when ``freeze_observers_after`` was not reached, and every evaluation pass (val
    each epoch, test, export) moved the ranges that ship."""
    import tasks.images.qat as qat_vision

    run_stage(monkeypatch, project, qat_vision, ["distill", "qat"], "student.pt", "qat")
    model = load_model(project / "qat.pt")
    assert model_meta(project / "qat.pt")["activation_bits"] == 8 and not _observing(model)
    model.apply(torch.ao.quantization.enable_observer)  # even a model that is still calibrating ...
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, Split.load(project / "data", "test"), 64)  # ... is not changed by an evaluation pass
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(_observing(model)) > 0  # and keeps calibrating on training data afterwards


@pytest.mark.parametrize("epochs,freeze,pattern", [
    (3, 3, r"qat\.vision.*freeze_observers_after \(3\) must be below epochs \(3\)"),
    (3, 0, r"qat\.vision\.freeze_observers_after: Input should be greater than or equal to 1"),
])
def test_observer_freeze_must_fall_inside_training(raw_params, epochs, freeze, pattern):
    from tasks.config import parse_config
    from tasks.errors import ConfigError

    qat = {**raw_params["qat"]["vision"], "epochs": epochs, "freeze_observers_after": freeze}
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**raw_params, "qat": {**raw_params["qat"], "vision": qat}})


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "auto"])
def test_distill_and_qat_stages_run_with_the_teacher_in_onnxruntime(project, monkeypatch, mlflow_uri, runtime):
    """distill.vision.teacher_runtime: onnxruntime, through the stages' CLIs: each distils from the teacher's ONNX
    twin and publishes a student the next stage loads. The stage logs the runtime that ran, never "auto"."""
    import json

    from mlflow.tracking import MlflowClient

    import tasks.images.distill as distill_vision
    import tasks.images.qat as qat_vision
    from tasks.config import load_config

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["vision"] |= {**FAST, "epochs": 1, "teacher_runtime": runtime}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(sys, "argv", ["distill_vision", "--data", "data", "--teacher", "teacher.pt",
                                      "--checkpoint", "ckpt/kd/last.pt", "--model", "kd.pt", "--metrics", "kd.json",
                                      "--plots", "kd.csv"])
    distill_vision.main("vision")
    assert json.loads((project / "kd.json").read_text())["test_accuracy"] >= 0.0
    (run,) = MlflowClient(mlflow_uri).search_runs(["1"], "tags.`pipeline.stage` = 'distill_vision'")
    expected = load_config(project / "params.yaml").distill.vision.resolved().teacher_runtime
    assert run.data.params["distill.vision.teacher_runtime"] == expected != "auto"
    run_stage(monkeypatch, project, qat_vision, ["distill", "qat"], "kd.pt", "qat")
    assert load_model(project / "qat.pt") is not None


@pytest.mark.slow
def test_a_reused_teacher_is_the_champions_and_its_stage_still_writes_every_output(project, monkeypatch):
    """Before: a teacher reused by the warm-start plan left its checkpoint folder (a DVC output) uncreated, so DVC
    failed the stage in any fresh workspace."""
    import tasks.images.train_teacher as train_teacher_vision
    from tasks.image_training import model_shape

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"]["vision"] |= {**FAST, "arch": TEACHER.model_dump()}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    warm = project / "warm"
    champion = ResNetTeacher(TEACHER, **model_shape(project / "data"))
    save_model(champion, "resnet_teacher", TEACHER, warm / "teacher.pt", shape=model_shape(project / "data"))
    (warm / "plan.json").write_text(json.dumps({"teacher": "reuse", "student": "scratch", "champion": "3"}))
    monkeypatch.setattr(sys, "argv", ["train_teacher_vision", "--data", "data", "--warm-start", "warm",
                                      "--checkpoint", "ckpt/teacher/last.pt", "--model", "teacher_out.pt",
                                      "--metrics", "teacher.json", "--plots", "teacher.csv"])
    train_teacher_vision.main("vision")
    assert (project / "ckpt" / "teacher").is_dir() and not any((project / "ckpt" / "teacher").iterdir())
    reused = torch.load(project / "teacher_out.pt", weights_only=True)
    assert reused["warm_start"] == "reuse"
    for key, value in champion.state_dict().items():
        torch.testing.assert_close(reused["state_dict"][key], value)
    assert (project / "teacher.csv").read_text() == "epoch\n"   # nothing trained
