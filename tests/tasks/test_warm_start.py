"""Warm start: the plan (scratch, fine-tune, reuse the teacher for k versions), the champion's weights fetched from
its registering run and fitted to today's data, and the training knobs of a fine-tuning run."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks.artifacts import save_model
from tasks.ctr.ctr_training import load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.family_config import WarmStart
from tasks.recsys.family import paired_data
from tasks.recsys.prepare import VOCABULARY
from tasks.recsys.warm_start import adapt
from tasks.warm_plan import ARTIFACTS, FILES, MODE, PLAN, fine_tuned, start_from
from tasks.warm_start import data_params, plan_training, warm_start
from tests.conftest import known_rows_only, older_and_grown


def _policy(policy: str = "fine_tune", every: int = 1) -> WarmStart:
    return WarmStart(policy=policy, teacher_every=every,
                     fine_tune={"teacher_epochs": 2, "student_epochs": 3, "lr_scale": 0.25})


def _champion(trained_at: int | None) -> dict:
    return {"version": "4", "trained_at": trained_at, "teacher": True, "student": True}


def test_the_plan_trains_from_scratch_without_a_champion_and_reuses_the_teacher_for_k_versions():
    assert plan_training(_policy(), 5, None)["teacher"] == "scratch"
    fine = plan_training(_policy(), 5, _champion(4))
    assert (fine["teacher"], fine["student"], fine["champion"], fine["teacher_versions"]) == ("fine_tune",
                                                                                            "fine_tune", "4", 5)
    # teacher every 3 versions: trained on version 4, it serves 5 and 6 as it is, and is trained again on 7
    assert [plan_training(_policy(every=3), v, _champion(4))["teacher"] for v in (5, 6, 7)] == \
        ["reuse", "reuse", "fine_tune"]
    assert plan_training(_policy(every=3), 6, _champion(4))["teacher_versions"] == 4
    scratch = plan_training(_policy("scratch", every=3), 7, _champion(4))
    assert (scratch["teacher"], scratch["student"]) == ("scratch", "scratch")   # scratch: the weights start anew
    assert plan_training(_policy("scratch", every=3), 5, _champion(4))["teacher"] == "reuse"
    # a champion registered before versions kept a plan (or a snapshot that shrank): the teacher is trained
    assert plan_training(_policy(every=3), 5, _champion(None))["teacher"] == "fine_tune"
    assert plan_training(_policy(every=3), 3, _champion(4))["teacher"] == "fine_tune"
    # teacher every version: trained again even on the data version its champion was trained on (a re-run)
    assert plan_training(_policy(every=1), 4, _champion(4))["teacher"] == "fine_tune"


def test_fine_tuning_knobs_scale_the_peak_rate_and_keep_the_type(config):
    spec = config.distill.recsys
    tuned = fine_tuned(spec, _policy().fine_tune, 3)
    assert type(tuned) is type(spec) and tuned.epochs == 3
    assert tuned.optimizer.lr == pytest.approx(spec.optimizer.lr * 0.25)
    assert tuned.schedule == spec.schedule and tuned.student == spec.student


def _blob(model: CtrModel, shape: dict) -> dict:
    """A model file's content, as the training stages write it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, "ctr", model.arch, Path(tmp) / "model.pt", shape=shape)
        return torch.load(Path(tmp) / "model.pt", weights_only=True)


def test_the_champions_model_reads_new_data_by_vocabulary_and_scores_known_rows_as_before(synthetic_movielens,
                                                                                          tmp_path):
    """New users and items shift every embedding row: the champion's rows are carried to their values' new rows, so
    on the ratings both vocabularies hold the adapted model scores exactly what the champion scored."""
    _, _, cfg = synthetic_movielens
    old, new = older_and_grown(cfg, tmp_path)
    torch.manual_seed(0)
    *_, old_shape = load_ctr_data(old)
    champion = CtrModel(cfg.teacher.recsys.arch, **old_shape).eval()
    with torch.no_grad():   # rows that differ, so a row carried to the wrong place shows
        champion.linear.weight.normal_()
        champion.embedding.weight.normal_()
    folder = tmp_path / "registered"
    folder.mkdir()
    (folder / VOCABULARY).write_text((old / VOCABULARY).read_text())

    fitted = adapt(_blob(champion, old_shape), folder, new)
    *_, new_shape = load_ctr_data(new)
    assert fitted["shape"] == new_shape and new_shape["vocabulary"] > old_shape["vocabulary"]
    model = CtrModel(cfg.teacher.recsys.arch, **new_shape).eval()
    model.load_state_dict(fitted["state_dict"])
    paired, mine = paired_data(folder, new, tmp_path / "pairs", known_rows_only(cfg))
    with torch.no_grad():
        before = champion(torch.from_numpy(np.load(paired / "test_fields.npy")),
                          torch.from_numpy(np.load(paired / "test_genres.npy")))
        after = model(torch.from_numpy(np.load(mine / "test_fields.npy")),
                      torch.from_numpy(np.load(mine / "test_genres.npy")))
    torch.testing.assert_close(after, before)
    # a user the champion never saw starts at the user field's mean row
    theirs, ours = (json.loads((d / VOCABULARY).read_text()) for d in (old, new))
    unseen = next(i for i, v in enumerate(ours["user"]) if v not in theirs["user"])
    torch.testing.assert_close(fitted["state_dict"]["embedding.weight"][unseen],
                               champion.embedding.weight[: len(theirs["user"])].mean(0))
    assert adapt(_blob(champion, old_shape), tmp_path / "pairs", new) is None   # no vocabulary kept: from scratch


