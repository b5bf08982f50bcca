from __future__ import annotations

import pytest

from tasks.config import load_config, parse_config
from tasks.errors import ConfigError
from tests.conftest import imported_by


def test_repo_params_load_in_both_profiles(config, smoke_config):
    assert config.profile == "full" and config.data.vision.subset is None
    assert smoke_config.teacher.vision.epochs == 1 and smoke_config.data.vision.subset.train == 3000
    # the overlay changes only what it names
    assert smoke_config.teacher.vision.optimizer == config.teacher.vision.optimizer


@pytest.mark.fault("params", "an unknown key (a typo)",
                   "ConfigError at load naming the key path")
def test_unknown_key_names_its_path(raw_params):
    raw = {**raw_params, "teacher": {"vision": {**raw_params["teacher"]["vision"], "epoch": 3}}}
    with pytest.raises(ConfigError, match=r"teacher\.vision\.epoch: Extra inputs are not permitted"):
        parse_config(raw)


@pytest.mark.fault("params", "a family taken off `families` while its blocks stay in params.yaml (to run one family)",
                   "one line naming the families left out, blocks of them, and the two ways on (add them back, or "
                   "delete their blocks and stages; `--family` to run some only); before: 'Extra inputs are not "
                   "permitted' for every block, each with its whole value (15 KB for four families)")
def test_a_family_taken_off_the_list_is_one_line_saying_what_to_do(raw_params):
    import copy

    raw = copy.deepcopy(raw_params)
    raw["families"] = ["vision", "recsys"]
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith("params.yaml: clicks, digits, text are not in families ['vision', 'recsys'], yet it "
                              "holds blocks of them (data.clicks, ")
    assert "add them to families" in message and "--family <name>" in message
    raw["data"]["vison"] = raw["data"]["vision"]   # a mistyped key is not taken for a family: named as before
    raw["families"] = raw_params["families"]
    with pytest.raises(ConfigError, match="data.vison: Extra inputs are not permitted"):
        parse_config(raw)


@pytest.mark.fault("params", "a value of the wrong type",
                   "ConfigError at load naming the key path and the value")
def test_wrong_type_names_its_path_and_value(raw_params):
    raw = {**raw_params, "teacher": {"vision": {**raw_params["teacher"]["vision"], "epochs": "ten"}}}
    with pytest.raises(ConfigError, match=r"teacher\.vision\.epochs: .*got 'ten'"):
        parse_config(raw)


def test_profile_overlay_errors_say_which_profile(raw_params):
    raw = {**raw_params, "profile": "smoke",
           "profiles": {"smoke": {"teacher": {"vision": {"batch_size": -1}}}}}
    with pytest.raises(ConfigError, match=r"after applying profile 'smoke'.*\n.*teacher\.vision\.batch_size"):
        parse_config(raw)


@pytest.mark.fault("params", "a profile that is no name, an overlay that is no mapping",
                   "ConfigError at load naming the key (before: a TypeError or AttributeError traceback)")
def test_a_malformed_profile_is_a_one_line_error(raw_params):
    with pytest.raises(ConfigError, match=r"profile: a profile name is required \(full or one of \['smoke'\]\), got "):
        parse_config({**raw_params, "profile": ["smoke"]})
    with pytest.raises(ConfigError, match=r"profiles\.smoke: an overlay of params is a mapping, got None"):
        parse_config({**raw_params, "profile": "smoke", "profiles": {"smoke": None}})


def test_a_profile_is_checked_when_a_run_selects_it_not_before(raw_params):
    """A profile a project never runs, left inconsistent with base values edited for its own data (a val_size below
    the smoke subset's), does not stop its runs; selected, it is refused naming it."""
    data = {**raw_params["data"]["vision"], "val_size": 100}
    raw = {**raw_params, "data": {**raw_params["data"], "vision": data}}
    assert parse_config(raw).data.vision.val_size == 100
    with pytest.raises(ConfigError, match=r"after applying profile 'smoke'.*\n.*data\.vision"):
        parse_config({**raw, "profile": "smoke"})


