"""A second look at a slot study's test result, on test users the study never read.

bench/slot_study.py reads the test split once, on its first `--eval-rows` users. When that
reading shows something the valid split did not (a difference whose interval leaves zero
on test only), looking again at the same users cannot confirm it. This script decodes the
study's trained runs on the rest of the test split (rows `--skip` onwards, never decoded
by the study) and reports the same paired difference there, with the first rows beside it
as a check that the all-rows decoding reproduces the study's numbers. Nothing is trained:
the study's runs are reused as they are (its options rebuild the same configuration).

    nice -n 5 .venv/bin/python bench/fresh_users.py --seeds 0,1 --arms n0,ratt \
        --base-epochs 4 --workdir runs/base4_study --name base4_industrial_scratch_cpu-2core

Writes results/fresh_users_<name>.json.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slot_study as ss  # noqa: E402  (the study's configuration, runs and pairing)

from latentr3_jax import data as D, study  # noqa: E402
from latentr3_jax.utils.jsonio import write_json  # noqa: E402

ROOT = ss.ROOT


def decode_all(cfg, run_dir: str) -> str:
    """The run on every test row (resumable, beside the study's own test decoding);
    returns its predictions file."""
    c = copy.deepcopy(cfg)
    with c.unlocked():
        c.data.max_eval_rows = -1
    return ss.gs.decode(c, run_dir, "test",
                        out_name=f"eval_test_allrows_{c.eval.mode}")["predictions"]


def compare_parts(users: dict, skip: int, total: int, resamples: int) -> dict:
    """users: arm -> one per-user metrics dict per seed (`slot_study.user_metrics` over all
    `total` test rows). Per arm and per part (the study's rows [0, skip), the fresh rows
    [skip, total)): the mean over seeds and users, and for every arm but n0 the paired
    difference to n0 (per-user differences averaged over seeds, bootstrap over users); and
    the same over all `total` rows ("all_rows": the whole split, for studies with no
    choice made on test, where the whole split is the one reading)."""
    out = {}
    for a, per_seed in users.items():
        entry = {}
        for part, sl in (("study_rows", slice(0, skip)), ("fresh_rows", slice(skip, total)),
                         ("all_rows", slice(0, total))):
            entry[part] = {"mean": {m: float(np.mean([u[m][sl].mean() for u in per_seed]))
                                    for m in ("NDCG@10", "HR@10")}}
            if a != "n0":
                entry[part]["vs_n0"] = {
                    m: study.paired_difference(np.stack([u[m][sl] for u in per_seed]),
                                               np.stack([u[m][sl] for u in users["n0"]]),
                                               resamples=resamples)
                    for m in ("NDCG@10", "HR@10")}
        out[a] = entry
    return out


def main(argv=None) -> int:
    p = ss.build_parser()
    p.add_argument("--skip", type=int, default=None,
                   help="test rows the study read (default: its --eval-rows)")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if "n0" not in arms or len(arms) < 2:
        raise SystemExit("--arms must name n0 and at least one other arm")
    skip = args.eval_rows if args.skip is None else args.skip
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t0 = time.perf_counter()
    users = {a: [] for a in arms}
    total = None
    for seed in seeds:
        cfg, _, _, trained = ss.train_seed(args, seed)   # reuses the finished runs
        full = copy.deepcopy(cfg)
        with full.unlocked():
            full.data.max_eval_rows = -1
        total = len(D.load_dataset(full).splits["test"])
        if total <= skip:
            raise SystemExit(f"the test split has {total} rows, none after the {skip} the "
                             f"study read")
        for a in arms:
            pred = decode_all(cfg, trained[a]["workdir"])
            users[a].append(ss.user_metrics(pred, total))
    res = {"command": "nice -n 5 .venv/bin/python bench/fresh_users.py "
                      + " ".join(argv or sys.argv[1:]),
           "dataset": os.path.basename(os.path.normpath(args.dataset)), "seeds": seeds,
           "test_rows": total, "read_by_study": skip, "fresh_rows": total - skip,
           "arms": {}, "wall_s": None}
    res["arms"] = compare_parts(users, skip, total, args.bootstrap)
    for a, entry in res["arms"].items():
        for part in ("study_rows", "fresh_rows", "all_rows"):
            d = entry[part].get("vs_n0", {}).get("NDCG@10")
            print(f"{a:<8} {part:<11} NDCG@10 {entry[part]['mean']['NDCG@10']:.4f}"
                  + (f"  vs N=0 {ss.fmt(d)}" if d else ""), flush=True)
    res["wall_s"] = time.perf_counter() - t0
    out = os.path.join(ROOT, "results", f"fresh_users_{args.name}.json")
    write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