def test_a_champion_of_another_architecture_is_not_started_from(synthetic_movielens, tmp_path, capsys):
    _, _, cfg = synthetic_movielens
    *_, shape = load_ctr_data(older_and_grown(cfg, tmp_path)[1])
    teacher = CtrModel(cfg.teacher.recsys.arch, **shape)
    warm = tmp_path / "warm"
    warm.mkdir()
    torch.save(_blob(teacher, shape), warm / FILES["teacher"])
    (warm / PLAN).write_text(json.dumps({"teacher": "fine_tune", "student": "scratch", "champion": "2"}))
    spec = cfg.teacher.recsys
    fresh = CtrModel(spec.arch, **shape)
    mode, tuned = start_from(warm, "teacher", fresh, spec.arch, shape, spec, _policy())
    assert mode == "fine_tune" and tuned.epochs == 2
    torch.testing.assert_close(fresh.state_dict()["embedding.weight"], teacher.state_dict()["embedding.weight"])
    other = spec.arch.model_copy(update={"dim": spec.arch.dim * 2})
    mode, same = start_from(warm, "teacher", CtrModel(other, **shape), other, shape, spec, _policy())
    assert (mode, same) == ("scratch", spec) and "another architecture" in capsys.readouterr().err


class _Registry:
    """A registry holding the recommender's versions whose registering runs kept their weights and warm-start plan
    (as ``flows.gating.keep_warm_start`` does), trained on the older data of ``older_and_grown``."""

    def __init__(self, cfg, tmp_path: Path, mlflow_uri: str) -> None:
        self.cfg, self.tmp, self.kept = cfg, tmp_path, 0
        self.old, self.new = older_and_grown(cfg, tmp_path)
        *_, self.shape = load_ctr_data(self.old)
        self.client = MlflowClient(mlflow_uri)
        self.experiment = self.client.create_experiment("warm", (tmp_path / "art").as_uri())
        self.name = cfg.gate.recsys.registered_model
        self.client.create_registered_model(self.name)

    def register(self, plan: dict, teacher_mode: str | None = None) -> str:
        """A version whose run kept a model as teacher (trained as ``teacher_mode``) and student, and ``plan``."""
        self.kept += 1
        kept = self.tmp / f"kept-{self.kept}"
        kept.mkdir()
        model = CtrModel(self.cfg.teacher.recsys.arch, **self.shape)
        for role in FILES:
            save_model(model, "ctr", model.arch, kept / FILES[role], shape=self.shape,
                       **({MODE: teacher_mode} if role == "teacher" and teacher_mode else {}))
        (kept / PLAN).write_text(json.dumps(plan))
        (kept / VOCABULARY).write_text((self.old / VOCABULARY).read_text())
        run = self.client.create_run(self.experiment).info.run_id
        self.client.log_artifacts(run, str(kept), ARTIFACTS)
        return str(self.client.create_model_version(self.name, f"runs:/{run}/model", run).version)


@pytest.mark.slow
def test_the_stage_fetches_the_champions_weights_from_its_registering_run(synthetic_movielens, tmp_path,
                                                                          mlflow_uri, capsys):
    _, _, cfg = synthetic_movielens
    tuned = cfg.model_copy(update={"warm_start": cfg.warm_start.model_copy(update={"recsys": _policy(every=2)})})
    registry = _Registry(cfg, tmp_path, mlflow_uri)
    client, name, new = registry.client, registry.name, registry.new

    def register(teacher_mode: str, params: str) -> str:
        """Trained on 2 data versions (the snapshot's first two batches), its teacher on the first."""
        return registry.register({"versions": 2, "teacher_versions": 1, "data_params": params,
                                  "history": ["b0", "b1"]}, teacher_mode)

    snapshot = tmp_path / "raw"
    snapshot.mkdir()
    (snapshot / "snapshot.json").write_text(json.dumps({"batches": [{"id": f"b{i}"} for i in range(3)]}))
    out = tmp_path / "out"
    plan = warm_start(tuned, "recsys", snapshot, new, out, adapt)
    assert (plan["teacher"], plan["student"], plan["champion"]) == ("scratch", "scratch", None)   # no champion yet
    assert sorted(p.name for p in out.iterdir()) == [PLAN]

    reused = register("reuse", data_params(cfg, "recsys"))
    client.set_registered_model_alias(name, "champion", reused)
    plan = warm_start(tuned, "recsys", snapshot, new, out, adapt)
    # its teacher was reused on version 2, so trained on version 1: two versions ago, it is trained again
    assert (plan["teacher"], plan["student"], plan["champion"]) == ("fine_tune", "fine_tune", reused)
    assert json.loads((out / PLAN).read_text()) == plan
    *_, new_shape = load_ctr_data(new)
    for role in FILES:   # in today's vocabulary
        assert torch.load(out / FILES[role], weights_only=True)["shape"] == new_shape

    trained = register("fine_tune", data_params(cfg, "recsys"))   # its teacher trained on version 2: reused now
    client.set_registered_model_alias(name, "champion", trained)
    pinned = warm_start(tuned, "recsys", snapshot, new, out, adapt, previous=plan)
    assert pinned["champion"] == reused   # a re-run on the same snapshot starts where the first did
    plan = warm_start(tuned, "recsys", snapshot, new, out, adapt)
    assert (plan["teacher"], plan["teacher_versions"], plan["champion"]) == ("reuse", 2, trained)

    other = register("fine_tune", "0" * 64)   # trained on rows split by other data params: never started from
    client.set_registered_model_alias(name, "champion", other)
    plan = warm_start(tuned, "recsys", snapshot, new, out, adapt)
    assert (plan["teacher"], plan["student"], plan["champion"]) == ("scratch", "scratch", None)
    assert "split by other data.recsys params" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.fault("runs", "the artifact store fails while the warm start fetches the champion's weights",
                   "a transient error (the stage is retried), no plan written; a champion whose run kept no weights "
                   "trains from scratch, said on stderr (before: a failing store read as that, so the data version "
                   "trained from scratch and its re-runs never asked the registry again)")
