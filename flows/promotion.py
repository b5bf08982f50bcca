"""Gate and promotion of the INT8 student in the MLflow model registry (aliases only, no deprecated stages).

``gate_and_register`` (called by the pipeline flow after the last stage, once per family): scores the candidate
and the current ``champion`` on the same test data in the same run, writes ``reports/<family>/gate.{json,md}``,
registers the candidate as a new version of ``gate.<family>.registered_model`` with the ONNX flavor, a signature
and an input example, tags it with every gate result and its lineage, points ``challenger`` at it, and moves
``champion`` only when every check passes. The registry is checked for reachability before anything is written.

``promote-model`` (``python -m flows.promotion``) is the separate flow that moves an alias to a given version
(promotion or rollback), recording who and why as tags on that version.
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.registry_lock import registry_lock
from flows.stage_graph import stage_paths
from tasks.config import Config, load_config
from tasks.errors import PipelineError, ServiceUnavailable, run_cli
from tasks.family import load_family
from tasks.gate import Check, champion_health, gate_checks, gate_markdown, gate_tags, health_markdown
from tasks.io import file_digest, write_atomic, write_json
from tasks.lineage import data_params, dvc_input_hashes, git_state, params_hash
from tasks.onnx_models import session
from tasks.speedup import paired_timing
from tasks.tracking import client_for, redact, registered_version, server_error

MODEL_SHA256 = "model.sha256"   # version tag: SHA-256 of the registered ONNX file, checked before it is run
FILES_SHA256 = "model.files.sha256"   # version tag: {name: SHA-256} of the files registered beside it (a vocabulary)
LINEAGE, LINEAGE_FILES = "lineage", ("params.yaml", "dvc.lock")   # artifacts of the registering run
SPLIT_TAG = "data.split_params"   # version tag: SHA-256 of the data.<family> params its rows were split by
DATA_TAG = "data.description"   # version tag: digest of what its data says a request and an answer are (Family.describe_data)


def paths(root: Path, family: str) -> dict[str, Path]:
    """Where a family's candidate, teacher, evaluation, data and reports are (relative to ``root``), as its evaluate
    and validate stages' commands in dvc.yaml name them."""
    evaluate, validate = stage_paths(root, f"evaluate_{family}"), stage_paths(root, f"validate_{family}")
    return {"candidate": evaluate["onnx"] / "student_int8.onnx", "onnx": evaluate["onnx"],
            "teacher": evaluate["onnx"] / "teacher_fp32.onnx", "evaluation": evaluate["metrics"],
            "data": evaluate["data"], "reports": validate["report"].parent}


class RegistryError(PipelineError):
    """The model registry refused an operation; nothing was changed in it."""


class RegistryUnreachable(RegistryError, ServiceUnavailable):
    """The model registry did not answer after bounded retries; nothing was changed in it."""


def check_registry(client: MlflowClient, uri: str) -> None:
    try:
        client.search_registered_models(max_results=1)
    except Exception as err:  # connection errors surface as MlflowException or requests exceptions
        error = server_error(err, f"model registry at {redact(uri)}", "nothing was registered or promoted")
        raise (RegistryUnreachable(str(error)) if error.transient else error) from err


class CandidateAltered(RegistryError):
    """The candidate file is not the file whose metrics were evaluated; nothing was registered."""


