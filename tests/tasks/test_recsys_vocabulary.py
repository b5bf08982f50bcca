"""A champion trained on an older snapshot reads new data in its own vocabulary: new users and items shift every
embedding index, so the gate scores it on the rows it knows, encoded as it was trained, beside the candidate."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.gate import gate_checks
from tasks.io import WINDOWS, read_windows
from tasks.recsys.evaluate import STANDS_FOR, probabilities_on_test
from tasks.recsys.family import FAMILY, paired_data
from tasks.recsys.movielens import acquire
from tasks.recsys.prepare import FIELDS, VOCABULARY, prepare_recsys
from tests.conftest import known_rows_only, older_and_grown


def _decode(fields: np.ndarray, vocabulary: dict[str, list]) -> list[tuple]:
    """Raw values of encoded rows (FIELDS order), through the vocabulary and the layout it implies."""
    offsets = np.cumsum([0] + [len(vocabulary[f]) for f in FIELDS])[:-1]
    return [tuple(str(vocabulary[f][code - off]) for f, code, off in zip(FIELDS, row, offsets, strict=True))
            for row in fields]


def _older_champion(cfg, tmp_path) -> tuple:
    """(the folder of a champion registered on the older snapshot, its vocabulary, the grown data's vocabulary)."""
    older_and_grown(cfg, tmp_path)
    champion = tmp_path / "registered"
    champion.mkdir()
    (champion / VOCABULARY).write_text((tmp_path / "old" / VOCABULARY).read_text())
    return champion, *(json.loads((d / VOCABULARY).read_text()) for d in (champion, tmp_path / "new"))


def test_a_champion_of_an_older_snapshot_reads_the_rows_it_knows_in_its_own_encoding(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    champion, theirs, ours = _older_champion(cfg, tmp_path)
    assert theirs != ours and FAMILY.model_files == (VOCABULARY,)

    paired, mine = paired_data(champion, tmp_path / "new", tmp_path / "scratch", known_rows_only(cfg))
    theirs_rows, our_rows = np.load(paired / "test_fields.npy"), np.load(mine / "test_fields.npy")
    assert 0 < len(theirs_rows) < len(np.load(tmp_path / "new" / "test_fields.npy"))   # only the rows it knows
    assert not (paired / STANDS_FOR).exists()
    assert _decode(theirs_rows, theirs) == _decode(our_rows, ours)   # the same ratings, each in its own encoding
    assert theirs_rows.max() < sum(len(theirs[f]) for f in FIELDS)   # every index inside the champion's table
    np.testing.assert_array_equal(np.load(paired / "test_y.npy"), np.load(mine / "test_y.npy"))
    assert np.load(paired / "users.npy").max() < sum(len(theirs[f]) for f in FIELDS)

    assert paired_data(champion, tmp_path / "old", tmp_path / "same", cfg) is None   # its own data: as is
    (champion / VOCABULARY).unlink()
    assert paired_data(champion, tmp_path / "new", tmp_path / "none", cfg) is None   # registered without one


def test_a_users_text_pandas_would_read_as_missing_is_the_value_a_champion_knows(synthetic_movielens, tmp_path,
                                                                                  monkeypatch):
    """Before: the champion's pairing read users.csv with pandas' missing-value strings, so an occupation "None" or
    "N/A" (a value the vocabulary holds) was unknown to the champion and its users' rows were left out."""
    from tasks.recsys import movielens

    _, _, cfg = synthetic_movielens
    acquire_real = movielens.acquire

    def with_none(data_cfg):
        source, tables = acquire_real(data_cfg)
        users = tables["users"].assign(occupation=np.where(tables["users"].user_id % 2 == 0, "None", "N/A"))
        return source, {**tables, "users": users}

    monkeypatch.setattr(movielens, "acquire", with_none)
    champion, theirs, _ = _older_champion(cfg, tmp_path)
    assert {"None", "N/A"} <= set(theirs["occupation"])
    paired, _ = paired_data(champion, tmp_path / "new", tmp_path / "scratch", known_rows_only(cfg))
    read = {row[FIELDS.index("occupation")] for row in _decode(np.load(paired / "test_fields.npy"), theirs)}
    assert read == {"None", "N/A"}


def test_a_champion_scores_users_and_items_it_never_saw_as_the_mean_over_known_ones(synthetic_movielens, tmp_path):
    """Before: a champion of an older snapshot was compared on the test rows whose users and items it knew only; a
    replayed MovieLens week's recent window (mostly new users) then held too few of them to decide on, every week."""
    import torch

    from tasks.ctr.config import RecArch
    from tasks.ctr.ctr_onnx import export_ctr_fp32, onnx_probabilities
    from tasks.ctr.ctr_training import CtrSplit
    from tasks.ctr.models import CtrModel

    _, _, cfg = synthetic_movielens
    samples = cfg.evaluate.recsys.cold_start_samples
    assert samples == 16
    champion, theirs, ours = _older_champion(cfg, tmp_path)
    shape = json.loads((tmp_path / "old" / "features.json").read_text())
    torch.manual_seed(0)
    model = CtrModel(RecArch(dim=8, fm=True, mlp=[16]), shape["vocabulary"], len(shape["fields"]), len(shape["genres"]))
    torch.nn.init.normal_(model.embedding.weight, std=0.5)
    path = export_ctr_fp32(model, champion / "model.onnx")
    test_rows = len(np.load(tmp_path / "new" / "test_y.npy"))
    recent = list(range(0, test_rows, 2))
    (tmp_path / "new" / WINDOWS).write_text(json.dumps({"golden": list(range(test_rows)), "recent": recent}))

    paired, mine = paired_data(champion, tmp_path / "new", tmp_path / "scratch", cfg)
    our_rows, rows = np.load(mine / "test_fields.npy"), np.load(paired / "test_fields.npy")
    assert len(our_rows) == len(np.load(tmp_path / "new" / "test_fields.npy"))   # every test row is compared
    stands_for = np.load(paired / STANDS_FOR)
    counts = np.bincount(stands_for)
    assert set(counts) == {1, samples} and len(counts) == len(our_rows)
    assert 0 <= rows.min() and rows.max() < sum(len(theirs[f]) for f in FIELDS)   # inside the champion's table
    known = counts[stands_for] == 1
    assert _decode(rows[known], theirs) == _decode(our_rows[stands_for[known]], ours)   # as it reads them
    for drawn, own in zip(_decode(rows[~known], theirs), _decode(our_rows[stands_for[~known]], ours), strict=True):
        assert all(d == o for d, o, f in zip(drawn, own, FIELDS, strict=True) if o in map(str, theirs[f]))   # known: own
        assert any(o not in map(str, theirs[f]) for o, f in zip(own, FIELDS, strict=True))   # something it never saw
    assert len(set(_decode(rows[~known][:samples], theirs))) > 1   # drawn from its table, not one fallback row

    labels, probabilities = probabilities_on_test(path, paired, 1)   # each row: its samples' mean probability
    every = onnx_probabilities(path, CtrSplit.load(paired, "test")).ravel()
    np.testing.assert_array_equal(labels, np.load(mine / "test_y.npy"))
    np.testing.assert_allclose(probabilities, [every[stands_for == r].mean() for r in range(len(counts))], rtol=1e-6)
    # every recent row is compared; its health is judged on those it reads as they are
    windows = read_windows(paired)
    assert windows["recent"].tolist() == recent and read_windows(mine)["recent_known"].tolist() == \
        windows["recent_known"].tolist() == [r for r in recent if counts[r] == 1] != recent
    again, _ = paired_data(champion, tmp_path / "new", tmp_path / "again", cfg)   # seeded: the same draw
    np.testing.assert_array_equal(np.load(again / "test_fields.npy"), rows)


def test_a_champion_made_with_other_encoding_params_reads_the_data_in_its_own(synthetic_movielens, tmp_path):
    """Before: the champion's rows were bucketed with the candidate's params (year_bucket, zip_prefix_length), so a
    champion of 5-year buckets read a 1995 film as 1990's row of its table."""
    _, _, cfg = synthetic_movielens
    source, tables = acquire(cfg.data.recsys)
    tables["items"] = tables["items"].assign(release_year=1990 + np.arange(len(tables["items"])) % 10)
    theirs_cfg = cfg.data.recsys.model_copy(update={"year_bucket": 5, "zip_prefix_length": 2})
    ours_cfg = cfg.data.recsys.model_copy(update={"year_bucket": 10, "zip_prefix_length": 1})
    prepare_recsys(theirs_cfg, tmp_path / "old", (source, tables))
    prepare_recsys(ours_cfg, tmp_path / "new", (source, tables))
    champion = tmp_path / "registered"
    champion.mkdir()
    (champion / VOCABULARY).write_text((tmp_path / "old" / VOCABULARY).read_text())
    theirs = json.loads((champion / VOCABULARY).read_text())
    assert theirs["year"] == [1990, 1995] and theirs["encoding"] == {"year_bucket": 5, "zip_prefix_length": 2}

    paired, _ = paired_data(champion, tmp_path / "new", tmp_path / "scratch", cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"recsys": ours_cfg})}))
    # the champion reads exactly the test rows it was prepared with: the same data, in its own encoding
    np.testing.assert_array_equal(np.load(paired / "test_fields.npy"), np.load(tmp_path / "old" / "test_fields.npy"))


