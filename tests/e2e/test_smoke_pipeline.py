"""The smoke profile end to end: one whole-graph Prefect flow run in a temporary copy of the repo, which these tests
inspect and build on (re-runs, a killed stage, the smoke, ablation and export-benchmark commands)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline import compression_pipeline
from flows.stage_graph import stage_graph
from tasks.lineage import remade_since
from tests.e2e.scratch import dvc, locked_outs, make_repo, repo_env

pytestmark = pytest.mark.e2e
FAMILIES = ["vision", "recsys", "text", "digits", "clicks"]   # params.yaml's, in its order
TRAINING_STAGES = ("train_teacher_", "distill_", "prune_", "qat_", "share_")


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory, prefect_server):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PIPELINE_PARENT_RUN_ID", None)
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "repo")
    state = compression_pipeline(str(repo), return_state=True)
    return repo, state, state.result()


def test_flow_runs_every_stage_and_tracks_it(flow_repo):
    repo, _, result = flow_repo
    names = [n.name for n in stage_graph(repo)]
    assert result["stages"] == {n: "ran" for n in names}
    assert 0.0 < result["metrics"]["vision.teacher.test_accuracy"] <= 1.0
    for family in FAMILIES:   # the lock DVC wrote is consistent: `--gate-only` takes these candidates
        assert remade_since(f"evaluate_{family}", (repo / "dvc.lock").read_text()) == [], family
    assert result["tracking_uri"] == f"sqlite:///{repo / 'mlflow.db'}"

    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.profile"] == "smoke"
    assert "vision.teacher.test_accuracy" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["pipeline.stage"]: r for r in children}
    assert set(by_stage) == set(names) | {f"promote_{f}" for f in FAMILIES}  # stages, then gates
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git.commit"] != "none" and run.data.tags["git.dirty"] == "false"
        assert len(run.data.tags["params.hash"]) == 64

    teacher = by_stage["train_teacher_vision"]
    assert teacher.data.tags["dvc.dep.data/vision/processed"] == locked_outs(repo)["data/vision/processed"]
    for stage, context in (("train_teacher_vision", "training"), ("evaluate_recsys", "evaluation"),
                           ("promote_vision", "evaluation")):   # MLflow's dataset inputs: the data each run saw
        (seen,) = client.get_run(by_stage[stage].info.run_id).inputs.dataset_inputs
        family = stage.rsplit("_", 1)[1]
        assert seen.dataset.digest == locked_outs(repo)[f"data/{family}/processed"], stage
        assert [t.value for t in seen.tags if t.key == "mlflow.data.context"] == [context], stage
    assert len(client.get_metric_history(teacher.info.run_id, "val_accuracy")) == 1  # one smoke epoch
    assert "system/cpu_utilization_percentage" in teacher.data.metrics   # MLflow's system metrics of the stage
    artifacts = {a.path for a in client.list_artifacts(teacher.info.run_id)}
    assert {"teacher.pt", "teacher.json", "teacher_history.csv", "model_summary.txt", "learning_curves.png"} <= artifacts
    figures = {stage: {a.path for a in client.list_artifacts(by_stage[stage].info.run_id) if a.path.endswith(".png")}
               for stage in ("prune_vision", "evaluate_vision", "evaluate_recsys", "qat_recsys")}
    assert figures == {"prune_vision": {"learning_curves.png", "weights_kept.png"},
                       "evaluate_vision": {"student_int8_confusion.png"},
                       "evaluate_recsys": {"student_int8_roc_pr_calibration.png"},
                       "qat_recsys": {"learning_curves.png"}}
    trained = [stage for stage, run in by_stage.items() if stage.startswith(TRAINING_STAGES)
               and run.data.tags.get("stage.pass_through") != "true"]   # (digits' recipe leaves prune and share out)
    assert {"prune_recsys", "prune_clicks", "distill_text"} < set(trained)   # (before: the click-through kit's
    assert [s for s in trained if "best_epoch" not in by_stage[s].data.metrics] == []   # prune runs had none)
    validation = {a.path for a in client.list_artifacts(by_stage["validate_vision"].info.run_id)}
    assert {"validation.json", "data_docs"} <= validation   # GE's Data Docs beside the report
    assert (repo / "reports/vision/data_docs/index.html").exists()

    onnx_files = {p.name for p in (repo / "models" / "vision" / "onnx").iterdir()}
    assert onnx_files == {"teacher_fp32.onnx", "student_fp32.onnx", "student_int8.onnx", "student_ptq_int8.onnx"}
    assert by_stage["export_vision"].data.metrics["student_int8.top1_agreement"] >= 0.8  # smoke parity threshold
    assert "student_ptq_int8.top1_agreement" in by_stage["export_vision"].data.metrics  # every shipped file checked
    # the smoke recipe prunes structurally: QAT, sharing and export carry the narrower student
    metrics = result["metrics"]
    assert metrics["vision.student_pruned.parameters"] < metrics["vision.student_pruned.parameters_before"]
    assert result["metrics"]["vision.evaluation.ratios.size_ratio_vs_teacher"] > 1
    assert result["metrics"]["vision.evaluation.models.student_int8.latency_b1_p95_ms"] > 0

    gate = result["gates"]["vision"]  # the smoke gate is lenient: a first candidate passes and becomes champion
    assert gate["passed"] and gate["version"] == "1" and gate["name"] == "smoke-student-int8"
    champion = client.get_model_version_by_alias("smoke-student-int8", "champion")
    assert str(champion.version) == "1" and champion.tags["gate.passed"] == "true"
    assert champion.tags["parent_run_id"] == parent.info.run_id
    assert champion.tags["data.hash"] == locked_outs(repo)["data/vision/processed"]
    assert "Gate: **PASS**" in (repo / "reports" / "vision" / "gate.md").read_text()
    promote_artifacts = {a.path for a in client.list_artifacts(by_stage["promote_vision"].info.run_id)}
    assert {"gate.md", "gate.json", "report.html", "model"} <= promote_artifacts
    assert (repo / "reports" / "vision" / "report.html").read_text().count("<svg") == 2


def test_flow_gates_and_registers_the_recommender(flow_repo):
    """The second family through the same run: every compression stage (smoke recipe), INT8 ONNX, gate, registry."""
    import onnx

    repo, _, result = flow_repo
    assert 0.5 < result["metrics"]["recsys.teacher.test_auc"] <= 1.0
    assert result["metrics"]["recsys.student_pruned.dimensions_after"] < result["metrics"]["recsys.student_pruned.dimensions_before"]
    graph = onnx.load(str(repo / "models/recsys/onnx/student_int8.onnx")).graph
    initializers = {i.name: i for i in graph.initializer}
    assert {"model.embedding.weight.int8", "model.row_map.index"} <= set(initializers)  # INT8 rows, shared
    assert {"DequantizeLinear", "Gather", "QuantizeLinear"} <= {n.op_type for n in graph.node}
    assert result["metrics"]["recsys.export.student_int8.rows_within"] >= 0.999

    gate = result["gates"]["recsys"]
    assert gate["passed"] and gate["version"] == "1" and gate["name"] == "smoke-ctr-student-int8"
    client = MlflowClient(result["tracking_uri"])
    champion = client.get_model_version_by_alias("smoke-ctr-student-int8", "champion")
    assert champion.tags["gate.auc_drop_vs_teacher"] == "pass" and champion.tags["gate.passed"] == "true"
    assert champion.tags["data.hash"] == locked_outs(repo)["data/recsys/processed"]
    assert "| auc |" in (repo / "reports" / "recsys" / "gate.md").read_text()
    assert (repo / "reports" / "recsys" / "report.html").read_text().count("<svg") == 2   # the same HTML report


def test_the_text_family_runs_through_the_same_graph_gate_and_registry(flow_repo, tmp_path):
    """The third family: a pretrained encoder fine-tuned as teacher, a BiLSTM distilled on the transfer set, a dynamic
    INT8 ONNX file that carries its tokenizer, gated and registered with a signature of word ids and lengths."""
    import onnx

    from tasks.text.onnx_graph import onnx_text_logits, tokenizer_of

    repo, _, result = flow_repo
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    teacher_run = client.search_runs([parent.info.experiment_id], "tags.`pipeline.stage` = 'train_teacher_text'")[0]
    assert teacher_run.data.tags["teacher.origin"].startswith("all-MiniLM-L6-v2 from ")
    student_kd = json.loads((repo / "metrics/text/student_kd.json").read_text())
    train_rows = json.loads((repo / "data/text/processed/manifest.json").read_text())["splits"]["train"]["rows"]
    assert student_kd["training_rows"] == 2 * train_rows   # the training sentences and one transfer copy of each
    path = repo / "models/text/onnx/student_int8.onnx"
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert tokenizer_of(path).kind == "words" and tokenizer_of(repo / "models/text/onnx/teacher_fp32.onnx").kind == \
        "wordpiece"
    assert result["metrics"]["text.export.student_int8.top1_agreement"] >= 0.8
    gate = result["gates"]["text"]
    assert gate["passed"] and gate["name"] == "smoke-text-student-int8"
    champion = client.get_model_version_by_alias("smoke-text-student-int8", "champion")
    assert champion.tags["data.hash"] == locked_outs(repo)["data/text/processed"]
    from mlflow.models import Model

    signature = Model.load(client.download_artifacts(champion.run_id, "model/MLmodel", str(tmp_path))).signature
    assert {i.name: i.shape for i in signature.inputs.inputs} == {"ids": (-1, -1), "lengths": (-1,)}   # any length
    texts = ["A wonderful, moving film.", "Dull."]
    assert onnx_text_logits(path, texts).shape == (2, 2)
    assert "| accuracy |" in (repo / "reports" / "text" / "gate.md").read_text()


def test_the_digits_family_added_through_the_contract_runs_the_graph_gate_and_registry(flow_repo):
    """The fourth family, added as a package of the image kit, its params blocks and its stages: scikit-learn's digits
    written out as an image folder, read back as a user's images, compressed, gated and registered."""
    from PIL import Image

    repo, _, result = flow_repo
    folders = sorted(p for p in (repo / "data/digits/images").iterdir())
    assert [p.name for p in folders] == [str(d) for d in range(10)]
    pngs = sorted((repo / "data/digits/images").glob("*/*.png"))
    assert len(pngs) == 1797 and Image.open(pngs[0]).size == (8, 8) and Image.open(pngs[0]).mode == "L"
    manifest = json.loads((repo / "data/digits/processed/manifest.json").read_text())
    snapshot = json.loads((repo / "data/digits/raw/snapshot.json").read_text())
    assert snapshot["batches"][0]["source"].startswith("image folder data/digits/images (content sha256 ")
    assert manifest["image"] | {"mean": None, "std": None} == {"channels": 1, "height": 8, "width": 8, "mean": None,
                                                               "std": None, "classes": [str(d) for d in range(10)]}
    assert sum(s["rows"] for s in manifest["splits"].values()) == 1797
    evaluation = json.loads((repo / "metrics/digits/evaluation.json").read_text())
    assert evaluation["models"]["student_int8"]["test_accuracy"] >= 0.5   # six epochs learn 8x8 digits: the smoke gate's floor
    gate = result["gates"]["digits"]
    assert gate["passed"] and gate["version"] == "1" and gate["name"] == "smoke-digits-student-int8"
    champion = MlflowClient(result["tracking_uri"]).get_model_version_by_alias("smoke-digits-student-int8", "champion")
    assert champion.tags["data.hash"] == locked_outs(repo)["data/digits/processed"]
    assert "| accuracy |" in (repo / "reports" / "digits" / "gate.md").read_text()


