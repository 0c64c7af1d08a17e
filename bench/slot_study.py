"""Is the thought slot read? SFT ablations of LatentR³ on a from-scratch model (CPU scale).

LR-GRPO can only improve the latent if the decoder reads it: if another user's latent in
the thought slot gives the same likelihood of the true title, the noise of stage 2 moves
no reward and there is nothing to learn. This study trains, from one shared N = 0 base
stage (`pipeline.base_epochs`, the same seed and the same batches for every arm), one SFT
run per arm:

  n0             N = 0: the BIGRec/D3 baseline, trained as long as the others
  ratt           N = 1, LatentRATT as the release builds it (N(0, 0.02), one learning rate)
  ratt_lr10      sft.latent_lr_scale = 10 (LatentRATT learns 10x faster than the LLM)
  ratt_identity  model.latent_init = identity (V = I: the latent starts as an attention
                 mean of the prompt's last hidden states)
  hidden         model.latent_mode = hidden (the last hidden state itself, no LatentRATT)
  ratt_n2        N = 2

and records for each, on the valid split only:

  * the best valid loss;
  * the slot probes (latent arms): the mean reward (negative perplexity of the true
    title, what LR-GRPO maximises) with the user's own latent, with another user's latent
    (the batch rotated by one), with a zero latent and with sigma = 1.5 noise added, and
    how far the users' latents are from their mean;
  * trie-constrained beam search (HR/NDCG) with the paired difference to n0 over users.

The N >= 1 arm with the best valid NDCG@10, the release's arm (ratt) and n0 are then
decoded on test once, and compared with n0 user by user (95% bootstrap interval,
sign-flip p-value). Nothing is chosen on test.

    nice -n 5 .venv/bin/python bench/slot_study.py            # resumable; reruns skip what finished
    nice -n 5 .venv/bin/python bench/slot_study.py --arms n0,ratt,ratt_lr10

Writes runs/slot_study/ (every run) and results/slot_study_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_study as gs  # noqa: E402  (the base config, the slot probes, decoding, pairing)

from latentr3_jax import pipeline  # noqa: E402
from latentr3_jax.train import runs  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402

# name, label, config overrides (dotted keys) on top of the LatentR³ SFT config
ARMS = (
    ("n0", "N = 0 (BIGRec/D3 baseline)", {"model.num_thoughts": 0}),
    ("ratt", "N = 1, LatentRATT (release)", {}),
    ("ratt_lr10", "N = 1, LatentRATT lr x10", {"sft.latent_lr_scale": 10.0}),
    ("ratt_identity", "N = 1, LatentRATT V = identity", {"model.latent_init": "identity"}),
    ("hidden", "N = 1, raw last hidden state", {"model.latent_mode": "hidden"}),
    ("ratt_n2", "N = 2, LatentRATT", {"model.num_thoughts": 2}),
)


def arm_config(cfg, base, workdir: str, name: str, over: dict):
    c = copy.deepcopy(cfg)
    for key, value in over.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    kind = "sft_baseline" if int(c.model.num_thoughts) == 0 else "sft_latentr3"
    v = pipeline._variant_config(c, kind, workdir, base)
    v.workdir = os.path.join(workdir, name)
    return v


def fmt(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] p={d['p']:.3f}"


def markdown(res: dict) -> str:
    out = [f"# {res['title']}", "", f"Command: `{res['command']}`", "",
           f"Valid: {res['valid_rows']} users; test: {res['test_rows']} users; "
           f"{res['items']} items; seed {res['args']['seed']}.", "",
           "## Valid split (every arm)", "",
           "| arm | best valid loss | reward own latent | other user's | zero latent | "
           "sigma 1.5 noise | latent norm | between users | NDCG@10 | HR@10 | "
           "NDCG@10 − N=0 [95%] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in res["arms"].items():
        p = a.get("probes") or {}
        cell = lambda k, f="{:.4f}": f.format(p[k]) if k in p else ""
        vs = a.get("valid_vs_n0", {}).get("NDCG@10")
        out.append(f"| {a['label']} | {a['best_valid_loss']:.4f} | {cell('reward')} | "
                   f"{cell('reward_other_latent')} | {cell('reward_zero_latent')} | "
                   f"{cell('reward_noisy_latent')} | {cell('latent_norm', '{:.2f}')} | "
                   f"{cell('latent_user_rel', '{:.2f}')} | {a['valid']['NDCG@10']:.4f} | "
                   f"{a['valid']['HR@10']:.4f} | {fmt(vs) if vs else ''} |")
    out += ["", "Reward: mean over valid users of −exp(mean NLL of the true title); "
            "'between users': RMS distance of the users' latents to their mean, over the "
            "mean latent norm.", "", "## Test split (read once)", "",
            "| arm | NDCG@10 | HR@10 | NDCG@10 − N=0 [95%] | HR@10 − N=0 [95%] |",
            "|---|---|---|---|---|"]
    for name in res.get("decoded_on_test", []):
        a = res["arms"][name]
        vs = a.get("test_vs_n0")
        out.append(f"| {a['label']} | {a['test']['NDCG@10']:.4f} | {a['test']['HR@10']:.4f} | "
                   f"{fmt(vs['NDCG@10']) if vs else ''} | {fmt(vs['HR@10']) if vs else ''} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=gs.DATASET)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "slot_study"))
    p.add_argument("--name", default="industrial_scratch_cpu-2core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-rows", type=int, default=3500)
    p.add_argument("--eval-rows", type=int, default=400)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--buckets", default="(128,192,256)")
    p.add_argument("--max-target-len", type=int, default=48)
    p.add_argument("--target-buckets", default="(32,48)")
    p.add_argument("--base-epochs", type=int, default=2)
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--arms", default=",".join(a[0] for a in ARMS))
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--until", choices=("train", "valid", "all"), default="all")
    args = p.parse_args(argv)
    # grpo_study.base_cfg also sets the LR-GRPO keys; none of them is used here
    args.prompts, args.batches, args.every, args.warmup = 8, 6, 6, 1
    t_start = time.perf_counter()

    cfg, overrides = gs.base_cfg(args)
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    dataset = pipeline._shared_inputs(cfg, workdir)   # the tokenizer, trained once
    base = pipeline._base_config(cfg, workdir)
    pipeline._timed_stage(pipeline.BASE, "sft", base)

    wanted = [a for a in ARMS if a[0] in args.arms.split(",")]
    if "n0" not in [a[0] for a in wanted]:
        raise SystemExit("--arms must include n0 (every arm is compared with it)")
    arms = {}
    for name, label, over in wanted:
        vcfg = arm_config(cfg, base, workdir, name, over)
        summary = pipeline._timed_stage(name, "sft", vcfg)
        arms[name] = {"label": label, "overrides": over, "workdir": vcfg.workdir,
                      "best_valid_loss": float(summary["best_valid_loss"]),
                      "train_time_s": summary.get("train_time_s"),
                      "steps": summary.get("optimizer_steps")}
    if args.until == "train":
        return

    rows = {s: len(dataset.splits[s]) for s in ("valid", "test")}
    if int(cfg.data.max_eval_rows) >= 0:
        rows = {s: min(n, int(cfg.data.max_eval_rows)) for s, n in rows.items()}
    gcfg = gs.one_shape(cfg, args)
    for name, a in arms.items():
        run = runs.load_run(a["workdir"])
        if run.num_thoughts:
            probe_path = os.path.join(a["workdir"], "slot_probes.json")
            if not os.path.exists(probe_path):
                r = gs.ValidReward(gcfg, run, probes=True)(run.params)
                write_json(probe_path, {k: v for k, v in r.items() if not k.startswith("per_row")})
            a["probes"] = read_json(probe_path)
        dv = gs.decode(cfg, a["workdir"], "valid")
        a["valid"], a["valid_predictions"] = dv["metrics"], dv["predictions"]
    for name, a in arms.items():
        if name != "n0":
            a["valid_vs_n0"] = gs.paired(a["valid_predictions"], arms["n0"]["valid_predictions"],
                                         rows["valid"], args.bootstrap)
        pr = a.get("probes", {})
        print(f"[{name}] valid loss {a['best_valid_loss']:.4f}  NDCG@10 {a['valid']['NDCG@10']:.4f}"
              + (f"  reward own {pr['reward']:.4f} other {pr['reward_other_latent']:.4f} "
                 f"zero {pr['reward_zero_latent']:.4f} noisy {pr['reward_noisy_latent']:.4f}"
                 if pr else ""), flush=True)

    res = {"title": f"Thought-slot ablations, {dataset.name} ({args.train_rows} train rows), "
                    f"demo decoder from scratch, seed {args.seed}",
           "dataset": dataset.name, "items": len(dataset.catalog),
           "command": "nice -n 5 .venv/bin/python bench/slot_study.py " + " ".join(argv or sys.argv[1:]),
           "config_overrides": overrides, "args": vars(args),
           "valid_rows": rows["valid"], "test_rows": rows["test"], "arms": arms,
           "base_summary": read_json(os.path.join(base.workdir, "train_summary.json"))}
    if args.until == "all":
        latent_arms = [n for n in arms if n != "n0"]
        best = max(latent_arms, key=lambda n: arms[n]["valid"]["NDCG@10"])
        chosen = ["n0"] + [n for n in ("ratt",) if n in arms] + ([best] if best != "ratt" else [])
        res["chosen_on_valid"] = best
        res["decoded_on_test"] = chosen
        for name in chosen:
            dt = gs.decode(cfg, arms[name]["workdir"], "test")
            arms[name]["test"], arms[name]["test_predictions"] = dt["metrics"], dt["predictions"]
        for name in chosen[1:]:
            arms[name]["test_vs_n0"] = gs.paired(arms[name]["test_predictions"],
                                                 arms["n0"]["test_predictions"], rows["test"],
                                                 args.bootstrap)
            t = arms[name]["test_vs_n0"]["NDCG@10"]
            print(f"[{name}] test NDCG@10 {arms[name]['test']['NDCG@10']:.4f} − N=0 {fmt(t)}",
                  flush=True)
    res["wall_s_this_call"] = time.perf_counter() - t_start
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    stem = os.path.join(ROOT, "results", f"slot_study_{args.name}")
    write_json(stem + ".json", res)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {stem}.json and .md ({res['wall_s_this_call']:.0f} s this call)")


if __name__ == "__main__":
    main()
