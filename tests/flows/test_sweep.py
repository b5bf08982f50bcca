"""The sweep's pure parts (recipes, Pareto front, choice of the best), its params, and the registry lock."""
from __future__ import annotations

import copy
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.dvc_stage import StageFailed, retry_transient
from flows.pipeline import gate_only
from flows.recipe import RecipeInvalid, layered_overrides
from flows.registry_lock import registry_lock
from flows.sweep import summary
from flows.sweep_report import best_passing, pareto_front, write_sweep_report
from flows.sweep_space import draw_recipes
from flows.workspace import copy_project, set_param
from tasks.config import load_config, parse_config
from tasks.errors import ConfigError, PipelineError, ServiceUnavailable
from tests.conftest import ROOT, dvc_lock, release_after

SPACE = {"distill.recsys.temperature": [1.0, 2.0], "share.recsys.clusters": [64, 128, 256]}


def test_grid_is_every_combination_and_random_draws_are_seeded_and_distinct():
    grid = draw_recipes(SPACE, "grid", 1, 0)
    assert len(grid) == 6 and len({tuple(sorted(r.items())) for r in grid}) == 6
    drawn = draw_recipes(SPACE, "random", 4, 7)
    assert drawn == draw_recipes(SPACE, "random", 4, 7) and len({tuple(sorted(r.items())) for r in drawn}) == 4
    assert all(r in grid for r in drawn)
    assert len(draw_recipes(SPACE, "random", 50, 0)) == 6   # never more than the grid holds


@pytest.mark.slow
def test_a_sweep_draws_each_recipe_once_without_the_knobs_its_stages_pass_over(raw_params):
    """Before: the grid was every combination of the space, with prune and share knobs also beside a [distill, qat]
    recipe, whose prune and share stages pass the student through: the default recsys space's 48 recipes were 30
    in effect, and a random draw of 8 (seed 0) ran one recipe twice (as recipe-000 and recipe-006)."""
    import json

    from flows.stage_graph import downstream_of, family_stages, stage_graph, stage_params
    from flows.sweep_space import in_effect, sweep_recipes

    def runs(family):   # the stages each recipe runs: what follows the teacher
        return [n.name for n in downstream_of(family_stages(stage_graph(ROOT), family), f"train_teacher_{family}")]

    def effect(recipe):   # what the recipe's stages read once it is applied: the blocks of the stages that train
        raw = copy.deepcopy(raw_params)
        for key, value in recipe.items():
            set_param(raw, key, value)
        steps = parse_config(raw).recipe.recsys
        blocks = {s: parse_config(raw).block(s, "recsys").model_dump() for s in ("distill", "export", *steps)}
        return json.dumps({"recipe": steps, **blocks}, sort_keys=True, default=str)

    stages = runs("recsys")
    grid = sweep_recipes(ROOT, parse_config({**raw_params, "sweep": {**raw_params["sweep"], "method": "grid"}}),
                         "recsys", stages, 8)
    assert len(grid) == 30 and len({effect(r) for r in grid}) == 30   # 2 x 3 [distill, qat] + 2 x 3 x 2 x 2 full
    assert {tuple(sorted(r)) for r in grid if r["recipe.recsys"] == ["distill", "qat"]} == {
        ("distill.recsys.temperature", "distill.recsys.weights.target", "recipe.recsys")}
    drawn = sweep_recipes(ROOT, parse_config(raw_params), "recsys", stages, 8)   # method random, seed 0
    assert drawn == sweep_recipes(ROOT, parse_config(raw_params), "recsys", stages, 8)
    assert len({effect(r) for r in drawn}) == 8 and all(r in grid for r in drawn)
    # a knob of a stage the recipe leaves out stays when a stage that runs reads it too: export_vision quantizes its
    # PTQ baseline with qat.vision's weight bits
    reads = stage_params(ROOT, runs("vision"))
    combo = {"qat.vision.weight_bits": 6, "qat.vision.epochs": 2, "recipe.vision": ["distill"]}
    assert in_effect(combo, "vision", ["distill", "qat"], reads) == {"qat.vision.weight_bits": 6,
                                                                     "recipe.vision": ["distill"]}
    assert in_effect({"qat.vision.epochs": 2}, "vision", ["distill", "qat"], reads) == {"qat.vision.epochs": 2}


def _o(name, auc, size, ms, passed=True, status="ok", test_auc=None):
    """A recipe's outcome: ``auc`` is its validation AUC (what a sweep ranks by); the test AUC is reported only."""
    return {"name": name, "status": status, "val_auc": auc, "test_auc": auc if test_auc is None else test_auc,
            "bytes": size, "latency_p50_ms": ms, "passed": passed, "failed_checks": [] if passed else ["auc"],
            "overrides": {"k": name}}


def test_recipes_are_ranked_on_validation_never_on_test():
    """Before: the sweep ranked recipes by the test AUC of their evaluation.json and registered the best."""
    honest = _o("honest", 0.85, 50_000, 1.0, test_auc=0.80)
    lucky = _o("lucky", 0.84, 50_000, 1.0, test_auc=0.90)   # better on test only: chosen on test, it would win
    assert best_passing([honest, lucky], "auc")["name"] == "honest"
    assert pareto_front([honest, lucky], "auc") == ["honest"]


def test_pareto_front_keeps_exactly_the_undominated_recipes():
    points = [_o("a", 0.85, 70_000, 0.8), _o("b", 0.84, 20_000, 0.9), _o("c", 0.83, 30_000, 1.0),  # c < b everywhere
              _o("d", 0.85, 70_000, 0.7)]                                                         # d beats a on latency
    assert pareto_front(points, "auc") == ["d", "b"]
    # a recipe without a validation score (NaN) is no point of the front: before, nothing dominated it, and it
    # was listed first
    assert pareto_front([_o("nan", float("nan"), 900, 5.0), *points], "auc") == ["d", "b"]


