"""A scratch copy of this project's pipeline sources as its own git + DVC repo (benchmarks and e2e tests)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tasks.config import keys_overlap, leaf_keys
from tasks.io import load_yaml

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = ("tasks", "flows", "dvc.yaml", "params.yaml", "prefect.yaml", ".dvc/config", ".dvcignore", ".gitignore")


def set_param(params: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping (creating the mappings on the way: a profile overlay may lack them)."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        params = params.setdefault(key, {})
    params[leaf] = value


def pretrained_teachers(params: dict[str, Any]) -> list[str]:
    """The files ``teacher.<family>.pretrained.path`` of raw params (its active profile applied) name."""
    from tasks.config import resolve_profile

    resolved = resolve_profile(params, "params.yaml")
    teachers = resolved.get("teacher") or {}
    return [block["pretrained"]["path"] for block in teachers.values()
            if isinstance(block, dict) and isinstance(block.get("pretrained"), dict) and block["pretrained"].get("path")]


def data_paths(params_file: Path) -> list[str]:
    """The files and folders the data blocks of ``params_file`` name by their content (``CONTENT``: a user's corpus,
    an image folder) or as the stages' inputs (``INPUTS``: a user's table, a folder of source files); none when the
    params do not load (a recipe's invalid overrides are named where they are loaded)."""
    from tasks.config import load_config
    from tasks.errors import ConfigError
    from tasks.lineage import content_paths

    try:
        cfg = load_config(params_file)
    except ConfigError:
        return []
    return content_paths(cfg) + content_paths(cfg, "INPUTS")


def _stage_outs(dvc_yaml: Path) -> list[Path]:
    stages = (load_yaml(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.is_file() else {}
    return [Path(next(iter(out)) if isinstance(out, dict) else out) for stage in stages.values()
            for out in stage.get("outs", [])]


def _not_sources(folder: str, names: list[str]) -> set[str]:
    """``__pycache__``, and what points nowhere: an editor's lock file (``.#x.py``) is a symlink to nowhere
    (``copytree``'s ``ignore_dangling_symlinks`` checks a relative link from the working folder, not the link's)."""
    return {name for name in names if name == "__pycache__" or not (Path(folder) / name).exists()}


def copy_project(dest: Path, overrides: dict[str, Any] | None = None, source: Path = PROJECT) -> Path:
    """Copy the pipeline sources of ``source`` to ``dest``, apply params ``overrides``, commit them; return ``dest``.
    An override is written into the overlay of the copy's profile too where that overlay sets the key (or a key
    above or under it): merged last, the overlay would otherwise win over it (a smoke profile naming a team's
    tracking server sent a smoke copy's runs there). Elsewhere the overlay is left as it is, so that the copy's
    dvc.yaml tracks every value it sets (``tasks.config.check_profile_tracked``)."""
    dest.mkdir(parents=True)
    for item in SOURCES:
        src = source / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=_not_sources)
        elif src.exists():
            (dest / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / item)
    params = load_yaml((dest / "params.yaml").read_text())
    profile = (overrides or {}).get("profile", params.get("profile", "full"))
    overlay = (params.get("profiles") or {}).get(profile)
    set_by_overlay = list(leaf_keys("", overlay)) if isinstance(overlay, dict) else []
    for dotted, value in (overrides or {}).items():
        set_param(params, dotted, value)
        if dotted != "profile" and not dotted.startswith("profiles.") and any(
                keys_overlap(dotted, key) for key in set_by_overlay):
            set_param(params, f"profiles.{profile}.{dotted}", value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the download caches: pinned by checksum and moved in whole, so copies share the project's instead of each
    # fetching the same files again
    downloads = source / ".cache" / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError:   # a read-only source: the copy fetches into its own cache
        pass
    if downloads.is_dir():
        (dest / ".cache").mkdir(exist_ok=True)
        (dest / ".cache" / "downloads").symlink_to(downloads.resolve(), target_is_directory=True)
    for teacher in pretrained_teachers(params):   # imported teachers are files of the project, not sources
        if not Path(teacher).is_absolute() and (source / teacher).is_file():
            (dest / teacher).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / teacher, dest / teacher)
    linked = _link_data(source, dest)
    git = ["git", "-c", "user.name=kdq-pipeline", "-c", "user.email=kdq-pipeline@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True, capture_output=True)
    with (dest / ".git" / "info" / "exclude").open("a") as exclude:   # data, not sources of the copy's commit
        exclude.writelines(f"/{data}\n" for data in linked)
    for cmd in (["add", "-A"], ["commit", "-qm", "scratch copy of the pipeline"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


def _link_data(source: Path, dest: Path) -> list[str]:
    """Symlink into ``dest`` the files and folders inside ``source`` that its data params name (``data_paths``: a
    user's corpus, image folder or table), unless a stage of the copy makes them; return them."""
    made, linked = _stage_outs(dest / "dvc.yaml"), []
    for data in data_paths(dest / "params.yaml"):
        path = Path(data)
        # a path of the project as params write it; it may be a link out of it (DVC's symlink cache type with a
        # shared cache elsewhere, a big disk): linked all the same (before: left out, and the copy's stage stopped)
        if (path.is_absolute() or ".." in path.parts or not (source / path).exists() or (dest / path).exists()
                or any(out == path or out in path.parents for out in made)):
            continue
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).symlink_to((source / path).resolve(), target_is_directory=(source / path).is_dir())
        linked.append(path.as_posix())
    return linked
