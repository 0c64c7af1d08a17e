"""HR@K / NDCG@K on hand-made rankings, both matching rules, and the predictions file."""

import json
import math

import pytest

from latentr3_jax.eval import metrics as M


def test_title_rule_strips_quotes_spaces_newlines_and_counts_duplicates():
    ranked = ['"Abbey Road"\n', " Greatest Hits ", "Thriller"]
    assert M.title_rank(ranked, "Greatest Hits") == 1
    assert M.title_rank(ranked, '"Abbey Road"') == 0
    assert M.title_rank(ranked, "Abbey  Road") == -1        # inner spaces matter
    assert M.title_rank(ranked, "thriller") == -1           # case matters
    assert M.title_rank([], "x") == -1


def test_id_rule_and_ties_by_list_order():
    # items 7 and 8 share a title; the id rule separates them, the title rule does not
    titles = ["Greatest Hits", "Greatest Hits", "Other"]
    ids = [7, 8, 3]
    row = M.prediction_row(row=0, user="u", line=2, target_id=8, target_title="Greatest Hits",
                           ranked_ids=ids, ranked_titles=titles, scores=[-1.0, -1.0, -2.0])
    assert row["rank_title"] == 0 and row["rank_id"] == 1
    assert M.id_rank([5, 5, 6], 5) == 0


def test_hr_ndcg_formulas_with_misses_and_k_beyond_list():
    ranks = [0, 2, 4, -1, 19, 25]
    m = M.rank_metrics(ranks, ks=(1, 3, 5, 10, 20, 50))
    n = len(ranks)
    assert m["HR@1"] == pytest.approx(1 / n)
    assert m["HR@3"] == pytest.approx(2 / n)
    assert m["HR@5"] == pytest.approx(3 / n)
    assert m["HR@20"] == pytest.approx(4 / n)
    assert m["HR@50"] == pytest.approx(5 / n)      # K larger than most lists
    assert m["NDCG@1"] == pytest.approx(1 / n)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / n)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(6) + 1 / math.log2(21)) / n)
    assert M.rank_metrics([], ks=(5,)) == {"HR@5": 0.0, "NDCG@5": 0.0}


def test_summarize_both_rules_and_oov():
    rows = [
        M.prediction_row(row=0, user=None, line=2, target_id=8, target_title="Hits",
                         ranked_ids=[7, 8], ranked_titles=["Hits", "Hits"], scores=[0, 0],
                         generated="Hits", oov=False),
        M.prediction_row(row=1, user=None, line=3, target_id=1, target_title="A",
                         ranked_ids=[2, 3], ranked_titles=["B", "C"], scores=[0, 0],
                         generated="Zzz", oov=True),
    ]
    m = M.summarize(rows, ks=(1, 5))
    assert m["HR@1"] == 0.5 and m["HR@1_id"] == 0.0 and m["HR@5_id"] == 0.5
    assert m["NDCG@5_id"] == pytest.approx(0.5 / math.log2(3))
    assert m["oov_rate"] == 0.5 and m["users"] == 2
    table = M.format_table(m, ks=(1, 5)).splitlines()
    assert table[2].split() == ["5", "0.5000", "0.5000", "0.5000", "0.3155"]


def test_predictions_file_torn_last_line(tmp_path):
    path = str(tmp_path / "p.jsonl")
    with M.PredictionWriter(path) as w:
        w.write({"row": 0, "x": "é"})
        w.write({"row": 1})
    with open(path, "a") as f:
        f.write('{"row": 2, "x"')            # interrupted mid-write
    assert [r["row"] for r in M.read_predictions(path)] == [0, 1]
    M.read_predictions(path, repair=True)
    with M.PredictionWriter(path) as w:
        w.write({"row": 2})
    assert [r["row"] for r in M.read_predictions(path)] == [0, 1, 2]
    assert json.loads(open(path, encoding="utf-8").read().splitlines()[0])["x"] == "é"
    assert M.read_predictions(str(tmp_path / "missing.jsonl")) == []