def test_the_gate_compares_a_champion_on_the_rows_it_read_with_the_candidate_on_the_same_rows(raw_params):
    from tasks.config import parse_config

    gate = parse_config(raw_params).gate.recsys
    measured = {"test_auc": 0.80, "latency_p95_ms": 0.1, "latency_p50_ms": 0.1, "bytes": 1000}
    evaluation = {"models": {"student_int8": measured, "teacher_fp32": {**measured, "latency_p50_ms": 10,
                                                                         "bytes": 10**6, "test_auc": 0.801}}}
    champion = {"version": "1", "test_auc": 0.79, "candidate": {"test_auc": 0.70}}   # worse on the rows it knows
    checks = {c.name: c for c in gate_checks(evaluation, champion, gate, FAMILY.gate)}
    assert checks["auc_drop_vs_champion"].value == pytest.approx(0.09) and not checks["auc_drop_vs_champion"].passed
    assert "the test rows both can read" in checks["auc_drop_vs_champion"].why


def test_the_champion_moves_only_when_the_challenger_is_not_worse_on_either_window(raw_params):
    from tasks.config import parse_config
    from tasks.gate import champion_health, health_markdown

    gate = parse_config(raw_params).gate.recsys
    measured = {"test_auc": 0.85, "val_auc": 0.85, "latency_p95_ms": 0.1, "latency_p50_ms": 0.1, "bytes": 1000,
                "golden_auc": 0.86, "golden_rows": 7000, "recent_auc": 0.79, "recent_rows": 300}
    evaluation = {"models": {"student_int8": measured, "teacher_fp32": {**measured, "latency_p50_ms": 10,
                                                                         "bytes": 10**6}}}
    champion = {"version": "1", "test_auc": 0.85, "val_auc": 0.85, "golden_auc": 0.86, "golden_rows": 7000,
                "recent_auc": 0.83, "recent_rows": 300}
    checks = {c.name: c for c in gate_checks(evaluation, champion, gate, FAMILY.gate)}
    assert checks["auc_drop_vs_champion"].passed and checks["auc_drop_vs_champion_golden"].passed
    assert not checks["auc_drop_vs_champion_recent"].passed    # worse on the newest data: the champion stays
    assert checks["auc_drop_vs_champion_recent"].value == pytest.approx(0.04)   # over the windows' own 0.03
    assert "recent window auc drop vs champion v1 (300 test rows both read" in checks["auc_drop_vs_champion_recent"].why
    few = {**champion, "recent_rows": 40}   # a week the champion reads 40 rows of: reported, not decided on noise
    check = next(c for c in gate_checks(evaluation, few, gate, FAMILY.gate) if c.name == "auc_drop_vs_champion_recent")
    assert check.passed and check.why == "recent window not compared: 40 test rows both read (fewer than 100)"
    assert "auc_drop_vs_champion_recent" not in {c.name for c in gate_checks(evaluation, champion, gate, FAMILY.gate,
                                                                              split="val")}

    health = champion_health(champion, {"test": 0.89}, gate)   # registered at 0.89 test AUC, 0.83 recent now
    assert health["degraded"] and health["drop"] == pytest.approx(0.06) and health["max_drop"] == 0.05
    like = champion_health(champion, {"test": 0.89, "recent": 0.86}, gate)   # its recent AUC then: like with like
    assert not like["degraded"] and like["baseline"] == "registered recent auc" and like["drop"] == pytest.approx(0.03)
    assert not champion_health(few, {"test": 0.95}, gate)["compared"]   # 40 rows: not judged
    # some recent rows hold users it never saw (scored as an average known one): judged on the rows it knows
    cold = {**champion, "recent_auc": 0.70, "recent_known_auc": 0.85, "recent_known_rows": 120}
    judged = champion_health(cold, {"test": 0.89, "recent": 0.86}, gate)
    assert judged["window"] == "recent_known" and judged["recent_auc"] == 0.85 and judged["recent_rows"] == 120
    assert not judged["degraded"] and judged["drop"] == pytest.approx(0.01)
    assert "(120 test rows whose users and items it knows): healthy" in health_markdown(judged, False)
    assert champion_health(champion, {}, gate) is None   # registered before versions recorded their score


def test_champion_health_at_its_limit_is_healthy_and_an_unmeasured_score_is_not_judged(raw_params):
    """Before: a drop of exactly max_drop (0.935 - 0.885, a difference of rounded scores) raised the ALERT the gate's
    own checks would not; a recorded score of NaN read as "healthy" (every comparison with NaN is False)."""
    from tasks.config import parse_config
    from tasks.gate import champion_health

    gate = parse_config(raw_params).gate.recsys
    champion = {"version": "3", "recent_auc": 0.885, "recent_rows": 500}
    at_limit = champion_health(champion, {"recent": 0.935}, gate)
    assert at_limit["drop"] > gate.champion_health.max_drop == 0.05 and not at_limit["degraded"]
    assert champion_health(champion, {"recent": float("nan")}, gate) is None   # nothing to compare with
    unmeasured = champion_health({**champion, "recent_auc": float("nan")}, {"recent": 0.935}, gate)
    assert not unmeasured["compared"] and not unmeasured["degraded"]
