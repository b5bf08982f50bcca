"""The training stages' ``device`` knob: auto trains on CUDA when PyTorch sees a GPU, else on the CPU (the default and
tested path); a GPU asked for on a machine without one stops the stage before it starts. The tests marked ``GPU`` run
only where a CUDA device exists: there every kit's loop trains on it and hands the model back on the CPU."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tasks.config import parse_config
from tasks.errors import ConfigError, run_cli
from tasks.family_config import LossWeights, Optimizer, Schedule
from tasks.hardware import training_device
from tasks.image_training import Split, evaluate, fit
from tasks.training import device_of

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def test_the_knob_takes_auto_cpu_or_cuda_and_names_its_key_otherwise(raw_params):
    teacher = raw_params["teacher"]
    assert parse_config(raw_params).teacher.vision.device == "auto"   # the default: CUDA when present
    raw = {**raw_params, "teacher": {**teacher, "vision": {**teacher["vision"], "device": "gpu"}}}
    with pytest.raises(ConfigError, match=r"teacher\.vision\.device: .*'auto', 'cpu' or 'cuda'"):
        parse_config(raw)
    assert training_device("cpu").type == "cpu"
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@NO_GPU
@pytest.mark.fault("params", "a training stage asked to train on a GPU the machine lacks (`device: cuda`)",
                   "ConfigError naming the key before the stage's run starts: nothing read, trained or tracked")
def test_a_gpu_asked_for_without_one_stops_the_stage_before_its_run(raw_params, tmp_path, monkeypatch, capsys):
    from tasks.images.train_teacher import main

    teacher = raw_params["teacher"]
    raw = {**raw_params, "teacher": {**teacher, "digits": {**teacher["digits"], "device": "cuda"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_teacher", "--params", "params.yaml", "--data", "data/processed/digits",
                                      "--checkpoint", "ck/ck.pt", "--model", "m.pt", "--metrics", "m.json",
                                      "--plots", "p.csv"])
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main("digits"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and errors == [
        (f"error: ConfigError: teacher.digits.device: cuda, but this PyTorch ({torch.__version__}) sees no CUDA "
        "device; set it to auto or cpu")]
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
@NO_GPU
def test_only_the_stages_own_block_decides_its_device(config, mlflow_uri, tmp_path, monkeypatch):
    """A QAT stage on the CPU runs though ``distill.vision`` (whose teacher settings it reads) asks for a GPU."""
    from tasks.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    kd = config.distill.vision.model_copy(update={"device": "cuda"})
    with stage_run("qat_vision", config, {"qat.vision": config.qat.vision, "distill.vision": kd}) as run:
        run.log_metrics({"ran": 1.0})
    with pytest.raises(ConfigError, match=r"^distill\.vision\.device: cuda"), stage_run("distill_vision", config,
                                                                                      {"distill.vision": kd}):
        pass


def test_a_distillers_teacher_moves_with_it():
    """``to(device)`` of a student training against a frozen teacher moves the teacher too (it is no submodule, so
    that no optimizer or checkpoint sees it): shown with a dtype, the same ``Module._apply`` path as a device."""
    from tests.tasks.test_distillation import _data, _kd_cfg, _pair

    distiller = _pair(_kd_cfg(), _data(2).inputs())
    distiller.to(torch.float64)
    assert {p.dtype for p in distiller.teacher.parameters()} == {torch.float64}
    assert all(p is not q for p in distiller.parameters() for q in distiller.teacher.parameters())
    distiller.to(torch.float32)
    assert {p.dtype for p in distiller.teacher.parameters()} == {torch.float32}


def _separable(n: int = 256) -> Split:
    labels = torch.arange(n) % 2
    dark = torch.randint(0, 100, (n, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Split(torch.where(labels[:, None, None] == 1, dark + 155, dark), labels)   # brightness is the class


@GPU
@pytest.mark.parametrize("bf16", [False, True])
def test_an_image_model_trains_on_the_gpu_and_comes_back_to_the_cpu(tmp_path, bf16):
    from tests.tasks.test_training import _model, _spec

    data, model = _separable(), _model()
    spec = _spec(epochs=4).model_copy(update={"device": "cuda", "bf16": bf16})
    history = fit(model, data, data, spec, tmp_path / "ck.pt", "fp")
    assert device_of(model).type == "cpu" and history[-1]["val_accuracy"] > 0.8
    assert evaluate(model, data, 64)["accuracy"] == pytest.approx(history[-1]["val_accuracy"], abs=0.02)
    resumed = _model()   # the checkpoint, written from the GPU, resumes on the CPU
    assert fit(resumed, data, data, spec.model_copy(update={"device": "cpu"}), tmp_path / "ck.pt", "fp") == history


@GPU
def test_a_student_distils_on_the_gpu_from_a_pytorch_teacher_beside_it(tmp_path):
    from tasks.distillation import distillation_loss
    from tests.tasks.test_distillation import _kd_cfg, _pair

    data = _separable(64)
    cfg = _kd_cfg().model_copy(update={"device": "cuda", "teacher_runtime": "auto"})
    assert not cfg.teacher_in_onnxruntime()   # auto: on a GPU the PyTorch teacher runs beside the student
    # ... of the stage that trains against it: a compression stage on the CPU gets the ONNX twin (fp32 teacher)
    assert cfg.resolved("cpu").teacher_runtime == "onnxruntime" and cfg.resolved().teacher_runtime == "pytorch"
    model = _pair(cfg, data.inputs(slice(2)))
    history = fit(model, data, data, cfg, tmp_path / "ck.pt", "fp", loss_fn=distillation_loss)
    assert history[0]["train_loss"] > 0
    assert device_of(model).type == "cpu" and device_of(model.teacher).type == "cpu"


@GPU
def test_a_click_through_student_distils_on_the_gpu():
    from tasks.ctr.config import DistillCtr
    from tasks.ctr.ctr_training import CtrDistiller, distilled_loss, fit_ctr
    from tests.tasks.test_recsys_models import _model, _split

    teacher, student = _model(seed=1, dim=16, mlp=[32]), _model(seed=2)
    cfg = DistillCtr(epochs=3, batch_size=64, optimizer=Optimizer(name="adamw", lr=0.01, weight_decay=0.0),
                     schedule=Schedule(name="constant"), seed=0, threads=1, student=student.arch, temperature=2.0,
                     weights=LossWeights(ground_truth=0.3, target=0.7, feature=0.5, label=0.1), device="cuda")
    distiller = CtrDistiller(student, teacher, cfg)
    history = fit_ctr(distiller, distilled_loss, _split(), _split(128, seed=1), cfg)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert device_of(student).type == "cpu" and device_of(teacher).type == "cpu"


@GPU
def test_a_text_model_trains_and_labels_on_the_gpu():
    from tasks.family_config import Training
    from tasks.text.training import Encoded, TextSplit, TrainingRows, fit_text, label_loss, predict
    from tasks.training import on_device
    from tests.tasks.test_text_family import SENTENCES, _students

    texts, labels = SENTENCES * 8, torch.tensor([1, 0, 1, 1, 0, 0] * 8)
    model, teacher = _students()[0], _students()[2]
    split = TextSplit(texts, labels)
    spec = Training(epochs=8, batch_size=8, optimizer=Optimizer(name="adamw", lr=0.02, weight_decay=0.0),
                    schedule=Schedule(name="constant"), seed=0, threads=1, device="cuda")
    history = fit_text(model, label_loss, TrainingRows(split, Encoded.of(model, texts)), split, spec, bf16=True)
    assert device_of(model).type == "cpu" and history[-1]["val_accuracy"] > history[0]["val_accuracy"] - 1e-9
    on_cpu = predict(teacher, texts)
    with on_device(teacher, spec):   # how the distill stage labels the transfer set
        assert device_of(teacher).type == "cuda"
        on_gpu = predict(teacher, texts)
    assert device_of(teacher).type == "cpu" and abs(on_gpu - on_cpu).max() < 1e-3
