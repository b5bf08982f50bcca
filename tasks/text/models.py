"""The text family's models: every one takes ``(ids (N, T) int64 right-padded with 0, lengths (N,) int64)`` and
returns class logits, and its output for a sentence does not depend on how much padding follows it (so a batch of
padded rows and one unpadded request score alike).

- ``BertClassifier`` (teacher): a pretrained BERT encoder (``tasks.text.encoder``) over WordPiece ids, padding
  masked out of attention, mean pooling (sentence-transformers'), a new classification head.
- ``TextTransformer`` (teacher trained from scratch): token + learned position embeddings, pre-norm encoder layers,
  masked mean pooling. Attention is written with plain matrix products in both, so it exports to ONNX as such.
- ``RecurrentStudent``: token embeddings, then a BiLSTM (the backward direction runs over each sentence reversed
  within its own length, so padding never enters it) or Kim's 1-D CNN, masked mean + max pooling, one hidden layer.

``forward_features`` returns ``(logits, pooled features)``: the representation feature distillation aligns. Every
model carries its tokenizer (``encode(texts)``), rebuilt from the vocabulary saved in its model file.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tasks.text.config import BertArch, RecurrentArch, TransformerArch
from tasks.text.data import TOKEN, WordPieceTokenizer, WordTokenizer


class Tokenized(nn.Module):
    """A text model that carries its tokenizer (rebuilt from the vocabulary saved with its weights)."""

    tokenizer: WordTokenizer | WordPieceTokenizer

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = self.tokenizer.encode(texts)
        return torch.from_numpy(ids), torch.from_numpy(lengths)

    @torch.no_grad()
    def word_vectors(self, words: list[str]) -> torch.Tensor:
        """(len(words), width) this model's input embedding of each word: the mean of its tokens' rows (an unknown
        word gets the unknown token's)."""
        table = self.input_embeddings().weight   # each model class says which table that is
        rows = [self.tokenizer.pieces(word) or [1] for word in words]
        return torch.stack([table[r].mean(0) for r in rows])


def valid_mask(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: True at a sentence's tokens. An empty sentence keeps its first position (a padding token)."""
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return positions < lengths.clamp(min=1).unsqueeze(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)


class EncoderLayer(nn.Module):
    def __init__(self, arch: TransformerArch) -> None:
        super().__init__()
        self.heads, self.width, self.scale = arch.heads, arch.dim // arch.heads, 1 / math.sqrt(arch.dim // arch.heads)
        self.norm1, self.norm2 = nn.LayerNorm(arch.dim), nn.LayerNorm(arch.dim)
        self.qkv, self.out = nn.Linear(arch.dim, 3 * arch.dim), nn.Linear(arch.dim, arch.dim)
        self.ff = nn.Sequential(nn.Linear(arch.dim, arch.ff), nn.GELU(), nn.Dropout(arch.dropout),
                                nn.Linear(arch.ff, arch.dim))
        self.drop = nn.Dropout(arch.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, self.width).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale + bias, dim=-1)
        x = x + self.drop(self.out((attn @ v).transpose(1, 2).reshape(n, t, self.heads * self.width)))
        return x + self.drop(self.ff(self.norm2(x)))


class TextTransformer(Tokenized):
    def __init__(self, arch: TransformerArch, vocabulary: list[str], max_tokens: int, classes: int,
                 pattern: str = TOKEN) -> None:
        super().__init__()
        self.arch, self.tokenizer = arch, WordTokenizer(vocabulary, max_tokens, pattern)
        self.embed = nn.Embedding(len(vocabulary), arch.dim, padding_idx=0)
        self.position = nn.Embedding(max_tokens, arch.dim)
        self.layers = nn.ModuleList(EncoderLayer(arch) for _ in range(arch.layers))
        self.norm = nn.LayerNorm(arch.dim)
        self.drop = nn.Dropout(arch.dropout)
        self.head = nn.Linear(arch.dim, classes)
        self.feature_width = arch.dim

    def input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = valid_mask(ids, lengths)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.drop(self.embed(ids) + self.position(positions))
        bias = attention_bias(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        pooled = masked_mean(self.norm(x), mask)
        return self.head(self.drop(pooled)), pooled

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_features(ids, lengths)[0]


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first ``length`` steps in reverse order, padding left where it was (its own inverse)."""
    t = x.shape[1]
    positions = torch.arange(t, device=x.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    index = torch.where(positions < lengths, lengths - 1 - positions, positions)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class RecurrentStudent(Tokenized):
    def __init__(self, arch: RecurrentArch, vocabulary: list[str], max_tokens: int, classes: int,
                 pattern: str = TOKEN) -> None:
        super().__init__()
        self.arch, self.tokenizer = arch, WordTokenizer(vocabulary, max_tokens, pattern)
        self.embed = nn.Embedding(len(vocabulary), arch.embedding, padding_idx=0)
        if arch.kind == "bilstm":
            self.forward_rnn = nn.LSTM(arch.embedding, arch.hidden, batch_first=True)
            self.backward_rnn = nn.LSTM(arch.embedding, arch.hidden, batch_first=True)
            width = 2 * arch.hidden
        else:
            self.convs = nn.ModuleList(nn.Conv1d(arch.embedding, arch.hidden, w) for w in arch.widths)
            width = arch.hidden * len(arch.widths)
        self.drop = nn.Dropout(arch.dropout)
        self.hidden = nn.Linear(2 * width, arch.head)
        self.head = nn.Linear(arch.head, classes)
        self.feature_width = arch.head

    def input_embeddings(self) -> nn.Embedding:
        return self.embed

    def _encode(self, x: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(ids, lengths)
        if self.arch.kind == "bilstm":
            ahead = self.forward_rnn(x)[0]
            behind = reverse_within(self.backward_rnn(reverse_within(x, lengths))[0], lengths)
            states = torch.cat([ahead, behind], dim=-1)
            return torch.cat([masked_mean(states, mask), masked_max(states, mask)], dim=-1)
        widest = max(self.arch.widths)
        x = F.pad(x.transpose(1, 2), (0, widest - 1))   # a sentence shorter than a filter still has one window
        pooled = []
        for conv, w in zip(self.convs, self.arch.widths, strict=True):
            y = F.relu(conv(x)).transpose(1, 2)[:, : ids.shape[1]]
            # windows starting inside the sentence and ending in it (or the first one, for a short sentence)
            fits = valid_mask(ids, (lengths - w + 1).clamp(min=1))
            pooled += [masked_mean(y, fits), masked_max(y, fits)]
        return torch.cat(pooled[0::2] + pooled[1::2], dim=-1)

    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.hidden(self.drop(self._encode(self.drop(self.embed(ids)), ids, lengths))))
        return self.head(self.drop(features)), features

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_features(ids, lengths)[0]


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, 1, 1, T) additive bias: 0 at a sentence's tokens, -inf at padding (keys only: a padded query's output is
    never pooled)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[:, None, None, :]


class BertLayer(nn.Module):
    """A post-norm BERT layer: self-attention, then the feed-forward block (exact GELU)."""

    def __init__(self, arch: BertArch) -> None:
        super().__init__()
        self.heads, self.width, self.scale = arch.heads, arch.dim // arch.heads, 1 / math.sqrt(arch.dim // arch.heads)
        self.query, self.key, self.value = (nn.Linear(arch.dim, arch.dim) for _ in range(3))
        self.attn_out, self.attn_norm = nn.Linear(arch.dim, arch.dim), nn.LayerNorm(arch.dim, eps=arch.eps)
        self.ff_in, self.ff_out = nn.Linear(arch.dim, arch.ff), nn.Linear(arch.ff, arch.dim)
        self.ff_norm = nn.LayerNorm(arch.dim, eps=arch.eps)
        self.drop = nn.Dropout(arch.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        q, k, v = (proj(x).view(n, t, self.heads, self.width).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale + bias, dim=-1)
        context = (self.drop(attn) @ v).transpose(1, 2).reshape(n, t, self.heads * self.width)
        x = self.attn_norm(x + self.drop(self.attn_out(context)))
        return self.ff_norm(x + self.drop(self.ff_out(F.gelu(self.ff_in(x)))))


class BertClassifier(Tokenized):
    """A BERT encoder (weights from a pretrained checkpoint: ``tasks.text.encoder``) with a new classification head
    over the mean of its token states (sentence-transformers' pooling), over WordPiece ids."""

    def __init__(self, arch: BertArch, vocabulary: list[str], max_tokens: int, classes: int) -> None:
        super().__init__()
        self.arch, self.tokenizer = arch, WordPieceTokenizer(vocabulary, max_tokens)
        self.word = nn.Embedding(len(vocabulary), arch.dim, padding_idx=0)
        self.position = nn.Embedding(arch.positions, arch.dim)
        self.token_type = nn.Embedding(arch.type_vocabulary, arch.dim)
        self.embed_norm = nn.LayerNorm(arch.dim, eps=arch.eps)
        self.layers = nn.ModuleList(BertLayer(arch) for _ in range(arch.layers))
        self.drop = nn.Dropout(arch.dropout)
        self.head = nn.Linear(arch.dim, classes)
        self.feature_width = arch.dim

    def input_embeddings(self) -> nn.Embedding:
        return self.word

    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = valid_mask(ids, lengths)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.word(ids) + self.position(positions) + self.token_type.weight[0]
        x = self.drop(self.embed_norm(x))
        bias = attention_bias(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        pooled = masked_mean(x, mask)
        return self.head(self.drop(pooled)), pooled

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_features(ids, lengths)[0]
