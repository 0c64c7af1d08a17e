"""Synthetic default dataset (determinism, sizes, planted structure) and the baselines."""

import math

import numpy as np
import pytest

from latentr3_jax.config import base_config
from latentr3_jax.data import baselines, load_dataset
from latentr3_jax.cli import cmd_data as data_main
from latentr3_jax.data.d3 import Catalog, Dataset, Sample
from latentr3_jax.data.synthetic import GENRES, generate


@pytest.fixture(scope="module")
def default():
    cfg = base_config()
    syn = cfg.data.synthetic
    return generate(syn.num_items, syn.num_users, syn.seed)


def test_deterministic_and_seeded():
    a = generate(100, 40, seed=1)
    b = generate(100, 40, seed=1)
    c = generate(100, 40, seed=2)
    assert a[0].titles == b[0].titles and a[1] == b[1]
    assert a[1] != c[1]


def test_default_sizes_and_titles(default):
    catalog, splits, genre = default
    sizes = {k: len(v) for k, v in splits.items()}
    print("synthetic sizes", sizes)
    assert 2500 <= sizes["train"] <= 4000 and 300 <= sizes["test"] <= 450
    assert len(catalog) == 320 and len(catalog.title_to_ids) == 320      # titles unique
    assert all(2 <= len(t.split()) <= 3 for t in catalog.titles.values())
    rows = [s for v in splits.values() for s in v]
    assert all(1 <= len(s.history_ids) <= 10 for s in rows)
    assert all(s.target_id not in s.history_ids for s in rows)           # no repeat purchases
    times = [s.timestamp for k in ("train", "valid", "test") for s in splits[k]]
    assert times == sorted(times)                                        # temporal split
    # genre words are visible, and the first word alone names the genre
    names = list(GENRES)
    leads = [set(GENRES[n][0]) for n in names]
    assert sum(len(x) for x in leads) == len(set().union(*leads))         # disjoint lead words
    for i in catalog.ids:
        lead_words, nouns, places = GENRES[names[genre[i]]]
        words = catalog.titles[i].split()
        assert words[0] in lead_words and words[-1] in nouns
        assert set(words[1:-1]) <= set(places)


def test_tiny_catalogs_and_bad_sizes():
    # users buy more albums than a genre holds: the generator moves on to other genres
    catalog, splits, genre = generate(num_items=16, num_users=50, seed=4)
    rows = [s for v in splits.values() for s in v]
    assert len(catalog) == 16 and rows
    assert all(s.target_id not in s.history_ids for s in rows)
    with pytest.raises(ValueError, match="num_items"):
        generate(num_items=10, num_users=5)
    with pytest.raises(ValueError, match="titles per genre"):
        generate(num_items=8 * 300, num_users=5)


def test_planted_structure(default):
    catalog, splits, genre = default
    rows = splits["train"]
    last_same = np.mean([genre[s.target_id] == genre[s.history_ids[-1]] for s in rows])
    in_hist = np.mean([genre[s.target_id] in {genre[h] for h in s.history_ids}
                       for s in rows if len(s.history_ids) >= 5])
    assert last_same < 0.2          # the last item's genre is mostly avoided ...
    assert in_hist > 0.75           # ... but the target's genre was in the history


def _genre_scorer(train, rows, catalog, genre):
    """The structure's own predictor: recency-weighted history genres minus the last one,
    times popularity inside the genre. A model that learns the structure can reach it."""
    pop = baselines.popularity(train, catalog) + 1.0
    G = genre.max() + 1
    gpop = np.array([pop[genre == g].sum() for g in range(G)])
    out = np.zeros((len(rows), len(catalog)))
    for r, s in enumerate(rows):
        w = np.full(G, 1e-3)
        for j, h in enumerate(s.history_ids):
            w[genre[h]] += 0.8 ** (len(s.history_ids) - 1 - j)
        w[genre[s.history_ids[-1]]] *= 0.15
        out[r] = w[genre] * pop / gpop[genre]
        out[r, list(s.history_ids)] = -np.inf
    return out


