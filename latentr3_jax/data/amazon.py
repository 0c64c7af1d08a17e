"""Raw Amazon Reviews 2018 -> D3-format folder (SPEC.md section 2).

Input: `<Category>_5.json(.gz)` (one review per line: reviewerID, asin, unixReviewTime,
overall) and `meta_<Category>.json(.gz)` (one item per line: asin, title).

Steps
1. Items: drop those without a title, with `<span id` in it, or with more than 20 words;
   then unescape `&quot;` and `&amp;`.
2. Window: reviews with start <= time <= end, end = 2018-11-01, start = 2017-10-01 first.
   Inside the window an iterative 5-core filter (users and items, each >= 5 reviews,
   repeated until stable). While fewer than `min_items` items survive, the start moves
   back 3 months (until it is before the oldest review).
3. Item ids: the surviving ASINs (sorted) shuffled with `random.Random(42)`; id = position.
4. Samples: each user's reviews in time order; every position i >= 1 is a sample whose
   history is the previous <= 10 items.
5. Split: all samples sorted by target time (stable), cut 80 / 10 / 10.
Output: train/valid/test.csv (CDs-style columns) and info.txt (`title<TAB>id`), each
written to a temporary file and renamed.
"""

from __future__ import annotations

import calendar
import datetime
import gzip
import json
import pathlib
import random
import sys
from collections import Counter, defaultdict
from typing import Optional

from latentr3_jax.data.d3 import category_word, csv_text
from latentr3_jax.utils.atomic import atomic_write_text
from latentr3_jax.errors import InputError, where

CSV_COLUMNS = ("user_id", "item_asins", "item_asin", "history_item_id", "item_id",
               "history_item_title", "item_title", "history_rating", "rating",
               "history_timestamp", "timestamp")


def _ts(year: int, month: int) -> int:
    return calendar.timegm(datetime.datetime(year, month, 1).timetuple())


def _months_back(year: int, month: int, k: int) -> tuple:
    m = year * 12 + (month - 1) - k
    return m // 12, m % 12 + 1


def _open(path: pathlib.Path):
    if not path.exists():
        raise InputError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _json_lines(path: pathlib.Path, progress=None):
    with _open(path) as f:
        n = 0
        try:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{where(path, n)}: not valid UTF-8 ({e.reason})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where(path, n)}: not a JSON object ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{where(path, n)}: not a JSON object")
                if progress and n % 200_000 == 0:
                    progress(f"{path.name}: {n:,} lines")
                yield n, obj
        except (OSError, EOFError) as e:  # truncated / corrupt gzip
            raise InputError(f"{where(path, n + 1)}: cannot read ({e})") from None


def clean_title(title) -> Optional[str]:
    """The kept title, or None when the item is dropped (SPEC.md section 2 filters)."""
    if not isinstance(title, str):
        return None
    t = title.strip()
    if not t or "<span id" in t or len(t.split()) > 20:
        return None
    t = t.replace("&quot;", '"').replace("&amp;", "&")
    return " ".join(t.split())   # tabs/newlines would break info.txt


def read_meta(path, progress=None) -> dict:
    """asin -> cleaned title, for items that pass the filters."""
    titles = {}
    for n, obj in _json_lines(pathlib.Path(path), progress):
        asin = obj.get("asin")
        if not isinstance(asin, str) or not asin:
            raise InputError(f"{where(path, n, 'asin')}: missing")
        t = clean_title(obj.get("title"))
        if t is not None and asin not in titles:
            titles[asin] = t
    return titles


def read_reviews(path, progress=None) -> list:
    """(user, asin, time, rating, order) per review."""
    out = []
    for n, obj in _json_lines(pathlib.Path(path), progress):
        for field in ("reviewerID", "asin", "unixReviewTime"):
            if field not in obj:
                raise InputError(f"{where(path, n, field)}: missing")
        try:
            t = int(obj["unixReviewTime"])
        except (TypeError, ValueError):
            raise InputError(f"{where(path, n, 'unixReviewTime')}: not an integer") from None
        rating = obj.get("overall", 0.0)
        out.append((str(obj["reviewerID"]), str(obj["asin"]), t,
                    float(rating) if isinstance(rating, (int, float)) else 0.0, n))
    return out


def k_core(reviews: list, k: int = 5) -> list:
    """Iteratively drop users and items with fewer than k reviews."""
    while True:
        users = Counter(r[0] for r in reviews)
        items = Counter(r[1] for r in reviews)
        kept = [r for r in reviews if users[r[0]] >= k and items[r[1]] >= k]
        if len(kept) == len(reviews):
            return kept
        reviews = kept


