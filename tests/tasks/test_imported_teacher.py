"""A pretrained teacher brought as an ONNX file, a TorchScript module, a ``torch.export`` program or a state dict:
verified by checksum, loaded
through the pipeline's model files, and driving distillation exactly as the torch teacher it was exported from
would."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tasks.artifacts import count_nonzero, count_parameters, load_model, model_meta
from tasks.config import load_config
from tasks.distillation import Distiller
from tasks.errors import ChecksumError
from tasks.family_config import LossWeights, PretrainedTeacher
from tasks.image_training import Split
from tasks.images.arch_config import ResNetArch
from tasks.images.config import DistillImages, FeaturePair
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.imported_teacher import (
    TeacherImportError,
    import_onnx,
    import_state_dict,
    load_pretrained,
    verified_bytes,
)
from tasks.program_teacher import import_exported_program, import_torchscript
from tests.conftest import briefly_trained

ARCH = ResNetArch(stem=8, widths=[16, 32], blocks=[1, 1])


class WithMaps(nn.Module):
    """What a user's exporter writes: logits and each stage's map as named outputs."""

    def __init__(self, teacher: ResNetTeacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor):
        logits, maps = self.teacher.forward_features(x)
        return (logits, *maps)


def export_teacher(teacher: nn.Module, path, names=("scores", "stage0", "stage1"), dynamic: bool = True) -> str:
    torch.onnx.export(WithMaps(teacher).eval(), (torch.zeros(2, 1, 28, 28),), str(path), input_names=["pixels"],
                      output_names=list(names), opset_version=17, dynamo=False,
                      dynamic_axes={"pixels": {0: "n"}, **{n: {0: "n"} for n in names}} if dynamic else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def teacher_and_data(real_splits):
    torch.manual_seed(0)
    train, val = (Split(torch.from_numpy(real_splits[s][0].copy()), torch.from_numpy(real_splits[s][1].astype("int64")))
                  for s in ("train", "val"))
    teacher = briefly_trained(ResNetTeacher(ARCH), train.inputs(slice(256)), train.y[:256], steps=40)
    return teacher, train, val


def _kd(target: float, label: float, feature: float = 0.0, pairs=()) -> DistillImages:
    cfg = load_config().distill.vision
    return cfg.model_copy(update={"weights": LossWeights(ground_truth=0.0, target=target, feature=feature, label=label),
                                  "feature_pairs": list(pairs), "label_smoothing": 0.0, "teacher_bf16": False,
                                  "teacher_runtime": "pytorch"})


@pytest.mark.slow
def test_an_onnx_teacher_computes_the_losses_of_the_torch_teacher_it_came_from(teacher_and_data, tmp_path):
    teacher, _, val = teacher_and_data
    sha = export_teacher(teacher, tmp_path / "t.onnx")
    imported = import_onnx(verified_bytes(str(tmp_path / "t.onnx"), sha, "k"), sha, "t.onnx", "scores",
                           ["stage0", "stage1"], (val.inputs(slice(2)),), [10], 4)
    x, y = val.inputs(slice(64)), val.y[:64]
    with torch.no_grad():
        torch.testing.assert_close(imported(x), teacher(x), atol=1e-4, rtol=1e-4)
    from tasks.images.evaluate import count_macs

    assert count_macs(imported, (1, 28, 28)) == count_macs(teacher, (1, 28, 28))
    # the exporter folds each batch norm into its convolution: the graph holds a few parameters fewer
    assert 0.98 < count_parameters(imported) / count_parameters(teacher) <= 1.0
    # target, label and feature terms: each equal to the torch teacher's, and gradients reach the student only
    student = MobileStudent(load_config().distill.vision.student)
    pairs = [FeaturePair(teacher=1, student=1)]
    for kd in (_kd(1.0, 0.0), _kd(0.0, 1.0), _kd(0.0, 0.0, 1.0, pairs)):
        torch.manual_seed(1)
        via_onnx = Distiller(student, imported, kd, x[:2]).train()
        torch.manual_seed(1)
        via_torch = Distiller(student, teacher, kd, x[:2]).train()
        onnx_total, _, _ = via_onnx.loss(x, y)
        torch_total, _, _ = via_torch.loss(x, y)
        torch.testing.assert_close(onnx_total, torch_total, atol=1e-4, rtol=1e-4)
        onnx_total.backward()
        assert next(student.parameters()).grad.abs().sum() > 0   # the stem learns from every term
        student.zero_grad(set_to_none=True)
    assert list(via_onnx.parameters()) and not list(imported.parameters())


def test_teacher_runtime_onnxruntime_distils_from_the_teachers_onnx_twin(teacher_and_data):
    """distill.vision.teacher_runtime: onnxruntime: the Distiller runs the frozen teacher's ONNX twin, whose losses
    are the PyTorch teacher's (there, a copy with its batch norms folded), and leaves the PyTorch teacher as it was."""
    from tasks.distillation import FoldedTeacher
    from tasks.onnx_teacher import OnnxTeacher

    teacher, _, val = teacher_and_data
    x, y = val.inputs(slice(64)), val.y[:64]
    student = MobileStudent(load_config().distill.vision.student)
    kd = _kd(0.7, 0.1, 0.5, [FeaturePair(teacher=1, student=1)])
    torch.manual_seed(1)
    via_torch = Distiller(student, teacher, kd, x[:2]).train()
    torch.manual_seed(1)
    via_onnx = Distiller(student, teacher, kd.model_copy(update={"teacher_runtime": "onnxruntime"}), x[:2]).train()
    assert isinstance(via_onnx.teacher, OnnxTeacher) and isinstance(via_torch.teacher, FoldedTeacher)
    assert not teacher.training
    torch.testing.assert_close(via_onnx.loss(x, y)[0], via_torch.loss(x, y)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("runtime", "bf16_param", "native", "expected"), [
    ("auto", True, True, False), ("auto", True, False, True), ("auto", False, True, True),
    ("pytorch", True, False, False), ("onnxruntime", True, True, True)])
