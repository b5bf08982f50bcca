"""The code a stage depends on, read from the imports of its module: what dvc.yaml must list as its code deps.

A stage ``python -m tasks.<family>.<kind>`` depends on ``tasks/<family>/<kind>.py`` and every project module it
imports, directly or through another (imports inside functions included: they run too). A test compares this with
dvc.yaml, so the listed deps cannot drift from the code, and DVC neither serves stale results nor re-runs a stage
for an edit of code it never runs.
"""
from __future__ import annotations

import ast
from pathlib import Path


def _runs(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations, never run)."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def imported_modules(path: Path, package: str = "tasks") -> set[str]:
    """The ``tasks.*`` modules that the file at ``path`` (a module of ``package``) imports when it runs: ``import
    tasks.a.b``, ``from tasks.a import b`` (module ``tasks.a.b`` when it is one), and relative imports resolved
    against ``package``. Names that are not modules (``from tasks.a import Config``) drop out in ``module_closure``."""
    found: set[str] = set()
    for node in _runs(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tasks."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:   # from .x import y / from .. import x: against this module's package
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], *([node.module] if node.module else [])])
            if base == "tasks" or base.startswith("tasks."):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def module_closure(module: str, root: Path) -> set[str]:
    """``module`` and every project module it imports, as paths relative to ``root`` (``tasks/x.py``,
    ``tasks/<family>/x.py``; a package's ``__init__.py``, a docstring only, is not counted)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = root / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        todo.extend(imported_modules(path, name.rsplit(".", 1)[0]))
    return {name.replace(".", "/") + ".py" for name in seen}


def model_modules(root: Path) -> set[str]:
    """The modules ``tasks.artifacts.load_model`` may import to rebuild a model file: each ``ModelArch`` subclass's
    module and that of the model it names (``MODEL``), found in the config modules of the kits and families
    (``tasks/config_types.py``, ``tasks/family_config.py``, ``tasks/<package>/config.py`` and ``arch_config.py``:
    where an architecture must be defined for this to find it)."""
    import importlib

    from tasks.config_types import ModelArch

    for path in [*root.glob("tasks/*config*.py"), *root.glob("tasks/*/config.py"), *root.glob("tasks/*/arch_config.py")]:
        importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts))
    found: set[str] = set()
    todo = list(ModelArch.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        found.add(cls.__module__.replace(".", "/") + ".py")
        if isinstance(getattr(cls, "MODEL", None), str):   # an abstract architecture names no model
            found.add(cls.MODEL.split(":")[0].replace(".", "/") + ".py")
    return found