def download_onnx(client: MlflowClient, version: Any, dest: Path) -> Path:
    """The ONNX file of a registered version, fetched through ``client`` (its ``runs:/`` source) and checked
    against the SHA-256 recorded on the version before anything runs it."""
    prefix = f"runs:/{version.run_id}/"
    if not version.source.startswith(prefix):
        raise RegistryError(f"version {version.version} has source {version.source}, not a run artifact of this "
                            "pipeline; promote a version registered by the pipeline")
    local = Path(client.download_artifacts(version.run_id, version.source.removeprefix(prefix), str(dest)))
    path = next(local.rglob("*.onnx"))
    recorded, actual = version.tags.get(MODEL_SHA256), file_digest(path)
    if recorded != actual:
        raise RegistryError(f"{version.name} version {version.version}: its stored ONNX file has SHA-256 {actual}, "
                            f"but the version records {recorded or 'none'} ({MODEL_SHA256}); the file was altered in "
                            "the artifact store (or registered outside the pipeline) and is not run")
    # the files it reads data with (a version registered before they were pinned carries none)
    for name, pinned in json.loads(version.tags.get(FILES_SHA256, "{}")).items():
        found = path.parent / name
        digest = file_digest(found) if found.is_file() else "none (missing)"
        if digest != pinned:
            raise RegistryError(f"{version.name} version {version.version}: its stored {name} has SHA-256 {digest}, "
                                f"but the version records {pinned} ({FILES_SHA256}); the file was altered in the "
                                "artifact store and the model is not run")
    return path


def verify_candidate(root: Path, family: str, evaluation: dict[str, Any], where: dict[str, Path]) -> None:
    """The candidate's and the teacher's SHA-256 must be the ones recorded when they were evaluated: metrics that
    passed belong to those files only (``where``: the family's ``paths``)."""
    for name, path in (("student_int8", where["candidate"]), ("teacher_fp32", where["teacher"])):
        recorded = evaluation.get("sha256", {}).get(name)
        actual = file_digest(root / path)
        if recorded != actual:
            raise CandidateAltered(f"{path} has SHA-256 {actual}, but {where['evaluation']} measured "
                                   f"{recorded or 'no recorded file'}: the file changed after evaluation; re-run "
                                   f"`dvc repro evaluate_{family}` (nothing was registered)")


def graph_signature(model: Any, inferred: Any) -> Any:
    """``inferred`` (from one request) with each input's shape as the ONNX graph declares it: an axis the graph
    leaves open (the batch, a variable length) is -1, so the scoring server takes any size there, not only the
    example's."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    declared = {i.name: [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
                for i in model.graph.input}
    inputs = [TensorSpec(spec.type, tuple(declared.get(spec.name, spec.shape)), spec.name)
              for spec in inferred.inputs.inputs]
    return ModelSignature(Schema(inputs), inferred.outputs)


def io_signature(path: Path) -> list[list[tuple[str, int, list[int]]]]:
    """(inputs, outputs) of an ONNX file: each value's element type and shape, an open axis as -1."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    spec = lambda v: (v.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else -1  # noqa: E731
                                                    for d in v.type.tensor_type.shape.dim])
    return [[spec(v) for v in graph.input], [spec(v) for v in graph.output]]


def data_description(family: str, data: Path) -> str:
    """A digest of what the family says a model of ``data`` takes and answers in ("" when it says nothing)."""
    describe = load_family(family).describe_data
    return hashlib.sha256(json.dumps(describe(data), sort_keys=True).encode()).hexdigest() if describe else ""


def split_by(client: MlflowClient, version: Any) -> str | None:
    """The ``data.<family>`` params hash a registered version's data was split by: its tag, else the warm start
    plan its run kept (versions registered before the tag); None when neither says."""
    from tasks.warm_plan import ARTIFACTS, PLAN, read_plan

    if version.tags.get(SPLIT_TAG):
        return version.tags[SPLIT_TAG]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return read_plan(Path(client.download_artifacts(version.run_id, f"{ARTIFACTS}/{PLAN}", tmp)).parent
                             ).get("data_params")
    except Exception:  # noqa: BLE001 - any store's "not found" (MLflow, local files, S3): not known
        return None


