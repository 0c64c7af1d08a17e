"""LR-GRPO with the contrastive reward against the SFT model's own top titles, on the demo.

`bench/demo_contrastive.py` scored each noisy latent against other users' titles of the
batch, and `bench/catalog_rank.py` showed why that does not move the ranking: those titles
are drawn by popularity, not by what competes with the user's title at the top of the
list. Here the negatives are the titles the SFT model itself ranks highest for the user
(`grpo.negative_source=model`: its constrained beam search at the noise-free latent,
mined once per SFT run and seed over train and valid). Same starts, batches and schedule as
`demo_contrastive.py`; in each family (negatives mined once, re-mined) the arm with the
best mean valid NDCG@10 over seeds is decoded on test once per seed and paired with its
SFT run, user by user.

  starts: the release SFT run (runs/demo[_seed<s>]/sft_latentr3) and the slot-bottleneck one
          (runs/demo_bn50[_seed<s>]/sft_latentr3), made by `latentr3 run` when missing;
  arms:   negatives (3, 7) x estimator (reinforce + rloo, pathwise) at lr 1e-3, and
          3 negatives with reinforce + rloo at 3e-3; 60 batches of 16 prompts, group 8,
          sigma 1.5, the last step kept. From the release start also three arms whose train
          negatives are mined again from the current latent every 10 batches
          (grpo.remine_every=10): 3 negatives, reinforce + rloo at 1e-3 and 3e-3, pathwise.

    python bench/demo_hard_negatives.py --seeds 0,1      # about 20 minutes a seed on 2 cores

Writes results/demo_hard_negatives_cpu-2core.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from demo_bottleneck import cli, decode  # noqa: E402
from demo_contrastive import STARTS, choose_and_test, ndcg10, pooled, start_run  # noqa: E402
from latentr3_jax.utils.jsonio import write_json  # noqa: E402

ARMS = [  # name, negatives, estimator, advantage, learning rate, re-mined every K batches
    (f"mined{c} {est}+{adv} lr{lr:g}" + (f" remine{k}" if k else ""), c, est, adv, lr, k)
    for c, est, adv, lr, k in (
        (3, "reinforce", "rloo", 1e-3, 0), (3, "reinforce", "rloo", 3e-3, 0),
        (3, "pathwise", "batch", 1e-3, 0), (7, "reinforce", "rloo", 1e-3, 0),
        (7, "pathwise", "batch", 1e-3, 0),
        (3, "reinforce", "rloo", 1e-3, 10), (3, "reinforce", "rloo", 3e-3, 10),
        (3, "pathwise", "batch", 1e-3, 10))]
REMINE_STARTS = ("release",)   # the re-mined arms (a beam search over train every 10 batches)
MINED = ("negatives_train", "negatives_valid")


def arm_dir(start: str, arm: tuple, seed: int) -> str:
    _, c, est, adv, lr, k = arm
    return os.path.join(ROOT, "runs", "demo_hard_negatives",
                        f"{start}_mined{c}_{est}_{adv}_{lr:g}{f'_re{k}' if k else ''}_seed{seed}")


def train_arm(sft: str, wd: str, arm: tuple, seed: int, mined_from: str = "") -> None:
    """One arm; the mined negatives of an earlier arm with the same start, seed and count
    are copied in first (the miner resumes from them: same model, same search)."""
    _, c, est, adv, lr, k = arm
    if os.path.exists(os.path.join(wd, "train_summary.json")):
        return
    if mined_from:
        for d in MINED:
            src, dst = os.path.join(mined_from, d), os.path.join(wd, d)
            if os.path.isdir(src) and not os.path.exists(dst):
                shutil.copytree(src, dst)
    cli("grpo", f"--config.grpo.init_from={sft}", f"--config.workdir={wd}",
        f"--config.seed={seed}", "--config.grpo.reward=contrastive",
        "--config.grpo.negative_source=model", f"--config.grpo.negatives={c}",
        f"--config.grpo.estimator={est}", f"--config.grpo.advantage={adv}",
        f"--config.grpo.learning_rate={lr:g}", f"--config.grpo.remine_every={k}",
        "--config.grpo.eval_every=20",
        "--config.grpo.select=last", "--config.eval.progress=False")


def displacement(arm_dir_: str, arm_eval: str, sft_eval: str, negatives: int) -> dict:
    """What the trained latent did to the valid top 10, user by user: the share of the
    mined negatives still in it, how many of its titles are new against the SFT run's, and
    the share of users whose own title is in it, before and after."""
    def rows(path):
        return {int(r["row"]): r for r in map(json.loads, open(path, encoding="utf-8"))}
    mined = rows(os.path.join(arm_dir_, MINED[1], "predictions.jsonl"))
    after = rows(os.path.join(arm_eval, "predictions.jsonl"))
    before = rows(os.path.join(sft_eval, "predictions.jsonl"))
    kept, new, hit0, hit1 = [], [], [], []
    for i, r in after.items():
        negs = [x for x in mined[i]["ranked_ids"] if x != r["target_id"]][:negatives]
        top = set(r["ranked_ids"][:10])
        kept.append(np.mean([x in top for x in negs]) if negs else np.nan)
        new.append(len(top - set(before[i]["ranked_ids"][:10])))
        hit0.append(0 <= before[i]["rank_title"] < 10)
        hit1.append(0 <= r["rank_title"] < 10)
    return {"negatives_kept_in_top10": float(np.nanmean(kept)),
            "new_titles_in_top10": float(np.mean(new)),
            "HR@10_sft": float(np.mean(hit0)), "HR@10_after": float(np.mean(hit1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=os.path.join(ROOT, "results",
                                                  "demo_hard_negatives_cpu-2core.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = {"command": f"python bench/demo_hard_negatives.py --seeds {args.seeds}",
           "seeds": seeds, "sft": {}, "arms": {}}
    sft_valid = {}
    for start in STARTS:
        sft_valid[start] = [decode(start_run(start, s)) for s in seeds]
        res["sft"][start] = {"valid_NDCG@10": ndcg10(sft_valid[start])}
    for start in STARTS:
        first = {}   # (seed, negatives) -> the arm whose mined negatives the others reuse
        for arm in ARMS:
            if arm[5] and start not in REMINE_STARTS:
                continue
            name = f"{start}: {arm[0]}"
            dirs, curves, train_curves = [], [], []
            for s in seeds:
                wd = arm_dir(start, arm, s)
                train_arm(start_run(start, s), wd, arm, s, first.get((s, arm[1]), ""))
                first.setdefault((s, arm[1]), wd)
                dirs.append(decode(wd))
                rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"),
                                                    encoding="utf-8")]
                curves.append([(r["step"], r["reward"]) for r in rows if r.get("split") == "valid"])
                train_curves.append([(r["step"], r["reward_eps0"], r["reward_noisy"])
                                     for r in rows if "reward_eps0" in r])
            nd = ndcg10(dirs)
            moved = [displacement(arm_dir(start, arm, s), d, sv, arm[1])
                     for s, d, sv in zip(seeds, dirs, sft_valid[start])]
            res["arms"][name] = {"start": start, "negatives": arm[1], "estimator": arm[2],
                                 "remine_every": arm[5],
                                 "valid_top10_per_seed": moved,
                                 "advantage": arm[3], "lr": arm[4],
                                 "valid_NDCG@10": nd, "valid_NDCG@10_mean": float(np.mean(nd)),
                                 "valid_reward_curves": curves,
                                 "train_reward_curves": train_curves,
                                 "valid_vs_sft": pooled(dirs, sft_valid[start])}
            v = res["arms"][name]["valid_vs_sft"]["NDCG@10"]
            r0 = [c[0][1] for c in curves if c]
            r1 = [c[-1][1] for c in curves if c]
            print(f"{name:45s} valid NDCG@10 {np.mean(nd):.4f}  vs SFT {v['diff']:+.4f} "
                  f"[{v['lo']:+.4f}, {v['hi']:+.4f}]  valid reward {np.mean(r0):.3f} -> "
                  f"{np.mean(r1):.3f}  negatives kept in top 10 "
                  f"{np.mean([m['negatives_kept_in_top10'] for m in moved]):.2f}", flush=True)
            write_json(args.out, res)
    # chosen on valid within each family (negatives mined once / re-mined), then test once
    choose_and_test(res, {"mined once": lambda a: not a["remine_every"],
                          "re-mined": lambda a: bool(a["remine_every"])}, ARMS, arm_dir, seeds)
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
