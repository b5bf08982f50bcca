"""The model registry as the gate and the promotion flows use it (MLflow, aliases only, no deprecated stages):
reachability, the ONNX flavor with a signature and an input example, the SHA-256 tags every registered file is
checked against before it runs, and what a version records of its data, scores and audit trail."""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from tasks.config import Config
from tasks.errors import PipelineError, ServiceUnavailable
from tasks.io import file_digest
from tasks.mlflow_store import redact, server_error
from tasks.onnx_models import session
from tasks.tracking import current_user

MODEL_SHA256 = "model.sha256"   # version tag: SHA-256 of the registered ONNX file, checked before it is run
MODEL_FILE = "model.onnx"   # the ONNX file mlflow.onnx writes in a model's folder: the one hashed and run
FILES_SHA256 = "model.files.sha256"   # version tag: {name: SHA-256} of the files registered beside it (a vocabulary)


SPLIT_TAG = "data.split_params"   # version tag: SHA-256 of the data.<family> params its rows were split by


DATA_TAG = "data.description"   # version tag: digest of what its data says a request and an answer are (Family.describe_data)
MEANING_TAG = "data.meaning"     # the same without what the split measures (Family.measured): compared across splits

# The version tags that chain champions, each naming an earlier version: the champion a version was compared with at
# registration (audit_tags), the version an alias move replaced (``<alias>.previous``) and the one a rollback left
# (``<alias>.rolled_back_from``; both by flows.promotion). Read by the rollback and by gating's interrupted-registration
# check.
CHAMPION_BEFORE = "audit.champion_before"


def previous_tag(alias: str) -> str:
    return f"{alias}.previous"


def rolled_back_tag(alias: str) -> str:
    return f"{alias}.rolled_back_from"


#: Of those, the ones an alias move writes (on the version it moved to, an earlier one after a rollback)
ALIAS_MOVES = (previous_tag("champion"), rolled_back_tag("champion"))
CHAMPION_CHAIN = (CHAMPION_BEFORE, *ALIAS_MOVES)


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


def model_gone(client: MlflowClient, version: Any) -> bool:
    """Whether the artifact store lists no ONNX file in a registered version's model folder (its ``runs:/`` source);
    False when it does not answer that either (not known gone). MLflow's ``runs:/`` download reports any failure (a
    reset connection, a 5xx) as RESOURCE_DOES_NOT_EXIST: a model still listed is a download that failed."""
    try:
        listed = client.list_artifacts(version.run_id, version.source.removeprefix(f"runs:/{version.run_id}/"))
    except Exception:  # noqa: BLE001 - any store's failure (MLflow, requests, S3, local files): not known gone
        return False
    return not any(f.path.endswith(".onnx") for f in listed)


def download_onnx(client: MlflowClient, version: Any, dest: Path) -> Path:
    """The ONNX file of a registered version, fetched through ``client`` (its ``runs:/`` source) and checked
    against the SHA-256 recorded on the version before anything runs it: ``model.onnx``, by name, the file
    ``log_onnx_model`` hashed (any other .onnx file in the folder is neither checked nor run)."""
    prefix = f"runs:/{version.run_id}/"
    if not version.source.startswith(prefix):
        raise RegistryError(f"version {version.version} has source {version.source}, not a run artifact of this "
                            "pipeline; promote a version registered by the pipeline")
    local = Path(client.download_artifacts(version.run_id, version.source.removeprefix(prefix), str(dest)))
    path = local / MODEL_FILE
    if not path.is_file():
        raise RegistryError(f"{version.name} version {version.version}: its artifact {version.source} holds no "
                            f"{MODEL_FILE}; it was not registered by the pipeline's gate and cannot be run")
    recorded, actual = version.tags.get(MODEL_SHA256), file_digest(path)
    if not recorded:   # nothing to check it against: not a sign that it was altered
        raise RegistryError(_unchecked(version, actual))
    if recorded != actual:
        raise RegistryError(f"{version.name} version {version.version}: its stored ONNX file has SHA-256 {actual}, "
                            f"but the version records {recorded} ({MODEL_SHA256}); the file was altered in the "
                            "artifact store (or registered outside the pipeline) and is not run")
    # the files it reads data with (a version registered before they were pinned carries none)
    for name, pinned in json.loads(version.tags.get(FILES_SHA256, "{}")).items():
        found = path.parent / name
        digest = file_digest(found) if found.is_file() else "none (missing)"
        if digest != pinned:
            raise RegistryError(f"{version.name} version {version.version}: its stored {name} has SHA-256 {digest}, "
                                f"but the version records {pinned} ({FILES_SHA256}); the file was altered in the "
                                "artifact store and the model is not run")
    return path


