"""CTR models, distillation and INT8 export on small random tables: real PyTorch, real onnxruntime."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tasks.ctr.config import RecArch
from tasks.ctr.ctr_onnx import export_ctr_fp32, export_ctr_int8, onnx_probabilities
from tasks.ctr.ctr_training import CtrDistiller, CtrSplit, distilled_loss, fit_ctr, predict_logits
from tasks.ctr.models import CtrModel, convert_ctr_int8, prepare_ctr_qat, quantize_table
from tasks.family_config import LossWeights

SHAPE = {"vocabulary": 60, "fields": 3, "genres": 5}


def _split(n: int = 512, seed: int = 0) -> CtrSplit:
    gen = torch.Generator().manual_seed(seed)
    fields = torch.stack([torch.randint(0, 20, (n,), generator=gen), torch.randint(20, 50, (n,), generator=gen),
                          torch.randint(50, 60, (n,), generator=gen)], 1)
    genres = (torch.rand(n, 5, generator=gen) < 0.3).float()
    y = ((fields[:, 0] % 2 == 0) ^ (fields[:, 1] % 3 == 0)).float()  # learnable from the ids
    return CtrSplit(fields, genres, y)


def _model(seed: int = 0, **arch) -> CtrModel:
    torch.manual_seed(seed)
    model = CtrModel(RecArch(**{"dim": 8, "fm": True, "mlp": [16], **arch}), **SHAPE)
    for table in (model.embedding, model.linear):
        torch.nn.init.normal_(table.weight, std=0.3)
    return model


def test_fm_term_equals_the_sum_over_field_pairs():
    model = _model(mlp=[])
    data = _split(8)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.genre_linear.weight.zero_()
        logit, vectors = model.forward_features(data.fields, data.genres)
    pairs = sum((vectors[:, i] * vectors[:, j]).sum(1) for i, j in itertools.combinations(range(vectors.shape[1]), 2))
    assert torch.allclose(logit, pairs, atol=1e-5)


def test_quantized_tables_are_per_row_except_one_column_tables():
    weight = torch.randn(6, 4) * torch.arange(1, 7).float()[:, None]
    q, scale = quantize_table(weight)
    assert q.dtype == torch.int8 and scale.shape == (6, 1)
    assert (q.abs().amax(1) == 127).all()  # each row uses its full range
    assert torch.allclose(q.float() * scale, weight, atol=float(scale.max()) / 2 + 1e-6)
    assert quantize_table(torch.randn(6, 1))[1].shape == (1, 1)


def test_distillation_moves_the_student_only_and_learns():
    teacher, student = _model(seed=1, dim=16, mlp=[32]), _model(seed=2)
    before = [p.detach().clone() for p in teacher.parameters()]
    cfg_weights = LossWeights(ground_truth=0.3, target=0.7, feature=0.5, label=0.1)
    from tasks.ctr.config import DistillCtr
    from tasks.family_config import Optimizer, Schedule

    cfg = DistillCtr(epochs=3, batch_size=64, optimizer=Optimizer(name="adamw", lr=0.01, weight_decay=0.0),
                     schedule=Schedule(name="constant"), seed=0, threads=1, student=student.arch,
                     temperature=2.0, weights=cfg_weights)
    distiller = CtrDistiller(student, teacher, cfg)
    assert all(p is not q for p in distiller.parameters() for q in teacher.parameters())
    train = _split()
    history = fit_ctr(distiller, distilled_loss, train, _split(128, seed=1), cfg)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


@pytest.mark.parametrize("mlp_bits", [7, 4])
def test_int8_onnx_stores_int8_tables_and_matches_the_qat_model(tmp_path, mlp_bits):
    """4-bit MLP weights are stored as INT4 (opset 21) beside the INT8 tables, computing the same numbers."""
    from tasks.int4 import weight_types

    torch.backends.quantized.engine = "x86"
    qat = prepare_ctr_qat(_model(), mlp_bits, True)
    data = _split(256)
    qat.train()
    with torch.no_grad():
        for i in range(0, 256, 64):  # let the activation observers see data
            qat(data.fields[i:i + 64], data.genres[i:i + 64])
    path = export_ctr_int8(convert_ctr_int8(qat), tmp_path / "int8.onnx")
    graph = onnx.load(str(path)).graph
    tables = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".weight.int8")}
    assert tables["model.embedding.weight.int8"].dtype == np.int8 and tables["model.embedding.weight.int8"].shape == (60, 8)
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= 4
    # the three tables (full INT8 range per row) stay INT8; the two quantized MLP weights follow QAT
    assert weight_types(path) == ({"INT8": 3, "INT4": 2} if mlp_bits == 4 else {"INT8": 5})
    opset = next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "")
    assert opset == (21 if mlp_bits == 4 else 17)
    reference = torch.sigmoid(torch.from_numpy(predict_logits(qat, data))).numpy()
    assert np.abs(onnx_probabilities(path, data) - reference).max() < 0.01

    fp32 = export_ctr_fp32(_model(), tmp_path / "fp32.onnx")
    assert path.stat().st_size < fp32.stat().st_size


@pytest.mark.parametrize("mlp_bits", [7, 4])
def test_weights_that_grew_past_their_frozen_range_export_as_trained(tmp_path, mlp_bits):
    """Before: observers freeze before QAT ends, weights keep moving, and ``convert_fx`` quantized the grown weights
    anew (values up to ±9 where training clamped to ±7), so the ONNX file computed something else than the trained
    model, and at 4 bits such weights no longer fitted INT4 and silently stayed INT8."""
    from tasks.int4 import weight_types
    from tasks.observers import freeze_observers

    torch.backends.quantized.engine = "x86"
    qat = prepare_ctr_qat(_model(), mlp_bits, True)
    data = _split(256)
    with torch.no_grad():
        for i in range(0, 256, 64):
            qat(data.fields[i:i + 64], data.genres[i:i + 64])
        freeze_observers(qat)
        for layer in qat.mlp.modules():   # training after the freeze moved the weights past the observed range
            if hasattr(layer, "weight_fake_quant"):
                layer.weight.mul_(1.15)
    qat.eval()
    path = export_ctr_int8(convert_ctr_int8(qat), tmp_path / "int8.onnx")
    if mlp_bits == 4:
        assert weight_types(path) == {"INT8": 3, "INT4": 2}
    reference = torch.sigmoid(torch.from_numpy(predict_logits(qat, data))).numpy()
    assert np.abs(onnx_probabilities(path, data) - reference).max() < 1e-3


@pytest.mark.parametrize("arch", [{"mlp": []}, {"fm": False, "mlp": []}])
def test_fm_and_lr_students_export_without_an_mlp(tmp_path, arch):
    model = _model(**arch)
    path = export_ctr_int8(convert_ctr_int8(prepare_ctr_qat(model, 7, True)), tmp_path / "m.onnx")
    data = _split(64)
    reference = torch.sigmoid(torch.from_numpy(predict_logits(model, data))).numpy()
    assert np.abs(onnx_probabilities(path, data) - reference).max() < 0.02


def test_pruned_dimensions_keep_the_model_function_on_what_is_kept():
    from tasks.ctr.compression import prune_dimensions

    model, data = _model().eval(), _split(32)
    assert torch.allclose(prune_dimensions(model, 8).eval()(data.fields, data.genres), model(data.fields, data.genres),
                          atol=1e-6)
    with torch.no_grad():  # dimension 3 carries (almost) nothing: it is the one removed
        model.embedding.weight[:, 3] *= 1e-5
        model.genre_embedding.weight[:, 3] *= 1e-5
    narrow = prune_dimensions(model, 7).eval()
    assert narrow.arch.dim == 7 and narrow.mlp[0].in_features == 7 * (SHAPE["fields"] + 1)
    assert torch.allclose(narrow(data.fields, data.genres), model(data.fields, data.genres), atol=1e-3)


def test_shared_rows_export_a_small_index_and_match_in_onnxruntime(tmp_path):
    from tasks.ctr.compression import share_rows

    torch.backends.quantized.engine = "x86"
    model = _model()
    shared = share_rows(model, 12)
    assert shared.embedding.num_embeddings == 12 and shared.row_map.shape == (SHAPE["vocabulary"],)
    assert set(shared.row_map.tolist()) == set(range(12))
    qat = prepare_ctr_qat(shared, 7, True)
    data = _split(128)
    with torch.no_grad():
        qat(data.fields, data.genres)
    path = export_ctr_int8(convert_ctr_int8(qat), tmp_path / "shared.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert inits["model.row_map.index"].dtype == np.uint8 and inits["model.embedding.weight.int8"].shape == (12, 8)
    reference = torch.sigmoid(torch.from_numpy(predict_logits(qat, data))).numpy()
    assert np.abs(onnx_probabilities(path, data) - reference).max() < 0.01


def test_a_model_file_saved_before_the_click_through_kit_still_loads(tmp_path):
    """Model files written before the recommender's model code moved to ``tasks.ctr`` name their architecture
    ``tasks.recsys.config:RecArch``: a champion registered then is still loaded (to warm-start from, to compare)."""
    from tasks.artifacts import load_model, save_model

    model = _model(seed=3, mlp=[8])
    save_model(model, "ctr", model.arch, tmp_path / "new.pt", shape=SHAPE)
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    assert blob["arch_class"] == "tasks.ctr.config:RecArch"
    torch.save({**blob, "arch_class": "tasks.recsys.config:RecArch"}, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    fields, genres = torch.randint(0, SHAPE["vocabulary"], (4, SHAPE["fields"])), torch.rand(4, SHAPE["genres"])
    assert isinstance(loaded, CtrModel) and torch.equal(loaded(fields, genres), model.eval()(fields, genres))


@pytest.mark.slow
def test_auc_and_logloss_are_scikit_learns_and_the_training_stages_do_not_import_it():
    """The metrics every epoch of a CTR stage reads: computed with numpy (before: scikit-learn's, ~1.2 CPU-s of
    imports in each training and export stage's process), to rounding its values, ties and clipping
    (the logloss's) included."""
    from sklearn.metrics import log_loss, roc_auc_score

    from tasks.ctr.ctr_training import ctr_metrics
    from tasks.errors import PipelineError
    from tests.conftest import imported_by

    rng = np.random.default_rng(0)
    for decimals in (None, 2, 0):   # distinct scores; many ties; all but two values tied (0 and 1, then clipped)
        y = (rng.random(4000) < 0.3).astype(np.float32)
        p = (rng.random(4000) * 0.8 + 0.1 * y).astype(np.float32)
        p = p if decimals is None else np.round(p, decimals)
        clipped = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        ours = ctr_metrics(y, p)
        assert ours["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert ours["logloss"] == pytest.approx(log_loss(y, clipped, labels=[0, 1]), rel=1e-12)
    assert np.isnan(ctr_metrics(np.ones(5, dtype=np.float32), np.full(5, 0.5))["auc"])   # scikit-learn's: NaN
    # the ranking of a confident model's scores, clipped only for the logloss (before: tied by the clip, AUC 0.5)
    assert ctr_metrics(np.array([1, 0, 1, 0]), np.array([1.0, 1 - 1e-8, 1e-9, 1e-10]))["auc"] == 0.75
    for labels, probabilities, refused in ((np.ones(3), np.ones((3, 1)), None), (np.ones(3), np.ones(4), "3 labels"),
                                           ([0, 2, 1], np.ones(3), "must be 0 or 1"),
                                           ([0, 1, 1], [0.1, np.nan, 0.2], "1 of 3 probabilities are not finite")):
        if refused is None:   # a column of probabilities is read as the vector it is
            assert ctr_metrics(labels, probabilities)["logloss"] == pytest.approx(-np.log(1 - 1e-7))
        else:   # a diverged model's NaN is a PipelineError (the stage is not retried for it), the others bugs
            with pytest.raises(PipelineError if "finite" in refused else ValueError, match=refused):
                ctr_metrics(labels, probabilities)
    stages = ("tasks.recsys.train_teacher", "tasks.recsys.distill", "tasks.recsys.prune", "tasks.recsys.qat",
              "tasks.recsys.export", "tasks.clicks.distill")
    assert imported_by("\n".join(f"import {stage}" for stage in stages), ("sklearn",)) == []


def test_ctr_parity_fails_on_probabilities_that_are_not_finite_or_an_auc_delta_that_is_not_a_number():
    """Before: a NaN AUC delta (test labels of one class) compared False with the limit, and parity passed."""
    from tasks.ctr.config import ExportCtr
    from tasks.ctr.export import ctr_parity
    from tasks.errors import ParityError

    cfg = ExportCtr.model_validate({"opset": 17, "threads": 1, "parity": {
        "min_rows_within": 0.99, "max_probability_diff": 0.01, "max_auc_delta": 0.001}})
    p = np.linspace(0.1, 0.9, 8)
    assert ctr_parity("f", p, p, np.array([0, 1] * 4), cfg)["auc_delta"] == 0.0
    with pytest.raises(ParityError, match=r"AUC delta nan"):
        ctr_parity("f", p, p, np.zeros(8), cfg)
    with pytest.raises(ParityError, match=r"^f: 1 of 8 test rows' probabilities are not finite"):
        ctr_parity("f", p, np.where(p > 0.85, np.nan, p), np.array([0, 1] * 4), cfg)


def test_sharing_into_as_many_clusters_as_rows_is_refused_in_one_line_before_any_data_is_read(tmp_path, raw_params):
    """Before: scikit-learn's k-means ValueError, a traceback, after the teacher, distillation, pruning and QAT had
    run (the smoke profile's 128 clusters on a small table of ~70 ids)."""
    from tasks.artifacts import save_model
    from tasks.ctr.config import DistillCtr, ShareCtr
    from tasks.ctr.share import share_ctr
    from tasks.errors import ConfigError

    model = _model()
    save_model(model, "ctr", model.arch, tmp_path / "student.pt", shape=SHAPE)
    cfg = ShareCtr.model_validate({**raw_params["share"]["recsys"], "clusters": 60})
    kd = DistillCtr.model_validate(raw_params["distill"]["recsys"])
    with pytest.raises(ConfigError, match=r"^share\.clicks\.clusters \(60\) must be fewer than the 60 embedding rows"):
        share_ctr(cfg, kd, True, tmp_path / "no-data", tmp_path / "no-teacher.pt", tmp_path / "student.pt",
                  where="share.clicks")
