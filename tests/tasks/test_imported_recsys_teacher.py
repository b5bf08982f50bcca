"""The recommender's teacher brought as an ONNX file (two inputs, a logit per row, field vectors as a named output)
or as a state dict: it drives target, label and feature distillation as the torch teacher it came from, and the
stages publish, distil from and export it."""
from __future__ import annotations

import hashlib
import json
import re
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tasks.artifacts import load_model, model_meta
from tasks.ctr.config import DistillCtr, RecArch
from tasks.ctr.ctr_training import CtrDistiller, evaluate_ctr, load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.family_config import LossWeights, Optimizer, Schedule
from tasks.imported_teacher import TeacherImportError, import_onnx
from tests.tasks.test_recsys_models import SHAPE, _model, _split


class WithVectors(nn.Module):
    def __init__(self, teacher: CtrModel) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, fields: torch.Tensor, genres: torch.Tensor):
        return self.teacher.forward_features(fields, genres)


def export_teacher(teacher: CtrModel, path, inputs=("user_fields", "user_genres")) -> str:
    example = (torch.zeros(2, teacher.num_fields, dtype=torch.int64), torch.zeros(2, teacher.genre_embedding.num_embeddings))
    torch.onnx.export(WithVectors(teacher).eval(), example, str(path), input_names=list(inputs),
                      output_names=["logit", "vectors"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "n"} for n in (*inputs, "logit", "vectors")})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kd(student: CtrModel, weights: LossWeights) -> DistillCtr:
    return DistillCtr(epochs=1, batch_size=64, optimizer=Optimizer(name="adamw", lr=0.01, weight_decay=0.0),
                      schedule=Schedule(name="constant"), seed=0, threads=1, student=student.arch,
                      temperature=2.0, weights=weights)


def test_an_onnx_ctr_teacher_computes_the_losses_of_the_torch_teacher_it_came_from(tmp_path):
    teacher = _model(seed=1, dim=16, mlp=[32]).eval()
    sha = export_teacher(teacher, tmp_path / "t.onnx")
    data = _split(256)
    imported = import_onnx((tmp_path / "t.onnx").read_bytes(), sha, "t.onnx", "logit", ["vectors"],
                           (data.fields[:2], data.genres[:2]), logits_shape=[], feature_rank=3)
    assert imported.arch.feature_shapes == [[SHAPE["fields"] + 1, 16]]
    with torch.no_grad():
        torch.testing.assert_close(imported(data.fields, data.genres), teacher(data.fields, data.genres),
                                   atol=1e-5, rtol=1e-5)
    student = _model(seed=2)
    for weights in (LossWeights(ground_truth=0.0, target=1.0, feature=0.0, label=0.0),
                    LossWeights(ground_truth=0.0, target=0.0, feature=0.0, label=1.0),
                    LossWeights(ground_truth=0.0, target=0.0, feature=1.0, label=0.0)):
        torch.manual_seed(3)
        via_onnx = CtrDistiller(student, imported, _kd(student, weights)).train()
        torch.manual_seed(3)
        via_torch = CtrDistiller(student, teacher, _kd(student, weights)).train()
        onnx_total, _ = via_onnx.loss(data.fields, data.genres, data.y)
        torch_total, _ = via_torch.loss(data.fields, data.genres, data.y)
        torch.testing.assert_close(onnx_total, torch_total, atol=1e-5, rtol=1e-5)
        onnx_total.backward()
        assert student.embedding.weight.grad.abs().sum() > 0
        student.zero_grad(set_to_none=True)


def test_an_onnx_ctr_teacher_whose_names_collide_with_the_pipelines_exports(tmp_path):
    """Before: inputs called ("genres", "fields") in that order, or a logit output called ``probability``, made
    export_ctr_fp32 write a graph the ONNX checker refuses."""
    from tasks.ctr.ctr_onnx import export_ctr_fp32, onnx_probabilities

    teacher = _model(seed=1).eval()
    path = tmp_path / "t.onnx"
    example = (torch.zeros(2, teacher.num_fields, dtype=torch.int64), torch.zeros(2, teacher.genre_embedding.num_embeddings))
    torch.onnx.export(teacher, example, str(path), input_names=["genres", "fields"], output_names=["probability"],
                      opset_version=17, dynamo=False, dynamic_axes={n: {0: "n"} for n in ("genres", "fields", "probability")})
    data = _split(64)
    imported = import_onnx(path.read_bytes(), "0" * 64, "t.onnx", None, [], (data.fields[:2], data.genres[:2]), [], 3)
    export_ctr_fp32(imported, tmp_path / "teacher_fp32.onnx")
    with torch.no_grad():
        expected = torch.sigmoid(teacher(data.fields, data.genres)).numpy()
    np.testing.assert_allclose(onnx_probabilities(tmp_path / "teacher_fp32.onnx", data), expected, atol=1e-5)


