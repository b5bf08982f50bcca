"""The one typed, strict, frozen view of params.yaml.

``profile`` selects an overlay from ``profiles`` (e.g. ``smoke``) that is deep-merged over the base values
before validation, so ``dvc exp run -S profile=smoke`` switches every stage at once.

The stage keys (``data``, ``teacher``, ``distill``, ...) hold one block per family of ``families``; each family's
``tasks/<name>/config.py`` says in ``SECTIONS`` which class validates its block under each key, and its ``check``
what spans blocks. The model of a project's params is built from its families (``config_model``): this module names
no family.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError, create_model, model_validator

from tasks.config_types import Positive, ProjectPath, Strict, distinct
from tasks.errors import ConfigError
from tasks.io import load_yaml
from tasks.operations_config import SweepConfig

PARAMS_FILE = Path("params.yaml")
#: The keys of params.yaml that hold one block per family.
SECTION_KEYS = ("ingest", "data", "validate", "teacher", "recipe", "distill", "prune", "qat", "share", "export", "evaluate",
                "gate", "ablation", "warm_start")


class TrackingHttp(Strict):
    """How long a client keeps trying a tracking server that does not answer (MLflow's own HTTP retries)."""

    max_retries: Annotated[int, Field(ge=0, le=20)]
    backoff_factor: Annotated[int, Field(ge=0)]       # MLflow reads whole seconds
    timeout_seconds: Positive


class TrackingConfig(Strict):
    experiment: str = Field(min_length=1)
    uri: str | None = None
    artifact_root: ProjectPath        # on local stores
    http: TrackingHttp
    registry_lock_timeout_seconds: Annotated[float, Field(gt=0.0)]   # wait for another run's promotion to finish
    system_metrics_seconds: Annotated[float, Field(gt=0.0)] | None    # sampling of a stage run's system/* metrics


class PipelineConfig(Strict):
    """Prefect retries of a step that failed for a transient reason (a server down, a killed process)."""

    retries: Annotated[int, Field(ge=0, le=10)]
    retry_delay_seconds: Annotated[float, Field(ge=0.0)]   # before the first retry ...
    retry_backoff: Annotated[float, Field(ge=1.0, le=10.0)]   # ... each later wait this many times the one before
    # ingestion and a pipeline run wait for each other (and a stage for DVC's lock) at most this long
    data_lock_timeout_seconds: Annotated[float, Field(gt=0.0)]
    commit_lock: bool = True   # continuous training commits dvc.lock after each run (flows.lock_commit)
    parallel_stages: Annotated[int, Field(ge=1, le=32)] = 1   # stages run at once where the graph allows

    def retry_delays(self, retries: int | None = None) -> list[float]:
        """The wait before each retry (``retries`` of them, default ``retries``)."""
        count = self.retries if retries is None else retries
        return [self.retry_delay_seconds * self.retry_backoff ** i for i in range(count)]


FAMILY_NAME = re.compile(r"[a-z][a-z0-9]*")


def family_module(name: str, part: str) -> ModuleType:
    """``tasks/<name>/<part>.py``, a module of family ``name``'s package (``config``: its params; ``family``: its
    contract)."""
    module_name = f"tasks.{name}.{part}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name not in (module_name, f"tasks.{name}"):   # not a module the family's own code failed to import
            raise
        raise ConfigError(f"families: {name!r} has no {part} module tasks/{name}/{part}.py") from None


def family_config(name: str) -> ModuleType:
    """``tasks/<name>/config.py``: a family's ``SECTIONS`` and ``check``."""
    return family_module(name, "config")


class Config(Strict):
    """What every project's params hold; ``config_model`` adds the stage keys of its families."""

    profile: str
    profiles: dict[str, dict[str, Any]]
    # The families this project runs, each a package tasks/<name>/: its config.py (its params) and
    # family.py (tasks.family), with its block under each stage key.
    families: Annotated[list[str], Field(min_length=1), distinct("family")]
    tracking: TrackingConfig
    pipeline: PipelineConfig
    sweep: SweepConfig

    def block(self, key: str, family: str) -> Any:
        """``<key>.<family>`` of params.yaml (``block("distill", name)``): how code shared by families reads one's."""
        return getattr(getattr(self, "validate_" if key == "validate" else key), family)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # the model class is built at load time (config_model): a pickle rebuilds it from the families, and from
        # the keys params gave (a block may be checked on which it was given: a column split refuses `val`)
        return _rebuild, (tuple(self.families), self.model_dump(by_alias=True, exclude_unset=True))

    @model_validator(mode="after")
    def _families_consistent(self) -> Config:
        for name in self.families:
            family_config(name).check(self)
        return self

    @model_validator(mode="after")
    def _distinct_models(self) -> Config:
        names = [getattr(self.gate, f).registered_model for f in self.families]   # type: ignore[attr-defined]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"gate: {self.families[names.index(name)]} and {self.families[i]} register the same "
                                 f"model name {name!r}")
        return self

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Config:
        for family in sorted({self.sweep.family, *self.sweep.space} - set(self.families)):
            raise ValueError(f"sweep: {family!r} is not one of families {self.families}")
        params = self.model_dump(by_alias=True)
        for family, space in self.sweep.space.items():
            for key, values in space.items():
                node: Any = params
                for part in key.split("."):
                    if not isinstance(node, dict) or part not in node:
                        raise ValueError(f"sweep.space.{family}: {key!r} is not a key of params.yaml")
                    node = node[part]
                section, _, *rest = key.split(".", 2)
                path = rest[0] if rest else ""
                for value in values:   # each value as its block takes it (what spans blocks: when a recipe loads)
                    _check_value(family_config(family).SECTIONS[section], params[section][family], path, value,
                                 f"sweep.space.{family}: {key}", merged=self.profile != "full")
        return self


