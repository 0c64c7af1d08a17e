"""LR-GRPO checkpoints chosen by valid NDCG@10 instead of the valid reward, on the demo.

Every LR-GRPO study so far found a reward that rises while the ranking gets worse, and
`grpo.select=best` on the reward then hands on either the SFT latent or a worse one. With
`grpo.select_metric=ndcg` each validation (start and every 10 batches) ranks valid users
with the evaluator's beam search and the run keeps the checkpoint with the highest
NDCG@10. Selecting on the same users that then report the gain would flatter it, so the
runs select on the first half of the valid split (`grpo.select_users`) and each arm is
judged on the other half, which no run looked at: paired over those users against the SFT
run. The arm best on that held-out half is decoded on test once per seed.

  start:  the release SFT run (runs/demo[_seed<s>]/sft_latentr3, made by `latentr3 run`
          when missing);
  arms:   the release objective (ppo + batch baseline) at the demo's lr 1e-4 and at 1e-3;
          perplexity reward with reinforce + rloo and with pathwise at 1e-3; the
          contrastive reward against 3 mined hard negatives, reinforce + rloo at 1e-3.
          60 batches of 16 prompts, group 8, sigma 1.5; validations every 10 batches.

    python bench/demo_select_ndcg.py --seeds 0,1     # about 15 minutes a seed on 2 cores

Writes results/demo_select_ndcg_cpu-2core.json.
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
from demo_contrastive import ndcg10, on_test, per_user, pooled, start_run  # noqa: E402
from latentr3_jax.utils.jsonio import write_json  # noqa: E402

SELECT_USERS = 194    # the first half of the demo's 387 valid users; the rest is held out
EVAL_EVERY = 10
DONE = "study_trained"
ARMS = [  # name, reward, estimator, advantage, learning rate
    ("release ppo+batch lr0.0001", "perplexity", "ppo", "batch", 1e-4),
    ("release ppo+batch lr0.001", "perplexity", "ppo", "batch", 1e-3),
    ("perplexity reinforce+rloo lr0.001", "perplexity", "reinforce", "rloo", 1e-3),
    ("perplexity pathwise+batch lr0.001", "perplexity", "pathwise", "batch", 1e-3),
    ("mined3 reinforce+rloo lr0.001", "contrastive", "reinforce", "rloo", 1e-3),
]


def arm_dir(arm: tuple, seed: int) -> str:
    _, rw, est, adv, lr = arm
    return os.path.join(ROOT, "runs", "demo_select_ndcg", f"{rw}_{est}_{adv}_{lr:g}_seed{seed}")


def train_arm(sft: str, wd: str, arm: tuple, seed: int) -> None:
    _, rw, est, adv, lr = arm
    if os.path.exists(os.path.join(wd, DONE)):
        return
    extra = ["--config.grpo.negative_source=model", "--config.grpo.negatives=3"] \
        if rw == "contrastive" else []
    cli("grpo", f"--config.grpo.init_from={sft}", f"--config.workdir={wd}",
        f"--config.seed={seed}", f"--config.grpo.reward={rw}", *extra,
        f"--config.grpo.estimator={est}", f"--config.grpo.advantage={adv}",
        f"--config.grpo.learning_rate={lr:g}", f"--config.grpo.eval_every={EVAL_EVERY}",
        "--config.grpo.select=best", "--config.grpo.select_metric=ndcg",
        f"--config.grpo.select_users={SELECT_USERS}", "--config.eval.progress=False")
    open(os.path.join(wd, DONE), "w").close()


def held_out(arm_dirs, sft_dirs) -> dict:
    """Paired difference arm - SFT over the valid users no run selected on (rows from
    SELECT_USERS on), per-user differences averaged over seeds."""
    out = pooled(arm_dirs, sft_dirs, start=SELECT_USERS)
    ua, ub = ([per_user(d, SELECT_USERS)["NDCG@10"] for d in dirs] for dirs in (arm_dirs, sft_dirs))
    out["arm_NDCG@10"] = float(np.mean([u.mean() for u in ua]))
    out["sft_NDCG@10"] = float(np.mean([u.mean() for u in ub]))
    out["users"] = int(len(ua[0]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "demo_select_ndcg_cpu-2core.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = {"command": f"python bench/demo_select_ndcg.py --seeds {args.seeds}", "seeds": seeds,
           "select_users": SELECT_USERS, "eval_every": EVAL_EVERY, "arms": {}}
    sfts = [start_run("release", s) for s in seeds]
    sft_valid = [decode(s) for s in sfts]
    res["sft_valid_NDCG@10"] = ndcg10(sft_valid)
    for arm in ARMS:
        dirs, curves, best = [], [], []
        for s, sft in zip(seeds, sfts):
            wd = arm_dir(arm, s)
            train_arm(sft, wd, arm, s)
            dirs.append(decode(wd))
            curves.append([(r["step"], r["ndcg10"], r["reward"]) for r in map(json.loads, open(
                os.path.join(wd, "metrics.jsonl"), encoding="utf-8")) if r.get("split") == "valid"])
            best.append(max(curves[-1], key=lambda x: x[1])[0])   # the first of the highest
        ho = held_out(dirs, sft_valid)
        # what grpo.select_metric=reward would have kept: the first checkpoint with the
        # highest valid reward, and its NDCG@10 on the selection half against the start's
        by_reward = [max(c, key=lambda x: x[2]) for c in curves]
        res["arms"][arm[0]] = {"reward": arm[1], "estimator": arm[2], "advantage": arm[3],
                               "lr": arm[4], "best_step": best,
                               "reward_select_step": [b[0] for b in by_reward],
                               "reward_select_minus_start_selection_half": float(np.mean(
                                   [b[1] - c[0][1] for b, c in zip(by_reward, curves)])),
                               "ndcg_select_minus_start_selection_half": float(np.mean(
                                   [max(x[1] for x in c) - c[0][1] for c in curves])),
                               "valid_curves_step_ndcg10_reward": curves,
                               "valid_NDCG@10": ndcg10(dirs), "held_out_valid": ho}
        v = ho["NDCG@10"]
        sel = res["arms"][arm[0]]["ndcg_select_minus_start_selection_half"]
        rsel = res["arms"][arm[0]]["reward_select_minus_start_selection_half"]
        print(f"{arm[0]:38s} best step {best}  selection-half gain {sel:+.4f} (by reward "
              f"{rsel:+.4f})  "
              f"held-out half vs SFT {v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] "
              f"p {v['p']:.3f}", flush=True)
        write_json(args.out, res)
    # chosen on the held-out half of valid, then test once per seed
    name = max(res["arms"], key=lambda n: res["arms"][n]["held_out_valid"]["NDCG@10"]["diff"])
    arm = next(a for a in ARMS if a[0] == name)
    res["chosen_on_valid"] = name
    res["test"] = {name: on_test(name, [decode(arm_dir(arm, s), "test") for s in seeds],
                                 [decode(s, "test") for s in sfts])}
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
