"""The embedded default dataset: synthetic album purchases with a planted structure.

Everything is a deterministic function of (num_items, num_users, seed); the keyword
arguments of `generate` are fixed knobs whose defaults define the dataset.

Catalog. 8 genres (jazz, metal, folk, electronic, classical, hip hop, country, reggae).
Each genre owns 4 lead words, 10 nouns and 6 places, and a title is "Lead Noun" or
"Lead Place Noun" ("Smoky Nocturne", "Iron Volcano Anvil"), unique over the catalog. The
lead words are disjoint across genres, so the FIRST word of a title names its genre; the
byte-level BPE makes it one token (`"Smoky` as the first target token), so the genre is
decided at the first decoding step. Items are split evenly over genres and ids are
shuffled. Inside a genre, popularity follows a Zipf law (weight 1 / rank^1.2 at a random
rank per item), so a few albums per genre dominate.

Users. Each user has a taste of 2 genres with Dirichlet(1.5) weights and buys 4-9 albums,
one after another in time. For every purchase after the first:
  1. drift (p = 0.1): the weaker taste genre is replaced by a genre outside the taste and
     the weights are re-drawn, so old purchases can mislead;
  2. alternation (p = 0.9): the genre of the previous purchase is excluded, so the last
     item alone points AWAY from the answer;
  3. the genre is drawn from the remaining taste weights, and the album from that genre's
     popularity among the albums the user has not bought yet (no repeat purchases).
So the next album is, most of the time, a popular album of the user's OTHER taste genre:
visible in the history (the recent genre that is not the last item's), invisible to the
last item alone, and blurred for an order-free count of the history.

Time and split. Users start at random times over a 1000-day span and buy every 1-20 days;
every position i >= 1 of a user's sequence is a sample (history = previous <= 10), and
all samples are split 80/10/10 by target time, as in the Amazon preprocessing. The result
is written in D3 format (CDs-style columns) with a `dataset.json`.

Numbers (defaults: 320 items, 700 users, seed 0 -> 3096 / 387 / 388 rows), test split,
item-id rule, whole catalog ranked (history items kept, as the model's beam search does;
with them excluded in brackets), HR@5 / HR@10:
  most popular                0.126 / 0.216   (0.142 / 0.250)
  last-item transitions       0.129 / 0.206   (0.129 / 0.209)
  history co-occurrence       0.263 / 0.351   (0.278 / 0.363)
  the structure's own scorer        -           (0.379 / 0.479)   (test_data_synthetic.py)
  `latentr3 run --config configs/demo.py` (2-layer, 128-wide decoder, 10-beam trie search):
    SFT N=0 0.356 / 0.469, SFT + LatentR³ 0.343 / 0.461, + LR-GRPO 0.340 / 0.464
`latentr3 data baselines DIR` prints the baseline rows for any D3 folder.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from latentr3_jax.data.d3 import Catalog, Sample, write_d3
from latentr3_jax.utils.atomic import atomic_write_text

GENRES = {   # genre -> (lead words that open a title, nouns, places)
    "jazz": (
        ["Smoky", "Velvet", "Midnight", "Bebop"],
        ["Saxophone", "Lounge", "Groove", "Trumpet", "Quartet", "Serenade", "Nocturne", "Swing",
         "Blues", "Standards"],
        ["Harlem", "Bayou", "Speakeasy", "Basement", "Avenue", "Crescent"]),
    "metal": (
        ["Iron", "Molten", "Infernal", "Brutal"],
        ["Anvil", "Skull", "Hammer", "Inferno", "Warlord", "Blade", "Chains", "Furnace", "Serpent",
         "Riffs"],
        ["Abyss", "Volcano", "Forge", "Wasteland", "Catacombs", "Pit"]),
    "folk": (
        ["Misty", "Wandering", "Rustic", "Humble"],
        ["Fiddle", "Meadow", "Lantern", "Harvest", "Shepherd", "Banjo", "Hearth", "Orchard",
         "Wagon", "Hymns"],
        ["Valley", "Hills", "Village", "Riverbank", "Highlands", "Cottage"]),
    "electronic": (
        ["Neon", "Digital", "Synthetic", "Binary"],
        ["Circuit", "Pulse", "Synth", "Beacon", "Signal", "Voltage", "Drone", "Mainframe", "Rave",
         "Bassline"],
        ["Grid", "Cyberspace", "Warehouse", "Megacity", "Dancefloor", "Satellite"]),
    "classical": (
        ["Royal", "Baroque", "Majestic", "Solemn"],
        ["Symphony", "Sonata", "Concerto", "Overture", "Requiem", "Fugue", "Minuet", "Prelude",
         "Etude", "Cantata"],
        ["Cathedral", "Palace", "Conservatory", "Vienna", "Court", "Salzburg"]),
    "hiphop": (
        ["Street", "Concrete", "Hustling", "Lyrical"],
        ["Cypher", "Block", "Mixtape", "Flow", "Hustle", "Breakbeat", "Rhyme", "Turntable", "Crew",
         "Anthem"],
        ["Projects", "Boulevard", "Subway", "Uptown", "Rooftop", "Bronx"]),
    "country": (
        ["Whiskey", "Dusty", "Rodeo", "Southern"],
        ["Cowboy", "Pickup", "Saloon", "Horseshoe", "Tailgate", "Boots", "Ranch", "Guitar",
         "Highway", "Heartache"],
        ["Texas", "Nashville", "Prairie", "Plains", "Barn", "Oklahoma"]),
    "reggae": (
        ["Island", "Roots", "Tropical", "Dubwise"],
        ["Riddim", "Skank", "Dub", "Sunsplash", "Lion", "Drumbeat", "Palm", "Steelpan", "Yard",
         "Vibes"],
        ["Kingston", "Beach", "Lagoon", "Trenchtown", "Reef", "Harbour"]),
}

NAME = "synthetic"
CATEGORY_WORD = "albums"
FORMAT_VERSION = 3


def _genre_titles(rng: np.random.Generator, words, count: int, p_short: float,
                  num_leads: int) -> list:
    """`count` distinct titles of one genre: "Lead Noun" or "Lead Place Noun"."""
    leads, nouns, places = words
    leads = leads[:num_leads]
    short = [f"{a} {n}" for a in leads for n in nouns]
    long = [f"{a} {p} {n}" for a in leads for p in places for n in nouns]
    if count > len(short) + len(long):
        raise ValueError(f"synthetic: at most {len(short) + len(long)} titles per genre")
    n_short = int(np.clip(rng.binomial(count, p_short), count - len(long), len(short)))
    out = [short[i] for i in rng.choice(len(short), n_short, replace=False)]
    out += [long[i] for i in rng.choice(len(long), count - n_short, replace=False)]
    return out


def _next_genre(rng, taste, weights, last, p_alternate, left) -> int:
    """Draw the genre of the next purchase (see the module docstring, steps 2-3)."""
    w = np.array(weights) * np.array([left[g] > 0 for g in taste])
    if last in taste and rng.random() < p_alternate and w.sum() > w[taste.index(last)]:
        w[taste.index(last)] = 0.0
    if w.sum() == 0:              # the taste is bought out (tiny catalogs): any genre left
        options = [g for g in range(len(left)) if left[g] > 0]
        return int(rng.choice(options))
    return int(taste[rng.choice(len(taste), p=w / w.sum())])


def generate(num_items: int = 320, num_users: int = 700, seed: int = 0, *,
             min_len: int = 4, max_len: int = 9, max_history: int = 10,
             p_drift: float = 0.1, p_alternate: float = 0.9, zipf: float = 1.2,
             taste_sizes=(2,), concentration: float = 1.5, p_short: float = 0.6,
             num_leads: int = 4):
    """(Catalog, {'train','valid','test': [Sample]}, item genre array [num_items])."""
    rng = np.random.default_rng(seed)
    names = list(GENRES)
    G = len(names)
    if num_items < 2 * G:
        raise ValueError(f"synthetic.num_items={num_items}: need at least {2 * G}")
    per_genre = [num_items // G + (1 if g < num_items % G else 0) for g in range(G)]
    titles, genre_of = [], []
    for g, name in enumerate(names):
        ts = _genre_titles(rng, GENRES[name], per_genre[g], p_short, num_leads)
        titles += ts
        genre_of += [g] * len(ts)
    # Shuffle ids so the genre is not readable from the id.
    perm = rng.permutation(num_items)
    titles = [titles[i] for i in perm]
    genre_of = np.array([genre_of[i] for i in perm])
    members = [np.flatnonzero(genre_of == g) for g in range(G)]
    popularity = np.zeros(num_items)
    for g in range(G):
        w = 1.0 / np.arange(1, len(members[g]) + 1) ** zipf
        popularity[members[g]] = w[rng.permutation(len(w))]   # random popularity rank per item

    events = []       # (time, user, history ids, history times, target id)
    for u in range(num_users):
        k = int(rng.choice(taste_sizes))
        taste = [int(g) for g in rng.choice(G, size=k, replace=False)]
        weights = list(rng.dirichlet(np.full(k, concentration)))
        length = int(rng.integers(min_len, max_len + 1))
        t = float(rng.uniform(0, 1000))
        seq, times, last = [], [], -1
        left = [len(m) for m in members]          # albums of each genre not bought yet
        for _ in range(min(length, num_items)):
            if seq and rng.random() < p_drift:
                j = int(np.argmin(weights))
                taste[j] = int(rng.choice([g for g in range(G) if g not in taste]))
                weights = list(rng.dirichlet(np.full(len(taste), concentration)))
            g = _next_genre(rng, taste, weights, last, p_alternate, left)
            seen = set(seq)
            cand = np.array([i for i in members[g] if i not in seen])
            cw = popularity[cand]
            item = int(cand[rng.choice(len(cand), p=cw / cw.sum())])
            seq.append(item)
            times.append(int(t * 86400))
            left[g] -= 1
            last = g
            t += float(rng.uniform(1, 20))
        for i in range(1, len(seq)):
            lo = max(0, i - max_history)
            events.append((times[i], u, seq[lo:i], times[lo:i], seq[i]))
    events.sort(key=lambda e: (e[0], e[1]))
    n = len(events)
    cuts = {"train": (0, int(0.8 * n)), "valid": (int(0.8 * n), int(0.9 * n)),
            "test": (int(0.9 * n), n)}
    catalog = Catalog({i: titles[i] for i in range(num_items)})
    splits = {}
    for split, (a, b) in cuts.items():
        rows = []
        for j, (t, u, hist, h_ts, tgt) in enumerate(events[a:b]):
            rows.append(Sample(user_id=f"U{u:05d}", history_ids=tuple(hist),
                               history_titles=tuple(titles[i] for i in hist), target_id=tgt,
                               target_title=titles[tgt], line=j + 2, timestamp=t,
                               history_timestamps=tuple(h_ts)))
        splits[split] = rows
    return catalog, splits, genre_of


def write_synthetic(folder, num_items: int = 320, num_users: int = 700,
                    seed: int = 0) -> pathlib.Path:
    """Generate into `folder` unless it already holds this exact dataset; returns the folder."""
    folder = pathlib.Path(folder)
    params = {"name": NAME, "category_word": CATEGORY_WORD, "num_items": int(num_items),
              "num_users": int(num_users), "seed": int(seed), "version": FORMAT_VERSION}
    meta_path = folder / "dataset.json"
    if meta_path.exists() and all((folder / f).exists() for f in
                                  ("info.txt", "train.csv", "valid.csv", "test.csv")):
        try:
            if json.loads(meta_path.read_text()) == params:
                return folder
        except json.JSONDecodeError:
            pass
    catalog, splits, _ = generate(num_items, num_users, seed)
    write_d3(folder, catalog, splits)
    atomic_write_text(meta_path, json.dumps(params, indent=1) + "\n")
    return folder


def synthetic_dir(cfg) -> pathlib.Path:
    """Where `dataset=synthetic` lives: cfg.dataset_dir if set, else <workdir>/synthetic_data."""
    if cfg.dataset_dir:
        return pathlib.Path(cfg.dataset_dir)
    return pathlib.Path(cfg.workdir) / "synthetic_data"
