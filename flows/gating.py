"""The gate step of a pipeline run (once per family, after the last stage): ``gate_and_register`` scores the
candidate and the current ``champion`` on the same test data in the same run, writes
``reports/<family>/gate.{json,md}`` and ``report.html``, registers the candidate as a new version of
``gate.<family>.registered_model`` (``flows.registry``) tagged with every gate result and its lineage, points
``challenger`` at it, and moves ``champion`` only when every check passes. The registry is checked for reachability
before anything is written; its failures, and the artifact store's, are one-line errors (``store_errors``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.registry import (
    ALIAS_MOVES,
    CHAMPION_BEFORE,
    CHAMPION_CHAIN,
    DATA_TAG,
    FILES_SHA256,
    MEANING_TAG,
    MODEL_SHA256,
    SPLIT_TAG,
    RegistryError,
    audit_tags,
    check_comparable,
    check_registry,
    download_onnx,
    log_onnx_model,
    model_gone,
    registered_scores,
    registered_with,
    split_by,
)
from flows.registry_lock import registry_lock
from flows.stage_graph import NoStage, stage_paths
from tasks.config import Config
from tasks.errors import ArtifactStoreError, PipelineError, ServiceUnavailable
from tasks.family import load_family
from tasks.gate import Check, champion_health, gate_checks, gate_markdown, gate_tags, health_markdown
from tasks.io import file_digest, write_atomic, write_json
from tasks.lineage import data_params, dvc_input_hashes, dvc_lock_text, git_state, params_hash, same_split
from tasks.mlflow_store import is_server_call_error, redact, registered_version, server_error
from tasks.speedup import paired_timing

LINEAGE, LINEAGE_FILES = "lineage", ("params.yaml", "dvc.lock")   # artifacts of the registering run
ALIASES_TAG = "registry.aliases"   # "pending" on a new version until the aliases it earned have moved, then "moved"


def paths(root: Path, family: str) -> dict[str, Path]:
    """Where a family's candidate, teacher, evaluation, data and reports are (relative to ``root``), as its evaluate
    and validate stages' commands in dvc.yaml name them."""
    evaluate, validate = stage_paths(root, f"evaluate_{family}"), stage_paths(root, f"validate_{family}")
    return {"candidate": evaluate["onnx"] / "student_int8.onnx", "onnx": evaluate["onnx"],
            "teacher": evaluate["onnx"] / "teacher_fp32.onnx", "evaluation": evaluate["metrics"],
            "data": evaluate["data"], "reports": validate["report"].parent}


class CandidateAltered(RegistryError):
    """The candidate file is not the file whose metrics were evaluated; nothing was registered."""


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


def data_description(family: str, data: Path) -> tuple[str, str]:
    """Digests of what the family says a model of ``data`` takes and answers in, whole and without what the split
    measures (``Family.measured``: its meaning, compared across splits); ("", "") when it says nothing."""
    contract = load_family(family)
    if contract.describe_data is None:
        return "", ""
    described = contract.describe_data(data)
    meaning = {k: v for k, v in described.items() if k not in contract.measured}
    whole, kept = (hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest() for d in (described, meaning))
    return whole, kept


def lineage(cfg: Config, root: Path, parent_run_id: str, family: str, lock_text: str | None = None
            ) -> dict[str, str]:
    """git commit, DVC's hash of the data and of the candidate file (from ``lock_text``, dvc.lock's content when
    read already), the hash of every param, the parent run."""
    hashes, where = dvc_input_hashes(f"evaluate_{family}", root, lock_text), paths(root, family)
    return {**git_state(root), "params.hash": params_hash(cfg),
            "data.hash": hashes.get(str(where["data"]), "unknown"),
            "onnx.hash": hashes.get(str(where["onnx"]), "unknown"), "parent_run_id": parent_run_id}


