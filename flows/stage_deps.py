"""The code a stage depends on, read from the imports of its module: what dvc.yaml must list as its code deps.

A stage ``python -m tasks.<name>`` depends on ``tasks/<name>.py`` and every project module it imports, directly or
through another (imports inside functions included: they run too). A test compares this with dvc.yaml, so the
listed deps cannot drift from the code, and DVC neither serves stale results nor re-runs a stage for an edit of
code it never runs.
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


def imported_modules(path: Path) -> set[str]:
    """The ``tasks.*`` modules that the file at ``path`` imports when it runs."""
    found: set[str] = set()
    for node in _runs(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tasks."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("tasks."):
                found.add(node.module)
            elif node.module == "tasks":
                found.update(f"tasks.{alias.name}" for alias in node.names)
    return found


def module_closure(module: str, root: Path) -> set[str]:
    """``module`` and every project module it imports, as paths relative to ``root`` (``tasks/x.py``)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = root / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        todo.extend(imported_modules(path))
    return {name.replace(".", "/") + ".py" for name in seen}
