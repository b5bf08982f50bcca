"""Read the stage graph from dvc.yaml through DVC itself, so the flow never restates the stage order."""
from __future__ import annotations

import itertools
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from tasks.errors import PipelineError

#: waits before reading the stage graph again when dvc.lock was found cut short (DVC rewriting it: about 1 s)
READ_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class StageNode:
    name: str
    upstream: tuple[str, ...]
    outs: tuple[str, ...] = ()    # every output path the stage declares (outs, metrics, plots), relative to root
    # a validation stage or what it depends on: every one of them finishes before any other stage starts
    checks: bool = False

    @property
    def family(self) -> str:
        """The model family a stage belongs to: stages are named ``<step>_<family>``."""
        return self.name.rsplit("_", 1)[-1]


class NoStage(PipelineError):
    """dvc.yaml has no stage of that name."""


def _stage_file(root: Path) -> Path:
    """``root/dvc.yaml``, or a one-line error naming it when ``root`` is no project folder."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():   # named resolved: `--root .` names the folder
        raise PipelineError(f"{path.resolve()}: no such file: {Path(root).resolve()} is not a project folder (its "
                            "dvc.yaml holds the stages)")
    return path


def stage_graph(root: Path) -> list[StageNode]:
    """Every pipeline stage of ``root/dvc.yaml`` with its upstream stages, in a deterministic topological order
    (level by level of the graph)."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    _stage_file(root)
    # the stages come with what dvc.lock records of them, which a DVC process rewrites in place (another family's
    # stage finishing: a second or so): a read that finds it cut short is tried again (not under DVC's lock, which
    # a push holds for minutes), a file still unreadable after that is named
    for delay in (*READ_RETRY_DELAYS, None):
        try:
            repo = Repo(str(root))
        except NotDvcRepoError:
            raise PipelineError(f"{root}: not a DVC project (no .dvc folder; `dvc init` makes one)") from None
        with repo:
            try:
                graph = repo.index.graph  # an edge points from a stage to a stage it depends on
            except DvcException as err:
                name = "dvc.lock" if "dvc.lock" in str(err) else "dvc.yaml"   # (dvc.yaml's errors do not pass)
                if delay is None or name != "dvc.lock":
                    raise PipelineError(f"{Path(root) / name}: DVC cannot read it "
                                        f"({' '.join(str(err).split())[:300]})") from None
            else:
                stages = {s.name: s for s in graph.nodes if isinstance(s, PipelineStage)}
                upstream = {name: tuple(sorted(u.name for u in graph.successors(s) if isinstance(u, PipelineStage)))
                            for name, s in stages.items()}
                outs = {name: tuple(str(o.def_path) for o in s.outs) for name, s in stages.items()}
                break
        time.sleep(delay)
    order = nx.DiGraph()
    order.add_nodes_from(upstream)
    order.add_edges_from((u, name) for name, ups in upstream.items() for u in ups)
    # Every family's data is validated before any family trains (bad data fails the run before compute is spent
    # elsewhere): first the validation stages and what they depend on, then the rest; each part level by level (a
    # stage after everything it depends on, alphabetical within a level).
    checks = {name for name in upstream if name.startswith("validate_")}
    first = checks.union(*(nx.ancestors(order, name) for name in checks))
    parts = (order.subgraph(first), order.subgraph(set(upstream) - first))
    return [StageNode(name, upstream[name], outs[name], name in first)
            for part in parts for level in nx.topological_generations(part) for name in sorted(level)]


def stage_paths(root: Path, stage: str) -> dict[str, Path]:
    """The ``--flag path`` arguments of ``stage``'s command in ``root/dvc.yaml``, keyed by flag name without dashes
    (``{"data": Path("data/vision/processed"), ...}``): how the flows find a stage's inputs and outputs without
    restating them."""
    from tasks.io import load_yaml

    stages = load_yaml(_stage_file(root).read_text()).get("stages", {})
    if stage not in stages:
        raise NoStage(f"{root / 'dvc.yaml'}: no stage {stage!r}")
    words = shlex.split(stages[stage]["cmd"])
    return {flag[2:].replace("-", "_"): Path(value) for flag, value in itertools.pairwise(words)
            if flag.startswith("--") and not value.startswith("--")}


def stage_params(root: Path, stages: list[str]) -> dict[str, list[str]]:
    """The params.yaml keys each of ``stages`` reads, as ``root/dvc.yaml`` lists them (a profile's overlay of a key:
    the key)."""
    from tasks.io import load_yaml

    listed = (load_yaml(_stage_file(root).read_text()) or {}).get("stages", {})
    return {name: sorted({re.sub(r"^profiles\.[^.]+\.", "", key) for key in listed.get(name, {}).get("params", [])
                          if isinstance(key, str)}) for name in stages}


def family_stages(nodes: list[StageNode], family: str) -> list[StageNode]:
    """The stages of one family, in graph order."""
    return [n for n in nodes if n.family == family]


def below(nodes: list[StageNode], changed: set[str]) -> set[str]:
    """``changed`` and every stage of ``nodes`` (graph order) that depends on one of them, directly or not."""
    stale: set[str] = set()
    for node in nodes:  # graph order: a stage comes after everything it depends on
        if node.name in changed or stale.intersection(node.upstream):
            stale.add(node.name)
    return stale


def downstream_of(nodes: list[StageNode], stage: str) -> list[StageNode]:
    """Every stage of ``nodes`` that depends, directly or not, on ``stage`` (one of them), in graph order."""
    found = below(nodes, {stage}) - {stage}
    return [n for n in nodes if n.name in found]


def upstream_of(nodes: list[StageNode], stage: str) -> list[StageNode]:
    """``stage`` and every stage of ``nodes`` it depends on, directly or not, in graph order."""
    found, todo = set(), [stage]
    by_name = {n.name: n for n in nodes}
    while todo:
        name = todo.pop()
        if name not in found and name in by_name:
            found.add(name)
            todo.extend(by_name[name].upstream)
    return [n for n in nodes if n.name in found]


def mermaid(nodes: list[StageNode]) -> str:
    """The stage graph as a mermaid flowchart, reduced to its direct dependencies (an edge implied by a longer
    path is left out: ``dvc dag --mermaid`` draws every one), in graph order."""
    graph = nx.DiGraph()
    graph.add_nodes_from(n.name for n in nodes)
    graph.add_edges_from((u, n.name) for n in nodes for u in n.upstream)
    reduced = nx.transitive_reduction(graph)
    order = {n.name: i for i, n in enumerate(nodes)}
    edges = sorted(reduced.edges, key=lambda e: (order[e[1]], order[e[0]]))
    return "\n".join(["flowchart LR", *(f"  {u} --> {v}" for u, v in edges)])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Print the stage graph of dvc.yaml as a mermaid flowchart.")
    parser.add_argument("--root", type=Path, default=Path("."))
    print(mermaid(stage_graph(parser.parse_args().root)))


if __name__ == "__main__":
    from tasks.errors import run_cli

    run_cli(main)