def test_teacher_runtime_auto_keeps_pytorch_only_where_it_infers_in_bf16(runtime, bf16_param, native, expected,
                                                                        monkeypatch):
    """auto: PyTorch where the teacher infers in bf16 (1.23x faster than onnxruntime on AVX512-BF16), onnxruntime
    where PyTorch would run it in fp32 (0.73x the step time on AVX2); an explicit choice is kept."""
    import tasks.hardware

    monkeypatch.setattr(tasks.hardware, "native_bf16", lambda: native)
    kd = load_config().distill.vision.model_copy(update={"teacher_runtime": runtime, "teacher_bf16": bf16_param})
    assert kd.teacher_in_onnxruntime() is expected
    # what the stages train, fingerprint and log with names the runtime that ran, never "auto"
    assert kd.resolved().teacher_runtime == ("onnxruntime" if expected else "pytorch")


def save_torchscript(module: nn.Module, path, example: torch.Tensor, script: bool = False,
                     train: bool = False) -> bytes:
    """What a user's ``torch.jit.save`` writes: the module traced on ``example`` (or scripted), in eval mode unless
    ``train``."""
    module = module.train(train)
    compiled = torch.jit.script(module) if script else torch.jit.trace(module, (example,))
    torch.jit.save(compiled, str(path))
    return path.read_bytes()


@pytest.mark.slow
def test_target_and_label_distillation_from_an_onnx_teacher_teach_the_student_its_answers(teacher_and_data, tmp_path):
    teacher, train, val = teacher_and_data
    sha = export_teacher(teacher, tmp_path / "t.onnx")
    imported = import_onnx((tmp_path / "t.onnx").read_bytes(), sha, "t.onnx", None, [], (val.inputs(slice(2)),), [10], 4)
    assert_students_learn_its_answers(imported, train)


@pytest.mark.slow
def test_a_torchscript_teacher_runs_as_its_onnx_export_and_teaches_the_student_its_answers(teacher_and_data, tmp_path):
    """A traced module returning (logits, *stage maps): the teacher gives the module's logits and named maps, and
    target and label distillation from it teach the student its answers."""
    teacher, train, val = teacher_and_data
    blob = save_torchscript(WithMaps(teacher), tmp_path / "t.pt", val.inputs(slice(2)))
    sha = hashlib.sha256(blob).hexdigest()
    imported = load_pretrained(PretrainedTeacher(path=str(tmp_path / "t.pt"), sha256=sha, format="torchscript",
                                                 features=["stage0", "stage1"]),
                               "teacher.vision.pretrained", (val.inputs(slice(2)),), [10], 4, build=None)
    assert imported.arch.sha256 == sha and imported.arch.features == ["stage0", "stage1"]
    assert imported.arch.feature_shapes == [[16, 14, 14], [32, 7, 7]] and imported.counts()["macs"] > 0
    x = val.inputs(slice(16))
    with torch.no_grad():
        logits, maps = imported.forward_features(x)
        expected_logits, expected_maps = teacher.forward_features(x)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    for got, expected in zip(maps, expected_maps, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert_students_learn_its_answers(imported, train)


def assert_students_learn_its_answers(imported: nn.Module, train: Split) -> None:
    torch.manual_seed(0)
    student = MobileStudent(load_config().distill.vision.student)
    distiller = Distiller(student, imported, _kd(1.0, 1.0), train.inputs(slice(2)))
    x = train.inputs(slice(512))
    with torch.no_grad():
        answers = imported(x).argmax(1)
        before = (student.eval()(x).argmax(1) == answers).float().mean().item()
    opt = torch.optim.AdamW(distiller.parameters(), lr=3e-3)
    distiller.train()
    for step in range(60):   # no ground truth in the loss: whatever the student learns, it learns from the teacher
        batch = slice(64 * (step % 8), 64 * (step % 8) + 64)
        opt.zero_grad()
        distiller.loss(x[batch], train.y[batch])[0].backward()
        opt.step()
    with torch.no_grad():
        after = (student.eval()(x).argmax(1) == answers).float().mean().item()
    assert len(answers.unique()) >= 8 and before < 0.5 and after > 0.85, (before, after)


def test_an_intermediate_value_of_the_graph_serves_as_a_feature_map(teacher_and_data, tmp_path):
    import onnx

    teacher, _, val = teacher_and_data
    sha = export_teacher(teacher, tmp_path / "t.onnx", names=("scores",))
    blob = (tmp_path / "t.onnx").read_bytes()
    last_relu = [n.output[0] for n in onnx.load_from_string(blob).graph.node if n.op_type == "Relu"][-1]
    imported = import_onnx(blob, sha, "t.onnx", None, [last_relu], (val.inputs(slice(2)),), [10], 4)
    x = val.inputs(slice(16))
    with torch.no_grad():
        logits, maps = imported.forward_features(x)
        expected_logits, expected_maps = teacher.forward_features(x)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps[0], expected_maps[-1], atol=1e-4, rtol=1e-4)   # the last stage's output


