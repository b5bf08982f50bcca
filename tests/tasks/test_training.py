from __future__ import annotations

import json

import pytest
import torch

from tasks.artifacts import count_parameters
from tasks.checkpoints import load_checkpoint, save_checkpoint
from tasks.family_config import Optimizer, Schedule
from tasks.image_training import Pixels, Split, augment, evaluate, fit, memory_format
from tasks.images.arch_config import ResNetArch
from tasks.images.config import Augmentation, TrainingRecipe
from tasks.images.models import ResNetTeacher

ARCH = ResNetArch(stem=4, widths=[8, 16], blocks=[1, 1])


def _data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=gen))


def _spec(epochs=2):
    return TrainingRecipe(epochs=epochs, batch_size=32, optimizer=Optimizer(name="sgd", lr=0.05, weight_decay=5e-4),
                          schedule=Schedule(name="onecycle", warmup_fraction=0.3),
                          augmentation=Augmentation(crop_padding=2, horizontal_flip=True),
                          label_smoothing=0.1, seed=0, threads=2, bf16=False, eval_batch_size=64)


def _model():
    torch.manual_seed(0)
    return ResNetTeacher(ARCH).to(memory_format=memory_format())


def test_teacher_shapes_and_features():
    model = _model().eval()
    x = _data(4).inputs()
    assert model(x).shape == (4, 10)
    logits, maps = model.forward_features(x)
    assert torch.equal(logits, model(x)) and [f.shape[1:] for f in maps] == [(8, 14, 14), (16, 7, 7)]
    assert count_parameters(model) > 0


@pytest.mark.fault("runs", "a learning rate at which the image training diverges (its loss NaN)",
                   "TrainingDiverged naming the epoch and the rate, no checkpoint of NaN weights (before: every "
                   "later epoch trained NaN weights and the stage shipped them)")
def test_a_diverged_image_run_stops_at_the_epoch_it_diverged(tmp_path):
    from tasks.image_training import TrainingDiverged

    spec = _spec(epochs=3).model_copy(update={"optimizer": Optimizer(name="sgd", lr=1e12, weight_decay=5e-4)})
    with pytest.raises(TrainingDiverged, match=r"epoch 1/3: the training loss is nan: the run diverged at learning "
                                               r"rate 1e\+12 \(lower it\)"):
        fit(_model(), _data(), _data(32, seed=1), spec, tmp_path / "ck.pt", "fp")
    assert not (tmp_path / "ck.pt").exists()


def test_augment_keeps_shape_and_is_seeded():
    x = _data(8).inputs()
    cfg = Augmentation(crop_padding=2, horizontal_flip=True)
    a = augment(x, cfg, torch.Generator().manual_seed(1), Pixels())
    b = augment(x, cfg, torch.Generator().manual_seed(1), Pixels())
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_training_learns_a_separable_task(tmp_path):
    labels = torch.arange(256) % 2
    gen = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 100, (256, 28, 28), generator=gen, dtype=torch.uint8)
    data = Split(torch.where(labels[:, None, None] == 1, dark + 155, dark), labels)  # brightness is the class
    model = _model()
    before = evaluate(model, data, 64)["accuracy"]
    history = fit(model, data, data, _spec(epochs=4), tmp_path / "ck.pt", "fp")
    assert len(history) == 4 and history[-1]["val_accuracy"] > max(before, 0.8)


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    """Before: the resumed run called ``on_epoch`` for its new epochs only, so a finished run's MLflow curves started
    at the epoch it resumed from."""
    train, val = _data(), _data(32, seed=1)
    uninterrupted = _model()
    fit(uninterrupted, train, val, _spec(), tmp_path / "a.pt", "fp")

    def stop_after_first(epoch, _metrics):
        if epoch == 0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(_model(), train, val, _spec(), tmp_path / "b.pt", "fp", on_epoch=stop_after_first)
    resumed, logged = _model(), []
    history = fit(resumed, train, val, _spec(), tmp_path / "b.pt", "fp",
                  on_epoch=lambda epoch, metrics: logged.append((epoch, metrics)))
    assert len(history) == 2
    assert logged == list(enumerate(history))   # every epoch, the restored one too, with its own step
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_one_cycle_trains_at_the_momentum_it_is_given():
    """Before: torch's OneCycleLR cycled every SGD momentum between 0.85 and 0.95 whatever the params said."""
    from torch import nn

    from tasks.training import make_optimizer, make_scheduler

    def momenta(schedule: Schedule) -> list[float]:
        opt = make_optimizer(nn.Linear(3, 2), Optimizer(name="sgd", lr=0.1, momentum=0.5, weight_decay=0.0))
        scheduler, seen = make_scheduler(opt, schedule, 20), []
        for _ in range(20):
            seen.append(opt.param_groups[0]["momentum"])
            opt.step()
            scheduler.step()
        return seen

    assert set(momenta(Schedule(name="onecycle", warmup_fraction=0.25, cycle_momentum=None))) == {0.5}
    cycled = momenta(Schedule(name="onecycle", warmup_fraction=0.25, cycle_momentum=[0.8, 0.9]))
    assert cycled[0] == pytest.approx(0.9) and min(cycled) == pytest.approx(0.8)