@functools.cache
def config_model(families: tuple[str, ...]) -> type[Config]:
    """The model of a project's params: ``Config`` plus, under each stage key, one block per family that has one."""
    sections = {name: family_config(name).SECTIONS for name in families}
    fields: dict[str, Any] = {}
    for key in SECTION_KEYS:
        blocks = {name: (found[key], ...) for name, found in sections.items() if key in found}
        section: Any = create_model(f"{key.capitalize()}Config", __base__=Strict, **blocks)
        # a key no family uses (the ablation, in a project without the vision family) may be left out
        default = ... if blocks else None
        if not blocks:
            section = section | None
        # ``validate`` would shadow a pydantic method: the field is ``validate_``, read from params' ``validate``
        fields["validate_" if key == "validate" else key] = (
            section, Field(default, alias="validate") if key == "validate" else default)
    return create_model("ProjectConfig", __base__=Config, **fields)


def _check_value(kind: Any, current: Any, path: str, value: Any, where: str, merged: bool) -> None:
    """``value`` as the field at dotted ``path`` of the params class ``kind`` ("" for the whole block) takes it on its
    own: its type and limits, strictly. A mapping replaces the ``current`` value, or is ``merged`` over it (a recipe's
    value in a profile's overlay, which is deep-merged), as the recipe will. Rules that tie it to the block's other
    knobs (which the sweep may change too) are checked when a recipe loads."""
    annotation: Any = kind
    for part in path.split(".") if path else []:
        model = _model(annotation)
        if model is None or part not in model.model_fields:   # inside a free-form mapping: nothing to check it by
            return
        field = model.model_fields[part]
        annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        current = current.get(part) if isinstance(current, dict) else None
    if merged and isinstance(value, dict) and isinstance(current, dict):
        value = deep_merge(current, value)
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {value!r} is not a value it takes: {at + ': ' if at else ''}"
                         f"{first['msg'].removeprefix('Value error, ')}") from None


def _model(annotation: Any) -> Any:
    """The params class ``annotation`` is, or holds beside None (``Ema | None``); None for any other type."""
    if isinstance(getattr(annotation, "model_fields", None), dict):
        return annotation
    found = [a for a in typing.get_args(annotation) if isinstance(getattr(a, "model_fields", None), dict)]
    return found[0] if len(found) == 1 else None


