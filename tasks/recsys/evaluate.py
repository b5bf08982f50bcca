"""Stage ``evaluate_recsys``: the exported CTR models measured in onnxruntime as a serving engineer would.

Inputs: ``<data>``, ``<onnx>`` (export_recsys's folder) and the PyTorch models (for parameter counts). Output
``<metrics>``: per ONNX model the validation AUC and logloss (``val_*``: what any choice between models may read),
the test AUC and logloss, NDCG@k and Recall@k (``test_*``: reported and gated, never chosen on), AUC and logloss on
each evaluation window of the test split (``golden_*``, ``recent_*``: ``tasks.recsys.prepare``), stored size, and
the latency of one request scoring ``candidates`` items for one user (p50 / p95 / p99) with its throughput in
items/s; plus ratios against the teacher, and the SHA-256 of every ONNX file measured (``sha256``). Ranking
protocol: for every user with a positive test row (or a seeded sample of them: ``ranking_users``), every item the
user has no train or validation row for is ranked; the user's positive test items are the relevant ones (Recall@k
divides the hits by min(k, relevant)).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.artifacts import count_parameters, load_model
from tasks.config import stage_args
from tasks.ctr.ctr_onnx import MODELS, OUTPUT, onnx_probabilities
from tasks.ctr.ctr_training import CtrSplit, ctr_metrics
from tasks.ctr.scores import log_int8_curves, ratios, split_quality
from tasks.errors import run_cli
from tasks.io import read_csv, read_prepared, read_windows
from tasks.onnx_models import file_sizes, percentiles_ms, session, timed_runs
from tasks.recsys.config import EvaluateRecsys
from tasks.recsys.prepare import assemble_fields


class Catalog:
    """Every user's and item's encoded fields: builds the rows of one user against many items."""

    def __init__(self, data_dir: Path) -> None:
        self.users, self.items, self.item_genres = (
            read_prepared(data_dir / f"{name}.npy", lambda path: np.load(path, allow_pickle=False), "prepare_recsys")
            for name in ("users", "items", "items_genres"))

    def request(self, user: int, items: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs scoring ``items`` (0-based) for ``user`` (0-based), in the FIELDS order of prepare_recsys."""
        users = np.broadcast_to(self.users[user], (len(items), self.users.shape[1]))
        return {"fields": assemble_fields(users, self.items[items]), "genres": self.item_genres[items]}


def ranking(path: Path, catalog: Catalog, interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
            k: int, threads: int, sample: int | None = None) -> dict[str, float]:
    """Mean NDCG@k and Recall@k over users with positive test rows (protocol in the module docstring); over a
    seeded ``sample`` of them when given (the same users for every model)."""
    sess = session(path, threads)
    user_index, item_index = pd.Index(users.user_id), pd.Index(items.item_id)
    seen = interactions[interactions.split != "test"].groupby("user_id").item_id.apply(set)
    positives = interactions[(interactions.split == "test") & (interactions.label == 1)].groupby("user_id").item_id.apply(set)
    if sample is not None and sample < len(positives):
        positives = positives.iloc[np.sort(np.random.default_rng(0).choice(len(positives), sample, replace=False))]
    discounts, catalog_items = 1 / np.log2(np.arange(2, k + 2)), set(items.item_id)
    ndcg, recall = [], []
    for user_id, relevant in positives.items():
        candidates = np.array(sorted(catalog_items - seen.get(user_id, set())))
        scores = sess.run([OUTPUT], catalog.request(user_index.get_loc(user_id), item_index.get_indexer(candidates)))[0]
        top = candidates[np.argsort(-scores, kind="stable")[:k]]
        hits = np.isin(top, list(relevant))
        ndcg.append(float((hits * discounts[:len(top)]).sum() / discounts[:min(k, len(relevant))].sum()))
        recall.append(float(hits.sum() / min(k, len(relevant))))
    return {f"test_ndcg_at_{k}": float(np.mean(ndcg)), f"test_recall_at_{k}": float(np.mean(recall)),
            "ranked_users": len(ndcg)}


