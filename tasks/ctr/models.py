"""Click-through models over field embeddings (DeepFM, FM, LR by ``RecArch``) and their INT8 form.

Input: ``fields`` int64 (N, F), each column an embedding row of one field (user, item, age, ... with per-field
offsets into one table), and ``genres`` float (N, G) multi-hot, embedded as the mean of its tag rows: one group
(MovieLens's genres), or several side by side (``groups``: the columns of each, in order; a table with several
multi-hot columns), each group one vector. ``forward_features`` returns ``(logit (N,), field vectors (N, F + K,
dim))`` for K groups, so distillation can align embeddings.

INT8: embedding tables are quantized per row (symmetric, one scale per row; a one-column table, the first-order
weights, per tensor), which is where this model's bytes are; the MLP is fake-quantized by PyTorch FX
(``qat_qconfig``) and converted to QDQ. ``prepare_ctr_qat`` turns a float model into that QAT model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tasks.ctr.config import RecArch

TABLES = ("embedding.weight", "genre_embedding.weight", "linear.weight", "genre_linear.weight")


def table_scale(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 scale: per row for an embedding table, one for the whole of a one-column table."""
    peak = weight.abs().amax(dim=1, keepdim=True) if weight.shape[1] > 1 else weight.abs().amax().reshape(1, 1)
    return (peak / 127.0).clamp(min=1e-8)


def quantize_table(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 table, float scale (rows, 1) or (1, 1)) with ``int8 * scale`` ≈ ``weight``."""
    scale = table_scale(weight)
    return torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale


def fake_quantize_table(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to its INT8 grid in the forward pass, identity in the backward (straight-through)."""
    q, scale = quantize_table(weight.detach())
    return weight + (q.float() * scale - weight).detach()