def test_prefect_ran_one_task_per_stage_in_graph_order(flow_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    repo, state, _ = flow_repo
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    # the smoke profile runs two stages at once (pipeline.parallel_stages): each starts once its upstream has ended
    timed = {r.name: r for r in runs}
    graph = stage_graph(repo)
    assert set(timed) == {n.name for n in graph} | {f"promote_{f}" for f in FAMILIES}
    for node in graph:
        for upstream in node.upstream:
            assert timed[upstream].end_time <= timed[node.name].start_time, (upstream, node.name)
    last_stage = max(timed[n.name].end_time for n in graph)
    promotes = sorted((r for r in runs if r.name.startswith("promote_")), key=lambda r: r.start_time)
    assert [r.name for r in promotes] == [f"promote_{f}" for f in FAMILIES]   # then the gates, in families' order
    assert all(r.start_time >= last_stage for r in promotes)


def test_the_prefect_run_shows_what_each_stage_printed_the_gates_and_the_evaluations(flow_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId

    repo, state, result = flow_repo
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
        tasks = {t.name: t.id for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
        teacher: list[str] = []
        deadline = time.monotonic() + 60   # the run's log records reach the API in batches, a few seconds late
        while not any(m.startswith("epoch 1/1:") for m in teacher) and time.monotonic() < deadline:
            time.sleep(1)
            teacher = [log.message for log in client.read_logs(
                LogFilter(task_run_id=LogFilterTaskRunId(any_=[tasks["train_teacher_vision"]])), limit=200)]
    assert {"pipeline-stages", "vision-evaluation", "recsys-evaluation", "vision-gate", "recsys-gate",
            "mlflow-run"} <= set(artifacts)
    assert "Gate: **PASS**" in artifacts["vision-gate"].data and "| size_kb |" in artifacts["vision-gate"].data
    assert "| auc_drop_vs_teacher |" in artifacts["recsys-gate"].data
    rows = json.loads(artifacts["vision-evaluation"].data)
    int8 = next(r for r in rows if r["model"] == "student_int8")
    measured = json.loads((repo / "metrics/vision/evaluation.json").read_text())["models"]["student_int8"]
    assert int8["test_accuracy"] == round(measured["test_accuracy"], 4) and int8["bytes"] == measured["bytes"]
    stages = json.loads(artifacts["pipeline-stages"].data)
    names = [s["stage"] for s in stages]
    assert names.index("snapshot_recsys") < names.index("prepare_recsys") and {s["status"] for s in stages} == {"ran"}
    assert result["parent_run_id"] in artifacts["mlflow-run"].data
    for family in FAMILIES:   # where the Data Docs are (a local store: the path of the MLflow artifact)
        docs = artifacts[f"validate-{family}-data-docs"].data
        assert "(validation success: true)" in docs and docs.split("`")[1].endswith("/data_docs/index.html")
        assert Path(docs.split("`")[1]).exists()
    # what a stage printed is in its task run's log (the UI shows it there), not only on the terminal
    assert any(m.startswith("epoch 1/1:") for m in teacher), teacher[-10:]


def test_a_click_table_family_added_through_the_contract_runs_the_graph_gate_and_registry(flow_repo):
    """The fifth family, a table family of the click-through kit: MovieLens's ratings written out as one Parquet table,
    read back only through the schema params.yaml declares, compressed, gated and registered with its vocabulary."""
    import pandas as pd

    repo, _, result = flow_repo
    table = pd.read_parquet(repo / "data/clicks/table/ratings.parquet")
    assert len(table) == 72855 and set(table.click.unique()) == {0, 1}
    features = json.loads((repo / "data/clicks/processed/features.json").read_text())
    assert [f["name"] for f in features["fields"]] == ["user_id", "item_id", "age", "gender", "occupation",
                                                       "zip_code", "release_year"]
    assert features["groups"] == [{"name": "genres", "offset": 0, "size": 19}]   # MovieLens's 19 genres
    assert sum(s["rows"] for s in features["splits"].values()) == 20000   # the smoke profile's subset
    assert json.loads((repo / "reports/clicks/validation.json").read_text())["success"]
    evaluation = json.loads((repo / "metrics/clicks/evaluation.json").read_text())
    assert evaluation["models"]["student_int8"]["test_auc"] > 0.6    # two epochs on 16,000 rows learn something
    assert evaluation["models"]["student_int8"]["request_rows"] == 1000
    gate = result["gates"]["clicks"]
    assert gate["passed"] and gate["version"] == "1" and gate["name"] == "smoke-clicks-student-int8"
    client = MlflowClient(result["tracking_uri"])
    champion = client.get_model_version_by_alias("smoke-clicks-student-int8", "champion")
    assert champion.tags["data.hash"] == locked_outs(repo)["data/clicks/processed"]
    registered = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(champion.run_id, "model")}
    assert {"model.onnx", "vocabulary.json"} <= registered   # what a client encodes raw rows with
    assert "| auc |" in (repo / "reports" / "clicks" / "gate.md").read_text()


def test_dvc_plots_and_metrics_show_every_family(flow_repo):
    """dvc.yaml's top-level plots render train and validation curves of the trained models in one chart per family, and
    ``dvc metrics show`` covers every family's metrics files."""
    repo, _, _ = flow_repo
    shown = dvc(repo, "plots", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    plots = json.loads(shown.stdout)
    for chart, metric in (("vision_accuracy", "accuracy"), ("recsys_auc", "auc"), ("clicks_auc", "auc")):
        (spec,) = plots["data"][chart]
        drawn = {v["filename::field"] for v in spec["content"]["data"]["values"]}   # one line per file and field
        assert drawn == {f"{model}_history.csv::{split}_{metric}" for split in ("train", "val")
                         for model in ("teacher", "student_kd", "student_qat")}
    (spec,) = plots["data"]["text_accuracy"]
    assert {v["filename::field"] for v in spec["content"]["data"]["values"]} == {
        f"{model}_history.csv::{split}_accuracy" for split in ("train", "val") for model in ("teacher", "student_kd")}
    # the sweeps' scatter waits for `make sweep`: a missing file, not a broken definition
    assert {e["name"] for e in plots.get("errors", [])} <= {"recsys_sweep_pareto", "vision_sweep_pareto"}
    metrics = dvc(repo, "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr
    files = set(json.loads(metrics.stdout)[""]["data"])
    assert {f"metrics/{f}/evaluation.json" for f in FAMILIES} <= files


def _browser(*args: str) -> subprocess.CompletedProcess:
    """Debian's headless Chromium (``make services`` installs ``chromium-headless-shell``), offline and sandboxed
    by its user namespace only when it may."""
    binary = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    assert binary, "no headless Chromium: apt-get install chromium-headless-shell (make services does, as root)"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def test_our_html_pages_render_in_a_real_browser(flow_repo, tmp_path):
    """The gate's HTML report and a validation page of the Data Docs, opened by Chromium as a user would: the
    rendered DOM has the plots and the tables, and the screenshot is not blank."""
    from PIL import Image

    repo, _, _ = flow_repo
    report = repo / "reports/vision/report.html"
    (page,) = (repo / "reports/vision/data_docs/validations/vision_rows_train").rglob("*.html")
    for name, html, expected in (("report", report, ("<svg", "Gate: <b>PASS</b>", "size_ratio_vs_teacher")),
                                 ("data_docs", page, ("Expectation Validation Result", "values must belong to this set"))):
        dom = _browser("--dump-dom", html.as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        for text in expected:
            assert text in dom.stdout, (name, text)
        shot = tmp_path / f"{name}.png"
        done = _browser(f"--screenshot={shot}", "--window-size=1280,1600", html.as_uri())
        assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
        pixels = np.asarray(Image.open(shot).convert("L"))
        assert pixels.shape == (1600, 1280) and pixels.std() > 10 and (pixels < 128).mean() > 0.003, name


def test_nothing_changed_means_nothing_recomputed(flow_repo):
    repo, _, _ = flow_repo
    before = locked_outs(repo)
    again = compression_pipeline(str(repo))
    assert set(again["stages"].values()) == {"cached"}
    for gate in again["gates"].values():  # the registry is not touched either
        assert gate["unchanged"] and gate["version"] == "1"
    repro = dvc(repo, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "Data and pipelines are up to date" in repro.stdout + repro.stderr
    assert locked_outs(repo) == before


@pytest.mark.fault("runs", "a teammate's `git clone` + `dvc pull` of a finished run",
                   "every output comes back from the DVC remote: `dvc status` finds nothing to re-run (before: the "
                   "checkpoints and Data Docs, declared outputs DVC did not cache, were missing, so every training "
                   "and validation stage of every family would run again)")
def test_a_clone_pulls_every_output_and_has_nothing_to_rerun(flow_repo, tmp_path):
    repo, _, _ = flow_repo
    pushed = dvc(repo, "push")   # the flow pushes the data versions; the rest, as the user shares them
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    shutil.copy(repo / "dvc.lock", clone / "dvc.lock")   # as the user commits it (not in this scratch copy's git)
    # the repo's remote (.dvc/config: ../.dvc-storage, relative to the .dvc folder: the clone's own otherwise)
    assert dvc(clone, "remote", "modify", "--local", "local", "url", str(repo / ".dvc-storage")).returncode == 0
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    status = dvc(clone, "status")
    assert status.returncode == 0, status.stderr[-3000:]
    assert "Data and pipelines are up to date" in status.stdout, status.stdout[-3000:]


def test_make_smoke_runs_a_family_in_its_own_copy_with_the_flows_outputs(flow_repo, tmp_path):
    """``python -m flows.smoke`` (``make smoke``): a fresh scratch copy, its own stores, and the very bytes the
    flow wrote: every stage is deterministic across processes. (One family: the other runs the same generic stage
    code.) The project it was started from is not touched."""
    repo, _, _ = flow_repo
    watched = [Path("params.yaml"), Path("dvc.yaml"), Path("mlflow.db"), Path("dvc.lock")]
    before = {p: p.read_bytes() if p.exists() else None for p in watched}
    dest = tmp_path / "smoke"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # a server it must not use
    proc = subprocess.run([sys.executable, "-m", "flows.smoke", "--dir", str(dest), "--family", "clicks"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke run: 10 stages and 1 gate(s)" in proc.stdout and "gate clicks: PASS" in proc.stdout
    assert {p: p.read_bytes() if p.exists() else None for p in watched} == before
    champion = MlflowClient(f"sqlite:///{dest / 'mlflow.db'}").get_model_version_by_alias(
        "smoke-clicks-student-int8", "champion")
    assert str(champion.version) == "1"
    theirs = locked_outs(dest)
    ours = {path: md5 for path, md5 in locked_outs(repo).items() if path in theirs}
    assert len(theirs) >= 9 and "models/clicks/student_qat.pt" in theirs
    for measured in ("metrics/clicks/evaluation.json", "reports/clicks/data_docs"):  # latencies; run times
        assert ours.pop(measured) and theirs.pop(measured)
    assert theirs == ours


@pytest.mark.fault("runs", "SIGKILL in the middle of QAT (the flow's `dvc repro --single-item`)",
                   "the previous QAT outputs stay byte-identical (staged outputs); the re-run resumes from the last "
                   "checkpoint, records every epoch and leaves DVC up to date")
def test_killed_qat_keeps_the_previous_outputs_and_resumes(flow_repo, tmp_path):
    import shutil
    import signal

    source, _, _ = flow_repo
    repo = tmp_path / "repo"
    shutil.copytree(source, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["smoke"]["qat"]["vision"]["epochs"] = 3  # other params: the flow's checkpoint is not resumed
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    outputs = [repo / "models/vision/student_qat.pt", repo / "metrics/vision/student_qat.json",
               repo / "plots/vision/student_qat_history.csv"]
    before = {p: p.read_bytes() for p in outputs}
    checkpoint = repo / "checkpoints/vision/student_qat/last.pt"
    stamp = checkpoint.stat().st_mtime_ns
    env = repo_env(repo)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "qat_vision"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while checkpoint.stat().st_mtime_ns == stamp and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "QAT ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p: p.read_bytes() for p in outputs} == before  # nothing half-written, nothing replaced

    again = dvc(repo, "repro", "--single-item", "qat_vision")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoints/vision/student_qat/last.pt after epoch 1" in again.stderr
    history = (repo / "plots/vision/student_qat_history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 3
    model = repo / "models/vision/student_qat.pt"
    assert locked_outs(repo)["models/vision/student_qat.pt"] == hashlib.md5(model.read_bytes()).hexdigest()
    assert not list(repo.rglob(".staging"))


def test_ablation_command_tables_every_arm_and_resumes(flow_repo):
    """The ablation on the smoke profile (2 seeds, structured pruning), on the flow's data and teacher: of the digits,
    the smallest image family (the command is generic; vision's arms run the same code on 28x28 images, ~6x the
    time)."""
    import onnx

    repo, _, _ = flow_repo
    env = repo_env(repo)
    command = [sys.executable, "-m", "flows.ablation", "--root", str(repo), "--family", "digits"]
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((repo / "reports" / "ablation" / "digits.json").read_text())
    rows = {row["arm"]: row for row in doc["rows"]}  # a list, in table order
    assert list(rows) == ["teacher", "student CE-only", "student KD", "CE-only + PTQ", "KD + PTQ", "QAT without KD",
                          "KD + QAT", "KD + QAT + pruning", "KD + QAT + weight sharing", "W4A8 CE-only + PTQ",
                          "W4A8 QAT without KD", "W4A8 KD + QAT"]
    assert rows["teacher"]["n"] == 1 and all(r["n"] == 2 and len(r["accuracies"]) == 2 for a, r in rows.items() if a != "teacher")
    assert all(0.0 < acc <= 1.0 for r in rows.values() for acc in r["accuracies"] + r["val_accuracies"])
    assert all(r["min_top1_agreement"] >= 0.8 for r in rows.values())   # every file passed the smoke parity check
    assert all(r["latency_ms"] > 0 and r["throughput_ips"] > 0 for r in rows.values())   # each file timed
    # the weights each arm's ONNX file stores (a 2,354-parameter model's file is mostly graph: its bytes say little)
    work = repo / "reports" / "ablation" / "work" / "digits" / "seed0"
    weights = lambda name: {onnx.TensorProto.DataType.Name(t.data_type)
                            for t in onnx.load(str(work / name)).graph.initializer if len(t.dims) >= 2}
    assert weights("kd.onnx") == {"FLOAT"} and weights("qat_kd.onnx") == weights("kd_ptq.onnx") == {"INT8"}
    assert weights("qat_kd_w4.onnx") == weights("ce_ptq_w4.onnx") == {"INT4"}
    # structured on the smoke profile: a narrower model, fewer weights
    assert rows["KD + QAT + pruning"]["parameters"] < rows["KD + QAT"]["parameters"]
    assert rows["KD + QAT + pruning"]["nonzero"] < 0.8 * rows["KD + QAT"]["parameters"]
    assert rows["W4A8 KD + QAT"]["bytes"] < rows["KD + QAT"]["bytes"]   # INT4 weights in the stored file
    assert rows["W4A8 CE-only + PTQ"]["bytes"] < rows["CE-only + PTQ"]["bytes"]
    assert [c["key"] for c in doc["targets"]] == ["kd_qat_accuracy", "drop_vs_teacher", "gain_over_ptq",
                                                 "low_bit_gain_over_ptq", "low_bit_size_ratio"]
    assert "| KD + QAT + weight sharing | INT8 |" in proc.stdout and "| target |" in proc.stdout

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run = client.search_runs(["1"], "tags.`pipeline.launcher` = 'ablation'", order_by=["start_time DESC"])[0]
    assert run.info.status == "FINISHED" and "kd_qat.accuracy_mean" in run.data.metrics
    assert {"target.kd_qat_accuracy", "target.gain_over_ptq"} <= set(run.data.tags)
    assert {"digits.md", "digits.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    (data,) = client.get_run(run.info.run_id).inputs.dataset_inputs   # the data every arm trained on
    processed = "data/digits/processed"
    assert (data.dataset.name, data.dataset.digest) == (processed, locked_outs(repo)[processed])

    again = subprocess.run(command + ["--skip-repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1/" in proc.stdout and "epoch 1/" not in again.stdout   # every arm resumed: nothing retrained
    rerun = json.loads((repo / "reports" / "ablation" / "digits.json").read_text())["rows"]
    assert {r["arm"]: r["accuracies"] for r in rerun} == {a: r["accuracies"] for a, r in rows.items()}


def test_recsys_benchmark_command_measures_baselines_beside_the_flows_models(flow_repo, tmp_path):
    """The recommender's own benchmark (its package's, not a generic command): our LR and FM trained now, then every
    model as ONNX on the same splits; it had no test before it moved into tasks/recsys/."""
    repo, _, _ = flow_repo
    out = tmp_path / "recsys.json"
    proc = subprocess.run([sys.executable, "-m", "tasks.recsys.benchmark", "--root", str(repo),
                           "--onnx-dir", str(repo / "models/recsys/onnx"), "--data", str(repo / "data/recsys/processed"),
                           "--out", str(out)], capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| LR (ours) |" in proc.stdout and "| student INT8 AUC drop vs teacher |" in proc.stdout
    numbers = json.loads(out.read_text())
    assert {"LR (ours)", "FM (ours)", "teacher_fp32", "student_int8"} <= set(numbers["models"])
    assert all(0.0 < m["test_auc"] <= 1.0 and m["bytes"] > 0 for m in numbers["models"].values())


def test_export_benchmark_command_measures_the_flows_onnx_models(flow_repo, tmp_path):
    repo, _, _ = flow_repo
    out = tmp_path / "export.json"
    proc = subprocess.run([sys.executable, "-m", "flows.export_benchmark", "--family", "vision", "--root", str(repo),
                           "--onnx-dir", str(repo / "models/vision/onnx"), "--data", str(repo / "data/vision/processed"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| student_int8 |" in proc.stdout and "| student INT8 vs FP32 batch-64 throughput |" in proc.stdout
    numbers = json.loads(out.read_text())
    assert set(numbers["models"]) == {"teacher_fp32", "student_fp32", "student_int8", "student_ptq_int8"}
    assert numbers["settings"]["threads"] == 1 and numbers["ratios"]["size_ratio_vs_teacher"] > 1