def test_best_is_the_highest_metric_among_passing_recipes_that_ran():
    outcomes = [_o("a", 0.86, 70_000, 0.8, passed=False), _o("b", 0.84, 20_000, 0.9), _o("c", 0.84, 10_000, 1.0),
                {"name": "d", "status": "failed", "overrides": {}, "error": "boom"}]
    assert best_passing(outcomes, "auc")["name"] == "c"   # tie on AUC: fewer bytes
    assert best_passing([outcomes[0], outcomes[3]], "auc") is None


def test_the_summary_names_the_passing_best_even_when_it_is_not_registered():
    """Before: a sweep run with --no-register said "no recipe passed the gate" although one had."""
    best = _o("recipe-002", 0.85, 70_000, 0.8)
    result = {"family": "recsys", "outcomes": [best], "recipes_seconds": 1.0, "pareto": ["recipe-002"],
              "sweep_run_id": "abc", "best": best, "registered": None}
    assert "best recipe passing the gate on validation: recipe-002 (not registered" in summary(result)
    assert "no recipe passed the gate" in summary({**result, "best": None})
    registered = {"name": "ctr", "version": 3, "recipe": "recipe-002"}
    assert "registered ctr version 3 (recipe-002) as challenger" in summary({**result, "registered": registered})


def test_the_summary_says_when_the_best_recipe_was_registered_before():
    """Before: a sweep whose best recipe's file was already a version said "registered ... as challenger", although
    no version was made and the challenger alias had not moved."""
    best = _o("recipe-002", 0.85, 70_000, 0.8)
    result = {"family": "recsys", "outcomes": [best], "recipes_seconds": 1.0, "pareto": ["recipe-002"],
              "sweep_run_id": "abc", "best": best,
              "registered": {"name": "ctr", "version": "3", "recipe": "recipe-002", "unchanged": True}}
    text = summary(result)
    assert "best recipe recipe-002 is already ctr version 3; registry unchanged" in text and "challenger" not in text


@pytest.mark.slow
@pytest.mark.fault("runs", "a recipe's stage process killed (a signal, out of memory) in the middle of its MLflow run",
                   "the recipe fails and the stage's run is marked KILLED (before: it stayed RUNNING for good: the "
                   "recipe run ended FAILED, and a retry closes runs under RUNNING recipe runs only)")
def test_a_killed_stage_of_a_recipe_leaves_no_run_running(mlflow_uri, tmp_path, monkeypatch):
    """Before: run_recipe called ``reproduce`` itself, so the pipeline's closing of a failed stage's runs never ran."""
    from mlflow.tracking import MlflowClient

    import flows.recipe
    from flows.recipe import run_recipe
    from tasks.mlflow_store import ensure_experiment
    from tasks.tracking import PARENT_ENV

    project = copy_project(tmp_path / "project", {"profile": "smoke"})
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    client = MlflowClient(mlflow_uri)
    experiment = ensure_experiment(client, load_config(project / "params.yaml"), project)
    sweep_run = client.create_run(experiment, run_name="sweep-recsys").info.run_id
    stage_runs = []

    def killed(stage, root, env, log=True, lock_wait=0.0):   # its process started its run, then was killed
        stage_runs.append(client.create_run(experiment, run_name=stage, tags={
            "mlflow.parentRunId": env[PARENT_ENV], "pipeline.stage": stage}).info.run_id)
        raise StageFailed(stage, "Killed", deterministic=False)

    monkeypatch.setattr(flows.recipe, "reproduce", killed)
    with pytest.raises(StageFailed, match="distill_recsys"):
        run_recipe.fn(0, {}, "recsys", project, tmp_path / "work", mlflow_uri, sweep_run, [], ["distill_recsys"], 1)
    stage_run = client.get_run(stage_runs[0])
    recipe_run = client.get_run(stage_run.data.tags["mlflow.parentRunId"])
    assert (recipe_run.data.tags["sweep.recipe"], recipe_run.info.status) == ("recipe-000", "FAILED")
    assert stage_run.info.status == "KILLED" and "pipeline.killed" in stage_run.data.tags


@pytest.mark.fault("params", "a sweep asked for no recipe or no worker, or a negative count (`--recipes -1`, "
                   "`--recipes 0`, `--workers 0`)", "a one-line usage error naming the option, exit 2, before "
                   "anything runs (before: a ValueError traceback for -1; 0 fell back to params' default without a "
                   "word; --workers -1 reached Dask)")
@pytest.mark.parametrize("option, value", [("--recipes", "-1"), ("--recipes", "0"), ("--workers", "0"),
                                           ("--workers", "-1")])
def test_a_sweep_refuses_counts_below_one_in_one_line(option, value, monkeypatch, capsys):
    import sys

    from flows.sweep import UsageError, main, recipe_sweep
    from tasks.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["flows.sweep", "--root", str(ROOT), option, value])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: UsageError: argument {option}: '{value}' is not a whole number of at least 1"), err
    # a caller of the flow is refused too, before a stage or a run starts (0 no longer means "params' default")
    with pytest.raises(UsageError, match=rf"^{option[2:]}: {value}; a sweep needs at least 1"):
        recipe_sweep.fn(root=str(ROOT), family="recsys", **{option[2:]: int(value)})


