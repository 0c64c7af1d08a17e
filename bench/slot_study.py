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
  ratt_n4        N = 4 (not in the default arms)
  ratt_k2..k4    K = 2, 3, 4 latent factors (model.latent_factors; not in the default arms)
  ratt_bn25..75  sft.slot_bottleneck = 0.25, 0.5, 0.75: that share of each batch's rows
                 predicts the title from the latent alone, the prompt hidden from the slot
                 and the target (not in the default arms)

and records for each, on the valid split only:

  * the best valid loss;
  * the slot probes (latent arms): the mean reward (negative perplexity of the true
    title, what LR-GRPO maximises) with the user's own latent, with another user's latent
    (the batch rotated by one), with a zero latent and with sigma = 1.5 noise added, and
    how far the users' latents are from their mean;
  * trie-constrained beam search (HR/NDCG) with the paired difference to n0 over users.

With several seeds (each its own base stage, initialisation and batch order) every
number is averaged over seeds and the paired differences average each user's difference
over seeds before the bootstrap over users. The N >= 1 arm with the best mean valid
NDCG@10 (a tie goes to the arm listed first in --arms), the release's arm (ratt) and n0
are then decoded on test once per seed, and compared with n0 user by user (95% bootstrap
interval, sign-flip p-value). Nothing is chosen on test.

    nice -n 5 .venv/bin/python bench/slot_study.py --seeds 0,1,2   # resumable; reruns skip what finished
    nice -n 5 .venv/bin/python bench/slot_study.py --arms n0,ratt,ratt_lr10

With `--model smollm2` the arms start from the pretrained SmolLM2-135M of
configs/smollm2.py (its `cpu` variant; no base stage) instead:

    nice -n 5 .venv/bin/python bench/slot_study.py --model smollm2 \
        --arms n0,ratt,hidden,ratt_n2,ratt_n4,ratt_lr10,ratt_identity --train-rows 640 \
        --sft-epochs 1 --eval-rows 200 --max-target-len 32 --target-buckets "(16,32)" \
        --workdir runs/smollm2_ablation --name ablation_industrial_smollm2-135m_cpu-2core \
        --dtype bfloat16

Writes runs/slot_study/ (seed 0; seed s: runs/slot_study_seed<s>/) and
results/slot_study_<name>.json and .md.
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

from latentr3_jax import pipeline, study  # noqa: E402
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
    ("ratt_n4", "N = 4, LatentRATT", {"model.num_thoughts": 4}),
    # factorised latents: K LatentRATT heads, K slots (sft.latent_diversity at its default)
    ("ratt_k2", "K = 2 latent factors", {"model.latent_factors": 2}),
    ("ratt_k3", "K = 3 latent factors", {"model.latent_factors": 3}),
    ("ratt_k4", "K = 4 latent factors", {"model.latent_factors": 4}),
    # sft.slot_bottleneck: a share of rows predicts the title from the latent alone
    ("ratt_bn25", "N = 1, slot bottleneck 0.25", {"sft.slot_bottleneck": 0.25}),
    ("ratt_bn50", "N = 1, slot bottleneck 0.5", {"sft.slot_bottleneck": 0.5}),
    ("ratt_bn75", "N = 1, slot bottleneck 0.75", {"sft.slot_bottleneck": 0.75}),
)
DEFAULT_ARMS = ("n0", "ratt", "ratt_lr10", "ratt_identity", "hidden", "ratt_n2")


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


def seed_workdir(root: str, seed: int) -> str:
    """Seed 0 trains in `root`, seed s in `root`_seed<s> (each with its own base stage)."""
    return root if seed == 0 else f"{root}_seed{seed}"


def user_metrics(pred_path: str, rows: int) -> dict:
    """Per-user NDCG@10 and HR@10 (title rule) from a predictions file."""
    u = study.per_user(study.prediction_ranks(pred_path, rows)["title"])
    return {m: u[m] for m in ("NDCG@10", "HR@10")}


def pooled(a: list, b: list, resamples: int) -> dict:
    """Paired difference a − b per user, averaged over seeds, for NDCG@10 and HR@10; a, b:
    one user_metrics dict per seed (the same users in every seed)."""
    return {m: study.paired_difference(np.stack([x[m] for x in a]), np.stack([x[m] for x in b]),
                                       resamples=resamples)
            for m in ("NDCG@10", "HR@10")}


smollm2_cfg = gs.smollm2_cfg   # configs/smollm2.py:<dataset>,cpu with this study's subsample


def seed_config(args, seed: int):
    """(cfg, overrides) of one seed's runs: SmolLM2's cpu config or the from-scratch one,
    in WORKDIR (seed 0) or WORKDIR_seed<s>; ensemble_study decodes the runs with it."""
    a = argparse.Namespace(**vars(args))
    a.seed, a.workdir = seed, seed_workdir(os.path.abspath(args.workdir), seed)
    return smollm2_cfg(a) if args.model == "smollm2" else gs.base_cfg(a)