def test_adamw_and_a_constant_rate_train_with_the_knobs_they_are_given():
    """Before: AdamW ran at torch's beta1 0.9 whatever optimizer.momentum said, and a constant schedule ignored its
    warmup_fraction: both accepted at load, neither used."""
    from torch import nn

    from tasks.training import make_optimizer, make_scheduler

    adamw = make_optimizer(nn.Linear(3, 2), Optimizer(name="adamw", lr=0.1, momentum=0.8, weight_decay=0.0))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.999)
    opt = make_optimizer(nn.Linear(3, 2), Optimizer(name="sgd", lr=0.1, weight_decay=0.0))
    scheduler, rates = make_scheduler(opt, Schedule(name="constant", warmup_fraction=0.5), 8), []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert make_scheduler(opt, Schedule(name="constant"), 8).get_last_lr() == [0.1, 0.1]   # no warm-up: at once


@pytest.mark.fault("runs", "a corrupted checkpoint (one byte changed)",
                   "SHA-256 mismatch detected, the checkpoint is not loaded, training starts fresh and says why")
def test_corrupted_checkpoint_is_not_loaded(tmp_path, capsys):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"history": [{"a": 1.0}], "model": {"w": torch.ones(3)}}, "fp")
    assert load_checkpoint(path, "fp")["history"] == [{"a": 1.0}]
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert load_checkpoint(path, "fp") is None
    assert "does not match its recorded SHA-256" in capsys.readouterr().err


@pytest.mark.fault("runs", "a kill between the checkpoint's rename and its SHA-256 sidecar's",
                   "the new checkpoint is resumed, its sidecar completed (before: it mismatched the old sidecar and "
                   "training started from scratch)")
def test_a_kill_between_the_two_renames_of_a_checkpoint_loses_no_epoch(tmp_path, monkeypatch):
    from tasks import checkpoints

    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"history": [{"a": 1.0}]}, "fp")
    renames = []

    def killed_after_one(src, dst):
        if renames:
            raise KeyboardInterrupt   # the kill
        renames.append(dst)
        return real(src, dst)

    real = checkpoints.os.replace
    monkeypatch.setattr(checkpoints.os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"history": [{"a": 1.0}, {"a": 2.0}]}, "fp")
    monkeypatch.setattr(checkpoints.os, "replace", real)
    assert load_checkpoint(path, "fp")["history"] == [{"a": 1.0}, {"a": 2.0}]
    assert load_checkpoint(path, "fp")["history"] == [{"a": 1.0}, {"a": 2.0}]   # its sidecar is in place now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck.pt.sha256"]


@pytest.mark.fault("runs", "a checkpoint made with other params or data",
                   "not resumed (fingerprint mismatch), training starts fresh and says why")
def test_checkpoint_of_other_params_is_not_resumed(tmp_path, capsys):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"history": []}, "fp-a")
    assert load_checkpoint(path, "fp-b") is None
    assert "other params, data or code" in capsys.readouterr().err


@pytest.mark.fault("runs", "a stage's code changes after its training finished (DVC re-runs the stage; the params "
                   "and data are the same)", "its finished checkpoint is not resumed: trained again from scratch, "
                   "saying why (before: resumed after its last epoch, handing back the old code's weights as the new "
                   "run's)")