def check_comparable(name: str, champ: Any, champion_file: Path, candidate_file: Path, description: str,
                     family: str) -> None:
    """Raise RegistryError when the champion was made for other data than the candidate (other inputs, outputs or
    data description): their scores on this data would compare nothing, and clients of the champion would break."""
    why = ""
    if description and champ.tags.get(DATA_TAG, description) != description:
        why = f"its data description ({DATA_TAG} {champ.tags[DATA_TAG][:12]}…) differs from the candidate's " \
              f"({description[:12]}…)"
    elif (theirs := io_signature(champion_file)) != (ours := io_signature(candidate_file)):
        why = f"it takes {theirs[0]} and gives {theirs[1]}; the candidate takes {ours[0]} and gives {ours[1]}"
    if why:
        raise RegistryError(f"{name}@champion (version {champ.version}) was made for other data: {why}. Register "
                            f"this data's models under a name of their own (gate.{family}.registered_model in "
                            "params.yaml); nothing was registered")


def log_onnx_model(client: MlflowClient, run_id: str, path: Path, sample: dict[str, np.ndarray],
                   files: tuple[Path, ...] = ()) -> tuple[str, str]:
    """Log ``path`` with the ``mlflow.onnx`` flavor, a signature and an input example (an ONNX file, JSON and YAML:
    never a pickle), and ``files`` beside it (what the model needs to read raw data); return its runs:/ URI and the
    SHA-256 of the stored ONNX file."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    outputs = session(path).run(None, sample)[0]
    model = onnx.load(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        mlflow.onnx.save_model(model, str(local), signature=graph_signature(model, infer_signature(sample, outputs)),
                               input_example=sample, save_as_external_data=False)
        digest = file_digest(local / "model.onnx")
        for extra in files:
            shutil.copy2(extra, local / extra.name)
        client.log_artifacts(run_id, str(local), "model")
    return f"runs:/{run_id}/model", digest


def lineage(cfg: Config, root: Path, parent_run_id: str, family: str) -> dict[str, str]:
    """git commit, DVC's hash of the data and of the candidate file, the hash of every param, the parent run."""
    hashes, where = dvc_input_hashes(f"evaluate_{family}", root), paths(root, family)
    return {**git_state(root), "params.hash": params_hash(cfg),
            "data.hash": hashes.get(str(where["data"]), "unknown"),
            "onnx.hash": hashes.get(str(where["onnx"]), "unknown"), "parent_run_id": parent_run_id}


