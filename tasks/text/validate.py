"""Stage ``validate_text``: the Great Expectations gate on the processed sentences.

Input: ``<data>`` as written by prepare_text. Output: ``<report>`` (JSON, every expectation with its observed
value) and Data Docs. Checked: the schema; every text non-empty and within the length range; every category one of
``data.text.labels``; no duplicate text; no validation or test sentence that is also a training sentence once
tokenized (leakage); per split a minimum row count, every class at least ``min_class_fraction``, every sentence
at least one word and a label; the manifest's row counts those of the sentences. A failed
expectation stops the pipeline naming it and the offending values.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd

from tasks.config import Config, stage_args
from tasks.errors import DataFormatError, run_cli
from tasks.expectations import ephemeral_context, publish_validation, run_suites, suite
from tasks.text.data import tokenize

E = gx.expectations
SPLITS = ("train", "val", "test")
COLUMNS = ["text", "category", "label", "split", "tokens"]


def load_tables(data_dir: Path) -> dict[str, Any]:
    try:
        tables: dict[str, Any] = {"sentences": pd.read_csv(data_dir / "sentences.csv", dtype={"text": str,
                                  "category": str}, keep_default_na=False),
                                  "manifest": json.loads((data_dir / "manifest.json").read_text())}
    except (OSError, ValueError) as err:
        raise DataFormatError(f"{data_dir}: cannot be read ({err}); re-run prepare_text") from err
    return tables


def sentence_suites(tables: dict[str, Any], cfg: Config) -> list[tuple[gx.ExpectationSuite, pd.DataFrame]]:
    rows, rules, data = tables["sentences"], cfg.validate_.text, cfg.data.text
    frame = rows.assign(chars=rows.text.astype(str).str.strip().str.len())
    train = {" ".join(tokenize(t)) for t in rows.text[rows.split == "train"]}
    held_out = rows[rows.split != "train"]
    leaks = pd.DataFrame({"text": held_out.text,
                          "also_in_train": [int(" ".join(tokenize(t)) in train) for t in held_out.text]})
    return [(suite("text_schema", [E.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=True)]), rows),
            (suite("text_sentences", [
        E.ExpectColumnValuesToNotBeNull(column="text"),
        E.ExpectColumnValuesToBeBetween(column="chars", min_value=rules.min_chars, max_value=rules.max_chars),
        E.ExpectColumnValuesToBeInSet(column="category", value_set=sorted(data.labels)),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        E.ExpectColumnValuesToBeUnique(column="text")]), frame),
        (suite("text_leakage", [E.ExpectColumnValuesToBeInSet(column="also_in_train", value_set=[0])]), leaks)]


def split_suites(tables: dict[str, Any], cfg: Config) -> list[tuple[gx.ExpectationSuite, pd.DataFrame]]:
    """Per split: row counts (and the manifest's), class shares, labels, words per sentence."""
    rows, rules, manifest, out = tables["sentences"], cfg.validate_.text, tables["manifest"], []
    labels = manifest["labels"]
    for split in SPLITS:
        part = rows[rows.split == split]
        frame = pd.DataFrame({"label": part.label, "tokens": part.tokens})
        for c, name in enumerate(labels):
            frame[f"is_{name}"] = (part.label == c).astype(float)
        out.append((suite(f"text_{split}", [
            E.ExpectTableRowCountToEqual(value=manifest["splits"].get(split, {}).get("rows", -1)),
            E.ExpectTableRowCountToBeBetween(min_value=rules.min_rows.get(split, 1)),
            E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=len(labels) - 1),
            E.ExpectColumnValuesToBeBetween(column="tokens", min_value=1),
            *(E.ExpectColumnMeanToBeBetween(column=f"is_{name}", min_value=rules.min_class_fraction, max_value=1.0)
              for name in labels)]), frame))
    return out


def validate_text(tables: dict[str, Any], cfg: Config, docs: Path | None = None) -> dict[str, Any]:
    """Run every suite (through GE Checkpoints, rendering Data Docs into ``docs`` when given); return the report."""
    context = ephemeral_context()
    return run_suites(context, "text", sentence_suites(tables, cfg) + split_suites(tables, cfg), docs)


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--report", "--docs")
    from tasks.tracking import stage_run

    with stage_run("validate_text", cfg, {"validate.text": cfg.validate_.text}) as run:
        report = publish_validation(run, validate_text(load_tables(args.data), cfg, args.docs), args.report,
                                    args.docs)
    print(f"validation passed: {len(report['checks'])} expectations")


if __name__ == "__main__":
    run_cli(main)