def select_window(reviews: list, titles: dict, *, min_items: int = 5000, k: int = 5,
                  end=(2018, 11), start=(2017, 10), step_months: int = 3, progress=None):
    """(kept reviews, (start ts, end ts)) for the first window whose k-core has min_items items."""
    reviews = [r for r in reviews if r[1] in titles]
    if not reviews:
        raise InputError("no review refers to an item with a usable title")
    end_ts = _ts(*end)
    oldest = min(r[2] for r in reviews)
    back = 0
    while True:
        y, m = _months_back(start[0], start[1], back)
        start_ts = _ts(y, m)
        core = k_core([r for r in reviews if start_ts <= r[2] <= end_ts], k)
        n_items = len({r[1] for r in core})
        if progress:
            progress(f"window {y:04d}-{m:02d} .. {end[0]:04d}-{end[1]:02d}: {len(core):,} reviews, "
                     f"{n_items:,} items after {k}-core")
        if n_items >= min_items or start_ts <= oldest:
            if n_items < min_items and progress:
                progress(f"warning: only {n_items} items even with the widest window")
            return core, (start_ts, end_ts)
        back += step_months


def build_samples(core: list, titles: dict, *, max_history: int = 10, seed: int = 42):
    """(id -> title, asin -> id, samples sorted by target time)."""
    asins = sorted({r[1] for r in core})
    random.Random(seed).shuffle(asins)
    asin_id = {a: i for i, a in enumerate(asins)}
    by_user = defaultdict(list)
    for r in core:
        by_user[r[0]].append(r)
    samples = []
    for user in sorted(by_user):
        seq = sorted(by_user[user], key=lambda r: (r[2], r[4]))
        for i in range(1, len(seq)):
            hist = seq[max(0, i - max_history):i]
            samples.append((seq[i][2], user, hist, seq[i]))
    samples.sort(key=lambda s: s[0])
    return {asin_id[a]: titles[a] for a in asins}, asin_id, samples


def _row(sample, asin_id, titles) -> list:
    _, user, hist, tgt = sample
    return [user, str([h[1] for h in hist]), tgt[1], str([asin_id[h[1]] for h in hist]),
            asin_id[tgt[1]], str([titles[h[1]] for h in hist]), titles[tgt[1]],
            str([h[3] for h in hist]), tgt[3], str([h[2] for h in hist]), tgt[2]]


def prepare_amazon(reviews_path, meta_path, out_dir, *, category: str = "",
                   min_items: int = 5000, k: int = 5, max_history: int = 10, seed: int = 42,
                   verbose: bool = True) -> dict:
    """Run the whole preprocessing; returns a summary dict (also written to stdout)."""
    out = pathlib.Path(out_dir)

    def progress(msg):
        if verbose:
            print(f"[prepare-amazon] {msg}", file=sys.stderr, flush=True)

    progress(f"reading {meta_path}")
    titles = read_meta(meta_path, progress)
    progress(f"{len(titles):,} items with a usable title")
    progress(f"reading {reviews_path}")
    reviews = read_reviews(reviews_path, progress)
    progress(f"{len(reviews):,} reviews")
    core, (start_ts, end_ts) = select_window(reviews, titles, min_items=min_items, k=k,
                                             progress=progress)
    if not core:
        raise InputError(f"{reviews_path}: nothing survives the {k}-core filter")
    id_title, asin_id, samples = build_samples(core, titles, max_history=max_history, seed=seed)
    n = len(samples)
    cut1, cut2 = int(n * 0.8), int(n * 0.9)
    parts = {"train": samples[:cut1], "valid": samples[cut1:cut2], "test": samples[cut2:]}
    title_of = {a: titles[a] for a in asin_id}
    for split, rows in parts.items():
        progress(f"writing {split}.csv ({len(rows):,} rows)")
        atomic_write_text(out / f"{split}.csv",
                          csv_text((_row(s, asin_id, title_of) for s in rows), CSV_COLUMNS))
    atomic_write_text(out / "info.txt", "".join(f"{id_title[i]}\t{i}\n" for i in sorted(id_title)))
    if category:
        meta = {"name": category, "category_word": category_word(category)}
        atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1) + "\n")
    fmt = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m")
    summary = {"category": category or out.name, "items": len(id_title),
               "users": len({r[0] for r in core}), "reviews": len(core),
               "window": f"{fmt(start_ts)} .. {fmt(end_ts)}",
               **{split: len(rows) for split, rows in parts.items()}}
    progress("done: " + ", ".join(f"{k_} {v}" for k_, v in summary.items()))
    return summary
