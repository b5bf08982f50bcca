"""Stage ``prepare_text``: the raw corpus -> de-duplicated, split, tokenized sentences.

The categories of ``data.text.drop`` are left out (the corpus's plot summaries); every other row is kept as it is,
an empty text or an unknown category included, for validate_text to name. Duplicate texts are dropped (first kept):
texts whose words are the same once tokenized ("Great movie!" and "great movie !") are one sentence to every model,
and two copies in different splits would be a leak validate_text refuses.
Split: seeded, stratified by category, ``train/val/test``. The vocabulary is built on the training split only.

Outputs in ``<out>``: ``sentences.csv`` (text, category, label (-1 for an unknown category), split, tokens: the
word count); ``manifest.json`` (source, labels, the word vocabulary, max_tokens, row counts and class shares per
split). Each model tokenizes the text itself, with the tokenizer it ships with (``tasks.text.data``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import stage_args
from tasks.errors import run_cli
from tasks.io import write_csv, write_json
from tasks.text.config import TextData
from tasks.text.data import TOKEN, acquire, build_vocabulary, tokenize

SPLITS = ("train", "val", "test")


def assign_splits(rows: pd.DataFrame, cfg: TextData) -> pd.Series:
    """``train``/``val``/``test`` per row: a seeded permutation within each category."""
    rng = np.random.default_rng(cfg.seed)
    names = pd.Series("train", index=rows.index, name="split")
    for _, group in rows.groupby("category", sort=True):
        order = group.index.to_numpy()[rng.permutation(len(group))]
        n_test, n_val = round(len(order) * cfg.split.test), round(len(order) * cfg.split.val)
        names[order[:n_test]] = "test"
        names[order[n_test:n_test + n_val]] = "val"
    return names


def select(rows: pd.DataFrame, cfg: TextData) -> pd.DataFrame:
    """Rows kept for the data set: dropped categories out, duplicate texts (the same once tokenized) out, the smoke
    subset (stratified)."""
    kept = rows[~rows.category.isin(cfg.drop)]
    kept = kept[~kept.text.map(lambda t: " ".join(tokenize(t))).duplicated()].reset_index(drop=True)
    if cfg.subset is not None and cfg.subset < len(kept):
        share = cfg.subset / len(kept)
        rng = np.random.default_rng(cfg.seed)
        picked = [g.index.to_numpy()[rng.permutation(len(g))[: max(1, round(len(g) * share))]]
                  for _, g in kept.groupby("category", sort=True)]
        kept = kept.loc[np.sort(np.concatenate(picked))].reset_index(drop=True)
    return kept


def prepare_text(cfg: TextData, out: Path) -> dict:
    """Acquire, select, split and tokenize the corpus into ``out``; return the manifest."""
    source, raw = acquire(cfg)
    rows = select(raw, cfg)
    rows["label"] = rows.category.map(cfg.labels).fillna(-1).astype(np.int64)
    rows["split"] = assign_splits(rows, cfg)
    rows["tokens"] = [len(tokenize(t)) for t in rows.text]
    vocabulary = build_vocabulary(rows.text[rows.split == "train"], cfg.min_count, cfg.max_vocabulary)
    labels = sorted(cfg.labels, key=cfg.labels.get)
    manifest = {"source": source, "labels": labels, "vocabulary": vocabulary, "max_tokens": cfg.max_tokens,
                "pattern": TOKEN, "splits": {}}
    for name in SPLITS:
        part = rows[rows.split == name]
        manifest["splits"][name] = {"rows": len(part),
                                    "class_fraction": {c: float((part.category == c).mean()) for c in labels}}
    write_csv(out / "sentences.csv", rows)
    write_json(out / "manifest.json", manifest)
    return manifest


def main() -> None:
    args, cfg = stage_args(__doc__, "--out")
    from tasks.tracking import stage_run

    with stage_run("prepare_text", cfg, params={"data.text": cfg.data.text}) as run:
        manifest = prepare_text(cfg.data.text, args.out)
        run.log_metrics({f"{s}_rows": v["rows"] for s, v in manifest["splits"].items()}
                        | {"vocabulary": len(manifest["vocabulary"])})
        run.set_tag("data.source", manifest["source"])
        run.log_artifact(args.out / "manifest.json")
    print(json.dumps({s: v["rows"] for s, v in manifest["splits"].items()}),
          f"vocabulary {len(manifest['vocabulary'])} from {manifest['source']}")


if __name__ == "__main__":
    run_cli(main)
