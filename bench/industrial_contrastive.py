"""LR-GRPO with the contrastive reward on models trained from scratch on a real folder.

Starts from the SFT runs of bench/slot_study.py's bottleneck study (Industrial_and_Scientific,
3,500 train rows, the demo's decoder; `runs/bottleneck_study[_seed<s>]/{ratt,ratt_bn50}`,
made by `bench/slot_study.py --seeds 0,1 --arms n0,ratt,ratt_bn50 --workdir
runs/bottleneck_study`). Each arm runs LR-GRPO with the study's batches (36 batches of 8
prompts, group 8, sigma 1.5, the last step kept), is decoded on the first 400 valid rows
and paired with its SFT run user by user, per-user differences averaged over seeds. The
arm with the best mean valid NDCG@10 is decoded on test once per seed.

    python bench/industrial_contrastive.py --seeds 0,1    # about 15 minutes on 2 cores

Writes results/industrial_contrastive_scratch_cpu-2core.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import grpo_study as gs  # noqa: E402
from latentr3_jax import config as config_lib  # noqa: E402
from demo_contrastive import ndcg10, on_test, pooled  # noqa: E402
from latentr3_jax.train.grpo import train_grpo  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402

STARTS = ("ratt", "ratt_bn50")
ARMS = {  # name: grpo.* overrides
    "perplexity reinforce+rloo lr1e-3": dict(estimator="reinforce", advantage="rloo",
                                             learning_rate=1e-3),
    "contrastive3 reinforce+rloo lr1e-3": dict(estimator="reinforce", advantage="rloo",
                                               learning_rate=1e-3, reward="contrastive",
                                               negatives=3),
    "contrastive7 reinforce+rloo lr1e-3": dict(estimator="reinforce", advantage="rloo",
                                               learning_rate=1e-3, reward="contrastive",
                                               negatives=7),
}


def sft_dir(start: str, seed: int) -> str:
    root = os.path.join(ROOT, "runs", "bottleneck_study" + (f"_seed{seed}" if seed else ""))
    d = os.path.join(root, start)
    if not os.path.exists(os.path.join(d, "train_summary.json")):
        raise SystemExit(f"{d}: no SFT run; make it with bench/slot_study.py --seeds {seed} "
                         f"--arms n0,ratt,ratt_bn50 --workdir runs/bottleneck_study")
    return d


def run_config(run_dir: str):
    """The run's saved config over today's defaults (keys added since it ran take their
    defaults, which leave the old behaviour unchanged)."""
    cfg = config_lib.base_config()
    saved = ml_collections.ConfigDict(read_json(os.path.join(run_dir, "config.json")))
    with cfg.unlocked():
        cfg.update(saved)
    return cfg


def arm_cfg(sft: str, name: str, over: dict):
    cfg = run_config(sft)
    args = type("A", (), {"cutoff": int(cfg.data.cutoff),
                          "max_target_len": int(cfg.data.max_target_len)})
    c = gs.one_shape(cfg, args)
    c.workdir = os.path.join(ROOT, "runs", "industrial_contrastive",
                             f"{os.path.basename(os.path.dirname(sft))}_{os.path.basename(sft)}_"
                             + name.replace(" ", "_").replace("+", "_"))
    c.grpo.init_from = sft
    c.grpo.eval_every = 12
    c.grpo.select = "last"
    c.grpo.checkpoint_every = 36
    for k, v in over.items():
        c.grpo[k] = v
    return cfg, c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--starts", default=",".join(STARTS))
    ap.add_argument("--out", default=os.path.join(ROOT, "results",
                                                  "industrial_contrastive_scratch_cpu-2core.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.arms.split(",")
    res = {"command": f"python bench/industrial_contrastive.py --seeds {args.seeds} "
                      f"--arms '{args.arms}' --starts {args.starts}",
           "seeds": seeds, "sft": {}, "arms": {}}
    for start in args.starts.split(","):
        dirs = [os.path.join(sft_dir(start, s), "eval_valid_constrained") for s in seeds]
        res["sft"][start] = {"valid_NDCG@10": ndcg10(dirs)}
        for name in names:
            vdirs, curves = [], []
            for s in seeds:
                cfg, c = arm_cfg(sft_dir(start, s), name, ARMS[name])
                marker = os.path.join(c.workdir, "train_summary.json")
                if not os.path.exists(marker):
                    summary = train_grpo(copy.deepcopy(c), progress=False)
                    write_json(marker, {k: v for k, v in summary.items() if k != "curve"})
                gs.decode(cfg, c.workdir, "valid")
                vdirs.append(os.path.join(c.workdir, "eval_valid_constrained"))
                curves.append([(r["step"], r["reward"]) for r in gs.runs.read_metrics(c.workdir)
                               if r.get("split") == "valid"])
            nd = ndcg10(vdirs)
            key = f"{start}: {name}"
            res["arms"][key] = {"start": start, "grpo": ARMS[name], "valid_NDCG@10": nd,
                                "valid_NDCG@10_mean": float(np.mean(nd)),
                                "valid_reward_curves": curves, "valid_dirs": vdirs,
                                "valid_vs_sft": pooled(vdirs, dirs)}
            v = res["arms"][key]["valid_vs_sft"]["NDCG@10"]
            print(f"{key:50s} valid NDCG@10 {np.mean(nd):.4f}  vs SFT {v['diff']:+.4f} "
                  f"[{v['lo']:+.4f}, {v['hi']:+.4f}]", flush=True)
            write_json(args.out, res)
    best = max(res["arms"], key=lambda k: res["arms"][k]["valid_NDCG@10_mean"])
    a = res["arms"][best]
    t_arm, t_sft = [], []
    for s, vd in zip(seeds, a["valid_dirs"]):
        run_dir = os.path.dirname(vd)
        cfg, _ = arm_cfg(sft_dir(a["start"], s), best.split(": ", 1)[1], a["grpo"])
        gs.decode(cfg, run_dir, "test")
        t_arm.append(os.path.join(run_dir, "eval_test_constrained"))
        t_sft.append(os.path.join(sft_dir(a["start"], s), "eval_test_constrained"))
    res["chosen_on_valid"] = best
    res["test"] = on_test(best, t_arm, t_sft)
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
