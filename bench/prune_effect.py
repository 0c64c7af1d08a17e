"""What vocabulary pruning (`latentr3 convert --prune-vocab`) does to a real model: the SFT
step time and the ranking metrics, full vocabulary against pruned, everything else equal.

    python bench/prune_effect.py                       # SmolLM2-135M on Industrial, CPU
    python bench/prune_effect.py --dataset cds --train-rows 1024 --eval-rows 300

For each arm it trains the LatentR³ SFT stage (N = 1) of `configs/smollm2.py:<dataset>,cpu`
on the first `--train-rows` train rows, then runs the constrained beam search on the first
`--eval-rows` valid rows (valid, not test: this compares two ways of running one model, and
test stays for final configurations). The arms share seed, data order and hyperparameters;
the pruned arm's vocabulary keeps the tokens of the dataset's prompts and titles. Reported:
the median SFT step time after compilation, validation loss, HR/NDCG@5/10, and the paired
difference (pruned - full) of NDCG@10 and HR@10 over users with a bootstrap interval.
Writes results/prune_effect_<dataset>_smollm2-135m_<where>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import common

from latentr3_jax import study as S  # noqa: E402
from latentr3_jax.config import default_config_file, parse_config  # noqa: E402
from latentr3_jax.data import vocab_prune  # noqa: E402
from latentr3_jax.eval.evaluate import PREDICTIONS, evaluate_run  # noqa: E402
from latentr3_jax.gguf_convert import resolve_model_path  # noqa: E402
from latentr3_jax.train import runs  # noqa: E402
from latentr3_jax.train.sft import train_sft  # noqa: E402
from latentr3_jax.utils.jsonio import read_json  # noqa: E402


def arm_config(dataset: str, workdir: str, hf_path: str, args):
    return parse_config([
        "--config", default_config_file("smollm2.py") + f":{dataset},cpu",
        f"--config.workdir={workdir}", f"--config.model.hf_path={hf_path}",
        "--config.model.num_thoughts=1", f"--config.data.max_train_rows={args.train_rows}",
        f"--config.data.max_eval_rows={args.eval_rows}", f"--config.seed={args.seed}",
        "--config.eval.split=valid", "--config.eval.progress=False"])[0]


def step_times(run_dir: str) -> list:
    """Seconds per step from the logged rates (log_every = 1: one rate per step); the
    first step pays the compile and is left out."""
    recs = [r for r in runs.read_metrics(run_dir)
            if r.get("split") == "train" and r.get("steps_per_s")]
    return [1.0 / float(r["steps_per_s"]) for r in recs[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="industrial", choices=("cds", "industrial", "office"))
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=os.path.join(common.ROOT, "runs", "prune_effect"))
    ap.add_argument("--where", default="cpu-2core")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()

    base = arm_config(args.dataset, "/tmp/unused", "", args)
    model = os.path.join(os.path.dirname(default_config_file("smollm2.py")), "..", "..",
                         "shared", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    model = os.path.normpath(model)
    if not os.path.exists(model) or not os.path.isdir(base.dataset_dir):
        sys.exit(f"needs {model} and {base.dataset_dir} (../shared)")
    full = resolve_model_path(model)
    pruned = os.path.join(args.workdir, f"smollm2_pruned_{args.dataset}")
    if not os.path.exists(os.path.join(pruned, vocab_prune.RECORD)):
        vocab_prune.prune_from_folders(full, pruned, [base.dataset_dir])
    prune_record = {k: v for k, v in
                    read_json(os.path.join(pruned, vocab_prune.RECORD)).items()
                    if k != "kept_ids"}

    arms = {}
    for name, path in (("full", full), ("pruned", pruned)):
        run_dir = os.path.join(args.workdir, f"{args.dataset}_{name}_seed{args.seed}")
        cfg = arm_config(args.dataset, run_dir, path, args)
        t = time.time()
        summary = train_sft(cfg, progress=True)
        train_s = time.time() - t
        t = time.time()
        metrics = evaluate_run(cfg, run_dir, split="valid", print_table=True,
                               out_dir=os.path.join(run_dir, "eval_valid"))
        eval_s = time.time() - t
        n = metrics["users"]
        ranks = S.prediction_ranks(os.path.join(run_dir, "eval_valid", PREDICTIONS), n)
        times = step_times(run_dir)
        arms[name] = {"hf_path": path, "train_s": train_s, "eval_s": eval_s,
                      "step_s_median": float(np.median(times)) if times else None,
                      "steps_timed": len(times), "best_valid_loss": summary.get("best_valid_loss"),
                      "metrics": {k: metrics[k] for k in ("HR@5", "HR@10", "NDCG@5", "NDCG@10")},
                      "users_per_s_after_compile": metrics.get("users_per_s_after_compile"),
                      "per_user": {m: S.per_user(ranks["title"])[m] for m in ("NDCG@10", "HR@10")}}
        print(f"{name}: step {arms[name]['step_s_median']} s, {arms[name]['metrics']}", flush=True)

    paired = {m: S.paired_difference(arms["pruned"]["per_user"][m][None],
                                     arms["full"]["per_user"][m][None], resamples=args.bootstrap)
              for m in ("NDCG@10", "HR@10")}
    for a in arms.values():
        a.pop("per_user")
    ratio = (arms["full"]["step_s_median"] / arms["pruned"]["step_s_median"]
             if arms["full"]["step_s_median"] and arms["pruned"]["step_s_median"] else None)
    result = {"benchmark": "prune_effect", "dataset": args.dataset, "model": "SmolLM2-135M-Instruct",
              "machine": common.machine(), "train_rows": args.train_rows,
              "eval_rows": args.eval_rows, "split": "valid", "seed": args.seed,
              "prune": prune_record, "arms": arms, "step_speedup": ratio,
              "paired_pruned_minus_full": paired}
    out = os.path.join(common.ROOT, "results",
                       f"prune_effect_{args.dataset}_smollm2-135m_{args.where}.json")
    common.write_result(out, result)


if __name__ == "__main__":
    main()
