"""The family contract: generic code asks a family through ``tasks.family`` and never names one, and every family
of params.yaml has a contract module."""
from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest

from tasks.config import load_config, parse_config
from tasks.errors import ConfigError
from tasks.family import Family, load_family

ROOT = Path(__file__).resolve().parents[1]
FAMILY_WORDS = ("vision", "recsys", "clicks", "fashion", "movielens", "mnist", "rotten", "tomatoes", "scattertext",
                "minilm")


def test_a_familys_modules_live_in_its_package():
    """Generic machinery at the top of tasks/, each family in tasks/<name>/: a stage or helper of one family left at
    the top would pass for generic code."""
    families = load_config(ROOT / "params.yaml").families
    for name in families:
        assert (ROOT / "tasks" / name / "config.py").is_file() and (ROOT / "tasks" / name / "family.py").is_file()
    stray = [p.name for p in (ROOT / "tasks").glob("*.py")
             if p.stem.startswith(tuple(f"{f}_" for f in families)) or p.stem.endswith(tuple(f"_{f}" for f in families))]
    assert not stray, f"family modules outside their package: {stray}"


def _names_a_family(path: Path) -> list[str]:
    """Identifiers, imported modules and string constants (docstrings aside) of ``path`` that name a family."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = re.compile(rf"(?<![a-z])({'|'.join(FAMILY_WORDS)})(?![a-z])", re.IGNORECASE)
    # a family's own package (tasks.<family>, tasks.<family>.x): "text" is too common a word to search for
    families = load_config(ROOT / "params.yaml").families
    own = re.compile(rf"^tasks\.({'|'.join(families)})(\.\w+)*$")
    found = []
    for node in ast.walk(tree):
        texts: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts = [node.value]
        elif isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.ImportFrom) and node.module:
            texts = [node.module, *(a.name for a in node.names)]
        elif isinstance(node, ast.Import):
            texts = [a.name for a in node.names]
        modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [f"line {node.lineno}: {t!r}" for t in texts if words.search(t)]
        found += [f"line {node.lineno}: imports {m}" for m in modules if own.match(m)]
    return found


def _kits() -> list[Path]:
    """The packages under tasks/ that are no family of params.yaml: machinery families build on (``tasks.images``)."""
    families = set(load_config(ROOT / "params.yaml").families)
    return [p for p in sorted((ROOT / "tasks").iterdir()) if (p / "__init__.py").is_file() and p.name not in families]


@pytest.mark.slow
def test_generic_modules_name_no_family():
    kits = [module for kit in _kits() for module in kit.glob("*.py")]
    assert kits, "the image kit (tasks/images) is generic code too"
    generic = sorted([*(ROOT / "tasks").glob("*.py"), *(ROOT / "flows").glob("*.py"), *kits])
    assert {"flows/gating.py", "flows/registry.py", "flows/promotion.py"} <= {str(p.relative_to(ROOT)) for p in generic}
    offenders = {str(p.relative_to(ROOT)): hits for p in generic if (hits := _names_a_family(p))}
    assert not offenders, f"generic modules naming a family (ask tasks.family instead): {offenders}"


def test_every_family_of_params_has_a_contract():
    for name in load_config(ROOT / "params.yaml").families:
        family = load_family(name)
        assert isinstance(family, Family) and family.name == name


@pytest.mark.fault("params", "families lists a family without its modules, a name that cannot be a package and "
                   "a stage suffix (my_images), or no families at all",
                   "ConfigError at load naming the missing module tasks/<name>/config.py or family.py, or the name")
def test_a_family_without_a_contract_module_is_named(raw_params):
    with pytest.raises(ConfigError, match=r"families: 'audio' has no family module tasks/audio/family.py"):
        load_family("audio")

    with pytest.raises(ConfigError, match=r"families: 'audio' has no config module tasks/audio/config.py"):
        parse_config({**raw_params, "families": ["vision", "recsys", "audio"]})
    with pytest.raises(ConfigError, match=r"families: a list of family names is required"):
        parse_config({k: v for k, v in raw_params.items() if k != "families"})
    with pytest.raises(ConfigError, match=r"families: 'my_images' is not a family name \(lower-case letters"):
        parse_config({**raw_params, "families": ["vision", "my_images"]})


def test_a_project_of_one_family_needs_only_that_familys_blocks(raw_params):
    """The params model is built from ``families``: a recommender-only project has no vision block anywhere."""
    from tasks.config import SECTION_KEYS, parse_config

    only = {k: ({f: b for f, b in v.items() if f == "recsys"} if k in SECTION_KEYS else v) for k, v in raw_params.items()}
    only.update(families=["recsys"], profiles={}, sweep={**raw_params["sweep"], "family": "recsys",
                                                          "space": {"recsys": raw_params["sweep"]["space"]["recsys"]}})
    cfg = parse_config(only)
    assert cfg.families == ["recsys"] and not hasattr(cfg.distill, "vision") and cfg.distill.recsys.epochs > 0
    assert parse_config({k: v for k, v in only.items() if k != "ablation"}).ablation is None   # no family has one
    with pytest.raises(ConfigError, match=r"vision are not in families \['recsys'\], yet it holds blocks of them "
                       r"\(distill\.clicks, distill\.digits, distill\.text, distill\.vision\): add them to families"):
        parse_config({**only, "distill": raw_params["distill"]})


def test_a_config_built_from_the_families_survives_pickling(config, raw_params):
    """Its model class is made at load time: a pickle (a process pool, a Dask worker) must rebuild it by families."""
    import pickle

    again = pickle.loads(pickle.dumps(config))
    assert again == config and type(again) is type(config)
    # a block checked on which keys it was given (a column split refuses `val`): rebuilt from those alone
    raw = copy.deepcopy(raw_params)
    raw["data"]["clicks"]["split"] = {"method": "column", "column": "split"}
    column = parse_config(raw)
    assert pickle.loads(pickle.dumps(column)) == column   # before: "['key', 'test', 'val'] would be ignored"


def test_stages_that_only_read_a_familys_data_import_neither_great_expectations_nor_pytorch():
    """Importing Great Expectations costs ~6 s of CPU and PyTorch ~3 s; the snapshot and prepare stages of every
    family paid for Great Expectations for nothing while the intakes imported it at the top (9 s to start
    ``snapshot_recsys``, 1.4 s now), and the recommender's warm-start stage for PyTorch though it starts from
    scratch by default (``warm_start.<family>.policy``) and needs it only to adapt a champion."""
    from tests.conftest import imported_by

    families = load_config(ROOT / "params.yaml").families
    modules = [f"tasks.{f}.{m}" for f in families for m in ("snapshot", "prepare", "intake", "warm_start")
               if (ROOT / "tasks" / f / f"{m}.py").is_file()]
    assert any(m.endswith(".intake") for m in modules) and any(m.endswith(".warm_start") for m in modules)
    assert imported_by(f"for m in {modules!r}:\n    __import__(m)", ("great_expectations", "torch")) == [], modules