def test_report_files_list_failed_recipes_and_mark_the_front(tmp_path):
    outcomes = [_o("recipe-000", 0.85, 70_000, 0.8), {"name": "recipe-001", "status": "failed",
                                                      "overrides": {"k": 1}, "error": "RecipeInvalid: bad\n"}]
    files = write_sweep_report(tmp_path, outcomes, ["recipe-000"], outcomes[0], "auc",
                               {"family": "recsys", "recipes": 2, "seconds": 1.0})
    md = files[1].read_text()
    assert "| recipe-000 | ok | 0.8500 | 0.8500 | 70,000 |" in md and "| recipe-001 | FAILED |" in md
    assert "recipe-001 failed: RecipeInvalid: bad" in md and files[2].stat().st_size > 5_000
    # the rows dvc.yaml's Pareto plot reads: recipes that ran, on validation (and test, reported)
    assert files[3].read_text().splitlines() == ["recipe,val_auc,test_auc,bytes,latency_p50_ms,pareto",
                                                 "recipe-000,0.850000,0.850000,70000,0.8000,yes"]


def test_overrides_land_in_the_layer_that_wins(tmp_path, raw_params):
    smoke = {**copy.deepcopy(raw_params), "profile": "smoke"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke))
    dotted = layered_overrides(smoke, {"share.recsys.clusters": 64, "qat.recsys.mlp_weight_bits": 8,
                                       "distill.recsys.weights": {"target": 0.5}}, "recsys", 1)
    assert dotted["profiles.smoke.share.recsys.clusters"] == 64 and dotted["profiles.smoke.qat.recsys.threads"] == 1
    repo = copy_project(tmp_path / "copy", dotted, source=tmp_path)
    cfg = load_config(repo / "params.yaml")   # the smoke overlay sets clusters: 128 too; the recipe's value wins
    assert cfg.share.recsys.clusters == 64 and cfg.distill.recsys.threads == 1 and cfg.qat.recsys.mlp_weight_bits == 8
    # a mapping is merged over the one it replaces under a profile, wherever it lands (as sweep values are checked)
    assert cfg.distill.recsys.weights.target == 0.5
    assert cfg.distill.recsys.weights.ground_truth == raw_params["distill"]["recsys"]["weights"]["ground_truth"]
    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written["profiles"]["smoke"]["share"]["recsys"]["clusters"] == 64   # where the overlay sets it ...
    assert "mlp_weight_bits" not in written["profiles"]["smoke"]["qat"]["recsys"]   # ... only there
    # (before: every knob went into the overlay, where dvc.yaml tracks only the keys the project's overlay sets: the
    # copy's stages refuse a profile value dvc.yaml does not track)
    full = layered_overrides(raw_params, {"share.recsys.clusters": 64}, "recsys", 2)
    assert full["share.recsys.clusters"] == 64
    # a family without some of the threaded sections (text: no prune, qat, share) gets limits only where it has them
    text = layered_overrides(raw_params, {"distill.text.temperature": 2.0}, "text", 1)
    assert "prune.text.threads" not in text and text["distill.text.threads"] == 1
    copy_project(tmp_path / "text", text, source=tmp_path)   # before: "prune.text: Extra inputs are not permitted"
    assert load_config(tmp_path / "text" / "params.yaml").distill.text.temperature == 2.0


@pytest.mark.parametrize("key, message", [
    ("teacher.recsys.epochs", "is not a recsys compression knob"),
    ("distill.vision.temperature", "is not a recsys compression knob"),
    ("distill.recsys.temprature", "is not a key of params.yaml"),
])
@pytest.mark.fault("params", "a sweep that would change data or teacher params",
                   "ConfigError at load naming the key and the allowed sections")
def test_a_sweep_space_key_that_is_not_a_compression_knob_fails_at_load(raw_params, key, message):
    raw = copy.deepcopy(raw_params)
    raw["sweep"]["space"]["recsys"] = {key: [1, 2]}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


@pytest.mark.fault("params", "a sweep value its knob does not take (clusters: 1, a temperature of 0)",
                   "ConfigError at load naming the key and the value (before: the recipes drawing it failed after "
                   "the upstream stages had run)")
