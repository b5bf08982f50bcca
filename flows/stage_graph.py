"""Read the stage graph from dvc.yaml through DVC itself, so the flow never restates the stage order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx


@dataclass(frozen=True)
class StageNode:
    name: str
    upstream: tuple[str, ...]


def stage_graph(root: Path) -> list[StageNode]:
    """Every pipeline stage of ``root/dvc.yaml`` with its upstream stages, in a deterministic topological order
    (level by level of the graph)."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge points from a stage to a stage it depends on
        stages = {s.name: s for s in graph.nodes if isinstance(s, PipelineStage)}
        upstream = {name: tuple(sorted(u.name for u in graph.successors(s) if isinstance(u, PipelineStage)))
                    for name, s in stages.items()}
    order = nx.DiGraph()
    order.add_nodes_from(upstream)
    order.add_edges_from((u, name) for name, ups in upstream.items() for u in ups)
    # Level by level (a stage after everything it depends on, alphabetical within a level), so every family's data
    # is validated before any family trains: bad data fails the run before compute is spent elsewhere.
    return [StageNode(name, upstream[name]) for level in nx.topological_generations(order) for name in sorted(level)]