def test_the_exported_teacher_takes_the_pipelines_names_even_where_its_own_collide(teacher_and_data, tmp_path):
    """Before: an input already called like the pipeline's output (or the reverse) gave an invalid graph at export."""
    import onnxruntime as ort

    teacher, _, val = teacher_and_data
    path = tmp_path / "swapped.onnx"
    torch.onnx.export(teacher.eval(), (torch.zeros(2, 1, 28, 28),), str(path), input_names=["logits"],
                      output_names=["image"], opset_version=17, dynamo=False,
                      dynamic_axes={"logits": {0: "n"}, "image": {0: "n"}})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    imported = import_onnx(path.read_bytes(), sha, "swapped.onnx", None, [], (val.inputs(slice(2)),), [10], 4)
    session = ort.InferenceSession(imported.onnx_for_export(["image"], "logits"), providers=["CPUExecutionProvider"])
    x = val.inputs(slice(8))
    out = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, teacher(x).numpy(), atol=1e-4)


@pytest.mark.fault("data", "an imported teacher file changed after its checksum was pinned, or an ONNX graph that does "
                   "not fit the family (inputs, batch axis, logits, features), or not ONNX at all",
                   "ChecksumError or TeacherImportError naming the file and what is wrong; the teacher stage stops")
def test_an_onnx_file_that_does_not_fit_is_refused_with_what_is_wrong(teacher_and_data, tmp_path):
    teacher, _, val = teacher_and_data
    sample = (val.inputs(slice(2)),)
    sha = export_teacher(teacher, tmp_path / "t.onnx")
    with pytest.raises(ChecksumError, match=r"teacher\.vision\.pretrained\.sha256: .*t\.onnx has SHA-256"):
        verified_bytes(str(tmp_path / "t.onnx"), "0" * 64, "teacher.vision.pretrained")
    blob = (tmp_path / "t.onnx").read_bytes()
    with pytest.raises(TeacherImportError, match="no value 'stage7'"):
        import_onnx(blob, sha, "t.onnx", "scores", ["stage7"], sample, [10], 4)
    with pytest.raises(TeacherImportError, match=r"output .stage0. has shape \[1, 16, 14, 14\] for a batch of 1, not"):
        import_onnx(blob, sha, "t.onnx", "stage0", [], sample, [10], 4)
    with pytest.raises(TeacherImportError, match="feature 'scores' has shape \\[1, 10\\] .* features of 4 axes"):
        import_onnx(blob, sha, "t.onnx", "scores", ["scores"], sample, [10], 4)
    fixed = export_teacher(teacher, tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(TeacherImportError, match="batch of 1"):
        import_onnx((tmp_path / "fixed.onnx").read_bytes(), fixed, "fixed.onnx", None, [], sample, [10], 4)
    flat = tmp_path / "flat.onnx"   # takes (N, 784): the wrong rank for the family's images
    torch.onnx.export(nn.Linear(784, 10), (torch.zeros(2, 784),), str(flat), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    with pytest.raises(TeacherImportError, match=r"flat.onnx: onnxruntime cannot run it on a batch of 1 of \[\[1, 28, 28\]\]"):
        import_onnx(flat.read_bytes(), "0" * 64, "flat.onnx", None, [], sample, [10], 4)
    with pytest.raises(TeacherImportError, match="not a valid ONNX model"):
        import_onnx(b"not onnx", sha, "junk.onnx", None, [], sample, [10], 4)


@pytest.mark.fault("security", "an imported ONNX teacher keeping tensors as external data (weights.bin beside it, a "
                   "constant in a subgraph), outside the file its SHA-256 pins",
                   "TeacherImportError naming the key, the file and the tensor, saying to save it as one file; no "
                   "weight read (before: the unverified weights were read, relative to the working directory)")
def test_an_onnx_teacher_with_external_data_is_refused_as_weights_its_checksum_does_not_cover(teacher_and_data,
                                                                                                tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import convert_model_to_external_data

    teacher, _, val = teacher_and_data
    sample = (val.inputs(slice(2)),)
    export_teacher(teacher, tmp_path / "t.onnx")
    model = onnx.load(str(tmp_path / "t.onnx"))
    convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save_model(model, str(tmp_path / "split.onnx"))
    assert (tmp_path / "weights.bin").stat().st_size > 0
    monkeypatch.chdir(tmp_path)   # where the weights are found (before: read, unverified)
    blob = (tmp_path / "split.onnx").read_bytes()
    spec = PretrainedTeacher(path=str(tmp_path / "split.onnx"), sha256=hashlib.sha256(blob).hexdigest(), format="onnx",
                             logits="scores")
    with pytest.raises(TeacherImportError, match=r"^teacher\.vision\.pretrained: .*split\.onnx: tensor .* is stored "
                       r"as external data \(weights\.bin\).*save_as_external_data=False"):
        load_pretrained(spec, "teacher.vision.pretrained", sample, [10], 4, build=lambda: ResNetTeacher(ARCH))
    # a constant of an If branch kept outside the file
    constant = helper.make_tensor("c", TensorProto.FLOAT, [10], [0.0] * 10)
    constant.data_location = TensorProto.EXTERNAL
    constant.ClearField("float_data")
    constant.external_data.add(key="location", value="c.bin")
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=constant)], "then", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [10])])
    other = helper.make_graph([helper.make_node("Constant", [], ["z"], value_floats=[0.0] * 10)], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [10])])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["m"]),
         helper.make_node("If", ["yes"], ["b"], then_branch=branch, else_branch=other),
         helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, [784, 10], [0.0] * 7840),
         helper.make_tensor("yes", TensorProto.BOOL, [], [True])])
    nested = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(TeacherImportError, match=r"^nested\.onnx: tensor 'c' is stored as external data \(c\.bin\)"):
        import_onnx(nested, "0" * 64, "nested.onnx", None, [], sample, [10], 4)