def keep_warm_start(client: MlflowClient, run_id: str, root: Path, family: str, data: Path) -> None:
    """What the next run's warm start reads should this version become champion (``tasks.warm_start``): its teacher
    and FP32 student, the plan they came from, the files its model reads data with; for a family whose stage graph
    has a warm start."""
    from tasks.warm_plan import ARTIFACTS, FILES, PLAN

    try:
        plan = stage_paths(root, f"warm_start_{family}")["out"] / PLAN
    except PipelineError:
        return
    kept = {FILES["teacher"]: stage_paths(root, f"train_teacher_{family}")["model"],
            FILES["student"]: stage_paths(root, f"distill_{family}")["model"], PLAN: plan,
            **{name: data / name for name in load_family(family).model_files}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in kept.items():
            if (root / path).is_file():
                shutil.copy2(root / path, Path(tmp) / name)
        client.log_artifacts(run_id, tmp, ARTIFACTS)


def gate_and_register(root: Path, cfg: Config, client: MlflowClient, uri: str, run_id: str,
                      parent_run_id: str, family: str, may_promote: bool = True,
                      extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Gate the family's candidate, register it, move aliases; return the report.

    ``champion`` moves only when every check passes and ``may_promote`` (a sweep registers challengers only). The
    registry part runs under the model's promotion lock, so concurrent runs promote one after another and each
    version's ``audit.*`` tags name the champion it was compared with."""
    gate = getattr(cfg.gate, family)
    check_registry(client, uri)
    where = paths(root, family)
    tags = {**lineage(cfg, root, parent_run_id, family), **(extra_tags or {})}
    for name in LINEAGE_FILES:   # what `python -m flows.restore` needs beside the git commit to re-create the run
        if (root / name).is_file():
            client.log_artifact(run_id, str(root / name), LINEAGE)
    if description := data_description(family, root / where["data"]):
        tags[DATA_TAG] = description   # the gate holds the champion to it
    tags[SPLIT_TAG] = data_params(cfg, family)   # a later gate compares with it only on data split the same way
    with registry_lock(gate.registered_model, cfg.tracking.registry_lock_timeout_seconds):
        same = _registered_with(client, gate.registered_model, tags["onnx.hash"])
        if same is not None:  # a no-change re-run: this exact file was gated and registered before
            print(f"{gate.registered_model} version {same.version} already holds this candidate; registry unchanged")
            return {"passed": same.tags.get("gate.passed") == "true", "checks": [], "name": gate.registered_model,
                    "version": str(same.version), "champion": False, "unchanged": True}
        keep_warm_start(client, run_id, root, family, where["data"])   # a new version: what the next run may start from
        report, checks, evaluation = _gate(root, cfg, client, run_id, family, where, description)
        promote = report["passed"] and may_promote
        tags.update({**gate_tags(checks), **audit_tags(report["champion_before"], promote),
                     **{f"quality.{window}_{gate.metric}": repr(evaluation["models"]["student_int8"][key])
                        for window in ("test", "recent")
                        if (key := f"{window}_{gate.metric}") in evaluation["models"]["student_int8"]}})
        contract = load_family(family)
        files = tuple(root / where["data"] / f for f in contract.model_files)
        source, tags[MODEL_SHA256] = log_onnx_model(client, run_id, root / where["candidate"],
                                                    contract.input_example(root / where["data"]), files)
        if files:
            tags[FILES_SHA256] = json.dumps({f.name: file_digest(f) for f in files}, sort_keys=True)
        if not client.search_registered_models(f"name = '{gate.registered_model}'"):
            try:
                client.create_registered_model(gate.registered_model)
            except MlflowException as err:  # created meanwhile by a run that holds no lock (an older version)
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        # Tags go in with the version (one call), aliases after: a failure in between leaves a tagged, unaliased
        # version that says what it is, never an alias on an untagged one.
        version = client.create_model_version(gate.registered_model, source, run_id, tags=tags)
        client.set_registered_model_alias(gate.registered_model, "challenger", version.version)
        if promote:
            client.set_registered_model_alias(gate.registered_model, "champion", version.version)
    report.update(name=gate.registered_model, version=str(version.version), champion=promote, unchanged=False)
    write_report(root, cfg, evaluation, report, tags, family, where)
    client.log_artifact(run_id, str(root / where["reports"] / "report.html"))
    return report


def _gate(root: Path, cfg: Config, client: MlflowClient, run_id: str, family: str, where: dict[str, Path],
          description: str) -> tuple[dict[str, Any], list[Check], dict[str, Any]]:
    """Score the candidate and the current champion back to back, check the gate, write and log its report;
    return the report, the checks and the evaluation with the candidate's fresh scores."""
    gate, contract = getattr(cfg.gate, family), load_family(family)
    data = root / where["data"]
    evaluation = json.loads((root / where["evaluation"]).read_text())
    verify_candidate(root, family, evaluation, where)
    champ = registered_version(client, gate.registered_model)
    champion = None
    if champ is not None and (theirs := split_by(client, champ)) not in (None, data_params(cfg, family)):
        # other split params: today's test rows may be the champion's training rows, its scores would flatter it
        champion = {"version": str(champ.version), "incomparable":
                    f"champion v{champ.version} was split by other data.{family} params ({theirs[:12]}…): today's "
                    "test rows may be its training rows, not compared (floors and teacher only)"}
        print(champion["incomparable"])
    with tempfile.TemporaryDirectory() as tmp:
        if champ is not None and champion is None:  # the champion and the candidate: same test data, same run
            champion_file = download_onnx(client, champ, Path(tmp))
            check_comparable(gate.registered_model, champ, champion_file, root / where["candidate"], description,
                             family)
            pair = contract.paired_data(champion_file.parent, data, Path(tmp) / "paired", cfg) \
                if contract.paired_data else None
            champion = {"version": str(champ.version), **contract.score(champion_file, pair[0] if pair else data, cfg)}
            if pair:   # it reads the data in its own encoding: both are compared on the rows it can read
                champion["candidate"] = contract.score(root / where["candidate"], pair[1], cfg)
    candidate, teacher = evaluation["models"]["student_int8"], evaluation["models"]["teacher_fp32"]
    candidate.update(contract.score(root / where["candidate"], data, cfg))
    # the latencies again, the candidate's and the teacher's in pairs of alternating rounds (tasks.speedup): a load
    # that changes while the gate measures weighs on both alike
    mine, theirs, speed = paired_timing(lambda: contract.timing(root / where["candidate"], data, cfg),
                                        lambda: contract.timing(root / where["teacher"], data, cfg),
                                        gate.vs_teacher.speedup_pairs, f"{contract.gate.latency}_p50_ms")
    candidate.update({**mine, **speed})
    teacher.update(theirs)
    checks = gate_checks(evaluation, champion, gate, contract.gate)
    passed = all(c.passed for c in checks)
    health = champion_health(champion, registered_scores(champ, gate.metric), gate)
    report = {"passed": passed, "checks": [c.as_dict() for c in checks], "champion_before": champion,
              "champion_health": health,
              "candidate": evaluation["models"]["student_int8"], "teacher": evaluation["models"]["teacher_fp32"]}
    reports = root / where["reports"]
    write_json(reports / "gate.json", report)
    write_atomic(reports / "gate.md", (gate_markdown(checks, passed) + health_markdown(health, passed)).encode())
    for name in ("gate.json", "gate.md"):
        client.log_artifact(run_id, str(reports / name))
    return report, checks, evaluation


def registered_scores(version: Any | None, metric: str) -> dict[str, float]:
    """The scores a version was registered with (tags ``quality.test_<metric>``, ``quality.recent_<metric>``): the
    baseline of its health; a tag that is not a number is left out."""
    found = {}
    for window in ("test", "recent"):
        try:
            found[window] = float(version.tags[f"quality.{window}_{metric}"]) if version is not None else None
        except (KeyError, ValueError):
            continue
    return {k: v for k, v in found.items() if v is not None}


def audit_tags(champion_before: dict | None, promoted: bool) -> dict[str, str]:
    """Who registered a version, when, from which flow run, against which champion, and what became of it."""
    from prefect.context import FlowRunContext

    flow_run = FlowRunContext.get()
    return {"audit.champion_before": champion_before["version"] if champion_before else "none",
            "audit.decision": "champion" if promoted else "challenger",
            "audit.registered_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "audit.registered_by": f"{getpass.getuser()}@{socket.gethostname()}",
            "audit.flow_run_id": str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else "none"}


def write_report(root: Path, cfg: Config, evaluation: dict, report: dict, tags: dict[str, str],
                 family: str, where: dict[str, Path]) -> None:
    """``reports/<family>/report.html``: Pareto plots, models, gate, and the family's ablation when one was run."""
    from tasks.report import ReportView, render_report

    contract = load_family(family)
    view = ReportView(contract.title, getattr(cfg.gate, family).metric, contract.gate.latency,
                      contract.gate.latency_what, ablation=contract.ablation)
    ablation_file = root / "reports" / "ablation" / f"{family}.json"
    ablation = json.loads(ablation_file.read_text()) if ablation_file.exists() else None
    context = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "profile": cfg.profile,
               "git commit": tags["git.commit"], "pipeline run": tags["parent_run_id"],
               "registered": f"{report['name']} version {report['version']}"
                             + (" (champion)" if report["champion"] else " (challenger only)")}
    write_atomic(root / where["reports"] / "report.html",
                 render_report(evaluation, report, ablation, context, view).encode())


def _registered_with(client: MlflowClient, name: str, onnx_hash: str) -> Any | None:
    if onnx_hash == "unknown" or not client.search_registered_models(f"name = '{name}'"):
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.`onnx.hash` = '{onnx_hash}'")
    return found[0] if found else None


@flow(name="promote-model", log_prints=True)
def promote_model(name: str, version: str, alias: str = "champion", reason: str = "", who: str | None = None,
                  root: str = ".") -> dict[str, str]:
    """Point ``alias`` of registered model ``name`` at ``version`` (a promotion or a rollback), recording who/why."""
    client, uri, cfg = _registry(root)
    with registry_lock(name, cfg.tracking.registry_lock_timeout_seconds):
        return _move_alias(client, uri, name, version, alias, reason, who)


@flow(name="rollback-champion", log_prints=True)
def rollback_champion(name: str, reason: str = "", who: str | None = None, root: str = ".") -> dict[str, str]:
    """Point ``champion`` back at the version it pointed at before the current one (as recorded on that version)."""
    client, uri, cfg = _registry(root)
    with registry_lock(name, cfg.tracking.registry_lock_timeout_seconds):
        current = registered_version(client, name)
        if current is None:
            raise RegistryError(f"{name} has no champion in {redact(uri)}; nothing to roll back")
        before = current.tags.get("champion.previous") or current.tags.get("audit.champion_before")
        if before in (None, "", "None", "none"):
            raise RegistryError(f"{name}@champion (version {current.version}) records no earlier champion "
                                "(tags champion.previous / audit.champion_before); nothing was changed")
        return _move_alias(client, uri, name, before, "champion",
                           reason or f"rollback from version {current.version}", who)


def _registry(root: str) -> tuple[MlflowClient, str, Config]:
    from tasks.tracking import tracking_uri

    cfg = load_config(Path(root) / "params.yaml")
    uri = tracking_uri(cfg, Path(root).resolve())
    client = client_for(uri)
    check_registry(client, uri)
    return client, uri, cfg


def _move_alias(client: MlflowClient, uri: str, name: str, version: str, alias: str, reason: str,
                who: str | None) -> dict[str, str]:
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        raise RegistryError(f"{name} version {version} does not exist in {redact(uri)}; nothing was changed") from err
    previous = getattr(registered_version(client, name), "version", None) if alias == "champion" else None
    who = who or getpass.getuser()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, alias, version)
    for key, value in {f"{alias}.set_by": who, f"{alias}.reason": reason or "(none given)", f"{alias}.set_at": when,
                       f"{alias}.previous": str(previous)}.items():
        client.set_model_version_tag(name, version, key, value)
    print(f"{name}@{alias} -> version {version} (was {previous}); by {who}: {reason or '(no reason given)'}")
    return {"name": name, "alias": alias, "version": str(version), "previous": str(previous)}


def registered_model(cfg: Config, family: str | None) -> str:
    """``gate.<family>.registered_model`` of a family of ``families`` (default: the first)."""
    family = family or cfg.families[0]
    if family not in cfg.families:
        raise PipelineError(f"--family: {family!r} is not one of params.yaml's families {cfg.families}")
    return getattr(cfg.gate, family).registered_model


def main() -> None:
    parser = argparse.ArgumentParser(description="Move a registry alias to a model version (promote or roll back).")
    parser.add_argument("--name", help="registered model (default: gate.<family>.registered_model)")
    parser.add_argument("--family", default=None, help="whose registered model, without --name (default: the "
                        "first of params.yaml's families)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--version")
    target.add_argument("--rollback", action="store_true", help="champion back to the version before the current one")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--reason", default="")
    parser.add_argument("--who", default=None)
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    name = args.name or registered_model(load_config(Path(args.root) / "params.yaml"), args.family)
    if args.rollback:
        rollback_champion(name, args.reason, args.who, args.root)
    else:
        promote_model(name, args.version, args.alias, args.reason, args.who, args.root)


if __name__ == "__main__":
    run_cli(main)