def test_a_checkpoint_made_by_other_code_is_not_resumed(tmp_path, monkeypatch, capsys):
    from tasks import artifacts

    train, val, data = _data(), _data(32, seed=1), tmp_path / "train_x.npy"
    data.write_bytes(b"the same data")
    spec = _spec(epochs=1)
    before = artifacts.fingerprint([spec], [data])
    fit(_model(), train, val, spec, tmp_path / "ck.pt", before)
    assert artifacts.fingerprint([spec], [data]) == before   # nothing changed: the same checkpoint resumes
    monkeypatch.setattr(artifacts, "code_digest", lambda package=None: "the code after an edit")
    after = artifacts.fingerprint([spec], [data])
    capsys.readouterr()
    history = fit(_model(), train, val, spec, tmp_path / "ck.pt", after)
    err = capsys.readouterr().err
    assert after != before and len(history) == 1 and "resuming" not in err and "other params, data or code" in err


def test_the_code_digest_covers_every_python_file_of_the_package(tmp_path):
    """Names and bytes of every ``.py`` file; not other files, an editor's hidden lock file (a dangling symlink
    named ``.#b.py``: reading it failed) or any other dangling link."""
    from pathlib import Path

    from tasks import artifacts
    from tasks.artifacts import code_digest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / "sub" / ".#b.py").symlink_to(tmp_path / "gone")
    (tmp_path / "sub" / "c.py").symlink_to(tmp_path / "gone too")   # dangling, not hidden
    first = code_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still not code")
    assert code_digest(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert code_digest(tmp_path) != first
    assert code_digest() == code_digest(Path(artifacts.__file__).parent)   # by default: the project's tasks package


@pytest.mark.parametrize("warmup,steps", [(0.25, 4), (0.5, 2), (0.1, 10), (0.3, 3)])
def test_a_one_step_warm_up_schedules_instead_of_dividing_by_zero(warmup, steps):
    """Before: one epoch of 400 images in batches of 128 (4 steps) with the vision teacher's 0.25 warm-up made
    torch's OneCycleLR divide by zero as the stage built it, a crash the user could read nothing from."""
    from tasks.training import make_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, Schedule(name="onecycle", warmup_fraction=warmup), steps)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert all(0 < rate <= 0.1 for rate in rates) and rates[-1] == min(rates)   # up to the peak at most, then down


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_a_warm_up_shorter_than_a_step_still_reaches_the_peak_rate(steps):
    """Before: a run of fewer steps than one warm-up step needs (a tiny image folder, a one-batch fine-tune: 3 steps
    at 0.25 warm-up) had no warm-up phase: with one step it trained at the schedule's floor (4e-7 for lr 0.1),
    learning nothing and saying nothing; with 5, no step reached the peak. Now the warm-up lasts a step at
    least: the first at the start rate, the second at the peak; one or two steps run at the peak."""
    from tasks.training import make_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, Schedule(name="onecycle", warmup_fraction=0.25), steps)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert max(rates) == pytest.approx(0.1) and rates.index(max(rates)) == (1 if steps >= 3 else 0)


@pytest.mark.parametrize("right", [False, True])
def test_fit_best_from_start_says_it_kept_the_starting_weights_only_when_no_epoch_beat_them(right, capsys):
    """Before: the batch loop reused the name of the starting score, so with more rows than one batch the message
    compared the history with the last batch's offset and said the starting weights were kept when they were not."""
    from types import SimpleNamespace

    from tasks.training import fit_best

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():   # starts right (nothing can beat it) or wrong (every row in the other class)
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]) * (1 if right else -1))
        model.bias.zero_()
    spec = SimpleNamespace(epochs=3, batch_size=32, seed=0, device="cpu",
                           optimizer=Optimizer(name="sgd", lr=0.5, weight_decay=0.0),
                           schedule=Schedule(name="constant"))

    def scores():
        with torch.no_grad():
            return {"val_accuracy": (model(x).argmax(1) == y).float().mean().item()}

    def loss_fn(m, inputs, target):
        logits = m(inputs)
        return torch.nn.functional.cross_entropy(logits, target), logits

    start = scores()["val_accuracy"]
    history = fit_best(model, loss_fn, len(y), lambda idx: (x[idx], y[idx]), spec, scores, "val_accuracy",
                       from_start=True)
    kept = "no epoch beat the starting weights" in capsys.readouterr().out
    assert kept == (max(h["val_accuracy"] for h in history) <= start)
    assert kept == right and scores()["val_accuracy"] == max(start, *(h["val_accuracy"] for h in history))