def test_an_onnx_ctr_teacher_must_take_the_familys_two_inputs_and_give_a_logit_per_row(tmp_path):
    teacher = _model(seed=1).eval()
    sha = export_teacher(teacher, tmp_path / "t.onnx")
    data = _split(8)
    blob = (tmp_path / "t.onnx").read_bytes()
    with pytest.raises(TeacherImportError, match=r"takes 1 input\(s\), this graph takes \['user_fields', 'user_genres'\]"):
        import_onnx(blob, sha, "t.onnx", "logit", [], (data.fields[:2],), [], 3)
    with pytest.raises(TeacherImportError, match=r"output 'vectors' has shape \[1, 4, 8\] for a batch of 1, not \['N'\]"):
        import_onnx(blob, sha, "t.onnx", "vectors", [], (data.fields[:2], data.genres[:2]), [], 3)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["onnx", "torchscript", "exported_program"])
def test_the_recsys_stages_import_distil_from_and_export_an_imported_teacher(form, synthetic_movielens, mlflow_uri,
                                                                             tmp_path, monkeypatch):
    """The teacher as an ONNX file, a TorchScript module traced on the family's two inputs (ids and multi-hot
    genres) or a torch.export program of them (a free batch axis): published as a model file of kind onnx, distilled
    from with its field vectors, exported."""
    import tasks.ctr.distill as distill_ctr
    import tasks.ctr.train_teacher as train_ctr_teacher
    from tasks.ctr.ctr_onnx import INPUTS, MODELS, OUTPUT, onnx_probabilities
    from tasks.ctr.export import export_ctr
    from tasks.onnx_models import session
    from tasks.recsys.prepare import prepare_recsys

    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "data")
    _, _, test, shape = load_ctr_data(tmp_path / "data")
    torch.manual_seed(0)
    teacher = CtrModel(RecArch(dim=8, fm=True, mlp=[16]), **shape).eval()
    if form == "onnx":
        sha, path, logits = export_teacher(teacher, tmp_path / "mine.onnx"), "mine.onnx", {"logits": "logit"}
    else:
        example, path, logits = (test.fields[:4], test.genres[:4]), "mine.pt", {}
        if form == "torchscript":
            torch.jit.save(torch.jit.trace(WithVectors(teacher).eval(), example), str(tmp_path / path))
        else:
            batch = torch.export.Dim.AUTO
            torch.export.save(torch.export.export(WithVectors(teacher).eval(), example,
                                                  dynamic_shapes=({0: batch}, {0: batch})), str(tmp_path / path))
        sha = hashlib.sha256((tmp_path / path).read_bytes()).hexdigest()
    params = cfg.model_dump(by_alias=True)
    params["teacher"]["recsys"]["pretrained"] = {"path": path, "sha256": sha, "format": form, **logits,
                                                 "features": ["vectors"]}
    params["distill"]["recsys"] |= {"epochs": 1, "threads": 1}
    params["distill"]["recsys"]["weights"]["feature"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    monkeypatch.setattr(sys, "argv", ["train_teacher_recsys", "--data", "data", "--model", "teacher.pt",
                                      "--metrics", "teacher.json", "--plots", "teacher.csv"])
    train_ctr_teacher.main("recsys")
    meta = model_meta(tmp_path / "teacher.pt")
    assert meta["kind"] == "onnx" and meta["arch"].sha256 == sha and meta["arch"].features == ["vectors"]
    expected = evaluate_ctr(teacher, test)["auc"]
    assert json.loads((tmp_path / "teacher.json").read_text())["test_auc"] == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "teacher.csv").read_text() == "epoch\n"

    monkeypatch.setattr(sys, "argv", ["distill_recsys", "--data", "data", "--teacher", "teacher.pt",
                                      "--model", "student.pt", "--metrics", "student.json", "--plots", "student.csv"])
    distill_ctr.main("recsys")
    assert json.loads((tmp_path / "student.json").read_text())["teacher_test_auc"] == pytest.approx(expected, abs=1e-6)

    from tasks.config import load_config

    export = load_config(tmp_path / "params.yaml").export.recsys
    checks = export_ctr(export, tmp_path / "data", tmp_path / "teacher.pt", tmp_path / "student.pt",
                           tmp_path / "student.pt", tmp_path / "onnx")
    assert set(checks) == set(MODELS)
    sess = session(tmp_path / "onnx" / "teacher_fp32.onnx")
    assert [i.name for i in sess.get_inputs()] == list(INPUTS) and [o.name for o in sess.get_outputs()] == [OUTPUT]
    with torch.no_grad():
        reference = torch.sigmoid(teacher(test.fields, test.genres)).numpy()
    np.testing.assert_allclose(onnx_probabilities(tmp_path / "onnx" / "teacher_fp32.onnx", test), reference, atol=1e-5)
    assert load_model(tmp_path / "teacher.pt").counts()["parameters"] > 0