@pytest.mark.fault("data", "an imported teacher state dict that does not fit teacher.<family>.arch",
                   "TeacherImportError naming the file and the mismatching tensor")
def test_a_state_dict_must_fit_the_architecture_in_params(teacher_and_data, tmp_path):
    teacher, _, val = teacher_and_data
    torch.save(teacher.state_dict(), tmp_path / "w.pt")
    loaded = import_state_dict((tmp_path / "w.pt").read_bytes(), "w.pt", lambda: ResNetTeacher(ARCH))
    x = val.inputs(slice(8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), teacher.eval()(x))
    with pytest.raises(TeacherImportError, match="w.pt: does not fit the teacher architecture .*size mismatch"):
        import_state_dict((tmp_path / "w.pt").read_bytes(), "w.pt",
                          lambda: ResNetTeacher(ResNetArch(stem=8, widths=[16, 64], blocks=[1, 1])))


class Noisy(nn.Module):
    """A scripted teacher whose forward draws noise (as dropout traced in train mode does)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1)) + torch.rand(x.size(0), 10)


class Scaled(nn.Module):
    """A teacher whose logits are multiplied by ``factor`` (NaN: a model whose weights went bad)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.head, self.factor = nn.Linear(784, 10), factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1)) * self.factor


def test_an_onnx_export_that_computes_other_answers_than_the_torchscript_module_is_refused(teacher_and_data,
                                                                                          tmp_path, monkeypatch):
    """The exporter's fault, injected: onnxruntime's logits shifted by 1 from what the module computes."""
    from tasks.onnx_teacher import OnnxTeacher

    _, _, val = teacher_and_data
    sample = (val.inputs(slice(2)),)
    blob = save_torchscript(Scaled(1.0), tmp_path / "t.pt", sample[0])
    import_torchscript(blob, "0" * 64, "t.pt", [], sample, [10], 4)   # as exported: accepted
    honest = OnnxTeacher.forward_features

    def shifted(self, *inputs):
        logits, maps = honest(self, *inputs)
        return logits + 1.0, maps

    monkeypatch.setattr(OnnxTeacher, "forward_features", shifted)
    with pytest.raises(TeacherImportError, match=r"t.pt: its ONNX export computes logits up to 1 away from "
                                                 r"TorchScript's \(a random operation in forward"):
        import_torchscript(blob, "0" * 64, "t.pt", [], sample, [10], 4)