@contextlib.contextmanager
def store_errors(client: MlflowClient, name: str, champion: Any = None, root: Path | None = None,
                 store: Path | None = None) -> Iterator[None]:
    """The registry's and the artifact store's failures in the block as one-line errors, so that only those that may
    pass are retried (the promote task retries anything else too, and the CLI showed a traceback): ``champion``'s
    model gone from the artifact store a RegistryError naming the fix; another failed call, a connection reset or a
    timeout through ``server_error`` (ServiceUnavailable, retried, when the server did not answer); a file of the
    project at ``root`` not read or written a PipelineError naming it; another file (or one of the local artifact
    ``store`` in it) an ArtifactStoreError."""
    what = f"the artifact store of {name} version {champion.version}" if champion is not None else \
        f"the registry at {redact(client.tracking_uri)}"

    def outcome(transient: bool) -> str:   # a retry follows a transient error only
        return "nothing was registered" if champion is not None else "a registration it stopped is gated and " \
            f"registered again by the next {'try' if transient else 'run, once that is fixed (not retried)'}"

    try:
        yield
    except Exception as err:
        # MLflow's runs:/ download answers any failure (a reset connection, a 5xx) RESOURCE_DOES_NOT_EXIST: a model
        # still listed is a download that failed, not a model gone
        if champion is not None and getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            if model_gone(client, champion):
                raise RegistryError(
                    f"{name} version {champion.version}, the champion: its model is not in the artifact store "
                    f"({redact(str(err))[:200]}); nothing was registered; move champion to a version whose model is "
                    f"there (`python -m flows.promotion --name {name} --rollback --reason ...`, or `--version N`)"
                ) from None
            raise ServiceUnavailable(f"{what} lists its model but did not give it ({redact(str(err))[:200]}); "
                                     f"{outcome(True)}") from None
        # before the OSErrors: a requests error is one too; and so is a reset connection or a timeout of any client
        if is_server_call_error(err) or isinstance(err, (ConnectionError, TimeoutError)):
            error = server_error(err, what, outcome(True))
            raise (error if error.transient else server_error(err, what, outcome(False))) from None
        where = Path(err.filename).resolve() if isinstance(err, OSError) and isinstance(err.filename, str) else None
        if where is not None and root is not None and where.is_relative_to(root.resolve()) and \
                not (store is not None and where.is_relative_to(store.resolve())):   # the project's, not the store's
            raise PipelineError(f"{err.filename}: {err.strerror or err} ({type(err).__name__}); the gate of {name} "
                                f"stopped; {outcome(False)}") from None
        if isinstance(err, OSError):   # a full or read-only store (or disk)
            raise ArtifactStoreError(f"{name}: a file was not written or read ({type(err).__name__}: {err}); "
                                     f"{outcome(False)}") from None
        raise


