"""Test-time latent ensembles (eval.latent_samples = M) on the slot study's LatentR³ models.

For each seed's `ratt` run of bench/slot_study.py (or --arm), constrained beam search on
the valid split with M latents per user (the model's own and M - 1 with sigma noise),
for every M in --samples and sigma in --sigmas, each compared user by user with M = 1
(per-user differences averaged over seeds, 95% bootstrap over users, sign-flip p); the
cost per user is the decode's steady-state time. The setting with the best mean valid
NDCG@10 is then decoded on test once per seed, with M = 1 beside it.

    nice -n 5 .venv/bin/python bench/ensemble_study.py --seeds 0,1

With --model smollm2, pass the slot study's own data options (--train-rows, --eval-rows,
--max-target-len, --target-buckets, --dtype) so that the runs decode as they were trained
and M = 1 is the slot study's decode.

Writes eval folders inside the runs and results/ensemble_study_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_study as gs  # noqa: E402
import slot_study as ss  # noqa: E402

from latentr3_jax import data as D  # noqa: E402
from latentr3_jax.eval.evaluate import evaluate_run  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402


def decode(cfg, run_dir: str, split: str, M: int, sigma: float) -> dict:
    """Constrained beam search of a run with an M-latent ensemble (resumable)."""
    # M = 1 is the slot study's own decode (same config), reused when it is there
    out_dir = os.path.join(run_dir, f"eval_{split}_constrained" if M == 1
                           else f"eval_{split}_ensemble_m{M}_s{sigma:g}")
    metrics = os.path.join(out_dir, "metrics.json")
    c = copy.deepcopy(cfg)
    c.eval.data_from_run = False
    c.eval.latent_samples, c.eval.latent_sigma = int(M), float(sigma)
    if os.path.exists(metrics):
        m = read_json(metrics)
    else:
        print(f"  decoding {os.path.basename(run_dir)} on {split}, M={M} sigma={sigma:g} ...",
              flush=True)
        m = evaluate_run(c, run_dir, split=split, out_dir=out_dir, print_table=False)
    ups = m.get("users_per_s_after_compile") or m.get("users_per_s")
    return {"NDCG@10": m["NDCG@10"], "HR@10": m["HR@10"], "users": m["users"],
            "ms_per_user": 1000.0 / ups if ups else None,
            "predictions": os.path.join(out_dir, "predictions.jsonl")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=gs.DATASET)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "slot_study"))
    p.add_argument("--name", default="industrial_scratch_cpu-2core")
    p.add_argument("--seeds", default="0")
    p.add_argument("--arm", default="ratt")
    p.add_argument("--samples", default="4,8")
    p.add_argument("--sigmas", default="0.5,1.5")
    gs.add_setup_args(p)   # the slot study's data options (its training ones are unused)
    gs.add_model_args(p)
    p.add_argument("--bootstrap", type=int, default=2000)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    gs.check_model(args)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t0 = time.perf_counter()
    settings = [(1, 0.0)] + [(int(m), float(s)) for m in args.samples.split(",")
                             for s in args.sigmas.split(",")]
    cfgs, dirs = [], []
    for seed in seeds:
        run_dir = os.path.join(ss.seed_workdir(os.path.abspath(args.workdir), seed), args.arm)
        if not os.path.exists(os.path.join(run_dir, "train_summary.json")):
            raise SystemExit(f"{run_dir}: not trained; run bench/slot_study.py --seeds {seed} first")
        # the slot study's own config for this seed (decoding reads the model and the
        # tokenizer from the run)
        c, _ = ss.seed_config(args, seed)
        cfgs.append(c)
        dirs.append(run_dir)
    rows = {s: min(len(D.load_dataset(cfgs[0]).splits[s]), int(args.eval_rows))
            for s in ("valid", "test")}
    table = {}
    users = {}
    for M, sigma in settings:
        key = "M=1" if M == 1 else f"M={M} sigma={sigma:g}"
        per = [decode(c, d, "valid", M, sigma) for c, d in zip(cfgs, dirs)]
        users[key] = [ss.user_metrics(r["predictions"], rows["valid"]) for r in per]
        table[key] = {"M": M, "sigma": sigma,
                      "valid_NDCG@10": sum(r["NDCG@10"] for r in per) / len(per),
                      "valid_HR@10": sum(r["HR@10"] for r in per) / len(per),
                      "ms_per_user": [r["ms_per_user"] for r in per]}
        if M > 1:
            table[key]["valid_vs_m1"] = ss.pooled(users[key], users["M=1"], args.bootstrap)
        print(f"[{key}] valid NDCG@10 {table[key]['valid_NDCG@10']:.4f}"
              + (f"  vs M=1 {ss.fmt(table[key]['valid_vs_m1']['NDCG@10'])}" if M > 1 else ""),
              flush=True)
    best = max((k for k in table if k != "M=1"), key=lambda k: table[k]["valid_NDCG@10"])
    test = {}
    for key in ("M=1", best):
        M, sigma = table[key]["M"], table[key]["sigma"]
        per = [decode(c, d, "test", M, sigma) for c, d in zip(cfgs, dirs)]
        test[key] = [ss.user_metrics(r["predictions"], rows["test"]) for r in per]
        table[key]["test_NDCG@10"] = sum(r["NDCG@10"] for r in per) / len(per)
        table[key]["test_ms_per_user"] = [r["ms_per_user"] for r in per]
    table[best]["test_vs_m1"] = ss.pooled(test[best], test["M=1"], args.bootstrap)
    print(f"[{best}] test NDCG@10 {table[best]['test_NDCG@10']:.4f} vs M=1 "
          f"{ss.fmt(table[best]['test_vs_m1']['NDCG@10'])}", flush=True)
    res = {"command": "nice -n 5 .venv/bin/python bench/ensemble_study.py " + " ".join(argv or sys.argv[1:]),
           "args": vars(args), "seeds": seeds, "runs": dirs, "valid_rows": rows["valid"],
           "test_rows": rows["test"], "chosen_on_valid": best, "table": table,
           "wall_s": time.perf_counter() - t0}
    stem = os.path.join(ROOT, "results", f"ensemble_study_{args.name}")
    write_json(stem + ".json", res)
    lines = [f"# Test-time latent ensembles, {args.arm} runs of the slot study, seeds {seeds}", "",
             f"Command: `{res['command']}`", "",
             "| setting | valid NDCG@10 | − M=1 [95%] | test NDCG@10 | − M=1 [95%] | ms/user |",
             "|---|---|---|---|---|---|"]
    for key, r in table.items():
        vs, ts = r.get("valid_vs_m1", {}).get("NDCG@10"), r.get("test_vs_m1", {}).get("NDCG@10")
        ms = [x for x in r["ms_per_user"] if x]
        test = f"{r['test_NDCG@10']:.4f}" if "test_NDCG@10" in r else ""
        cost = f"{sum(ms) / len(ms):.1f}" if ms else ""
        lines.append(f"| {key} | {r['valid_NDCG@10']:.4f} | {ss.fmt(vs) if vs else ''} | {test} | "
                     f"{ss.fmt(ts) if ts else ''} | {cost} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