class Listed(nn.Module):
    """A scripted teacher returning a list (or a dict) where a tuple belongs."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.head, self.as_dict = nn.Linear(784, 10), as_dict

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        logits = self.head(x.flatten(1))
        if self.as_dict:
            return {"logits": logits}
        return [logits, x]


@pytest.mark.fault("data", "an imported TorchScript teacher that is no TorchScript archive, "
                   "does not run on the family's inputs, returns a list or dict, fewer outputs than its named "
                   "features or logits of the wrong shape, or answers that depend on the batch (traced in train "
                   "mode, random noise); or a torchscript setting naming logits",
                   "TeacherImportError naming the file and what is wrong (the setting: a ConfigError at load); the "
                   "teacher stage stops")
def test_a_torchscript_teacher_that_does_not_fit_is_refused_with_what_is_wrong(teacher_and_data, tmp_path):
    teacher, _, val = teacher_and_data
    sample = (val.inputs(slice(2)),)
    blob = save_torchscript(WithMaps(teacher), tmp_path / "t.pt", sample[0])

    def refused(message: str, blob: bytes, features=(), inputs=sample, logits=(10,)) -> None:
        with pytest.raises(TeacherImportError, match=message):
            import_torchscript(blob, "0" * 64, "t.pt", list(features), inputs, list(logits), 4)

    refused(r"t.pt: not a TorchScript module saved by torch.jit.save", b"not a zip")
    refused(r"t.pt: the module cannot run on a batch of 2 of \[\[3, 28, 28\]\]", blob,
            inputs=(torch.zeros(2, 3, 28, 28),))
    refused(r"forward returns 3 output\(s\); the logits and the features \['a', 'b', 'c'\] need 4", blob,
            features=["a", "b", "c"])
    refused(r"the logits, has shape \[2, 10\] for a batch of 2, not \['N', 12\]", blob, logits=[12])
    for as_dict, kind in ((True, "dict"), (False, "list")):
        refused(f"forward returns a {kind}; return the logits, or a tuple of the logits and the feature maps",
                save_torchscript(Listed(as_dict), tmp_path / "l.pt", sample[0], script=True))
    training = copy.deepcopy(teacher).train()   # forgot model.eval(): batch norm traced with the batch's statistics
    refused(r"t.pt: its answer for a row depends on the batch the row is in \(traced or exported in train mode\? "
            r"save it from model.eval",
            save_torchscript(WithMaps(training), tmp_path / "train.pt", sample[0], train=True))
    refused(r"depends on the batch", save_torchscript(Noisy(), tmp_path / "noisy.pt", sample[0], script=True))
    refused(r"t.pt: its logits for the family's example rows are not all finite numbers",
            save_torchscript(Scaled(float("nan")), tmp_path / "nan.pt", sample[0]))
    with pytest.raises(ValueError, match="logits names an ONNX output"):
        PretrainedTeacher(path="t.pt", sha256="0" * 64, format="torchscript", logits="scores")
    with pytest.raises(ValueError, match="features of a teacher in format torchscript must be distinct names, none of"):
        PretrainedTeacher(path="t.pt", sha256="0" * 64, format="torchscript", features=["logits"])
    # what loaded before stays loading: an ONNX value named twice, a logits key beside a state dict
    PretrainedTeacher(path="t.onnx", sha256="0" * 64, format="onnx", logits="out", features=["h", "h", "out"])
    PretrainedTeacher(path="w.pt", sha256="0" * 64, format="state_dict", logits="logits")


def save_exported(module: nn.Module, path, example: torch.Tensor, dynamic: bool = True, train: bool = False) -> bytes:
    """What a user's ``torch.export.save`` writes: the module exported on ``example`` with a free batch axis (unless
    not ``dynamic``), in eval mode unless ``train``."""
    shapes = ({0: torch.export.Dim.AUTO},) if dynamic else None
    torch.export.save(torch.export.export(module.train(train), (example,), dynamic_shapes=shapes), str(path))
    return path.read_bytes()


@pytest.mark.slow
def test_a_torch_export_program_runs_as_its_onnx_export_and_teaches_the_student_its_answers(teacher_and_data,
                                                                                           tmp_path):
    """``torch.export.save`` of a module returning (logits, *stage maps), the ``.pt2`` format PyTorch 2 saves: the
    teacher gives the module's logits and named maps for a batch of any size, and distillation from it teaches the
    student its answers."""
    teacher, train, val = teacher_and_data
    blob = save_exported(WithMaps(copy.deepcopy(teacher)), tmp_path / "t.pt2", val.inputs(slice(4)))
    sha = hashlib.sha256(blob).hexdigest()
    imported = load_pretrained(PretrainedTeacher(path=str(tmp_path / "t.pt2"), sha256=sha, format="exported_program",
                                                 features=["stage0", "stage1"]),
                               "teacher.vision.pretrained", (val.inputs(slice(2)),), [10], 4, build=None)
    assert imported.arch.sha256 == sha and imported.arch.features == ["stage0", "stage1"]
    assert imported.arch.feature_shapes == [[16, 14, 14], [32, 7, 7]]
    script = save_torchscript(WithMaps(copy.deepcopy(teacher)), tmp_path / "t.ts", val.inputs(slice(2)))
    traced = import_torchscript(script, "0" * 64, "t.ts", ["stage0", "stage1"], (val.inputs(slice(2)),), [10], 4)
    assert imported.counts() == traced.counts() and imported.counts()["parameters"] > 0   # weights as initializers
    for rows in (1, 16):
        x = val.inputs(slice(rows))
        with torch.no_grad():
            logits, maps = imported.forward_features(x)
            expected_logits, expected_maps = teacher.eval().forward_features(x)
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
        for got, expected in zip(maps, expected_maps, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert_students_learn_its_answers(imported, train)


class ViewHead(nn.Module):
    """The commonest CNN head: flattened by ``view(x.size(0), -1)``, a size the program computes from its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, stride=2), nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.head(h.view(h.size(0), -1))