def test_feature_distillation_needs_the_field_vectors_named(raw_params):
    from tasks.config import parse_config
    from tasks.errors import ConfigError

    spec = {"path": "t.onnx", "sha256": "0" * 64, "format": "onnx"}
    teacher = {**raw_params["teacher"]["recsys"], "pretrained": spec}
    distill = {**raw_params["distill"]["recsys"],
               "weights": {**raw_params["distill"]["recsys"]["weights"], "feature": 0.5}}
    params = {**raw_params, "teacher": {**raw_params["teacher"], "recsys": teacher},
              "distill": {**raw_params["distill"], "recsys": distill}}
    with pytest.raises(ConfigError, match="name that one output in teacher.recsys.pretrained.features"):
        parse_config(params)
    spec["features"] = ["vectors"]
    parse_config(params)


def test_a_ctr_state_dict_is_imported_into_the_arch_of_params(tmp_path):
    from tasks.imported_teacher import import_state_dict

    teacher = _model(seed=1).eval()
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "w.pt")
    loaded = import_state_dict((tmp_path / "w.pt").read_bytes(), "w.pt", lambda: CtrModel(teacher.arch, **SHAPE))
    data = _split(16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.fields, data.genres), teacher(data.fields, data.genres))
    with pytest.raises(TeacherImportError, match="w.pt: does not fit"):
        import_state_dict((tmp_path / "w.pt").read_bytes(), "w.pt",
                          lambda: CtrModel(RecArch(dim=4, fm=True, mlp=[16]), **SHAPE))


@pytest.mark.slow
def test_an_onnx_ctr_teacher_without_features_is_distilled_from_with_the_feature_weight_at_0(
        synthetic_movielens, mlflow_uri, tmp_path, monkeypatch):
    """What docs/byom.md tells a user whose teacher exposes no field vectors: ``features: []`` and
    ``distill.recsys.weights.feature: 0``; the teacher and distill stages then run on its logits alone.
    Before: the distiller read the width of the teacher's first feature whatever the weight, and every such
    distill stage died with ``IndexError: list index out of range``."""
    import tasks.ctr.distill as distill_ctr
    import tasks.ctr.train_teacher as train_ctr_teacher
    from tasks.recsys.prepare import prepare_recsys

    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "data")
    *_, shape = load_ctr_data(tmp_path / "data")
    torch.manual_seed(0)
    sha = export_teacher(CtrModel(RecArch(dim=8, fm=True, mlp=[16]), **shape).eval(), tmp_path / "mine.onnx")
    params = cfg.model_dump(by_alias=True)
    params["teacher"]["recsys"]["pretrained"] = {"path": "mine.onnx", "sha256": sha, "format": "onnx",
                                                 "logits": "logit", "features": []}
    params["distill"]["recsys"] |= {"epochs": 1, "threads": 1}
    params["distill"]["recsys"]["weights"] |= {"feature": 0.0, "target": 0.7, "ground_truth": 0.3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    monkeypatch.setattr(sys, "argv", ["train_teacher_recsys", "--data", "data", "--model", "teacher.pt",
                                      "--metrics", "teacher.json", "--plots", "teacher.csv"])
    train_ctr_teacher.main("recsys")
    assert model_meta(tmp_path / "teacher.pt")["arch"].features == []
    monkeypatch.setattr(sys, "argv", ["distill_recsys", "--data", "data", "--teacher", "teacher.pt",
                                      "--model", "student.pt", "--metrics", "student.json", "--plots", "student.csv"])
    distill_ctr.main("recsys")
    student = json.loads((tmp_path / "student.json").read_text())
    assert 0.0 <= student["test_auc"] <= 1.0
    assert student["teacher_test_auc"] == json.loads((tmp_path / "teacher.json").read_text())["test_auc"]


class OneVector(nn.Module):
    """A teacher whose "field vectors" are one vector per row: (N, 1, dim), not one per field and genre group."""

    def __init__(self, teacher: CtrModel) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, fields: torch.Tensor, genres: torch.Tensor):
        logit, vectors = self.teacher.forward_features(fields, genres)
        return logit, vectors.mean(dim=1, keepdim=True)


