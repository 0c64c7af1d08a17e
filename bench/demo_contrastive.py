"""LR-GRPO with the contrastive reward against the release's perplexity reward, on the demo.

The release's reward, minus the perplexity of the user's title, rewards a latent that makes
titles likelier in general as much as one that picks this user's title; ranking only
cares about the second. `grpo.reward=contrastive` scores each noisy latent by the
log-probability that the user's title beats `grpo.negatives` other users' titles of the
batch. This script trains LR-GRPO from the demo's SFT runs with both rewards and reads
the result on valid; the configuration with the best mean valid NDCG@10 over seeds is then
decoded on test once per seed and paired with its SFT run, user by user.

  starts: the release SFT run (runs/demo[_seed<s>]/sft_latentr3) and the slot-bottleneck one
          (runs/demo_bn50[_seed<s>]/sft_latentr3), made by `latentr3 run` when missing (as
          bench/demo_bottleneck.py makes them);
  arms:   reward x estimator x learning rate, `configs/demo.py`'s 60 batches of 16 prompts,
          group 8, sigma 1.5, the last step kept.

    python bench/demo_contrastive.py --seeds 0,1       # about 12 minutes a seed on 2 cores

Writes results/demo_contrastive_cpu-2core.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from demo_bottleneck import cli, decode  # noqa: E402
from latentr3_jax import study  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402

STARTS = {"release": "demo", "bottleneck": "demo_bn50"}
ARMS = [  # name, reward, negatives, estimator, advantage, learning rate
    (f"{rw}{'' if rw == 'perplexity' else f'{c}'} {est}+{adv} lr{lr:g}", rw, c, est, adv, lr)
    for rw, c in (("perplexity", 0), ("contrastive", 3), ("contrastive", 15))
    for est, adv in (("reinforce", "rloo"), ("pathwise", "batch"))
    for lr in (1e-3, 3e-3)]
RESAMPLES = 2000


def start_run(start: str, seed: int) -> str:
    """The SFT run an arm starts from, made by `latentr3 run` when missing."""
    wd = os.path.join(ROOT, "runs", STARTS[start] + (f"_seed{seed}" if seed else ""))
    if not os.path.exists(os.path.join(wd, "results.json")):
        extra = ["--config.sft.slot_bottleneck=0.5"] if start == "bottleneck" else []
        cli("run", f"--config.workdir={wd}", f"--config.seed={seed}", *extra)
    return os.path.join(wd, "sft_latentr3")


def arm_dir(start: str, arm: tuple, seed: int) -> str:
    _, rw, c, est, adv, lr = arm
    tag = rw if rw == "perplexity" else f"{rw}{c}"
    return os.path.join(ROOT, "runs", "demo_contrastive", f"{start}_{tag}_{est}_{adv}_{lr:g}_seed{seed}")


def train_arm(sft: str, wd: str, arm: tuple, seed: int) -> None:
    _, rw, c, est, adv, lr = arm
    if os.path.exists(os.path.join(wd, "train_summary.json")):
        return
    extra = [f"--config.grpo.negatives={c}"] if c else []
    cli("grpo", f"--config.grpo.init_from={sft}", f"--config.workdir={wd}",
        f"--config.seed={seed}", f"--config.grpo.reward={rw}", *extra,
        f"--config.grpo.estimator={est}", f"--config.grpo.advantage={adv}",
        f"--config.grpo.learning_rate={lr:g}", "--config.grpo.eval_every=20",
        "--config.grpo.select=last")


def per_user(eval_dir: str, start: int = 0) -> dict:
    """Per-user metrics of an evaluation's rows from `start` on (title rule)."""
    pred = os.path.join(eval_dir, "predictions.jsonl")
    rows = sum(1 for _ in open(pred, encoding="utf-8"))
    return study.per_user(study.prediction_ranks(pred, rows)["title"][start:])