class Planted:
    """What a crafted file could unpickle: writing a file stands for running any code."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path(self.path).write_text, ("pwned",))


@pytest.mark.slow
@pytest.mark.fault("security", "an imported torch.export program carrying pickles (planted sample inputs, a payload "
                   "stored as a pickle)",
                   "the sample inputs are never read; a pickled payload is refused with TeacherImportError naming "
                   "it; no code from the file runs")
def test_a_program_reading_its_batch_size_imports_and_no_pickle_in_it_is_ever_run(teacher_and_data, tmp_path):
    """A head that flattens with the batch size it reads answers for a batch of any size; a program archive's
    pickles (its sample inputs, a payload stored as a pickle) are never unpickled: the sample inputs are left out,
    pickled payloads refused."""
    _, _, val = teacher_and_data
    module = ViewHead().eval()
    blob = save_exported(module, tmp_path / "v.pt2", val.inputs(slice(4)))
    imported = import_exported_program(blob, "0" * 64, "v.pt2", [], (val.inputs(slice(2)),), [10], 4)
    for rows in (1, 5):
        with torch.no_grad():
            torch.testing.assert_close(imported(val.inputs(slice(rows))), module(val.inputs(slice(rows))),
                                       atol=1e-4, rtol=1e-4)

    def rewritten(change) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                dst.writestr(info.filename, change(info.filename, src.read(info)))
        return out.getvalue()

    marker = tmp_path / "ran"
    planted = io.BytesIO()
    torch.save(Planted(marker), planted)
    inputs_planted = rewritten(lambda name, content: planted.getvalue() if "sample_inputs/" in name else content)
    import_exported_program(inputs_planted, "0" * 64, "v.pt2", [], (val.inputs(slice(2)),), [10], 4)
    assert not marker.exists()

    def pickled_weight(name: str, content: bytes) -> bytes:
        if not name.endswith("model_weights_config.json"):
            return content
        config = json.loads(content)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    with pytest.raises(TeacherImportError, match=r"v.pt2: holds pickled objects \(conv.\w+\): only plain tensors"):
        import_exported_program(rewritten(pickled_weight), "0" * 64, "v.pt2", [], (val.inputs(slice(2)),), [10], 4)
    out = io.BytesIO()   # the weights file of an older format, which the loader reads before the config
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr(f"{src.namelist()[0].partition('/')[0]}/data/weights/model.pt", planted.getvalue())
    with pytest.raises(TeacherImportError, match=r"v.pt2: holds its weights or constants as a pickle"):
        import_exported_program(out.getvalue(), "0" * 64, "v.pt2", [], (val.inputs(slice(2)),), [10], 4)
    assert not marker.exists()


def on_device(program: bytes, device: str) -> bytes:
    """A ``torch.export.save`` archive as it reads when saved from a model on ``device`` (every device record)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(program)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".json"):
                data = re.sub(rb'"device": \{"type": "cpu", "index": null\}',
                              b'"device": {"type": "%s", "index": 0}' % device.encode(), data)
            dst.writestr(info, data)
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.fault("data", "an imported torch.export program exported with a fixed batch size, in train mode or "
                   "on a GPU, or not a program; a teacher file in another format than its setting says (a .pt2 or a "
                   "torch.save file as torchscript, TorchScript as a state dict, any of them as ONNX)",
                   "TeacherImportError naming the params key, the file and what is wrong (the format it is in, "
                   "and how to export it); the teacher stage stops")