@pytest.mark.fault("data", "an imported click-through teacher made for other data: field vectors not one per field "
                   "and genre group, or embedding tables smaller than the data's vocabulary",
                   "the teacher stage stops in one line naming teacher.<family>.pretrained (before: the feature loss "
                   "broadcast silently, or distillation died in an onnxruntime Gather traceback)")
@pytest.mark.parametrize("made_for", ["one_vector_per_row", "a_smaller_vocabulary"])
def test_an_onnx_ctr_teacher_made_for_other_data_is_refused_at_import(made_for, synthetic_movielens, tmp_path):
    """Before: the import checked the feature's rank and scored two validation rows only. A (N, 1, dim) feature
    passed and the feature loss broadcast it over every field (a UserWarning); a teacher with fewer embedding rows
    than the data's vocabulary passed, then the distill stage died on a training row with onnxruntime's
    "Gather ... idx=311 must be within the inclusive range"."""
    from tasks.ctr.train_teacher import import_ctr_teacher
    from tasks.family_config import PretrainedTeacher
    from tasks.recsys.prepare import prepare_recsys

    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "data")
    train, val, test, shape = load_ctr_data(tmp_path / "data")
    arch = RecArch(dim=8, fm=True, mlp=[16])
    key = "teacher.recsys.pretrained"

    def imported(name: str, module: nn.Module):
        example = (val.fields[:2], val.genres[:2])
        torch.onnx.export(module.eval(), example, str(tmp_path / name), input_names=["fields", "genres"],
                          output_names=["logit", "vectors"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "n"} for n in ("fields", "genres", "logit", "vectors")})
        spec = PretrainedTeacher(path=name, sha256=hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(),
                                 format="onnx", logits="logit", features=["vectors"])
        return import_ctr_teacher(cfg.teacher.recsys.model_copy(update={"pretrained": spec}), tmp_path / "data", key)

    torch.manual_seed(0)
    model, _, metrics = imported("fits.onnx", WithVectors(CtrModel(arch, **shape)))   # this data's own shape
    assert model.arch.feature_shapes == [[shape["fields"] + 1, 8]] and 0.0 <= metrics["test_auc"] <= 1.0
    if made_for == "one_vector_per_row":
        with pytest.raises(TeacherImportError, match=rf"^{re.escape(key)}: other\.onnx: feature 'vectors' has shape "
                                                     rf"\['N', 1, 8\]; the data's field vectors are \[N, "
                                                     rf"{shape['fields'] + 1}, dim\]"):
            imported("other.onnx", OneVector(CtrModel(arch, **shape)))
        return
    # a table that holds the two rows the import runs first, not the data's largest ids
    rows = int(val.fields[:2].max()) + 1
    assert rows <= int(torch.cat([train.fields, val.fields, test.fields]).max())
    with pytest.raises(TeacherImportError, match=rf"^{re.escape(key)}: other\.onnx: onnxruntime cannot run it on the "
                                                 rf"data's largest ids \[.+\] \(vocabulary {shape['vocabulary']}\): "
                                                 r"a teacher made for other data\? \(.*Gather"):
        imported("other.onnx", WithVectors(CtrModel(arch, **{**shape, "vocabulary": rows})))