def test_an_artifact_store_that_fails_is_not_read_as_a_champion_without_weights(synthetic_movielens, tmp_path,
                                                                                mlflow_uri, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from tasks.errors import ServiceUnavailable

    _, _, cfg = synthetic_movielens
    tuned = cfg.model_copy(update={"warm_start": cfg.warm_start.model_copy(update={"recsys": _policy(every=2)})})
    registry = _Registry(cfg, tmp_path, mlflow_uri)
    champion = registry.register({"versions": 2, "teacher_versions": 1, "data_params": data_params(cfg, "recsys"),
                                  "history": ["b0", "b1"]}, "fine_tune")
    registry.client.set_registered_model_alias(registry.name, "champion", champion)
    snapshot, out = tmp_path / "raw", tmp_path / "out"
    snapshot.mkdir()
    (snapshot / "snapshot.json").write_text(json.dumps({"batches": [{"id": f"b{i}"} for i in range(3)]}))

    def unanswered(self, *args, **kwargs):
        raise MlflowException("the artifact store did not answer")

    with monkeypatch.context() as broken:
        broken.setattr(MlflowClient, "download_artifacts", unanswered)
        with pytest.raises(ServiceUnavailable, match=rf"the artifact store of {registry.name} version {champion} is "
                                                     r"not reachable .*; no warm start planned"):
            warm_start(tuned, "recsys", snapshot, registry.new, out, adapt)
    assert not (out / PLAN).exists()
    assert warm_start(tuned, "recsys", snapshot, registry.new, out, adapt)["champion"] == champion   # answered now

    run = registry.client.create_run(registry.experiment).info.run_id   # a version whose run kept no weights
    bare = registry.client.create_model_version(registry.name, f"runs:/{run}/model", run).version
    registry.client.set_registered_model_alias(registry.name, "champion", str(bare))
    plan = warm_start(tuned, "recsys", snapshot, registry.new, out, adapt)
    assert (plan["teacher"], plan["student"], plan["champion"]) == ("scratch", "scratch", None)
    assert f"version {bare}: no warm_start/ weights to read" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.fault("data", "a champion trained on a snapshot today's does not extend (another bootstrap, batches in "
                   "another order), its data split by the same params",
                   "never started from: the warm start trains from scratch and says why (before: fine-tuned from, "
                   "though its training rows may be today's test rows)")
def test_a_champion_of_another_snapshot_history_is_not_started_from(synthetic_movielens, tmp_path, mlflow_uri,
                                                                    capsys):
    _, _, cfg = synthetic_movielens
    tuned = cfg.model_copy(update={"warm_start": cfg.warm_start.model_copy(update={"recsys": _policy(every=2)})})
    registry = _Registry(cfg, tmp_path, mlflow_uri)
    snapshot = tmp_path / "raw"
    snapshot.mkdir()
    (snapshot / "snapshot.json").write_text(json.dumps({"batches": [{"id": f"b{i}", "digest": f"d{i}"}
                                                                    for i in range(3)]}))
    for history, started in ((["dX", "d1"], False), (["d1", "d0"], False), (None, False), (["d0", "d1"], True)):
        plan = {"versions": 2, "teacher_versions": 2, "data_params": data_params(cfg, "recsys")}
        version = registry.register({**plan, **({"history": history} if history else {})})
        registry.client.set_registered_model_alias(registry.name, "champion", version)
        plan = warm_start(tuned, "recsys", snapshot, registry.new, tmp_path / "out", adapt)
        assert (plan["champion"] == version) is started, history
        assert plan["history"] == ["d0", "d1", "d2"]   # what the next run holds its champion to
        err = capsys.readouterr().err
        assert started or ("not the first of today's" if history else "recorded no snapshot history") in err, err