def test_a_teacher_file_in_another_format_or_a_program_that_does_not_fit_is_refused_naming_its_key(
        teacher_and_data, tmp_path):
    teacher, _, val = teacher_and_data
    sample = (val.inputs(slice(2)),)
    key = "teacher.vision.pretrained"
    files = {"t.pt2": save_exported(WithMaps(copy.deepcopy(teacher)), tmp_path / "t.pt2", val.inputs(slice(4))),
             "t.ts": save_torchscript(WithMaps(copy.deepcopy(teacher)), tmp_path / "t.ts", sample[0])}
    torch.save(teacher.state_dict(), tmp_path / "w.pt")
    torch.save(teacher.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)   # PyTorch < 1.6
    files |= {name: (tmp_path / name).read_bytes() for name in ("w.pt", "old.pt")}
    export_teacher(teacher, tmp_path / "t.onnx")
    files["t.onnx"] = (tmp_path / "t.onnx").read_bytes()

    def refused(message: str, name: str, form: str, features=()) -> None:
        spec = PretrainedTeacher(path=str(tmp_path / name), sha256=hashlib.sha256(files[name]).hexdigest(),
                                 format=form, features=list(features))
        with pytest.raises(TeacherImportError, match=message):
            load_pretrained(spec, key, sample, [10], 4, build=lambda: ResNetTeacher(ARCH))

    program, script = r"a torch.export program \(torch.export.save, .pt2\)", r"a TorchScript archive \(torch.jit.save\)"
    saved = r"a torch.save file \(a state dict or a pickled model\)"
    refused(rf"^{key}: .*t.pt2 is {program}, not {script}: use format: exported_program$", "t.pt2", "torchscript")
    refused(rf"^{key}: .*w.pt is {saved}, not {script}: use format: state_dict$", "w.pt", "torchscript")
    refused(rf"^{key}: .*old.pt is {saved}, not {program}: use format: state_dict$", "old.pt", "exported_program")
    refused(rf"^{key}: .*t.ts is {script}, not {saved}: use format: torchscript$", "t.ts", "state_dict")
    refused(rf"^{key}: .*t.pt2 is {program}, not an ONNX model: use format: exported_program$", "t.pt2", "onnx")
    refused(rf"^{key}: .*t.onnx: not a torch.export program saved by torch.export.save", "t.onnx", "exported_program")
    # a program exported for one batch size only, or from a model in train mode
    files["fixed.pt2"] = save_exported(WithMaps(copy.deepcopy(teacher)), tmp_path / "fixed.pt2", val.inputs(slice(4)),
                                       dynamic=False)
    refused(rf"^{key}: .*fixed.pt2: the module cannot run on a batch of 2 of \[\[1, 28, 28\]\] \(.*\); export it "
            r"with a free batch axis: dynamic_shapes=\{0: Dim.AUTO\} for each input$", "fixed.pt2", "exported_program")
    files["train.pt2"] = save_exported(WithMaps(copy.deepcopy(teacher)), tmp_path / "train.pt2", val.inputs(slice(4)),
                                       train=True)
    refused(rf"^{key}: .*train.pt2: its answer for a row depends on the batch the row is in \(traced or exported in "
            r"train mode\?", "train.pt2", "exported_program")
    # exported from a model on a GPU: its tensors are stored on the device (before: "not a torch.export program
    # saved by torch.export.save (Torch not compiled with CUDA enabled)" on a machine without CUDA)
    files["gpu.pt2"] = on_device(files["t.pt2"], "cuda")
    (tmp_path / "gpu.pt2").write_bytes(files["gpu.pt2"])
    program = torch.export.load(tmp_path / "t.pt2")   # a file of the user's beside it is none of the program's records
    torch.export.save(program, tmp_path / "notes.pt2", extra_files={"notes.json": "trained on a GPU, not JSON",
                                                                    "device.json": '{"device": {"type": "cuda"}}'})
    files["notes.pt2"] = (tmp_path / "notes.pt2").read_bytes()
    refused(rf"^{key}: .*gpu.pt2: a program exported on cuda \(its tensors are stored there; the teacher runs on the "
            r"CPU\): export it from the model moved to the CPU, model.cpu\(\)$", "gpu.pt2", "exported_program")
    with pytest.raises(ValueError, match="logits names an ONNX output; with format: exported_program the logits are "
                                         "forward's first"):
        PretrainedTeacher(path="t.pt2", sha256="0" * 64, format="exported_program", logits="scores")
    # each file loads in its own format (and the old torch.save format still loads as a state dict)
    for name, form in (("t.pt2", "exported_program"), ("notes.pt2", "exported_program"), ("t.ts", "torchscript"),
                       ("old.pt", "state_dict")):
        spec = PretrainedTeacher(path=str(tmp_path / name), sha256=hashlib.sha256(files[name]).hexdigest(), format=form)
        load_pretrained(spec, key, sample, [10], 4, build=lambda: ResNetTeacher(ARCH))


