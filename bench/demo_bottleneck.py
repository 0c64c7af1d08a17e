"""The slot bottleneck on the demo, where the user's history does move the title's likelihood.

On the embedded synthetic dataset another user's prompt costs far more reward than on the
real folders, so it tests whether `sft.slot_bottleneck` makes the thought slot carry the
user when there is a user to carry. Steps (each skipped when its output exists):

  1. `latentr3 run` of configs/demo.py as is (runs/demo) and with
     --config.sft.slot_bottleneck=0.5 (runs/demo_bn50), seed 0;
  2. the slot probes on the LatentR³ SFT run of each (own, another user's, zero and noisy
     latent; another user's whole prompt, for the N=0 run too; grpo_study.ValidReward and
     prompt_swap_reward), and the reward with the prompt hidden (ValidReward(blind=True));
  3. LR-GRPO from the bottleneck SFT run with three estimators at lr 1e-3 (valid reward
     every 20 batches, the last step kept), each decoded on valid and paired with the SFT
     run user by user. Test is not read.

    python bench/demo_bottleneck.py [--seed 0]   # about 15 minutes on a 2-core CPU from nothing

Seed 0 uses runs/demo and runs/demo_bn50; seed s, runs/demo_seed<s> and runs/demo_bn50_seed<s>.
Writes results/demo_bottleneck_seed<s>_cpu-2core.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ml_collections  # noqa: E402

import grpo_study as gs  # noqa: E402
from latentr3_jax.train import runs  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402

CLI = [sys.executable, "-m", "latentr3_jax"]
DEMO = os.path.join(ROOT, "configs", "demo.py")
VARIANTS = (("reinforce", "rloo"), ("pathwise", "batch"), ("ppo", "rloo"))
LR = 1e-3


def cli(command: str, *args: str) -> None:
    subprocess.run([*CLI, command, "--config", DEMO, *args], check=True)


def decode(run_dir: str, split: str = "valid") -> str:
    """Constrained decoding of a run on `split`, once; returns its output directory."""
    out = os.path.join(run_dir, f"eval_{split}_constrained")
    if not os.path.exists(os.path.join(out, "metrics.json")):
        cli("evaluate", f"--config.eval.checkpoint={run_dir}", f"--config.eval.split={split}",
            "--config.eval.progress=False")
    return out


def probes(run_root: str) -> dict:
    """The slot probes of both SFT runs of `run_root` on the whole valid split (what
    launch/device_study.probe_seed records), plus the reward with the prompt hidden."""
    sft = os.path.join(run_root, "sft_latentr3")
    cfg = ml_collections.ConfigDict(read_json(os.path.join(sft, "config.json")))
    cfg.eval.split = "valid"
    cfg = gs.one_shape(cfg, types.SimpleNamespace(cutoff=int(cfg.data.cutoff),
                                                  max_target_len=int(cfg.data.max_target_len)))
    run = runs.load_run(sft)
    r = gs.ValidReward(cfg, run, probes=True)(run.params)
    got = {k: v for k, v in r.items() if not k.startswith("per_row")}
    got["rows"] = len(r["per_row"])
    got.update(gs.prompt_swap_reward(cfg, run))
    got["n0"] = gs.prompt_swap_reward(cfg, runs.load_run(os.path.join(run_root, "sft_baseline")))
    blind = gs.ValidReward(cfg, run, blind=True)(run.params)
    got.update(reward_blind=blind["reward"], reward_blind_other_latent=blind["reward_other_latent"])
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tail = f"_seed{args.seed}" if args.seed else ""
    RUNS = {"release": os.path.join(ROOT, "runs", f"demo{tail}"),
            "bottleneck_0.5": os.path.join(ROOT, "runs", f"demo_bn50{tail}")}
    res = {"command": "python bench/demo_bottleneck.py --seed %d" % args.seed, "seed": args.seed,
           "runs": {}, "grpo": {}}
    for name, wd in RUNS.items():
        if not os.path.exists(os.path.join(wd, "results.json")):
            extra = ["--config.sft.slot_bottleneck=0.5"] if "bottleneck" in name else []
            cli("run", f"--config.workdir={wd}", f"--config.seed={args.seed}", *extra)
        res["runs"][name] = {"test_table": read_json(os.path.join(wd, "results.json")),
                             "probes": probes(wd)}
    sft = os.path.join(RUNS["bottleneck_0.5"], "sft_latentr3")
    base = decode(sft)
    rows = sum(1 for _ in open(os.path.join(base, "predictions.jsonl"), encoding="utf-8"))
    res["sft_valid"] = read_json(os.path.join(base, "metrics.json"))
    for est, adv in VARIANTS:
        wd = os.path.join(ROOT, "runs", f"demo_bn50_grpo_{est}_{adv}_{LR:g}{tail}")
        if not os.path.exists(os.path.join(wd, "train_summary.json")):
            cli("grpo", f"--config.grpo.init_from={sft}", f"--config.workdir={wd}",
                f"--config.seed={args.seed}",
                f"--config.grpo.estimator={est}", f"--config.grpo.advantage={adv}",
                f"--config.grpo.learning_rate={LR:g}", "--config.grpo.eval_every=20",
                "--config.grpo.select=last")
        dv = decode(wd)
        curve = [(r["step"], r["reward"]) for r in map(json.loads, open(
            os.path.join(wd, "metrics.jsonl"), encoding="utf-8")) if r.get("split") == "valid"]
        pred = os.path.join(dv, "predictions.jsonl")
        res["grpo"][f"{est} + {adv}, lr {LR:g}"] = {
            "valid_reward_curve": curve,
            "valid": read_json(os.path.join(dv, "metrics.json")),
            "valid_vs_sft": gs.paired(pred, os.path.join(base, "predictions.jsonl"), rows, 2000)}
    out = os.path.join(ROOT, "results", f"demo_bottleneck_seed{args.seed}_cpu-2core.json")
    write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