def test_structure_beats_the_baselines(default):
    catalog, splits, genre = default
    ds = Dataset("synthetic", "albums", catalog, splits)
    base = baselines.evaluate_baselines(ds, "test", exclude_history=True)
    print("\n" + baselines.format_table(base))
    sc = _genre_scorer(splits["train"], splits["test"], catalog, genre)
    oracle = baselines.metrics(baselines.ranks(sc, splits["test"], catalog))
    print("structure-aware scorer HR@5 %.4f HR@10 %.4f NDCG@10 %.4f" %
          (oracle["HR@5"], oracle["HR@10"], oracle["NDCG@10"]))
    simple = [base["most_popular"], base["last_item"]]
    assert oracle["HR@10"] > 1.6 * max(v["HR@10"] for v in simple)
    assert oracle["HR@5"] > 2.0 * max(v["HR@5"] for v in simple)
    # the item-kNN flavoured baseline sees the whole history, but not its order
    assert oracle["HR@10"] > 1.2 * base["cooccurrence"]["HR@10"]


def test_baselines_against_brute_force():
    titles = {0: "a", 1: "b", 2: "c", 3: "a"}      # 0 and 3 share a title
    cat = Catalog(titles)
    S = lambda h, t: Sample("u", tuple(h), tuple(titles[i] for i in h), t, titles[t])
    train = [S([0], 1), S([0], 1), S([2], 1), S([1], 2), S([1], 3), S([1], 3), S([2], 0)]
    test = [S([0], 2), S([1], 3), S([2], 0)]
    pop = baselines.popularity(train, cat)
    assert list(pop) == [1, 3, 1, 2]
    # most popular: order 1, 3, then 0 and 2 tied on count -> smaller id first
    r = baselines.ranks(baselines.scores("most_popular", train, test, cat), test, cat)
    assert list(r) == [3, 1, 2]
    # last item: after 1 -> 3 (2 times) then 2 (1); after 2 -> 1, 0 ; after 0 -> 1
    r = baselines.ranks(baselines.scores("last_item", train, test, cat), test, cat)
    assert list(r) == [3, 0, 1]
    r_title = baselines.ranks(baselines.scores("last_item", train, test, cat), test, cat, title_rule=True)
    assert list(r_title) == [3, 0, 1]
    r = baselines.ranks(baselines.scores("most_popular", train, test, cat), test, cat, title_rule=True)
    assert list(r) == [3, 1, 1]               # item 3 ("a") at rank 1 is a hit for target 0
    r = baselines.ranks(baselines.scores("most_popular", train, test, cat, exclude_history=True), test, cat)
    assert list(r) == [2, 0, 2]
    m = baselines.metrics(np.array([0, 2, 7]), ks=(1, 3, 5))
    assert m["HR@1"] == pytest.approx(1 / 3) and m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["NDCG@5"] == m["NDCG@3"]


def test_load_dataset_caches_and_cli(tmp_path, capsys):
    cfg = base_config()
    cfg.workdir = str(tmp_path / "run")
    cfg.data.synthetic.num_users = 80
    ds = load_dataset(cfg)
    folder = tmp_path / "run" / "synthetic_data"
    assert ds.category_word == "albums" and (folder / "info.txt").exists()
    stamp = (folder / "train.csv").stat().st_mtime_ns
    cfg.data.max_train_rows, cfg.data.max_eval_rows = 10, 5
    again = load_dataset(cfg)
    assert (folder / "train.csv").stat().st_mtime_ns == stamp
    assert again.splits["train"] == ds.splits["train"][:10] and len(again.splits["test"]) == 5
    cfg.data.synthetic.seed = 1
    assert load_dataset(cfg).splits["test"] != ds.splits["test"][:5]
    assert data_main(["baselines", str(folder), "--exclude-history"]) == 0
    out = capsys.readouterr().out
    assert "most_popular" in out and "last_item" in out and "HR@10" in out
    cfg.dataset = "nope"
    from latentr3_jax.errors import InputError
    with pytest.raises(InputError, match="dataset='nope'"):
        load_dataset(cfg)


def test_baseline_table_rows():
    catalog, splits, _ = generate(num_items=64, num_users=80, seed=2)
    ds = Dataset("synthetic", "albums", catalog, splits)
    rows = baselines.table_rows(ds, "test")
    ref = baselines.evaluate_baselines(ds, "test")
    assert [r["name"] for r in rows] == list(ref)
    for r in rows:
        assert r["users"] == len(splits["test"])
        assert r["HR@10"] == ref[r["name"]]["HR@10"] and r["NDCG@5"] == ref[r["name"]]["NDCG@5"]
        assert "no model" in r["variant"]