def test_fit_best_refuses_a_validation_score_that_is_not_a_number():
    """Before: a NaN score (the AUC of a validation split of one class) never beat the start's -inf, so training
    ended on the weights it started from, untrained, without a word."""
    from types import SimpleNamespace

    from tasks.errors import PipelineError
    from tasks.training import fit_best

    x, y = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(64, dtype=torch.long)
    model = torch.nn.Linear(2, 2)
    spec = SimpleNamespace(epochs=2, batch_size=32, seed=0, device="cpu",
                           optimizer=Optimizer(name="sgd", lr=0.5, weight_decay=0.0),
                           schedule=Schedule(name="constant"))

    def loss_fn(m, inputs, target):
        logits = m(inputs)
        return torch.nn.functional.cross_entropy(logits, target), logits

    with pytest.raises(PipelineError, match=r"^val_auc is not a number after epoch 1 .*one class"):
        fit_best(model, loss_fn, len(y), lambda idx: (x[idx], y[idx]), spec, lambda: {"val_auc": float("nan")},
                 "val_auc")


@pytest.mark.slow
@pytest.mark.parametrize(("from_start", "scores", "kept"), [(False, [0.6, 0.9, 0.7], 2),
                                                            (True, [0.95, 0.6, 0.9, 0.7], 0)])
def test_a_training_run_logs_the_kept_weights_scores_as_best_and_its_curves_from_epoch_one(
        mlflow_uri, tmp_path, from_start, scores, kept):
    """Before: the run value of ``val_accuracy`` (the runs table's, ``search_runs``'s) was the last epoch's, not the
    best epoch's that was kept; a text stage logged the kept model's ``val_accuracy`` again at step 0, a bogus first
    point on its curve; and nothing said when a warm start's weights won."""
    from argparse import Namespace
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from tasks.artifacts import publish_training
    from tasks.tracking import RunLogger
    from tasks.training import fit_best

    x, y = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(64, dtype=torch.long)
    model = torch.nn.Linear(2, 2)
    spec = SimpleNamespace(epochs=3, batch_size=32, seed=0, device="cpu",
                           optimizer=Optimizer(name="sgd", lr=0.5, weight_decay=0.0),
                           schedule=Schedule(name="constant"))
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("training", artifact_location=(tmp_path / "artifacts").as_uri())
    run = RunLogger(client, client.create_run(experiment).info.run_id, experiment)
    validation = iter(scores)   # the validation score of the start (from_start) and of each epoch in turn

    def loss_fn(m, inputs, target):
        logits = m(inputs)
        return torch.nn.functional.cross_entropy(logits, target), logits

    history = fit_best(model, loss_fn, len(y), lambda idx: (x[idx], y[idx]), spec,
                       lambda: {"val_accuracy": next(validation)}, "val_accuracy",
                       lambda epoch, m: run.log_metrics(m, step=epoch + 1), from_start=from_start)
    # as a text stage publishes it: the kept model scored again on val and test
    metrics = {"val_accuracy": scores[kept - (not from_start)], "test_accuracy": 0.5,
               "parameters": count_parameters(model)}
    paths = Namespace(model=tmp_path / "m.pt", metrics=tmp_path / "m.json", plots=tmp_path / "m.csv")
    publish_training(run, model, "linear", ARCH, history, metrics, paths)

    logged = client.get_run(run.run_id).data
    best = max(scores)
    assert logged.metrics["best_val_accuracy"] == best and logged.metrics["best_epoch"] == kept
    assert logged.metrics["val_accuracy"] == 0.7   # the curve's last point, as MLflow takes it
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_accuracy")) == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run.run_id, "best_val_accuracy")] == [best]
    assert logged.tags.get("training.kept") == ("start" if kept == 0 else None)
    assert json.loads(paths.metrics.read_text())["val_accuracy"] == best   # the DVC metrics file as before