def _rebuild(families: tuple[str, ...], params: dict[str, Any]) -> Config:
    return config_model(families).model_validate(params)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overlay`` merged in recursively (overlay wins on leaves)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_profile(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Apply the overlay named by ``profile`` (``full`` means no overlay)."""
    profile, profiles = raw.get("profile", "full"), raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: profiles: a mapping of profile names to overlays is required, got {profiles!r}")
    if not isinstance(profile, str):
        raise ConfigError(f"{source}: profile: a profile name is required (full or one of {sorted(profiles)}), got "
                          f"{profile!r}")
    if profile == "full":
        return raw
    if profile not in profiles:
        raise ConfigError(f"{source}: profile: unknown profile {profile!r}; choose 'full' or one of {sorted(profiles)}")
    if not isinstance(profiles[profile], dict):
        raise ConfigError(f"{source}: profiles.{profile}: an overlay of params is a mapping, got {profiles[profile]!r}")
    return deep_merge(raw, profiles[profile])


def _format_errors(err: ValidationError, source: str, profile: str) -> str:
    where = f" (after applying profile {profile!r})" if profile != "full" else ""
    lines = [f"{source}{where} is invalid:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        if not path:   # a check across sections names its keys itself; its input is the whole file
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"  {path}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "params.yaml") -> Config:
    """Validate a raw params mapping under its selected profile; errors name every offending key path, and the
    profile. (Another profile is checked when a run selects it: one a project never runs, left inconsistent with
    values edited for its own data, does not stop the runs it does.)"""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    merged = resolve_profile(raw, source)
    families = merged.get("families")
    if not isinstance(families, list) or not families or not all(isinstance(f, str) for f in families):
        raise ConfigError(f"{source}: families: a list of family names is required, got {families!r}")
    # a name is a package (tasks/<name>/) and the last word of its stages' names (<kind>_<name>)
    if bad := [f for f in families if not FAMILY_NAME.fullmatch(f)]:
        raise ConfigError(f"{source}: families: {bad[0]!r} is not a family name (lower-case letters and digits, a "
                          "letter first: it names the package tasks/<name>/ and ends its stages' names <kind>_<name>)")
    try:
        return config_model(tuple(families)).model_validate(merged)
    except ValidationError as err:
        if unlisted := _unlisted_families(merged, families):   # said once, not as every block's "extra input"
            raise ConfigError(_unlisted_message(source, families, unlisted)) from None
        raise ConfigError(_format_errors(err, source, merged.get("profile", "full"))) from None


def _unlisted_families(merged: dict[str, Any], families: list[str]) -> dict[str, list[str]]:
    """The family packages (``tasks/<name>/config.py``) ``families`` leaves out that blocks of ``merged`` name
    (``data.<name>``, ...), each with those blocks' key paths: a family taken off the list, not a mistyped key."""
    found: dict[str, list[str]] = {}
    for key, section in merged.items():
        for name in section if isinstance(section, dict) else ():
            if (isinstance(name, str) and name not in families and FAMILY_NAME.fullmatch(name)
                    and (Path(__file__).parent / name / "config.py").is_file()):
                found.setdefault(name, []).append(f"{key}.{name}")
    return found


def _unlisted_message(source: str, families: list[str], unlisted: dict[str, list[str]]) -> str:
    names = sorted(unlisted)
    paths = [path for name in names for path in unlisted[name]]
    them = "it" if len(names) == 1 else "them"
    return (f"{source}: {', '.join(names)} {'is' if len(names) == 1 else 'are'} not in families {families}, yet it "
            f"holds blocks of {them} ({', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}): add {them} to "
            "families, or delete the blocks and the stages in dvc.yaml; to run some families only, `python -m "
            "flows.pipeline --family <name>`")


def load_config(path: Path | str = PARAMS_FILE, profile: str | None = None) -> Config:
    """Read and validate params.yaml (under ``profile`` instead of the one it selects, when given)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass the params file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if profile is not None and isinstance(raw, dict):
        raw = {**raw, "profile": profile}
    return parse_config(raw, str(path))


#: The path flags that name a stage's outputs (the rest are inputs, and ``--checkpoint``, which persists on its own).
OUTPUT_FLAGS = ("--out", "--model", "--metrics", "--plots", "--report", "--docs")


def check_profile_tracked(cfg: Config, params: Path | str) -> None:
    """Every value the selected profile's overlay sets is tracked by the stage graph beside ``params`` (its
    dvc.yaml) wherever a stage reads it: a stage listing a params key the overlay sets (``teacher.vision``, or a key
    above or under it) lists the overlay's key too (``profiles.<name>.teacher.vision``, or a key above it), so DVC
    re-runs the stage when the profile's value changes. A ConfigError naming the first stage and value that is not
    (before: a profile added to params.yaml ran, and its later edits left outputs stale, silently). ``full`` (no
    overlay) and a params file with no dvc.yaml beside it (no DVC project) pass."""
    graph = Path(params).parent / "dvc.yaml"
    if cfg.profile == "full" or not graph.is_file():
        return
    name, mine = cfg.profile, f"profiles.{cfg.profile}"
    leaves = list(leaf_keys("", cfg.profiles.get(name) or {}))
    missed = []
    for stage, spec in ((load_yaml(graph.read_text()) or {}).get("stages") or {}).items():
        keys = listed_params(spec, Path(params).name)
        if "profiles" in keys or mine in keys:
            continue
        covered = [key.removeprefix(f"{mine}.") for key in keys if key.startswith(f"{mine}.")]
        read = [key for key in keys if key.split(".")[0] not in ("profile", "profiles")]
        for leaf in leaves:
            if any(leaf == c or leaf.startswith(f"{c}.") for c in covered):
                continue
            if (key := next((k for k in read if keys_overlap(leaf, k)), None)) is not None:
                missed.append((stage, leaf, key))
    if missed:
        stage, leaf, key = missed[0]
        more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
        listed = leaf if key.startswith(f"{leaf}.") else key   # the overlay's key where it stops above the read one
        raise ConfigError(f"{params}: profile: {name!r} sets {mine}.{leaf}, which {graph} does not track for stage "
                          f"{stage} (it reads {key}){more}: DVC would not re-run the stage when that value changes; "
                          f"list {mine}.{listed} in the stage's params beside {key}, or choose 'full'")


def leaf_keys(prefix: str, tree: Any) -> Iterator[str]:
    """The dotted keys of the values a params overlay sets (mappings gone into, anything else a value)."""
    if isinstance(tree, dict):   # (an empty mapping sets nothing: a deep merge leaves the base as it is)
        for key, sub in tree.items():
            yield from leaf_keys(f"{prefix}.{key}" if prefix else str(key), sub)
    elif prefix:
        yield prefix


def listed_params(spec: Any, params_name: str) -> list[str]:
    """The keys of ``params_name`` a dvc.yaml stage lists (``- key`` entries, and ``- <params_name>: [keys]``)."""
    keys: list[str] = []
    for entry in (spec.get("params") or []) if isinstance(spec, dict) else []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            keys += [k for k in entry.get(params_name) or [] if isinstance(k, str)]
    return keys


#: what ``param_at`` gives for a key the params do not hold (no value equals it)
ABSENT: Any = object()


def param_at(tree: Any, dotted: str) -> Any:
    """The value at a dotted params key (``teacher.vision.arch``) of nested mappings, or ``ABSENT``."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return ABSENT
        tree = tree[part]
    return tree


def keys_overlap(a: str, b: str) -> bool:
    """Dotted params keys of which one is the other or holds it."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def stage_args(doc: str, *path_flags: str, optional: tuple[str, ...] = ()) -> tuple[argparse.Namespace, Config]:
    """A stage CLI's arguments: ``--params`` plus required path flags (and ``optional`` ones, None when absent);
    returns (args, validated config). Under ``run_cli`` the output paths are staging paths (``tasks.staging``)."""
    from tasks.staging import staged

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the params file (default: params.yaml)")
    for flag in path_flags:
        parser.add_argument(flag, type=Path, required=True)
    for flag in optional:
        parser.add_argument(flag, type=Path, default=None)
    args = parser.parse_args()
    cfg = load_config(args.params)
    check_profile_tracked(cfg, args.params)
    for flag in set(path_flags) & set(OUTPUT_FLAGS):  # written to staging, moved into place when the stage succeeds
        name = flag.removeprefix("--").replace("-", "_")
        setattr(args, name, staged(getattr(args, name)))
    return args, cfg