def test_every_sweep_value_is_checked_at_load(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["sweep"]["space"]["recsys"]["share.recsys.clusters"] = [64, 1]
    with pytest.raises(ConfigError, match=r"sweep\.space\.recsys: share\.recsys\.clusters: 1 is not a value it "
                                          r"takes: Input should be greater than or equal to 2"):
        parse_config(raw)
    # knobs a rule ties together are each checked alone: a space whose values are valid in some combinations loads, and
    # so does each recipe of a valid combination (the rule checks the recipe's own values when it loads)
    raw["prune"]["recsys"]["epochs"] = 8
    raw["sweep"]["space"]["recsys"] = {"prune.recsys.steps": [2, 4], "prune.recsys.epochs": [6, 8]}
    parse_config(raw)
    recipe = copy.deepcopy(raw)
    for key, value in layered_overrides(raw, {"prune.recsys.steps": 4, "prune.recsys.epochs": 8}, "recsys", 1).items():
        set_param(recipe, key, value)
    assert parse_config(recipe).prune.recsys.steps == 4
    raw["sweep"]["space"]["recsys"] = {"share.recsys.clusters": [64, "2"]}   # strictly, as params.yaml is read
    with pytest.raises(ConfigError, match=r"clusters: '2' is not a value it takes: Input should be a valid integer"):
        parse_config(raw)
    raw["sweep"]["space"]["recsys"] = {"recipe.recsys": [["distill", "qat"], ["distill", "sharpen"]]}
    with pytest.raises(ConfigError, match=r"sweep\.space\.recsys: recipe\.recsys: \['distill', 'sharpen'\] is not"):
        parse_config(raw)
    # a knob inside an optional block (ema: null or a mapping) is checked too
    raw["sweep"]["space"]["recsys"] = {"share.recsys.clusters": [64]}
    raw["distill"]["vision"]["ema"] = {"decay": 0.998}
    raw["sweep"]["space"]["vision"] = {"distill.vision.ema.decay": [0.99, 5.0]}
    with pytest.raises(ConfigError, match=r"distill\.vision\.ema\.decay: 5\.0 is not a value it takes"):
        parse_config(raw)
    # a mapping is checked as the recipe applies it: replacing the block's (full profile), merged over it (a profile)
    raw["sweep"]["space"]["vision"] = {"distill.vision.temperature": [2.0]}
    raw["sweep"]["space"]["recsys"] = {"distill.recsys.weights": [{"target": 1.0}]}
    with pytest.raises(ConfigError, match=r"distill\.recsys\.weights: \{'target': 1\.0\} is not a value it takes"):
        parse_config(raw)
    assert parse_config({**raw, "profile": "smoke"}).sweep.space["recsys"]


@pytest.mark.fault("runs", "transient vs deterministic failures under Prefect retries",
                   "a server that did not answer is retried; bad data or params are not")
def test_retries_are_for_transient_failures_only():
    class State:
        def __init__(self, data):
            self.data = data

    assert retry_transient(None, None, State(ServiceUnavailable("tracking server down")))
    assert retry_transient(None, None, State(StageFailed("x", "killed", deterministic=False)))
    assert retry_transient(None, None, State(OSError("disk")))
    assert not retry_transient(None, None, State(StageFailed("x", "bad data", deterministic=True)))
    assert not retry_transient(None, None, State(RecipeInvalid("bad params")))
    assert not retry_transient(None, None, State(ConfigError("unknown key")))


@pytest.mark.fault("promotion", "two holders of the promotion lock at once",
                   "the second waits for the first (Prefect global concurrency limit)")
def test_the_registry_lock_lets_one_holder_in_at_a_time(prefect_server):
    inside: list[tuple[str, float, float]] = []

    def hold(name: str) -> None:
        with registry_lock("lock-test-model", timeout_seconds=60):
            start = time.monotonic()
            time.sleep(1.0)
            inside.append((name, start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (_, s1, e1), (_, s2, _) = sorted(inside, key=lambda x: x[1])
    assert len(inside) == 2 and s2 >= e1   # the second entered only after the first left


@pytest.mark.fault("data", "a batch ingested while a pipeline run of the same project reads the family's data",
                   "the ingestion waits for the run's data lock (and gives up after "
                   "pipeline.data_lock_timeout_seconds, naming the lock); a copy of the project is not held up")
def test_ingestion_and_a_pipeline_run_never_hold_one_family_data_at_once(prefect_server, tmp_path):
    from flows.registry_lock import RegistryBusy, data_lock

    project, copy = tmp_path / "project", tmp_path / "copy"
    with data_lock(project, ["recsys"], timeout_seconds=60):
        with pytest.raises(RegistryBusy, match=r"recsys data was held by another run.*data_lock_timeout_seconds"):
            with data_lock(project, ["recsys"], timeout_seconds=1):
                pass
        # a free slot is taken at once; the timeout only bounds a server slow to answer (a loaded machine once
        # took over 1 s to grant one)
        with data_lock(copy, ["recsys"], timeout_seconds=30), data_lock(project, ["vision"], timeout_seconds=30):
            pass   # another project's data, another family's data: free
    with data_lock(project, ["recsys"], timeout_seconds=30):
        pass   # released


def test_a_family_named_twice_takes_its_data_lock_once(prefect_server, tmp_path):
    """Before: ``flows.pipeline --family vision --family vision`` asked the family's one-slot lock twice in one
    process; the second request waited pipeline.data_lock_timeout_seconds and blamed "another run"."""
    from flows.registry_lock import data_lock

    with data_lock(tmp_path, ["recsys", "recsys"], timeout_seconds=5):
        pass


@pytest.mark.fault("data", "`flows.pipeline --gate-only` while another run (a pipeline run, an ingestion) holds the "
                   "family's data", "it waits for the data lock like a pipeline run and gives up after "
                   "pipeline.data_lock_timeout_seconds, naming the lock (before: it scored the champion and the "
                   "candidate on data another run was rewriting)")
def test_gating_alone_holds_the_data_lock_too(prefect_server, raw_params, tmp_path):
    from flows.registry_lock import RegistryBusy, data_lock

    params = copy.deepcopy(raw_params)
    params["pipeline"]["data_lock_timeout_seconds"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with data_lock(tmp_path, ["vision"], timeout_seconds=60), \
            pytest.raises(RegistryBusy, match=r"the vision data was held by another run"):
        gate_only.fn(str(tmp_path), ["vision"])


@pytest.mark.fault("data", "`flows.pipeline --gate-only` after a stage upstream of the candidate ran again (a new "
                   "batch prepared whose validation then failed; a teacher retrained, not distilled from)",
                   "refused before anything is gated, naming the input remade and by which stage (before: the old "
                   "candidate was gated and registered as if made from today's data)")
def test_gating_alone_refuses_a_candidate_made_from_inputs_remade_since(prefect_server, raw_params, tmp_path):
    from tasks.lineage import remade_since

    data, kd = "data/vision/processed", "models/vision/student_kd.pt"

    def lock(prepared: str) -> str:
        return yaml.safe_dump({"schema": "2.0", "stages": {
            "prepare_vision": {"cmd": "p", "outs": [{"path": data, "md5": f"{prepared}.dir"}]},
            "distill_vision": {"cmd": "d", "deps": [{"path": data, "md5": "a1.dir"}],
                               "outs": [{"path": kd, "md5": "b2"}]},
            "evaluate_vision": {"cmd": "e", "deps": [{"path": data, "md5": "a1.dir"}, {"path": kd, "md5": "b2"}],
                                "outs": [{"path": "metrics/vision/evaluation.json", "md5": "c3"}]}}})

    assert remade_since("evaluate_vision", lock("a1")) == []
    assert remade_since("evaluate_vision", lock("new")) == [f"{data} (by prepare_vision, after {stage} read it)"
                                                            for stage in ("distill_vision", "evaluate_vision")]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "dvc.lock").write_text(lock("new"))
    with pytest.raises(PipelineError, match=r"--gate-only: .*dvc\.lock: vision's candidate was made from inputs "
                                            r"remade since: data/vision/processed \(by prepare_vision"):
        gate_only.fn(str(tmp_path), ["vision"])


def _two_stage_project(root: Path, params: dict, evaluate: str = "cp kd.txt e.txt") -> None:
    """A git + DVC project whose ``distill_vision`` reads the KD temperature and whose ``evaluate_vision`` runs
    ``evaluate``; ``edit.py`` in it raises the temperature in params.yaml, as a user would edit it."""
    import subprocess
    import sys

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "edit.py").write_text("import yaml\nwith open('params.yaml') as f:\n    params = yaml.safe_load(f)\n"
                                  "params['distill']['vision']['temperature'] += 1.0\n"
                                  "with open('params.yaml', 'w') as f:\n    yaml.safe_dump(params, f)\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "distill_vision": {"cmd": "echo kd > kd.txt", "params": ["distill.vision.temperature"], "outs": ["kd.txt"]},
        "evaluate_vision": {"cmd": evaluate, "deps": ["kd.txt"], "outs": ["e.txt"]}}}))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