def train_seed(args, seed: int):
    """Base stage and every arm's SFT for one seed (resumable); returns (cfg, overrides,
    dataset, arms)."""
    cfg, overrides = seed_config(args, seed)
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    dataset = pipeline._shared_inputs(cfg, workdir)   # the tokenizer, trained once per seed
    base = pipeline._base_config(cfg, workdir)
    if base is not None:
        pipeline._timed_stage(pipeline.BASE, "sft", base)
    arms = {}
    by_name = {a[0]: a for a in ARMS}
    for name in args.arms.split(","):          # in the order given
        if name not in by_name:
            raise SystemExit(f"--arms: unknown arm {name!r}; known: {', '.join(by_name)}")
        _, label, over = by_name[name]
        vcfg = arm_config(cfg, base, workdir, name, over)
        summary = pipeline._timed_stage(f"{name} seed {seed}", "sft", vcfg)
        arms[name] = {"label": label, "overrides": over, "workdir": vcfg.workdir,
                      "best_valid_loss": float(summary["best_valid_loss"]),
                      "train_time_s": summary.get("train_time_s"),
                      "steps": summary.get("optimizer_steps")}
    return cfg, overrides, dataset, arms


def probe_and_decode(cfg, args, arms: dict) -> None:
    """Slot probes (latent arms) and constrained beam search on valid, for one seed."""
    gcfg = gs.one_shape(cfg, args)
    for name, a in arms.items():
        run = runs.load_run(a["workdir"])
        if run.num_thoughts:
            probe_path = os.path.join(a["workdir"], "slot_probes.json")
            if not os.path.exists(probe_path):
                r = gs.ValidReward(gcfg, run, probes=True)(run.params)
                write_json(probe_path, {k: v for k, v in r.items() if not k.startswith("per_row")})
            a["probes"] = read_json(probe_path)
            blind_path = os.path.join(a["workdir"], "slot_probes_blind.json")
            if not os.path.exists(blind_path):   # the latent alone, the prompt hidden
                r = gs.ValidReward(gcfg, run, blind=True)(run.params)
                write_json(blind_path, {"reward_blind": r["reward"],
                                        "reward_blind_other_latent": r["reward_other_latent"]})
            a["probes"].update(read_json(blind_path))
        swap_path = os.path.join(a["workdir"], "prompt_swap.json")
        if not os.path.exists(swap_path):   # another user's whole prompt, every arm
            write_json(swap_path, gs.prompt_swap_reward(gcfg, run))
        a.setdefault("probes", {}).update(read_json(swap_path))
        dv = gs.decode(cfg, a["workdir"], "valid")
        a["valid"], a["valid_predictions"] = dv["metrics"], dv["predictions"]


def mean_over(per_seed: list, path: tuple):
    vals = []
    for arms in per_seed:
        x = arms
        for k in path:
            x = x.get(k) if isinstance(x, dict) else None
            if x is None:
                break
        if isinstance(x, (int, float)):
            vals.append(float(x))
    return float(np.mean(vals)) if len(vals) == len(per_seed) else None


def choose_on_valid(summary: dict, latent_arms: list) -> tuple:
    """The latent arm with the best mean valid NDCG@10 (a tie goes to the arm listed first)
    and the other arms tied with it."""
    best = max(latent_arms, key=lambda n: summary[n]["valid_NDCG@10"])   # first of the maxima
    top = summary[best]["valid_NDCG@10"]
    return best, [n for n in latent_arms if n != best and summary[n]["valid_NDCG@10"] == top]


