"""Registries written by earlier versions of the pipeline: the tags they lack or wrote by other rules, read today."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from flows.promotion import promote_model, rollback_champion
from flows.registry import RegistryError
from tests.flows.test_promotion import _gate, _lenient, _root_with_params, project  # noqa: F401 - the fixture


def _registry(tmp_path, befores: tuple[str, ...], champion: str) -> tuple[MlflowClient, str, str]:
    """(client, model name, a root whose params name the store) of model ``m``: one version per entry of
    ``befores`` (its audit.champion_before, the champion the gate compared it with), ``champion`` its champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, name, root = MlflowClient(uri, registry_uri=uri), "m", str(_root_with_params(tmp_path, uri))
    run = client.create_run(client.create_experiment("e")).info.run_id
    client.create_registered_model(name)
    for before in befores:
        client.create_model_version(name, f"runs:/{run}/model", run,
                                    tags={"audit.champion_before": before, "audit.decision": "champion"})
    client.set_registered_model_alias(name, "champion", champion)
    return client, name, root


def test_a_champion_previous_naming_a_version_compared_with_this_one_is_still_followed(tmp_path, prefect_server):
    """The rule that skips an old rollback's record reads the chain as rollbacks do, not which version was compared
    with which: v2 and v3 challengers (v3 compared with v2); v3, then v2 promoted by hand. v2 replaced v3 (its
    champion.previous), though v3 was compared with v2 when registered: a rollback returns to v3."""
    client, name, root = _registry(tmp_path, ("none", "1", "2"), champion="1")
    promote_model.fn(name, "3", "champion", "", "alice", root)
    promote_model.fn(name, "2", "champion", "", "alice", root)
    assert client.get_model_version(name, "2").tags["champion.previous"] == "3"
    rollback_champion.fn(name, "", "bob", root)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"


@pytest.mark.fault("promotion", "a champion registered before model.sha256 was recorded (before 2026-11-30)",
                   "RegistryError: it records no model.sha256, cannot be checked and is not run, with the ways out "
                   "and the tag value its file would need; nothing registered (before: the message said its file "
                   "was altered in the artifact store)")
def test_a_champion_without_a_model_digest_is_named_unchecked_not_altered(project, raw_params, tmp_path):  # noqa: F811
    """Before: "its stored ONNX file has SHA-256 ..., but the version records none (model.sha256); the file was
    altered in the artifact store": tampering blamed, and no way out named while every later gate failed alike."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _lenient(raw_params)
    first, client = _gate(project, cfg, uri)
    assert first["champion"]
    name, version = first["name"], first["version"]
    digest = client.get_model_version(name, version).tags["model.sha256"]
    client.delete_model_version_tag(name, version, "model.sha256")   # as registered before 2026-11-30
    with pytest.raises(RegistryError) as error:
        _gate(project, cfg, uri)
    message = str(error.value)
    assert "\n" not in message and "altered" not in message
    assert message.startswith(f"{name} version {version} (@champion) records no model.sha256 (registered before "
                              "2026-11-30, or outside the pipeline): its ONNX file cannot be checked and is not run")
    assert f"python -m flows.promotion --name {name} --alias champion --version N" in message
    assert f"delete_registered_model_alias('{name}', 'champion')" in message
    assert f"set_model_version_tag('{name}', '{version}', 'model.sha256', '{digest}')" in message
    registered = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in registered] == [str(version)]   # nothing registered

    client.set_model_version_tag(name, version, "model.sha256", digest)   # the way out the message names
    assert _gate(project, cfg, uri)[0]["champion_before"]["version"] == version