@pytest.mark.fault("promotion", "`flows.pipeline --gate-only` after params.yaml changed a param a stage of the "
                   "candidate reads (the KD temperature edited after `dvc repro`)",
                   "refused before anything is gated, naming the stages DVC finds out of date (before: the old "
                   "candidate was registered under the edited params' hash and params.yaml, so a restore re-ran "
                   "other params than it was made with)")
def test_gating_alone_refuses_a_candidate_its_params_no_longer_make(prefect_server, raw_params, tmp_path):
    import subprocess
    import sys

    _two_stage_project(tmp_path, raw_params)
    for cmd in (["-m", "dvc", "repro", "-q"], ["edit.py"]):   # made, then the temperature edited
        subprocess.run([sys.executable, *cmd], cwd=tmp_path, check=True, capture_output=True)
    with pytest.raises(PipelineError, match=r"--gate-only: vision's candidate is not what its stages make of today's "
                                            r"params, code and data: DVC finds distill_vision, evaluate_vision out of "
                                            r"date; run them first"):
        gate_only.fn(str(tmp_path), ["vision"])


@pytest.mark.fault("promotion", "params.yaml edited while a pipeline run goes on (the KD temperature changed after "
                   "distillation, while a later stage ran)",
                   "the run gates and registers nothing, naming the stages DVC finds out of date (before: the gate "
                   "read the edited params and registered the candidate under their hash, beside a student distilled "
                   "with the temperature before the edit)")
def test_a_run_whose_params_were_edited_while_it_ran_gates_nothing(prefect_server, raw_params, tmp_path,
                                                                   monkeypatch):
    from flows.pipeline import compression_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own store
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    _two_stage_project(tmp_path, raw_params, evaluate="cp kd.txt e.txt && python edit.py")   # edited meanwhile
    with pytest.raises(PipelineError, match=r"params, code or data changed while the pipeline ran: DVC finds "
                                            r"distill_vision out of date; nothing gated or registered"):
        compression_pipeline(str(tmp_path), ["vision"])
    assert not (tmp_path / "reports").exists()


@pytest.mark.fault("data", "a run killed (SIGKILL) while it holds a family's data lock",
                   "the next run on the machine (one already waiting too) finds the holder gone and gives back its "
                   "lease, instead of waiting pipeline.data_lock_timeout_seconds and failing; once: when the server's "
                   "repossessor later frees the dead lease on expiry, the slot stays the next holder's")
