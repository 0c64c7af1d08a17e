"""Pool several seeds of one dataset's study from their results folders' rank files.

    python bench/pool_seeds.py results/h200_cds_smollm2-135m_seed0 \
        results/h200_cds_smollm2-135m_seed1 [--out results/h200_cds_smollm2-135m_pooled.json]

Each folder holds test_ranks.json.gz (launch/collect_device_run.py writes it: the 0-based
rank of every test user's target per variant and matching rule, -1 = missed). Runs of one
seed whose checkpoints and predictions are gone (a lent accelerator's) can thus be pooled
with later ones. Prints and writes, per variant, HR/NDCG@5/10 per seed with the t-interval
over seeds, and for LatentR³ − N=0 and LR-GRPO − SFT the paired difference per user
averaged over seeds with its bootstrap interval and sign-flip p-value: the same
statistics as `latentr3 study` (latentr3_jax/study.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentr3_jax import study  # noqa: E402
from latentr3_jax.utils.jsonio import write_json  # noqa: E402


def read_ranks(folder: str, split: str = "test") -> dict:
    path = os.path.join(folder, f"{split}_ranks.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        ranks = json.load(f)["ranks"]
    return {name: {rule: np.asarray(r[rule]) for rule in study.RULES} for name, r in ranks.items()}


def pool(folders, *, resamples: int = 2000, split: str = "test") -> dict:
    """The pooled tables over the folders (one seed each, same users in the same order)."""
    per_seed = [read_ranks(f, split) for f in folders]
    names = [n for n in per_seed[0] if all(n in s for s in per_seed)]
    users = {len(s[n]["title"]) for s in per_seed for n in names}
    if len(users) != 1:
        raise SystemExit(f"the folders rank different numbers of users: {sorted(users)}")
    per_user = {n: [{rule: study.per_user(s[n][rule]) for rule in study.RULES} for s in per_seed]
                for n in names}
    table = {n: {f"{m}_{rule}": study.seed_interval([u[rule][m].mean() for u in per_user[n]])
                 for rule in study.RULES for m in study.METRICS} for n in names}
    pairs = []
    for a, b, label in study.PAIRS:
        if a in per_user and b in per_user:
            for rule in study.RULES:
                for m in study.METRICS:
                    pairs.append({"pair": label, "rule": rule, "metric": m, **study.paired_difference(
                        np.stack([u[rule][m] for u in per_user[a]]),
                        np.stack([u[rule][m] for u in per_user[b]]), resamples=resamples)})
    return {"folders": list(folders), "split": split, "seeds": len(folders),
            "users": users.pop(), "table": table, "pairs": pairs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", default="")
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args(argv)
    res = pool(args.folders, resamples=args.resamples)
    print(f"{res['seeds']} seed(s), {res['users']} users")
    for name, row in res["table"].items():
        iv = row["NDCG@10_title"]
        half = "" if iv["lo"] is None else f" ± {(iv['hi'] - iv['lo']) / 2:.4f}"
        print(f"  {name:14s} NDCG@10 (title) {iv['mean']:.4f}{half}")
    for p in res["pairs"]:
        if p["metric"] == "NDCG@10":
            print(f"  {p['pair']} ({p['rule']}): {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"
                  f" p {p['p']:.3g}")
    if args.out:
        write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
