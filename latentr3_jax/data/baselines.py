"""Classical baselines the LLM recommender must beat, with HR@K / NDCG@K (numpy only).

- most-popular: items ranked by how often they are a train target;
- last-item transitions: counts of (last history item -> target) in train, ties and
  unseen pairs broken by popularity;
- history co-occurrence: sum over all history items h of the train counts of
  (h in a history -> target), again backed off to popularity (an item-kNN flavour
  that sees the whole history but not its order).
Ranks use the item-id rule; `title_rule=True` counts any item with the target's title
as a hit (SPEC.md section 7, the release's rule). Ties break towards the smaller id.

Fair comparison with the LLM recommender: its trie-constrained beam search ranks the whole
catalog, items already in the history included, so `exclude_history=False` (the default)
is the like-for-like setting; `exclude_history=True` gives the baselines an advantage the
model does not get (the synthetic data never repeats a purchase).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (1, 3, 5, 10, 20)


def _index(catalog):
    ids = np.array(catalog.ids, dtype=np.int64)
    return ids, {int(i): k for k, i in enumerate(ids)}


def popularity(train, catalog) -> np.ndarray:
    ids, pos = _index(catalog)
    c = np.zeros(len(ids))
    for s in train:
        c[pos[s.target_id]] += 1
    return c


def _transition_counts(train, catalog, whole_history: bool) -> dict:
    _, pos = _index(catalog)
    counts = {}
    for s in train:
        src = s.history_ids if whole_history else s.history_ids[-1:]
        t = pos[s.target_id]
        for h in set(src):
            row = counts.setdefault(pos[h], {})
            row[t] = row.get(t, 0) + 1
    return counts


def scores(method: str, train, rows, catalog, *, exclude_history: bool = False) -> np.ndarray:
    """[len(rows), len(catalog)] scores (higher = better), columns in catalog.ids order."""
    ids, pos = _index(catalog)
    pop = popularity(train, catalog)
    tie = pop / (pop.max() + 1.0)        # in [0, 1): popularity only breaks ties
    out = np.tile(tie, (len(rows), 1))
    if method in ("last_item", "cooccurrence"):
        counts = _transition_counts(train, catalog, whole_history=(method == "cooccurrence"))
        for r, s in enumerate(rows):
            src = s.history_ids if method == "cooccurrence" else s.history_ids[-1:]
            for h in src:
                for t, c in counts.get(pos.get(h, -1), {}).items():
                    out[r, t] += c
    elif method != "most_popular":
        raise ValueError(f"unknown baseline {method!r}")
    if exclude_history:
        for r, s in enumerate(rows):
            out[r, [pos[h] for h in s.history_ids if h in pos]] = -np.inf
    return out


def ranks(score: np.ndarray, rows, catalog, *, title_rule: bool = False) -> np.ndarray:
    """0-based rank of the first correct item per row (ties -> smaller id first)."""
    ids, pos = _index(catalog)
    out = np.empty(len(rows), dtype=np.int64)
    for r, s in enumerate(rows):
        correct = catalog.title_to_ids[catalog.titles[s.target_id]] if title_rule else [s.target_id]
        best = len(ids)
        for t in correct:
            k = pos[t]
            v = score[r, k]
            rank = int(np.sum(score[r] > v) + np.sum(score[r, :k] == v))
            best = min(best, rank)
        out[r] = best
    return out


def metrics(rank: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """HR@K = mean[r < K], NDCG@K = mean[1/log2(r+2) if r < K] (SPEC.md section 7)."""
    rank = np.asarray(rank)
    out = {}
    for k in ks:
        hit = rank < k
        out[f"HR@{k}"] = float(hit.mean()) if len(rank) else 0.0
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean()) if len(rank) else 0.0
    return out


def evaluate_baselines(dataset, split: str = "test", *, ks: Sequence[int] = KS,
                       exclude_history: bool = False, title_rule: bool = False,
                       methods=("most_popular", "last_item", "cooccurrence"), chunk: int = 1024) -> dict:
    """method -> metrics on `split`, trained on the train split."""
    train, rows = dataset.splits["train"], dataset.splits[split]
    result = {}
    for m in methods:
        all_ranks = []
        for a in range(0, len(rows), chunk):
            part = rows[a:a + chunk]
            sc = scores(m, train, part, dataset.catalog, exclude_history=exclude_history)
            all_ranks.append(ranks(sc, part, dataset.catalog, title_rule=title_rule))
        result[m] = metrics(np.concatenate(all_ranks) if all_ranks else np.zeros(0), ks)
    return result


def format_table(result: dict, ks: Sequence[int] = (1, 5, 10, 20)) -> str:
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    lines = [f"{'baseline':<14}" + "".join(f"{c:>9}" for c in cols)]
    for m, v in result.items():
        lines.append(f"{m:<14}" + "".join(f"{v[c]:>9.4f}" for c in cols))
    return "\n".join(lines)


LABELS = {"most_popular": "most popular (no model)",
          "last_item": "last-item transitions (no model)",
          "cooccurrence": "history co-occurrence (no model)"}


def table_rows(dataset, split: str = "test", *, exclude_history: bool = False,
               title_rule: bool = False) -> list:
    """The baselines as rows of the `latentr3 run` results table (same keys as a variant)."""
    result = evaluate_baselines(dataset, split, exclude_history=exclude_history,
                                title_rule=title_rule)
    return [{"variant": LABELS[m], "name": m, **{k: v[k] for k in ("HR@1", "HR@5", "HR@10",
                                                                    "HR@20", "NDCG@5",
                                                                    "NDCG@10", "NDCG@20")},
             "users": len(dataset.splits[split])} for m, v in result.items()]