def log_lineage(client: MlflowClient, run_id: str, root: Path, lock_text: str | None) -> None:
    """What `python -m flows.restore` needs beside the git commit, as artifacts of the registering run."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in LINEAGE_FILES:
            if name == "dvc.lock" and lock_text is not None:
                (Path(tmp) / name).write_text(lock_text)
            elif name != "dvc.lock" and (root / name).is_file():
                shutil.copy2(root / name, Path(tmp) / name)
        client.log_artifacts(run_id, tmp, LINEAGE)


def keep_warm_start(client: MlflowClient, run_id: str, root: Path, family: str, data: Path) -> None:
    """What the next run's warm start reads should this version become champion (``tasks.warm_start``): its teacher
    and FP32 student, the plan they came from, the files its model reads data with; for a family whose stage graph
    has a warm start."""
    from tasks.warm_plan import ARTIFACTS, FILES, PLAN

    try:
        plan = stage_paths(root, f"warm_start_{family}")["out"] / PLAN
    except NoStage:   # a family without a warm start
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
    gate = cfg.block("gate", family)
    check_registry(client, uri)
    where = paths(root, family)
    if not (root / where["evaluation"]).is_file():   # else read under the registry's lock, an ArtifactStoreError there
        raise PipelineError(f"{root}: nothing evaluated yet for {family} (no {where['evaluation']}): run `dvc repro "
                            f"evaluate_{family}` or the pipeline; nothing was registered")
    lock_text = dvc_lock_text(root)   # once, whole: the tags and the logged file say the same
    tags = {**lineage(cfg, root, parent_run_id, family, lock_text), **(extra_tags or {})}
    description, meaning = data_description(family, root / where["data"])
    if description:   # the gate holds the champion to them: the whole on data split alike, the meaning across splits
        tags.update({DATA_TAG: description, MEANING_TAG: meaning})
    tags[SPLIT_TAG] = data_params(cfg, family, root)   # a later gate compares with it only on data split the same way
    with registry_lock(gate.registered_model, cfg.tracking.registry_lock_timeout_seconds), \
            store_errors(client, gate.registered_model, root=root, store=root / cfg.tracking.artifact_root):
        log_lineage(client, run_id, root, lock_text)
        same = registered_with(client, gate.registered_model, tags["onnx.hash"])
        if same is not None and same.tags.get(ALIASES_TAG) == "pending":
            same = _interrupted(client, gate.registered_model, same)
        if same is not None and same.tags.get("parent_run_id") == parent_run_id and (
                gated := root / where["reports"] / "gate.json").is_file():
            # a retry of this run's promote task that failed after its registration was complete: that registration
            now = registered_version(client, gate.registered_model)
            for made in (gated, root / where["reports"] / "report.html"):   # on this try's run too
                if made.is_file():
                    client.log_artifact(run_id, str(made))
            return {**json.loads(gated.read_text()), "name": gate.registered_model, "version": str(same.version),
                    "champion": now is not None and str(now.version) == str(same.version), "unchanged": False}
        if same is not None:  # a no-change re-run: this exact file was gated and registered before
            print(f"{gate.registered_model} version {same.version} already holds this candidate; registry unchanged")
            now = str(getattr(registered_version(client, gate.registered_model), "version", "none"))
            if may_promote and same.tags.get("gate.passed") == "true" and same.tags.get("audit.decision") == \
                    "challenger" and same.tags.get(CHAMPION_BEFORE) == now:   # passed against today's champion
                print(f"  it passed its gate but was registered as challenger only (--no-promote, a sweep, or a "
                      f"champion of unknown split params): "
                      f"`python -m flows.promotion --family {family} --version {same.version} --reason ...` makes it "
                      "champion")
            return {"passed": same.tags.get("gate.passed") == "true", "checks": [], "name": gate.registered_model,
                    "version": str(same.version), "champion": False, "unchanged": True}
        keep_warm_start(client, run_id, root, family, where["data"])   # a new version: what the next run may start from
        report, checks, evaluation = _gate(root, cfg, client, run_id, family, where, description, meaning,
                                           tags[SPLIT_TAG])
        promote = report["passed"] and may_promote and not (report["champion_before"] or {}).get("unverified")
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
        # Tags go in with the version (one call), aliases after: a failure in between leaves a tagged version
        # marked pending (never an alias on an untagged one), which the retry registers again (``_interrupted``).
        version = client.create_model_version(gate.registered_model, source, run_id,
                                              tags={**tags, ALIASES_TAG: "pending"})
        report.update(name=gate.registered_model, version=str(version.version), champion=promote, unchanged=False)
        # the report before the aliases: a failure here leaves the version pending, gated again by the retry
        write_report(root, cfg, evaluation, report, tags, family, where)
        client.log_artifact(run_id, str(root / where["reports"] / "report.html"))
        client.set_registered_model_alias(gate.registered_model, "challenger", version.version)
        if promote:
            client.set_registered_model_alias(gate.registered_model, "champion", version.version)
        client.set_model_version_tag(gate.registered_model, version.version, ALIASES_TAG, "moved")
    return report


def _interrupted(client: MlflowClient, name: str, version: Any) -> Any | None:
    """A version whose registration stopped before its aliases had moved (a registry that failed mid-way, the
    process killed): when it holds ``champion``, or a later version names it as the champion it was compared with or
    replaced, or any version as the one an alias move replaced or rolled back from (a rollback moves to an earlier
    version), it became champion and only the last tag was lost: it is complete; else it is deleted (the aliases it
    got go with it), and the candidate is gated and registered again against today's champion — a retry that found
    it by its hash would otherwise report it unchanged, tagged as champion and never promoted."""
    champion, mine = registered_version(client, name), str(version.version)
    named = any(v.tags.get(tag) == mine for v in client.search_model_versions(f"name = '{name}'")
                if str(v.version) != mine
                for tag in (CHAMPION_CHAIN if int(v.version) > int(mine) else ALIAS_MOVES))
    if named or (champion is not None and str(champion.version) == mine):
        # complete (it became champion: a later version was compared with it, or it holds the alias): kept as it is
        client.set_model_version_tag(name, version.version, ALIASES_TAG, "moved")
        return version
    client.delete_model_version(name, version.version)
    print(f"{name} version {version.version}: its registration stopped before its aliases moved; deleted, the "
          "candidate is gated and registered again")
    return None


def pair_latencies(root: Path, cfg: Config, family: str, evaluation: dict[str, Any], where: dict[str, Path]) -> None:
    """The candidate's and the teacher's latencies in ``evaluation`` measured again, in pairs of alternating rounds
    (tasks.speedup), with the speed-up they give: a load that changes while they are measured weighs on both alike
    (the evaluate stage timed them minutes apart, each beside whatever ran then)."""
    gate, contract, data = cfg.block("gate", family), load_family(family), root / where["data"]
    mine, theirs, speed = paired_timing(lambda: contract.timing(root / where["candidate"], data, cfg),
                                        lambda: contract.timing(root / where["teacher"], data, cfg),
                                        gate.vs_teacher.speedup_pairs, f"{contract.gate.latency}_p50_ms")
    evaluation["models"]["student_int8"].update({**mine, **speed, "latency_timed_by": "gate"})
    evaluation["models"]["teacher_fp32"].update({**theirs, "latency_timed_by": "gate"})


def _gate(root: Path, cfg: Config, client: MlflowClient, run_id: str, family: str, where: dict[str, Path],
          description: str, meaning: str, split: str) -> tuple[dict[str, Any], list[Check], dict[str, Any]]:
    """Score the candidate and the current champion back to back, check the gate, write and log its report;
    return the report, the checks and the evaluation with the candidate's fresh scores. ``split``: today's data
    params (``tasks.lineage.data_params``, the candidate's tag), which the champion's must equal to be compared."""
    gate, contract = cfg.block("gate", family), load_family(family)
    data = root / where["data"]
    evaluation = json.loads((root / where["evaluation"]).read_text())
    verify_candidate(root, family, evaluation, where)
    champ = registered_version(client, gate.registered_model)
    champion = None
    theirs = split_by(client, champ) if champ is not None else None
    if champ is not None and (theirs is None or not same_split(theirs, cfg, family, root, split)):
        # other split params, or none recorded (registered before they were, or by hand): today's test rows may be
        # the champion's training rows, its scores would flatter it (warm_start.champion_files refuses it alike)
        # (split otherwise, a candidate may replace it on the floors alone; of a split no one knows, as the champion
        # the operator chose, it is not replaced but by hand: registered as challenger only)
        how = f"was split by other data.{family} params ({theirs[:12]}…)" if theirs is not None else \
            f"records no split params (no {SPLIT_TAG} tag, no warm start plan naming them)"
        held = "" if theirs is not None else "; so it is not replaced automatically: a passing candidate is " \
            "registered as challenger, made champion by hand (`python -m flows.promotion --version N`)"
        champion = {"version": str(champ.version), "incomparable":
                    f"champion v{champ.version} {how}: today's test rows may be its training rows, not compared "
                    f"(floors and teacher only){held}", **({"unverified": True} if theirs is None else {})}
        print(champion["incomparable"])
    with tempfile.TemporaryDirectory() as tmp:
        if champ is not None:   # made for other data: refused, whatever its split. Split by other params, by what
            # no split measures (the description also holds pixel statistics measured on the training rows)
            with store_errors(client, gate.registered_model, champ):
                champion_file = download_onnx(client, champ, Path(tmp))
            across = champion is not None
            check_comparable(gate.registered_model, champ, champion_file, root / where["candidate"],
                             meaning if across else description, family,
                             paired=contract.paired_data is not None, tag=MEANING_TAG if across else DATA_TAG)
        if champ is not None and champion is None:  # the champion and the candidate: same test data, same run
            pair = contract.paired_data(champion_file.parent, data, Path(tmp) / "paired", cfg) \
                if contract.paired_data else None
            champion = {"version": str(champ.version), **contract.score(champion_file, pair[0] if pair else data, cfg)}
            if pair:   # it reads the data in its own encoding: both are compared on the rows it can read
                champion["candidate"] = contract.score(root / where["candidate"], pair[1], cfg)
    evaluation["models"]["student_int8"].update(contract.score(root / where["candidate"], data, cfg))
    pair_latencies(root, cfg, family, evaluation, where)
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


def write_report(root: Path, cfg: Config, evaluation: dict, report: dict, tags: dict[str, str],
                 family: str, where: dict[str, Path]) -> None:
    """``reports/<family>/report.html``: Pareto plots, models, gate, and the family's ablation when one was run."""
    from tasks.report import ReportView, render_report

    contract = load_family(family)
    view = ReportView(contract.title, cfg.block("gate", family).metric, contract.gate.latency,
                      contract.gate.latency_what, ablation=contract.ablation)
    ablation_file = root / "reports" / "ablation" / f"{family}.json"
    ablation = json.loads(ablation_file.read_text()) if ablation_file.exists() else None
    context = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "profile": cfg.profile,
               "git commit": tags["git.commit"], "pipeline run": tags["parent_run_id"],
               "registered": f"{report['name']} version {report['version']}"
                             + (" (champion)" if report["champion"] else " (challenger only)")}
    write_atomic(root / where["reports"] / "report.html",
                 render_report(evaluation, report, ablation, context, view).encode())