def request_latency(path: Path, catalog: Catalog, cfg: EvaluateRecsys) -> dict[str, float]:
    """Latency of scoring ``cfg.candidates`` items for one user, and the items/s that implies."""
    count = min(cfg.candidates, len(catalog.items))
    times = timed_runs(session(path, cfg.threads), catalog.request(0, np.arange(count)), cfg.warmup, cfg.repeats)
    return {**percentiles_ms(times, "latency"), "throughput_items_per_s": float(count / np.median(times)),
            "candidates": count}


def window_quality(labels: np.ndarray, probabilities: np.ndarray, data_dir: Path) -> dict[str, float]:
    """``<window>_auc``, ``<window>_logloss`` and ``<window>_rows`` on the test rows of each evaluation window of
    ``windows.json`` (golden, recent; a window whose rows hold one class only has no AUC: its rows are reported)."""
    out: dict[str, float] = {}
    for name, positions in read_windows(data_dir).items():
        y = labels[positions]
        out[f"{name}_rows"] = len(y)
        if len(np.unique(y)) == 2:
            out.update({f"{name}_{k}": v for k, v in ctr_metrics(y, probabilities[positions]).items()})
    return out


STANDS_FOR = "test_stands_for.npy"   # beside expanded test rows: the test row each one is a sample of


def probabilities_on_test(path: Path, data_dir: Path, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the test rows of ``data_dir``; rows written as several samples (``STANDS_FOR``: a
    champion's cold-start rows) are scored as the mean of their samples' probabilities."""
    rows = CtrSplit.load(data_dir, "test")
    labels, probabilities = rows.y.numpy(), onnx_probabilities(path, rows, threads=threads).ravel()
    if (data_dir / STANDS_FOR).is_file():
        stands_for = np.load(data_dir / STANDS_FOR)
        probabilities = np.bincount(stands_for, weights=probabilities) / np.bincount(stands_for)
        labels = labels[np.unique(stands_for, return_index=True)[1]]
    return labels, probabilities


def score_onnx(path: Path, data_dir: Path, cfg: EvaluateRecsys) -> dict[str, float]:
    """Test AUC / logloss, the same on each evaluation window, and the request latency of one ONNX file (what the
    gate re-measures for a champion)."""
    labels, probabilities = probabilities_on_test(path, data_dir, cfg.threads)
    return {**{f"test_{k}": v for k, v in ctr_metrics(labels, probabilities).items()},
            **window_quality(labels, probabilities, data_dir), **request_latency(path, Catalog(data_dir), cfg)}


def evaluate_recsys(cfg: EvaluateRecsys, data_dir: Path, onnx_dir: Path, models: dict[str, Path]) -> dict[str, dict]:
    torch.set_num_threads(cfg.threads)
    catalog = Catalog(data_dir)
    tables = {name: read_csv(data_dir / f"{name}.csv", dtype={"zip_code": str})
              for name in ("interactions", "users", "items")}
    results = {}
    for name in MODELS:
        path = onnx_dir / f"{name}.onnx"
        results[name] = {**split_quality(path, data_dir, "val", cfg.threads), **score_onnx(path, data_dir, cfg),
                         **file_sizes(path),
                         **ranking(path, catalog, tables["interactions"], tables["users"], tables["items"],
                                   cfg.ranking_k, cfg.threads, cfg.ranking_users),
                         "parameters": count_parameters(load_model(models[name]))}
    return results


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--onnx", "--teacher", "--student-fp32", "--student", "--metrics")
    ev = cfg.evaluate.recsys
    from tasks.tracking import stage_run

    with stage_run("evaluate_recsys", cfg, {"evaluate.recsys": ev}) as run:
        models = {"teacher_fp32": args.teacher, "student_fp32": args.student_fp32, "student_int8": args.student}
        results = evaluate_recsys(ev, args.data, args.onnx, models)
        summary = ratios(results)
        run.publish_evaluation(args.metrics, results, summary, ev, args.onnx)
        log_int8_curves(run, args.onnx, args.data, ev.threads)
    for name, r in results.items():
        print(f"{name}: AUC val {r['val_auc']:.4f}, test {r['test_auc']:.4f}, "
              f"NDCG@{ev.ranking_k} {r[f'test_ndcg_at_{ev.ranking_k}']:.4f}, {r['bytes']:,} bytes, "
              f"p50 {r['latency_p50_ms']:.3f} ms per {r['candidates']} candidates")
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    run_cli(main)