def pooled(a_dirs, b_dirs, start: int = 0) -> dict:
    """Paired difference a - b per user (rows from `start` on), per-user differences
    averaged over seeds."""
    ua, ub = [per_user(d, start) for d in a_dirs], [per_user(d, start) for d in b_dirs]
    return {m: study.paired_difference(np.stack([u[m] for u in ua]),
                                       np.stack([u[m] for u in ub]), resamples=RESAMPLES)
            for m in ("NDCG@10", "HR@10")}


def ndcg10(eval_dirs) -> list:
    return [read_json(os.path.join(d, "metrics.json"))["NDCG@10"] for d in eval_dirs]


def on_test(name: str, arm_dirs, sft_dirs) -> dict:
    """Test NDCG@10 of an arm's runs and their SFT runs (one per seed), paired; printed."""
    out = {"test_NDCG@10": ndcg10(arm_dirs), "sft_test_NDCG@10": ndcg10(sft_dirs),
           "vs_sft": pooled(arm_dirs, sft_dirs)}
    v = out["vs_sft"]["NDCG@10"]
    print(f"test {name}: vs SFT {v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] p {v['p']:.3f}")
    return out


def choose_and_test(res: dict, families: dict, arms, arm_dir_of, seeds) -> None:
    """In each family (label -> predicate on an arm's record in res['arms']) the arm with
    the best mean valid NDCG@10, decoded on test once per seed and paired with its SFT
    runs; fills res['chosen_on_valid'] {label: arm} and res['test'] {arm: on_test}."""
    res["chosen_on_valid"], res["test"] = {}, {}
    for label, keep in families.items():
        names = [n for n, a in res["arms"].items() if keep(a)]
        if not names:
            continue
        best = max(names, key=lambda n: res["arms"][n]["valid_NDCG@10_mean"])
        res["chosen_on_valid"][label] = best
        start = res["arms"][best]["start"]
        arm = next(x for x in arms if x[0] == best.split(": ", 1)[1])
        runs = [arm_dir_of(start, arm, s) for s in seeds]
        sfts = [start_run(start, s) for s in seeds]
        res["test"][best] = on_test(best, [decode(r, "test") for r in runs],
                                    [decode(r, "test") for r in sfts])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "demo_contrastive_cpu-2core.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = {"command": f"python bench/demo_contrastive.py --seeds {args.seeds}", "seeds": seeds,
           "sft": {}, "arms": {}}
    sft_valid = {}
    for start in STARTS:
        sft_valid[start] = [decode(start_run(start, s)) for s in seeds]
        res["sft"][start] = {"valid_NDCG@10": ndcg10(sft_valid[start])}
    for start in STARTS:
        for arm in ARMS:
            name = f"{start}: {arm[0]}"
            dirs, curves = [], []
            for s in seeds:
                wd = arm_dir(start, arm, s)
                train_arm(start_run(start, s), wd, arm, s)
                dirs.append(decode(wd))
                curves.append([(r["step"], r["reward"]) for r in map(json.loads, open(
                    os.path.join(wd, "metrics.jsonl"), encoding="utf-8")) if r.get("split") == "valid"])
            nd = ndcg10(dirs)
            res["arms"][name] = {"start": start, "reward": arm[1], "negatives": arm[2],
                                 "estimator": arm[3], "advantage": arm[4], "lr": arm[5],
                                 "valid_NDCG@10": nd, "valid_NDCG@10_mean": float(np.mean(nd)),
                                 "valid_reward_curves": curves,
                                 "valid_vs_sft": pooled(dirs, sft_valid[start])}
            v = res["arms"][name]["valid_vs_sft"]["NDCG@10"]
            print(f"{name:55s} valid NDCG@10 {np.mean(nd):.4f}  vs SFT {v['diff']:+.4f} "
                  f"[{v['lo']:+.4f}, {v['hi']:+.4f}]", flush=True)
            write_json(args.out, res)
    # chosen on valid: the best arm per reward, then test once per seed
    choose_and_test(res, {rw: (lambda a, rw=rw: a["reward"] == rw)
                          for rw in ("perplexity", "contrastive")}, ARMS, arm_dir, seeds)
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