@pytest.mark.slow
def test_the_teacher_stage_imports_an_onnx_teacher_that_distillation_and_export_then_use(
        teacher_and_data, synthetic_source, raw_params, mlflow_uri, tmp_path, monkeypatch):
    """The stages as ``dvc repro`` runs them: train_teacher_vision with ``pretrained`` set publishes a model file of
    kind onnx (no training); distill_vision trains against it; export writes it under the pipeline's names."""
    import tasks.images.distill as distill_vision
    import tasks.images.train_teacher as train_teacher_vision
    from tasks.images.export import export_images
    from tasks.images.prepare import prepare_images
    from tasks.onnx_models import INPUT, OUTPUT, session

    teacher, _, _ = teacher_and_data
    _, cfg = synthetic_source
    prepare_images(cfg.data.vision, tmp_path / "data", "vision")
    sha = export_teacher(teacher, tmp_path / "mine.onnx")
    params = cfg.model_dump(by_alias=True)
    params["teacher"]["vision"]["pretrained"] = {"path": "mine.onnx", "sha256": sha, "format": "onnx",
                                                 "logits": "scores", "features": ["stage0", "stage1"]}
    params["distill"]["vision"] |= {"epochs": 1, "batch_size": 128, "threads": 1,
                                    "feature_pairs": [{"teacher": 1, "student": 1}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    monkeypatch.setattr(sys, "argv", ["train_teacher_vision", "--data", "data", "--checkpoint", "ck/t/last.pt",
                                      "--model", "teacher.pt", "--metrics", "teacher.json", "--plots", "teacher.csv"])
    train_teacher_vision.main("vision")
    meta = model_meta(tmp_path / "teacher.pt")
    assert meta["kind"] == "onnx" and meta["arch"].sha256 == sha and meta["arch"].features == ["stage0", "stage1"]
    metrics = json.loads((tmp_path / "teacher.json").read_text())
    test = Split.load(tmp_path / "data", "test")
    with torch.no_grad():
        expected = (teacher(test.inputs()).argmax(1) == test.y).float().mean().item()
    assert metrics["test_accuracy"] == pytest.approx(expected, abs=1e-3)
    assert metrics["parameters"] == count_parameters(load_model(tmp_path / "teacher.pt")) > 0
    assert (tmp_path / "teacher.csv").read_text() == "epoch\n" and (tmp_path / "ck" / "t").is_dir()
    assert 0 < count_nonzero(load_model(tmp_path / "teacher.pt")) <= metrics["parameters"]

    import mlflow
    run = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`teacher.imported.sha256` = '{sha}'")
    assert len(run) == 1

    monkeypatch.setattr(sys, "argv", ["distill_vision", "--data", "data", "--teacher", "teacher.pt",
                                      "--checkpoint", "ck/s/last.pt", "--model", "student.pt",
                                      "--metrics", "student.json", "--plots", "student.csv"])
    distill_vision.main("vision")
    assert json.loads((tmp_path / "student.json").read_text())["teacher_test_accuracy"] == pytest.approx(expected, abs=1e-3)

    cfg = load_config(tmp_path / "params.yaml")
    export = cfg.export.vision.model_copy(update={"calibration_size": 64})
    checks = export_images(export, cfg.qat.vision, tmp_path / "data", tmp_path / "teacher.pt",
                           tmp_path / "student.pt", tmp_path / "student.pt", tmp_path / "onnx")
    assert checks["teacher_fp32"]["top1_agreement"] == 1.0
    sess = session(tmp_path / "onnx" / "teacher_fp32.onnx")
    assert [i.name for i in sess.get_inputs()] == [INPUT] and [o.name for o in sess.get_outputs()] == [OUTPUT]
    out = sess.run([OUTPUT], {INPUT: test.inputs(slice(4)).numpy()})[0]
    np.testing.assert_allclose(out, teacher(test.inputs(slice(4))).detach().numpy(), atol=1e-4)


def test_feature_pairs_need_features_the_onnx_teacher_names(raw_params):
    from tasks.config import parse_config
    from tasks.errors import ConfigError

    teacher = {**raw_params["teacher"]["vision"],
               "pretrained": {"path": "t.onnx", "sha256": "0" * 64, "format": "onnx"}}
    params = {**raw_params, "teacher": {**raw_params["teacher"], "vision": teacher}}
    if raw_params["distill"]["vision"].get("feature_pairs"):
        with pytest.raises(ConfigError, match="feature_pairs.0.teacher: .*name them in teacher.vision.pretrained.features"):
            parse_config(params)
    teacher["pretrained"]["features"] = ["a", "b", "c", "d"]
    parse_config(params)


def test_the_onnx_export_snippet_of_the_docs_makes_a_teacher_the_import_takes(tmp_path, monkeypatch):
    """docs/byom.md's step 1 (ONNX), run as written on a small model. Before: without ``dynamo=False`` torch 2.13
    wrote the weights beside the file (``.onnx.data``), and the import refused the teacher the docs told users to
    make."""
    from tasks.imported_teacher import load_pretrained

    docs = (Path(__file__).resolve().parents[2] / "docs" / "byom.md").read_text()
    step = docs.split("## Step by step (ONNX)", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", step, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    code = compile("import torch\n" + "\n".join(line.strip() for line in snippet.splitlines()), "byom.md", "exec")
    exec(code, {"model": model})  # noqa: S102 - the docs' snippet, run as written
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["my_teacher.onnx"]
    spec = PretrainedTeacher(path="models/my_teacher.onnx", format="onnx", logits="scores", features=[],
                             sha256=hashlib.sha256((tmp_path / "models/my_teacher.onnx").read_bytes()).hexdigest())
    x = torch.rand(3, 1, 28, 28)
    teacher = load_pretrained(spec, "teacher.vision.pretrained", (x,), [10], 4, lambda: None)
    with torch.no_grad():
        scores = teacher(x)
        assert torch.allclose(scores[0] if isinstance(scores, tuple) else scores, model(x), atol=1e-5)