def test_a_data_lock_whose_holder_was_killed_is_freed(prefect_server, tmp_path, monkeypatch):
    """Before: the slot count was reset to 0, and a Prefect server that frees expired leases (``prefect server
    start``'s repossessor) freed the dead run's lease again five minutes later: a second holder got in beside the
    next one (an ingestion changing the snapshot under a running pipeline). And a run already waiting when the
    holder was killed looked for a dead holder only before it began to wait."""
    import json
    import signal
    import subprocess
    import sys
    from uuid import UUID

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from flows import registry_lock
    from flows.registry_lock import RegistryBusy, data_lock, data_lock_name, holder_file

    script = ("import sys, time; from pathlib import Path; from flows.registry_lock import data_lock\n"
              f"with data_lock(Path({str(tmp_path)!r}), ['recsys'], 60):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                              stdout=subprocess.PIPE, text=True)
    name = data_lock_name(tmp_path, "recsys")
    monkeypatch.setattr(registry_lock, "GIVE_BACK_EVERY", 1.0)
    got, leave = threading.Event(), threading.Event()

    def wait_for_it() -> None:   # a run that started waiting before the holder was killed
        with data_lock(tmp_path, ["recsys"], timeout_seconds=60):
            got.set()
            leave.wait(60)

    waiter = threading.Thread(target=wait_for_it)
    try:
        assert holder.stdout.readline().strip() == "held"
        with get_client(sync_client=True) as client:
            record = holder_file(name, registry_lock._server(client.server_type, client.api_url))
        dead_lease = UUID(json.loads(record.read_text())["lease"])
        waiter.start()
        assert not got.wait(3)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    try:
        assert got.wait(30)   # found the holder gone while it waited (not at the end of its 60 s)
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(dead_lease)   # the repossessor, when the dead lease expires
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
        with pytest.raises(RegistryBusy), data_lock(tmp_path, ["recsys"], timeout_seconds=1):
            pass
    finally:
        leave.set()
        waiter.join()
    with data_lock(tmp_path, ["recsys"], timeout_seconds=5):
        pass


@pytest.mark.parametrize("holder, given_back", [("ephemeral", 1), ("server", 0), ("another server", 0)])
def test_a_dead_holders_lease_the_server_does_not_hold(prefect_server, holder, given_back):
    """A holder on an ephemeral server of its own: no repossessor runs there and the lease was that server's alone,
    so its slot is given back. On a server that outlives its clients the lease was freed on expiry (by now the slot
    may be another machine's holder's): nothing is given back. A record of a holder of another server is left alone.
    (The session's test server stands in for the dead holder's: "ephemeral" is what that holder recorded of it.)"""
    import json
    import socket
    import uuid

    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate

    from flows.registry_lock import _give_back, _server, holder_file

    name = f"data-test-{uuid.uuid4().hex[:12]}"
    with get_client(sync_client=True) as client:
        ours = holder_file(name, _server(client.server_type, client.api_url))   # what a waiting run looks at
        record = holder_file(name, "http://elsewhere:4200/api") if holder == "another server" else ours
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 1, "started": "0",  # gone
                                      "lease": str(uuid.uuid4()), "since": time.time() - 5,
                                      "ephemeral": holder == "ephemeral"}))   # a lease this server never held
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        try:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))
            _give_back(client, name, ours)
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 1 - given_back
        finally:
            client.delete_global_concurrency_limit_by_name(name)
    assert record.exists() == (holder == "another server")
    record.unlink(missing_ok=True)


def test_ephemeral_servers_share_slots_only_through_one_database(tmp_path, monkeypatch):
    """A process's own (ephemeral) server keeps its slot counts in PREFECT_HOME's database: two processes with one
    home share them, so a dead holder's record is theirs to act on; another home is another set of slots."""
    from prefect.client.base import ServerType
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings

    from flows.registry_lock import _server, holder_file

    def ephemeral(home):
        # (the session's test server, when this process started it, set a database of its own: back to the default)
        with temporary_settings(updates={PREFECT_HOME: home}, restore_defaults={PREFECT_API_DATABASE_CONNECTION_URL}):
            return _server(ServerType.EPHEMERAL, "http://127.0.0.1:8123/api")   # each process's own port

    assert ephemeral(tmp_path / "a") == ephemeral(tmp_path / "a") != ephemeral(tmp_path / "b")
    assert _server(ServerType.SERVER, "http://prefect:4200/api") == "http://prefect:4200/api"
    assert holder_file("registry-m", ephemeral(tmp_path / "a")) != holder_file("registry-m", ephemeral(tmp_path / "b"))
    # Before: a relative PREFECT_HOME was hashed as written, so processes in two folders, each with its own database,
    # took each other's dead holders' records for theirs (and gave back a slot of the wrong database).
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    with monkeypatch.context() as folder:
        folder.chdir(tmp_path / "one")
        in_one = ephemeral("home")
        assert in_one == ephemeral(tmp_path / "one" / "home")   # the same file named absolutely: the same database
        folder.chdir(tmp_path / "two")
        assert ephemeral("home") != in_one
    # an in-memory database is its process's own: no other process shares its slots or acts on its holders' records
    for memory in ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true"):
        with temporary_settings(updates={PREFECT_API_DATABASE_CONNECTION_URL: memory}):
            here = _server(ServerType.EPHEMERAL, "http://127.0.0.1:8123/api")
            with monkeypatch.context() as another:
                another.setattr(os, "getpid", lambda: 1)
                assert _server(ServerType.EPHEMERAL, "http://127.0.0.1:8123/api") != here, memory


