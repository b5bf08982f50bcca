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
    """Every pipeline stage of ``root/dvc.yaml`` with its upstream stages, in a deterministic topological order."""
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
    return [StageNode(name, upstream[name]) for name in nx.lexicographical_topological_sort(order)]