class CtrModel(nn.Module):
    """bias + first-order weights + FM pairwise interactions (``arch.fm``) + MLP on the field vectors (``arch.mlp``)."""

    def __init__(self, arch: RecArch, vocabulary: int, fields: int, genres: int,
                 groups: list[int] | None = None) -> None:
        super().__init__()
        if groups is not None and (sum(groups) != genres or min(groups, default=0) < 1):
            raise ValueError(f"groups {groups} must split the {genres} multi-hot columns into non-empty groups")
        # one group (None): the graph of a model made before groups existed, byte for byte
        self.groups = None if groups is None or len(groups) == 1 else list(groups)
        self.arch, self.num_fields, self.fake_quant_tables = arch, fields, False
        self.qat_settings: dict[str, int | bool] | None = None   # set by prepare_ctr_qat
        # Weight sharing: ``row_map`` points each id at one of ``shared_rows`` rows (see tasks/ctr/compression.py).
        self.embedding = nn.Embedding(arch.shared_rows or vocabulary, arch.dim)
        self.register_buffer("row_map", torch.arange(vocabulary) if arch.shared_rows else None)
        self.genre_embedding = nn.Embedding(genres, arch.dim)
        self.linear = nn.Embedding(vocabulary, 1)
        self.genre_linear = nn.Embedding(genres, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        for table in (self.embedding, self.genre_embedding):
            nn.init.normal_(table.weight, std=0.01)
        for table in (self.linear, self.genre_linear):
            nn.init.zeros_(table.weight)
        layers: list[nn.Module] = []
        width = (fields + self.num_groups) * arch.dim
        for hidden in arch.mlp:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(arch.dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1)) if arch.mlp else None

    def qat_form(self, mlp_weight_bits: int, float_last_layer: bool) -> CtrModel:
        """Its QAT form, as ``prepare_ctr_qat`` makes it (how ``tasks.artifacts`` rebuilds a saved QAT model)."""
        return prepare_ctr_qat(self, mlp_weight_bits, float_last_layer)

    @property
    def num_groups(self) -> int:
        return 1 if self.groups is None else len(self.groups)

    def _table(self, module: nn.Embedding) -> torch.Tensor:
        return fake_quantize_table(module.weight) if self.fake_quant_tables else module.weight

    def _group_terms(self, genres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the groups' vectors (N, K, dim), their first-order sum (N, 1)): each group the mean of its tags' rows.
        Each group's columns are padded to all of them (zeros elsewhere) rather than the tables sliced: an exported
        graph then reads each table whole, under its own name (sliced, ONNX's constant folding made each slice a new
        unnamed table that ``quantize_tables`` never found: they shipped as float inside the INT8 file)."""
        table, linear = self._table(self.genre_embedding), self._table(self.genre_linear)
        vectors, first, start, width = [], 0, 0, genres.shape[1]
        for size in self.groups or []:
            part = genres[:, start:start + size]
            count = part.sum(dim=1, keepdim=True).clamp(min=1.0)
            padded = F.pad(part, (start, width - start - size))
            vectors.append(padded @ table / count)
            first = first + padded @ linear / count
            start += size
        return torch.stack(vectors, dim=1), first

    def forward_features(self, fields: torch.Tensor, genres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.groups is None:   # one group, in the order of operations its exported graphs have always had
            count = genres.sum(dim=1, keepdim=True).clamp(min=1.0)
            rows = fields if self.row_map is None else self.row_map[fields]
            vectors = torch.cat([F.embedding(rows, self._table(self.embedding)),
                                 (genres @ self._table(self.genre_embedding) / count).unsqueeze(1)], dim=1)
            first = (F.embedding(fields, self._table(self.linear)).sum(dim=1)
                     + genres @ self._table(self.genre_linear) / count).squeeze(1)
        else:
            rows = fields if self.row_map is None else self.row_map[fields]
            group_vectors, group_first = self._group_terms(genres)
            vectors = torch.cat([F.embedding(rows, self._table(self.embedding)), group_vectors], dim=1)
            first = (F.embedding(fields, self._table(self.linear)).sum(dim=1) + group_first).squeeze(1)
        logit = self.bias + first
        if self.arch.fm:
            total = vectors.sum(dim=1)
            logit = logit + 0.5 * (total * total - (vectors * vectors).sum(dim=1)).sum(dim=1)
        if self.mlp is not None:
            logit = logit + self.mlp(vectors.flatten(1)).squeeze(1)
        return logit, vectors

    def forward(self, fields: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        return self.forward_features(fields, genres)[0]


class Probability(nn.Module):
    """What is served and exported: the click probability."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fields: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(fields, genres))


def prepare_ctr_qat(model: CtrModel, mlp_weight_bits: int, float_last_layer: bool) -> CtrModel:
    """A copy of ``model`` with fake-quantized tables and an FX-prepared QAT MLP, in train mode; ``qat_settings``
    records the arguments, so a saved model is rebuilt the same way (``tasks.artifacts``)."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from tasks.quantization import fx_quantization, qat_qconfig

    qat = copy.deepcopy(model).train()
    qat.fake_quant_tables = True
    qat.qat_settings = {"mlp_weight_bits": mlp_weight_bits, "float_last_layer": float_last_layer}
    if qat.mlp is not None:
        example = torch.zeros(2, qat.mlp[0].in_features)
        mapping = qat_qconfig(8, weight_bits=mlp_weight_bits)
        if float_last_layer:
            mapping.set_module_name(str(len(qat.mlp) - 1), None)
        with fx_quantization():
            qat.mlp = prepare_qat_fx(qat.mlp, mapping, (example,))
    return qat


def convert_ctr_int8(qat: CtrModel) -> CtrModel:
    """The deployable form of a QAT model: tables holding exactly their INT8 values, the MLP converted to a
    reference-quantized FX graph (which the TorchScript exporter writes as QDQ)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    from tasks.quantization import bake_weight_quantization, fx_quantization

    model = copy.deepcopy(qat).eval()
    with torch.no_grad():
        for name in TABLES:
            module = model.get_submodule(name.split(".")[0])
            module.weight.copy_(fake_quantize_table(module.weight))
    model.fake_quant_tables = False
    if model.mlp is not None and isinstance(model.mlp, torch.fx.GraphModule):
        # the weights the MLP trained with, on their grid: convert_fx would quantize weights that grew past their
        # frozen observer range anew (see tasks.quantization.bake_weight_quantization)
        bake_weight_quantization(model.mlp)
        with fx_quantization():
            model.mlp = convert_fx(model.mlp)
    return model