def markdown(res: dict) -> str:
    seeds = res["seeds"]
    tied = res.get("tied_on_valid")
    test_header = ("## Test split: not decoded (--until valid)" if not res.get("decoded_on_test")
                   else f"## Test split (read once; chosen on valid: {res.get('chosen_on_valid')}"
                   + (f", tied on valid NDCG@10 with {', '.join(tied)}; a tie goes to the arm "
                      "listed first in --arms" if tied else "") + ")")
    out = [f"# {res['title']}", "", f"Command: `{res['command']}`", "",
           f"Valid: {res['valid_rows']} users; test: {res['test_rows']} users; "
           f"{res['items']} items; seeds {seeds}. Every number is the mean over seeds; the "
           "intervals are paired over users (per-user differences averaged over seeds, "
           "95% bootstrap, sign-flip p).", "",
           "## Valid split (every arm)", "",
           "| arm | best valid loss | reward own latent | other user's | zero latent | "
           "sigma 1.5 noise | own / other user's prompt | "
           "prompt hidden: own / other's latent | latent norm | "
           "between users | NDCG@10 | HR@10 | "
           "NDCG@10 − N=0 [95%] | NDCG@10 − N=1 [95%] | factor cos² | train s | "
           "decode ms/user |", "|" + "---|" * 17]
    for name, s in res["summary"].items():
        cell = lambda k, f="{:.4f}": f.format(s[k]) if s.get(k) is not None else ""
        vs = s.get("valid_vs_n0", {}).get("NDCG@10")
        vr = s.get("valid_vs_ratt", {}).get("NDCG@10")
        out.append(f"| {s['label']} | {cell('best_valid_loss')} | {cell('reward')} | "
                   f"{cell('reward_other_latent')} | {cell('reward_zero_latent')} | "
                   f"{cell('reward_noisy_latent')} | "
                   f"{cell('reward_own_prompt', '{:.2f}')}"
                   f"{' / ' if s.get('reward_own_prompt') else ''}"
                   f"{cell('reward_other_prompt', '{:.2f}')} | "
                   f"{cell('reward_blind', '{:.2f}')}{' / ' if s.get('reward_blind') else ''}"
                   f"{cell('reward_blind_other_latent', '{:.2f}')} | "
                   f"{cell('latent_norm', '{:.2f}')} | "
                   f"{cell('latent_user_rel', '{:.2f}')} | {cell('valid_NDCG@10')} | "
                   f"{cell('valid_HR@10')} | {fmt(vs) if vs else ''} | "
                   f"{fmt(vr) if vr else ''} | {cell('factor_cos2', '{:.1e}')} | "
                   f"{cell('train_time_s', '{:.0f}')} | {cell('decode_ms_per_user', '{:.0f}')} |")
    out += ["", "Reward: mean over valid users of −exp(mean NLL of the true title), the "
            "quantity LR-GRPO maximises; 'other user's': each user's latent replaced by "
            "another user's of the same batch; 'other user's prompt': the whole prompt "
            "(history, and the latent computed from it) of another user of the batch, the "
            "true title kept; 'prompt hidden': the same with the prompt "
            "hidden from the slot and the title (sft.slot_bottleneck's blind rows), so the "
            "latent is all the decoder sees of the user; 'between users': RMS distance of the users' "
            "latents to their mean, over the mean latent norm; 'factor cos²': the mean "
            "squared cosine between a user's K factors (0: orthogonal); 'train s': the arm's "
            "SFT wall time; 'decode ms/user': valid beam search after compiling (CPU timings "
            "with whatever else ran on the machine).", "",
            test_header, "",
            "| arm | NDCG@10 | HR@10 | NDCG@10 − N=0 [95%] | HR@10 − N=0 [95%] | "
            "NDCG@10 − N=1 [95%] |", "|---|---|---|---|---|---|"]
    if not res.get("decoded_on_test"):
        return "\n".join(out[:-3]) + "\n"
    for name in res.get("decoded_on_test", []):
        s = res["summary"][name]
        vs, vr = s.get("test_vs_n0"), s.get("test_vs_ratt")
        out.append(f"| {s['label']} | {s['test_NDCG@10']:.4f} | {s['test_HR@10']:.4f} | "
                   f"{fmt(vs['NDCG@10']) if vs else ''} | {fmt(vs['HR@10']) if vs else ''} | "
                   f"{fmt(vr['NDCG@10']) if vr else ''} |")
    return "\n".join(out) + "\n"


PROBE_KEYS = ("reward", "reward_other_latent", "reward_zero_latent", "reward_noisy_latent",
              "latent_norm", "latent_user_rel", "factor_cos2", "reward_blind",
              "reward_blind_other_latent", "reward_own_prompt", "reward_other_prompt")