@pytest.fixture
def shared_tmp(monkeypatch):
    """A temp dir every user may write in, as /tmp is (sticky, 1777), made this process's TMPDIR."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="kdq-shared-tmp-"))
    shared.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))   # (gettempdir caches the first answer)
    yield shared
    shutil.rmtree(shared, ignore_errors=True)


def _as_another_user(uid: int, then) -> str:
    """Run ``then()`` in a fork of this process switched to user ``uid`` (a fork: an interpreter started as that user
    may not read this one, e.g. under /root); return what it raised as one line, or "" when it returned."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            then()
            os.write(write, b"")
        except BaseException as err:   # noqa: BLE001 (whatever it was, the parent reports it)
            os.write(write, f"{type(err).__name__}: {err}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        said = answer.read()
    os.waitpid(pid, 0)
    return said


@pytest.mark.skipif(os.geteuid() != 0, reason="taking the guard as another user needs root (setuid)")
@pytest.mark.fault("security", "two users of one machine take a lock (a pipeline run each, one shared TMPDIR)",
                   "each user's lock records and guards are in a folder of its own (owner-only): both take theirs")
def test_two_users_of_one_machine_each_take_their_machine_guard(shared_tmp):
    """Before: the records and guards were in one $TMPDIR/kdq-locks/, made 0755 (its files 0644) by the first user
    to take a lock; any other user's run failed with a PermissionError traceback on the guard file (at the data
    lock before any stage ran, or at the registry lock in the gate, where the promote task retried it)."""
    import stat

    from flows.registry_lock import _machine_guard, holder_file

    def take_the_guard() -> None:
        with _machine_guard(holder_file("registry-m", "http://prefect:4200/api")):
            pass

    record = holder_file("registry-m", "http://prefect:4200/api")
    with _machine_guard(record):   # held by root while the other user takes its own
        assert _as_another_user(65534, take_the_guard) == ""
    assert stat.S_IMODE(record.parent.stat().st_mode) == 0o700   # no other user reads or writes a record of ours
    theirs = [p for p in shared_tmp.iterdir() if p.stat().st_uid == 65534]
    assert len(theirs) == 1 and stat.S_IMODE(theirs[0].stat().st_mode) == 0o700
    with _machine_guard(record):   # and taken again after them
        pass


@pytest.mark.parametrize("folder", ["a file in its place", "another user's folder"])
@pytest.mark.fault("security", "the lock folder in TMPDIR cannot be used (a file in its place; made by another user)",
                   "the run stops before taking the lock with one line naming the folder, not retried (before: an "
                   "OSError traceback, retried by the promote task)")
def test_an_unusable_lock_folder_is_named_in_one_line(shared_tmp, folder):
    """The machine guard is what a data or registry lock takes first (``_give_back``), before it waits for a slot.
    Before: the OSError of creating or opening the guard came out raw (a traceback), and retry_transient took it
    for a passing failure."""
    from flows.registry_lock import _machine_guard, holder_file

    record = holder_file("registry-m", "http://prefect:4200/api")
    where = record.parent
    if folder == "a file in its place":
        where.write_text("")
    else:
        if os.geteuid() != 0:
            pytest.skip("handing a folder to another user needs root (chown)")
        where.mkdir(mode=0o777)
        os.chown(where, 65534, 65534)
    with pytest.raises(PipelineError) as err, _machine_guard(record):
        pass
    assert type(err.value) is PipelineError and not err.value.transient and "\n" not in str(err.value)
    assert str(where) in str(err.value)


def test_which_recipes_may_be_chosen_is_decided_on_validation_scores(raw_params):
    """Before: a recipe was eligible only if it passed the gate on its test scores, so the test split filtered the
    choice; now the gate's thresholds are read on validation scores for that, and the test gate is reported."""
    from tasks.config import parse_config
    from tasks.family import load_family
    from tasks.gate import gate_checks

    gate = parse_config(raw_params).gate.recsys
    scores = lambda val, test: {"val_auc": val, "test_auc": test, "latency_p50_ms": 0.5,  # noqa: E731
                                "latency_p95_ms": 0.6, "bytes": 50_000}
    evaluation = {"models": {"teacher_fp32": {**scores(0.86, 0.86), "latency_p50_ms": 2.0, "bytes": 800_000},
                             "student_int8": scores(0.858, 0.79)}}   # fine on validation, below the floor on test
    assert all(c.passed for c in gate_checks(evaluation, None, gate, load_family("recsys").gate, split="val"))
    assert not all(c.passed for c in gate_checks(evaluation, None, gate, load_family("recsys").gate))


@pytest.mark.fault("data", "a sweep started while an ingestion (or a pipeline run) holds the family's data",
                   "the sweep waits for the family's data lock, as a pipeline run does, and gives up after "
                   "pipeline.data_lock_timeout_seconds naming the lock, before any stage or MLflow run starts")
def test_a_sweep_takes_the_familys_data_lock_before_it_runs_a_stage(prefect_server, tmp_path, monkeypatch):
    """Before: the sweep ran the family's upstream stages (its raw snapshot in) and its recipes on their outputs
    holding no lock, so an ingestion could change the data under it."""
    from flows.registry_lock import RegistryBusy, data_lock
    from flows.sweep import recipe_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own store: mlflow.db in it
    project = copy_project(tmp_path / "project", {"pipeline.data_lock_timeout_seconds": 1})
    listing = lambda: sorted(p.relative_to(project) for p in project.rglob("*")   # DVC's own state (.dvc/tmp) aside
                             if not {".git", ".cache", ".dvc"} & set(p.relative_to(project).parts))
    before = listing()
    with data_lock(project, ["recsys"], timeout_seconds=60), \
            pytest.raises(RegistryBusy, match=r"recsys data was held by another run"):   # an ingestion, say
        recipe_sweep.fn(root=str(project), family="recsys", register_best=False)
    # no stage ran and no MLflow store was opened: nothing was written into the project (no data, dvc.lock, mlflow.db)
    assert listing() == before


def test_a_version_a_sweep_registered_is_restored_from_the_projects_commit(prefect_server, tmp_path, monkeypatch,
                                                                           capsys):
    """Before: the version a sweep registered recorded the git commit of its recipe's scratch copy (in no history of
    the project: ``flows.restore`` failed with "commit … is not in …'s history"), ``git.dirty`` false whatever the
    project's, ``data.hash`` unknown, and kept a dvc.lock without the snapshot stage (no data version to pull).
    And its upstream stages wait for DVC's lock, held a moment by another DVC process of the project, as a pipeline
    run's do (before: the sweep failed at once, "Unable to acquire lock")."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    import flows.sweep
    from flows.gating import paths
    from flows.restore import restore
    from flows.sweep import recipe_sweep
    from tasks.lineage import params_hash, remade_since
    from tests.e2e.scratch import locked_outs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own store: mlflow.db in it
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    space = {"distill.recsys.temperature": [3.0], "recipe.recsys": [["distill", "qat"]]}   # one recipe, a short one
    project = copy_project(tmp_path / "project", {"profile": "smoke", "sweep.space.recsys": space})
    with (project / "prefect.yaml").open("a") as edited:   # an uncommitted change the recipe's copy carries
        edited.write("# edited, not committed\n")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                          check=True).stdout.strip()

    found_stale, holders = flows.sweep.stale_stages, []

    def and_then_dvc_is_busy(*args):   # another DVC process of the project holds its lock 8 s (DVC itself tries 3)
        stale = found_stale(*args)
        holders.append(release_after(dvc_lock(project), 8.0))
        return stale

    monkeypatch.setattr(flows.sweep, "stale_stages", and_then_dvc_is_busy)
    try:
        result = recipe_sweep(root=str(project), family="recsys", workers=1, recipes=1)
    finally:
        for holder in holders:
            holder.join()
    assert holders and [o["status"] for o in result["outcomes"]] == ["ok"], result["outcomes"]
    recipe = Path(result["outcomes"][0]["dir"])   # its lock as DVC left it: `--gate-only` takes its candidate
    assert remade_since("evaluate_recsys", (recipe / "dvc.lock").read_text()) == []
    registered = result["registered"]
    version = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version(registered["name"],
                                                                                 registered["version"])
    tags = version.tags
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == tags["sweep.source_commit"] == head
    assert tags["git.dirty"] == "true"
    assert tags["data.hash"] == locked_outs(project)[str(paths(project, "recsys")["data"])]
    # so does each stage run of the recipe (its copy's own commit kept beside: in no history of the project)
    client, recipe_run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}"), result["outcomes"][0]["run_id"]
    stage_runs = client.search_runs([client.get_run(recipe_run).info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{recipe_run}'")
    assert {r.data.tags["pipeline.stage"] for r in stage_runs} >= {"distill_recsys", "qat_recsys", "evaluate_recsys"}
    for stage_run in stage_runs:
        assert (stage_run.data.tags["git.commit"], stage_run.data.tags["git.dirty"]) == (head, "true")
        assert stage_run.data.tags["git.scratch_commit"] not in ("none", head)

    restored = tmp_path / "restored"
    assert restore(project, "recsys", registered["name"], registered["version"], restored, run=False) == 0
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=restored, capture_output=True, text=True,
                          check=True).stdout.strip() == head
    cfg = load_config(restored / "params.yaml")   # the recipe's params: its overrides applied (restore checked them)
    assert cfg.distill.recsys.temperature == 3.0 and params_hash(cfg) == tags["params.hash"]
    raw = "data/recsys/raw"   # the snapshot it was trained on, pulled as the project's dvc.lock records it
    assert locked_outs(restored)[raw] == locked_outs(project)[raw] and any((restored / raw).iterdir())
    assert "trained from uncommitted changes" in capsys.readouterr().err
    # the warm start the version began from and the snapshot's bootstrap the sweep made are on the project's DVC
    # remote, as a pipeline run and an ingestion push them: restored on another machine, they are pulled from there
    # (before: the sweep left them in this machine's cache alone)
    pushed = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", "snapshot_recsys", "warm_start_recsys"],
                            cwd=project, capture_output=True, text=True, check=True).stdout
    assert "models/recsys/warm_start" not in pushed and raw not in pushed, pushed


def test_a_version_restore_cannot_bring_back_is_refused_in_one_line(mlflow_uri, tmp_path):
    """A version a sweep registered before its lineage named the project's commit (its git.commit a scratch copy's),
    and a run whose dvc.lock records no snapshot. Before: git's "not in …'s history" for the first, and for the
    second whatever ``dvc pull`` of a stage the lock does not know did."""
    from mlflow.tracking import MlflowClient

    from flows.restore import restore, restore_data

    client = MlflowClient(mlflow_uri)
    client.create_registered_model("ctr-old")
    client.create_model_version("ctr-old", str(tmp_path / "model"),
                                tags={"git.commit": "5c4a7c4" * 6, "sweep.source_commit": "4795a65" * 6})
    with pytest.raises(PipelineError, match=r"^ctr-old version 1: git\.commit 5c4a7c45c4a7 is its sweep recipe's "
                                            r"scratch copy's \(the project was at 4795a654795a\).*cannot be restored"):
        restore(ROOT, "recsys", "ctr-old", "1", tmp_path / "restored", run=False)
    assert not (tmp_path / "restored").exists()
    project = copy_project(tmp_path / "project", {"profile": "smoke"})
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(PipelineError, match=r"dvc\.lock \(its run's lineage/dvc\.lock\) records no snapshot_recsys: "
                                            "which outputs to pull is not known"):
        restore_data(ROOT, project, "recsys")


@pytest.mark.fault("params", "`flows.sweep_benchmark` asked for no worker or no recipe (`--workers 0`, "
                   "`--recipes 0`, `--recipes -1`)", "a usage error naming the option, exit 2, before the project "
                   "is copied (before: a whole 1-worker sweep ran, then the second sweep refused --workers 0)")
@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--recipes", "0"), ("--recipes", "-1")])
def test_the_sweep_benchmark_refuses_counts_below_one_before_it_copies_the_project(option, value, monkeypatch,
                                                                                    capsys):
    """Before: `--workers 0` and `--recipes 0` were taken (type int): the project was copied and a whole sweep with
    1 worker ran (upstream stages, every recipe) before the second sweep refused 0 workers."""
    import sys

    import flows.sweep_benchmark
    from flows.benchmark import PROJECT_RUN_ENV

    for name in PROJECT_RUN_ENV:   # the benchmark drops them from this process: given back after the test
        monkeypatch.delenv(name, raising=False)

    def no_copy(*args, **kwargs):
        raise AssertionError("the project was copied for a sweep")

    monkeypatch.setattr(flows.sweep_benchmark, "sweep_copy", no_copy)
    monkeypatch.setattr(sys, "argv", ["flows.sweep_benchmark", option, value])
    with pytest.raises(SystemExit) as exit_info:
        flows.sweep_benchmark.main()
    assert exit_info.value.code == 2
    assert f"argument {option}: '{value}' is not a whole number of at least 1" in capsys.readouterr().err
