"""Structural compression of click-through models: pruning embedding dimensions, sharing embedding rows.

``prune_dimensions`` rebuilds a model with only some embedding dimensions: every table keeps those columns and the
MLP's first layer keeps the inputs they feed, so FM interactions and the MLP see the same values for what is kept.
Importance of a dimension: the L2 norm of its column over the field and genre tables (magnitude pruning).

``share_rows`` replaces the field-embedding table by ``clusters`` k-means centroids of its rows and a ``row_map``
from each id to its centroid: a table of K rows plus a one- or two-byte index per id, instead of a row per id.
Both work on a float model and on a QAT model (whose tables are float parameters fake-quantized in the forward).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from tasks.ctr.models import CtrModel


def dimension_importance(model: CtrModel) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.embedding.weight, model.genre_embedding.weight]).norm(dim=0)


def prune_dimensions(model: CtrModel, keep: int) -> CtrModel:
    """A copy of float ``model`` with its ``keep`` most important embedding dimensions."""
    if not 0 < keep <= model.arch.dim:
        raise ValueError(f"keep must be within 1..{model.arch.dim}, got {keep}")
    kept = dimension_importance(model).argsort(descending=True)[:keep].sort().values
    vocabulary, genres = model.linear.num_embeddings, model.genre_linear.num_embeddings
    narrow = CtrModel(model.arch.model_copy(update={"dim": keep}), vocabulary, model.num_fields, genres, model.groups)
    state = copy.deepcopy(model.state_dict())
    for name in ("embedding.weight", "genre_embedding.weight"):
        state[name] = state[name][:, kept]
    if model.mlp is not None:
        columns = torch.cat([f * model.arch.dim + kept for f in range(model.num_fields + model.num_groups)])
        state["mlp.0.weight"] = state["mlp.0.weight"][:, columns]
    narrow.load_state_dict(state)
    return narrow


def id_rows(model: CtrModel) -> int:
    """How many embedding rows ``share_rows`` clusters: one per id (an already shared table: what each id sees)."""
    return len(model.row_map) if model.row_map is not None else model.embedding.num_embeddings


def share_rows(model: CtrModel, clusters: int, seed: int = 0) -> CtrModel:
    """A copy of ``model`` whose field-embedding rows are ``clusters`` k-means centroids shared through ``row_map``."""
    from sklearn.cluster import KMeans

    weight = model.embedding.weight.detach()
    if model.row_map is not None:            # already shared: cluster what each id sees
        weight = weight[model.row_map]
    if clusters >= id_rows(model):
        raise ValueError(f"clusters ({clusters}) must be fewer than the table's {id_rows(model)} rows")
    kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(weight.numpy().astype(np.float64))
    shared = copy.deepcopy(model)
    shared.arch = model.arch.model_copy(update={"shared_rows": clusters})
    shared.embedding = nn.Embedding(clusters, model.arch.dim)
    with torch.no_grad():
        shared.embedding.weight.copy_(torch.from_numpy(kmeans.cluster_centers_).float())
    shared.row_map = torch.from_numpy(kmeans.labels_.astype(np.int64))
    return shared