def build_parser() -> argparse.ArgumentParser:
    """The study's options (bench/fresh_users.py rebuilds a study's runs from them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=gs.DATASET)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "slot_study"),
                   help="seed 0's runs; seed s goes to WORKDIR_seed<s>")
    p.add_argument("--name", default="industrial_scratch_cpu-2core")
    p.add_argument("--seeds", default="0", help="comma list")
    gs.add_setup_args(p)   # (its LR-GRPO options are unused here)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma list of {', '.join(a[0] for a in ARMS)}")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--until", choices=("train", "valid", "all"), default="all")
    gs.add_model_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    gs.check_model(args)
    if "n0" not in args.arms.split(","):
        raise SystemExit("--arms must include n0 (every arm is compared with it)")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t_start = time.perf_counter()

    per_seed, cfgs = [], []
    for seed in seeds:
        cfg, overrides, dataset, arms = train_seed(args, seed)
        per_seed.append(arms)
        cfgs.append(cfg)
    if args.until == "train":
        return
    rows = {s: len(dataset.splits[s]) for s in ("valid", "test")}
    for cfg, arms in zip(cfgs, per_seed):
        probe_and_decode(cfg, args, arms)
    names = list(per_seed[0])
    valid_users = {n: [user_metrics(arms[n]["valid_predictions"], rows["valid"])
                       for arms in per_seed] for n in names}
    summary = {}
    for n in names:
        s = {"label": per_seed[0][n]["label"], "overrides": per_seed[0][n]["overrides"],
             "best_valid_loss": mean_over(per_seed, (n, "best_valid_loss")),
             "valid_NDCG@10": mean_over(per_seed, (n, "valid", "NDCG@10")),
             "valid_HR@10": mean_over(per_seed, (n, "valid", "HR@10")),
             "valid_NDCG@10_per_seed": [arms[n]["valid"]["NDCG@10"] for arms in per_seed]}
        for k in PROBE_KEYS:
            s[k] = mean_over(per_seed, (n, "probes", k))
        s["train_time_s"] = mean_over(per_seed, (n, "train_time_s"))
        ups = mean_over(per_seed, (n, "valid", "users_per_s_after_compile"))
        s["decode_ms_per_user"] = 1000.0 / ups if ups else None
        if n != "n0":
            s["valid_vs_n0"] = pooled(valid_users[n], valid_users["n0"], args.bootstrap)
        if n not in ("n0", "ratt") and "ratt" in per_seed[0]:
            s["valid_vs_ratt"] = pooled(valid_users[n], valid_users["ratt"], args.bootstrap)
        summary[n] = s
        print(f"[{n}] valid loss {s['best_valid_loss']:.4f}  NDCG@10 {s['valid_NDCG@10']:.4f}"
              + (f"  reward own {s['reward']:.4f} other {s['reward_other_latent']:.4f} "
                 f"zero {s['reward_zero_latent']:.4f} noisy {s['reward_noisy_latent']:.4f}"
                 if s.get("reward") is not None else "")
              + (f"  vs N=0 {fmt(s['valid_vs_n0']['NDCG@10'])}" if n != "n0" else ""), flush=True)

    model = ("SmolLM2-135M-Instruct (pretrained), no base stage" if args.model == "smollm2"
             else "demo decoder from scratch")
    res = {"title": f"Thought-slot ablations, {dataset.name} ({args.train_rows} train rows), "
                    f"{model}, seeds {seeds}",
           "dataset": dataset.name, "items": len(dataset.catalog), "seeds": seeds,
           "command": "nice -n 5 .venv/bin/python bench/slot_study.py " + " ".join(argv or sys.argv[1:]),
           "config_overrides": overrides, "args": vars(args),
           "valid_rows": rows["valid"], "test_rows": rows["test"], "summary": summary,
           "per_seed": {str(sd): arms for sd, arms in zip(seeds, per_seed)}}
    if args.until == "all":
        latent_arms = [n for n in names if n != "n0"]
        best, tied = choose_on_valid(summary, latent_arms)
        chosen = ["n0"] + [n for n in ("ratt",) if n in names] + ([best] if best != "ratt" else [])
        res["chosen_on_valid"] = best
        res["tied_on_valid"] = tied
        res["decoded_on_test"] = chosen
        test_users = {}
        for n in chosen:
            ms = []
            for cfg, arms in zip(cfgs, per_seed):
                dt = gs.decode(cfg, arms[n]["workdir"], "test")
                arms[n]["test"], arms[n]["test_predictions"] = dt["metrics"], dt["predictions"]
                ms.append(user_metrics(dt["predictions"], rows["test"]))
            test_users[n] = ms
            summary[n]["test_NDCG@10"] = mean_over(per_seed, (n, "test", "NDCG@10"))
            summary[n]["test_HR@10"] = mean_over(per_seed, (n, "test", "HR@10"))
        for n in chosen[1:]:
            summary[n]["test_vs_n0"] = pooled(test_users[n], test_users["n0"], args.bootstrap)
            if n != "ratt" and "ratt" in test_users:
                summary[n]["test_vs_ratt"] = pooled(test_users[n], test_users["ratt"],
                                                    args.bootstrap)
            print(f"[{n}] test NDCG@10 {summary[n]['test_NDCG@10']:.4f} − N=0 "
                  f"{fmt(summary[n]['test_vs_n0']['NDCG@10'])}", flush=True)
    res["wall_s_this_call"] = time.perf_counter() - t_start
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    stem = os.path.join(ROOT, "results", f"slot_study_{args.name}")
    write_json(stem + ".json", res)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {stem}.json and .md ({res['wall_s_this_call']:.0f} s this call)")


if __name__ == "__main__":
    main()
