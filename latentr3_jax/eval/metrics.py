"""HR@K and NDCG@K with the two matching rules of SPEC.md section 7, and the predictions file.

For one test row the returned list is ranked; r is the 0-based position of the first
correct entry (-1 if none). HR@K = [0 <= r < K]; NDCG@K = 1 / log2(r + 2) if 0 <= r < K.
Both are averaged over all rows. Ties are ranked by list order.

- title rule (the release's): an entry is correct when its title equals the target title
  after stripping spaces, newlines and quotes at both ends; duplicate titles therefore
  count as hits even when the item id differs.
- item-id rule: an entry is correct when its item id is the target id.

The predictions file is JSON lines, one row per evaluated sample, appended and flushed
row by row so an interrupted evaluation can resume from it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional, Sequence

from latentr3_jax.data.prompts import normalize_title  # the title rule; importable from here too

KS = (1, 3, 5, 10, 20)


def title_rank(ranked_titles: Sequence[str], target_title: str) -> int:
    """Position of the first title equal to the target under the title rule, or -1."""
    want = normalize_title(target_title)
    for r, t in enumerate(ranked_titles):
        if normalize_title(t) == want:
            return r
    return -1


def id_rank(ranked_ids: Sequence[int], target_id: int) -> int:
    """Position of the target item id in the ranked ids, or -1."""
    for r, i in enumerate(ranked_ids):
        if int(i) == int(target_id):
            return r
    return -1


def hit(rank: int, k: int) -> float:
    return 1.0 if 0 <= rank < k else 0.0


def ndcg(rank: int, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if 0 <= rank < k else 0.0


def rank_metrics(ranks: Sequence[int], ks: Sequence[int] = KS, suffix: str = "") -> dict:
    """{'HR@K' + suffix, 'NDCG@K' + suffix} averaged over rows (0.0 for no rows)."""
    n = len(ranks)
    out = {}
    for k in ks:
        out[f"HR@{k}{suffix}"] = sum(hit(r, k) for r in ranks) / n if n else 0.0
        out[f"NDCG@{k}{suffix}"] = sum(ndcg(r, k) for r in ranks) / n if n else 0.0
    return out


def summarize(rows: Iterable[dict], ks: Sequence[int] = KS) -> dict:
    """Metrics of prediction rows (each with 'rank_title', 'rank_id' and optional 'oov').

    Keys: HR@K / NDCG@K (title rule), HR@K_id / NDCG@K_id (item-id rule), oov_rate (share
    of generated titles not in the catalog; 0 for constrained decoding), users.
    """
    rows = list(rows)
    out = rank_metrics([int(r["rank_title"]) for r in rows], ks)
    out.update(rank_metrics([int(r["rank_id"]) for r in rows], ks, suffix="_id"))
    oov = [bool(r["oov"]) for r in rows if r.get("oov") is not None]
    out["oov_rate"] = sum(oov) / len(oov) if oov else 0.0
    out["users"] = len(rows)
    return out


def prediction_row(*, row: int, user, line: int, target_id: int, target_title: str,
                   ranked_ids: Sequence[int], ranked_titles: Sequence[str],
                   scores: Sequence[float], generated: Optional[str] = None,
                   oov: Optional[bool] = None, id_ranked: Optional[Sequence[int]] = None) -> dict:
    """One predictions-file record, with both ranks already computed.

    `ranked_titles` is the list the title rule reads; `ranked_ids` the one the item-id rule
    reads (for constrained decoding: each title expanded to all its item ids).
    """
    return {"row": int(row), "user": user, "line": int(line), "target_id": int(target_id),
            "target_title": target_title, "ranked_ids": [int(i) for i in ranked_ids],
            "ranked_titles": list(ranked_titles), "scores": [float(s) for s in scores],
            "generated": generated, "oov": oov,
            "rank_title": title_rank(ranked_titles, target_title),
            "rank_id": id_rank(ranked_ids, target_id)}


def read_predictions(path: str, *, repair: bool = False) -> list:
    """Rows of a predictions file. A torn last line (an interrupted write) is dropped and,
    with `repair`, cut off the file so appending continues on a clean line boundary."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good_end, pos = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break                                  # last line without newline: torn
        line = data[pos:nl]
        try:
            rows.append(json.loads(line))
        except ValueError:
            break                                  # garbage: keep only what came before
        pos = nl + 1
        good_end = pos
    if repair and good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


class PredictionWriter:
    """Appends prediction rows as JSON lines, flushing each so nothing written is lost."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_table(metrics: dict, ks: Sequence[int] = KS) -> str:
    """Plain-text table: one line per K, title and item-id rules side by side."""
    lines = [f"{'K':>4} {'HR':>8} {'NDCG':>8} {'HR(id)':>8} {'NDCG(id)':>9}"]
    for k in ks:
        lines.append(f"{k:>4} {metrics.get(f'HR@{k}', 0.0):8.4f} {metrics.get(f'NDCG@{k}', 0.0):8.4f} "
                     f"{metrics.get(f'HR@{k}_id', 0.0):8.4f} {metrics.get(f'NDCG@{k}_id', 0.0):9.4f}")
    extra = [f"users {metrics.get('users', 0)}", f"oov_rate {metrics.get('oov_rate', 0.0):.4f}"]
    if "users_per_s" in metrics:
        extra.append(f"users/s {metrics['users_per_s']:.2f}")
    lines.append("  ".join(extra))
    return "\n".join(lines)