def _unchecked(version: Any, digest: str) -> str:
    """Why a version without a ``model.sha256`` tag is not run, and the ways out: its alias (champion when it holds
    that one too) moved to a version that records one, the alias deleted, or the tag set by hand to ``digest`` (its
    file's) once the file is checked."""
    name, aliases = version.name, list(getattr(version, "aliases", None) or [])
    alias = "champion" if "champion" in aliases or not aliases else aliases[0]
    held = f" (@{alias})" if aliases else ""
    return (f"{name} version {version.version}{held} records no {MODEL_SHA256} (registered before 2026-11-30, "
            f"or outside the pipeline): its ONNX file cannot be checked and is not run; move {alias} to a version "
            f"that records one (`python -m flows.promotion --name {name} --alias {alias} --version N`), or delete "
            f"the alias (`MlflowClient().delete_registered_model_alias('{name}', '{alias}')`), or, once you have "
            f"checked its file, set the tag to that file's digest (`MlflowClient().set_model_version_tag('{name}', "
            f"'{version.version}', '{MODEL_SHA256}', '{digest}')`)")


def declared_shape(value: Any) -> list[int]:
    """An ONNX graph value's shape as its graph declares it: an axis left open (the batch, a length) is -1."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def graph_signature(model: Any, inferred: Any) -> Any:
    """``inferred`` (from one request) with each input's shape as the ONNX graph declares it: an axis the graph
    leaves open (the batch, a variable length) is -1, so the scoring server takes any size there, not only the
    example's."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    declared = {i.name: declared_shape(i) for i in model.graph.input}
    inputs = [TensorSpec(spec.type, tuple(declared.get(spec.name, spec.shape)), spec.name)
              for spec in inferred.inputs.inputs]
    return ModelSignature(Schema(inputs), inferred.outputs)


def io_signature(path: Path) -> list[list[tuple[str, int, list[int]]]]:
    """(inputs, outputs) of an ONNX file: each value's element type and shape, an open axis as -1."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    spec = lambda v: (v.type.tensor_type.elem_type, declared_shape(v))
    return [[spec(v) for v in graph.input], [spec(v) for v in graph.output]]


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
                     family: str, paired: bool = False, tag: str = DATA_TAG) -> None:
    """Raise RegistryError when the champion was made for other data than the candidate (other inputs, outputs or
    data description): their scores on this data would compare nothing, and clients of the champion would break.
    ``paired``: the family scores a champion on the data in its own encoding (``Family.paired_data``), whose widths
    may differ from today's (a table's tags): then the inputs' and outputs' types and ranks must match, not sizes."""
    def kinds(signature: list) -> list:
        return [[(elem, len(shape)) for elem, shape in values] for values in signature] if paired else signature

    why = ""
    if description and champ.tags.get(tag, description) != description:   # (a version without the tag: older)
        why = f"its data description ({tag} {champ.tags[tag][:12]}…) differs from the candidate's " \
              f"({description[:12]}…)"
    elif kinds(theirs := io_signature(champion_file)) != kinds(ours := io_signature(candidate_file)):
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

    answered = session(path)   # every output by its name: the signature says what the server answers with
    outputs = dict(zip([o.name for o in answered.get_outputs()], answered.run(None, sample), strict=True))
    model = onnx.load(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        mlflow.onnx.save_model(model, str(local), signature=graph_signature(model, infer_signature(sample, outputs)),
                               input_example=sample, save_as_external_data=False, pip_requirements=requirements())
        digest = file_digest(local / "model.onnx")
        for extra in files:
            shutil.copy2(extra, local / extra.name)
        client.log_artifacts(run_id, str(local), "model")
    return f"runs:/{run_id}/model", digest


def requirements() -> list[str]:
    """What serving an ONNX model needs, pinned to this environment: the flavor's own (mlflow, onnx, onnxruntime) and
    numpy. Given, not inferred: MLflow infers them by loading the model in a new Python process (~2.5 s of CPU on
    every registration) and finds these four."""
    import mlflow.onnx

    return [*mlflow.onnx.get_default_pip_requirements(), f"numpy=={np.__version__}"]


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
    return {CHAMPION_BEFORE: champion_before["version"] if champion_before else "none",
            "audit.decision": "champion" if promoted else "challenger",
            "audit.registered_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "audit.registered_by": f"{current_user()}@{socket.gethostname()}",
            "audit.flow_run_id": str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else "none"}


def registered_with(client: MlflowClient, name: str, onnx_hash: str) -> Any | None:
    """The version of ``name`` registered from the ONNX folder DVC hashed as ``onnx_hash`` (None: none, or unknown)."""
    if onnx_hash == "unknown" or not client.search_registered_models(f"name = '{name}'"):
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.`onnx.hash` = '{onnx_hash}'")
    return found[0] if found else None


def registered_model(cfg: Config, family: str | None) -> str:
    """``gate.<family>.registered_model`` of a family of ``families`` (default: the first)."""
    family = family or cfg.families[0]
    if family not in cfg.families:
        raise PipelineError(f"--family: {family!r} is not one of params.yaml's families {cfg.families}")
    return cfg.block("gate", family).registered_model