def test_unknown_profile_lists_choices(raw_params):
    with pytest.raises(ConfigError, match=r"unknown profile 'tiny'.*'smoke'"):
        parse_config({**raw_params, "profile": "tiny"})


@pytest.mark.fault("params", "a profile added to params.yaml (`profiles.quick`, `profile: quick`) that dvc.yaml "
                   "does not track, or tracks for some stages or keys only", "refused by the pipeline's checks and "
                   "by every stage in one line naming the first stage and key untracked and what to list (before: it "
                   "ran, and its later edits left outputs stale, silently)")
def test_a_profile_dvc_yaml_does_not_track_is_refused_before_anything_runs(raw_params, tmp_path, monkeypatch):
    import re
    import shutil
    import sys

    import yaml

    from flows.pipeline import preflight
    from tasks.config import stage_args
    from tests.conftest import ROOT

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    quick = {**raw_params, "profile": "quick", "profiles": {**raw_params["profiles"],
                                                            "quick": raw_params["profiles"]["smoke"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(quick, sort_keys=False))
    refusal = (r"params.yaml: profile: 'quick' sets profiles.quick.(\S+), which (\S+/)?dvc.yaml does not track for "
               r"stage (\w+) \(it reads (\S+)\) \(and \d+ more\): DVC would not re-run the stage when that value "
               r"changes; list profiles.quick.\4 in the stage's params beside \4, or choose 'full'$")
    with pytest.raises(ConfigError, match=refusal):
        preflight(tmp_path, None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stage"])
    with pytest.raises(ConfigError, match=refusal):
        stage_args("a stage")
    preflight(tmp_path, None, gate_only=True)   # no stage runs: nothing to go stale

    graph = (tmp_path / "dvc.yaml").read_text()   # one block tracked: the rest would still go stale
    (tmp_path / "dvc.yaml").write_text(graph.replace("- profiles.smoke.data.vision\n",
                                                     "- profiles.smoke.data.vision\n      - profiles.quick.data.vision\n", 1))
    with pytest.raises(ConfigError, match=refusal):
        stage_args("a stage")
    # each stage lists the profile's keys it reads, as it lists smoke's; or the whole `profiles` tree; or no DVC
    (tmp_path / "dvc.yaml").write_text(re.sub(r"^(\s*- )profiles\.smoke\.(\S+)$", r"\1profiles.smoke.\2\n\1profiles.quick.\2",
                                              graph, flags=re.MULTILINE))
    assert stage_args("a stage")[1].profile == "quick"
    (tmp_path / "dvc.yaml").write_text(re.sub(r"^(\s*- )profiles\.smoke\.(\S+)$", r"\1profiles", graph, flags=re.MULTILINE))
    assert stage_args("a stage")[1].profile == "quick"
    (tmp_path / "dvc.yaml").unlink()
    assert stage_args("a stage")[1].profile == "quick"
    (tmp_path / "dvc.yaml").write_text(graph)   # an overlay that sets nothing (an empty block) has nothing to track
    empty = {**quick, "profile": "empty", "profiles": {**quick["profiles"], "empty": {"teacher": {"vision": {}}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(empty, sort_keys=False))
    assert stage_args("a stage")[1].profile == "empty"


@pytest.mark.parametrize("field,value,pattern", [
    ("sha256", {"train-images-idx3-ubyte": "0" * 64}, r"sha256 must pin exactly"),
    ("val_size", 0, r"data\.vision\.val_size"),
    ("subset", {"train": 10, "val": 10}, r"data\.vision\.subset\.test: Field required"),
])
def test_data_section_rejects_bad_values(raw_params, field, value, pattern):
    raw = {**raw_params, "data": {"vision": {**raw_params["data"]["vision"], field: value}}}
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


def test_arch_lengths_must_agree(raw_params):
    teacher = {**raw_params["teacher"]["vision"], "arch": {"stem": 8, "widths": [8, 16], "blocks": [1]}}
    with pytest.raises(ConfigError, match=r"teacher\.vision\.arch: .*same length"):
        parse_config({**raw_params, "teacher": {"vision": teacher}})


@pytest.mark.parametrize("change,pattern", [
    ({"kinds": ["fused"]}, r"distill\.vision\.student: .*kinds \(1\) and widths \(5\) must have the same length"),
    ({"kinds": ["dense"] * 5}, r"distill\.vision\.student\.kinds\.0: Input should be 'separable' or 'fused'"),
    ({"stem_stride": 4}, r"distill\.vision\.student\.stem_stride: Input should be 1 or 2"),
    ({"residual": [True] + [False] * 4}, r"distill\.vision\.student: .*residual\.0: a residual block needs stride 1"),
])
def test_bad_student_arch_is_rejected_at_load(raw_params, change, pattern):
    kd = raw_params["distill"]["vision"]
    raw = {**raw_params, "distill": {"vision": {**kd, "student": {**kd["student"], **change}}}}
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


@pytest.mark.fault("params", "an optimizer momentum a one-cycle schedule would not use, or momentum 0 with nesterov",
                   "ConfigError naming the key and the setting that makes it count (before: the one-cycle silently "
                   "cycled 0.85-0.95 whatever momentum said; momentum 0 stopped the stage with torch's traceback)")
@pytest.mark.parametrize("optimizer,schedule,pattern", [
    ({"momentum": 0.5}, {}, (r"teacher\.vision: .*optimizer\.momentum 0\.5 is not used: schedule onecycle cycles "
                             r"the momentum between 0\.85 and 0\.95")),
    ({"momentum": 0.0}, {"name": "cosine"}, r"teacher\.vision\.optimizer: .*nesterov needs a momentum above 0"),
    ({}, {"cycle_momentum": [0.95, 0.85]},
     r"teacher\.vision\.schedule: .*cycle_momentum \[0\.95, 0\.85\] is \[low, high\]"),
])
def test_a_momentum_that_would_not_count_is_refused_at_load(raw_params, optimizer, schedule, pattern):
    block = raw_params["teacher"]["vision"]
    raw = {**raw_params, "teacher": {**raw_params["teacher"], "vision": {
        **block, "optimizer": {**block["optimizer"], **optimizer}, "schedule": {**block["schedule"], **schedule}}}}
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)
    raw["teacher"]["vision"]["schedule"]["cycle_momentum"] = None   # a momentum the run then uses
    if optimizer.get("momentum"):
        assert parse_config(raw).teacher.vision.optimizer.momentum == 0.5


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "nope.yaml")


def test_ablation_recipes_merge_overrides_and_seed(config):
    from tasks.images.config import ablation_recipes

    recipes = ablation_recipes(config, 7, "vision")
    assert recipes["distill"].epochs == config.ablation.vision.distill["epochs"] != config.distill.vision.epochs
    assert recipes["distill"].temperature == config.distill.vision.temperature  # what is not overridden is kept
    assert {r.seed for r in recipes.values()} == {7}


def test_reading_params_imports_no_pytorch():
    """Before: params' check of the ablation blocks resolved teacher_runtime ``auto``, which asks PyTorch about the
    CPU: every process that read params.yaml (each stage, the flows, the CLI commands) imported torch (~3 s)."""
    loads = ("from tasks.config import load_config\ncfg = load_config('params.yaml')\n"
             "assert cfg.ablation is not None and any(getattr(cfg.block('distill', f), 'teacher_runtime', None) "
             "== 'auto' for f in cfg.families)")
    assert imported_by(loads, ("torch", "onnxruntime")) == []


@pytest.mark.parametrize("override,pattern", [
    ({"qat": {"epochs": 0}}, r"ablation\.vision\.qat does not give a valid qat\.vision: epochs"),
    ({"distill": {"epoch": 3}}, r"ablation\.vision\.distill .*epoch: Extra inputs"),
    ({"prune": {"steps": 9}}, r"ablation\.vision\.prune .*must cover steps"),
    ({"seeds": [1, 1]}, r"ablation\.vision\.seeds: .*lists a seed twice"),
    ({"seeds": []}, r"ablation\.vision\.seeds: "),
    # what spans the stage blocks, checked on the ablation's recipes too (before: a traceback mid-ablation, or a float
    # module silently ignored)
    ({"distill": {"feature_pairs": []}},
     r"ablation\.vision\.distill\.weights\.feature > 0 needs at least one entry in ablation\.vision\.distill\.fea"),
    ({"distill": {"feature_pairs": [{"teacher": 1, "student": 9}]}},
     r"ablation\.vision\.distill\.feature_pairs\.0\.student: student block 9 does not exist"),
    ({"qat": {"float_modules": ["blocks.9"]}}, r"ablation\.vision\.qat\.float_modules\.0: blocks\.9 does not exist"),
])
def test_bad_ablation_overrides_fail_at_load(raw_params, override, pattern):
    raw = {**raw_params, "ablation": {**raw_params["ablation"], "vision": {**raw_params["ablation"]["vision"], **override}}}
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


@pytest.mark.parametrize("section,change,pattern", [
    ("data", {"negative_max_rating": 4}, r"data\.recsys: .*negative_max_rating \(4\) must be below positive_min_rating"),
    ("data", {"sha256": {"ml-100k.inter": "0" * 64}}, r"data\.recsys: .*sha256 must pin exactly"),
    ("recipe", None, r"recipe\.recsys\.0: Input should be 'distill', 'prune', 'qat' or 'share'"),
])
def test_bad_recommender_params_are_rejected_at_load(raw_params, section, change, pattern):
    family = raw_params[section]["recsys"]
    value = ["distil"] if change is None else {**family, **change}
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**raw_params, section: {**raw_params[section], "recsys": value}})


def test_the_two_families_cannot_register_the_same_model(raw_params):
    gate = raw_params["gate"]
    same = {**gate, "recsys": {**gate["recsys"], "registered_model": gate["vision"]["registered_model"]}}
    with pytest.raises(ConfigError, match=r"gate: .*register the same model name"):
        parse_config({**raw_params, "gate": same})


@pytest.mark.parametrize("section,key,value", [
    ("data.vision", "download_cache", "/etc/fashion-mnist"),
    ("data.recsys", "download_cache", "../../outside/ml-100k"),
    ("tracking", "artifact_root", "mlartifacts/../../elsewhere"),
    ("sweep", "work_dir", "/tmp/sweeps"),
])
@pytest.mark.fault("security", "a params path that leaves the project (absolute, or '..' out of it)",
                   "ConfigError at load naming the key and the rule; no stage starts")
def test_paths_the_pipeline_writes_cannot_leave_the_project(raw_params, section, key, value):
    import copy

    raw = copy.deepcopy(raw_params)
    node = raw
    for part in section.split("."):
        node = node[part]
    node[key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*leaves the project"):
        parse_config(raw)


@pytest.mark.fault("params", "a value no stage can run with though its type is right (a negative seed, min_chars "
                   "above max_chars, the label in a table's split key, na_values that is no list)",
                   "ConfigError at load naming the key (before: accepted, then a traceback in the stage, every "
                   "sentence refused, a relabelled row moving split, or a wrong type read as none)")
@pytest.mark.parametrize("dotted,value,pattern", [
    ("data.text.seed", -1, r"data\.text\.seed: Input should be greater than or equal to 0"),
    ("data.vision.seed", -1, r"data\.vision\.seed: Input should be greater than or equal to 0"),
    ("data.recsys.seed", -1, r"data\.recsys\.seed: Input should be greater than or equal to 0"),
    ("data.clicks.seed", -1, r"data\.clicks\.seed: Input should be greater than or equal to 0"),
    ("distill.vision.seed", -1, r"distill\.vision\.seed: Input should be greater than or equal to 0"),
    ("validate.text.min_chars", 500, r"validate\.text: .*min_chars 500 is above max_chars 400"),
    ("data.clicks.split.key", ["user_id", "click"], r"data\.clicks: .*split\.key holds the label 'click'"),
    ("data.clicks.na_values", False, r"data\.clicks\.na_values"),
    ("data.clicks.na_values", "", r"data\.clicks\.na_values"),
])
def test_values_a_stage_cannot_run_with_are_refused_at_load(raw_params, dotted, value, pattern):
    import copy

    from flows.workspace import set_param

    raw = copy.deepcopy(raw_params)
    set_param(raw, dotted, value)
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)
