"""LR-GRPO estimator study on a real Amazon folder (CPU scale), from scratch or from SmolLM2-135M.

One LatentR³ (N = 1) SFT model is trained with the demo's decoder shape (configs/demo.py) on
a subsample of a D3 folder, after a shared N = 0 base stage (`pipeline.base_epochs`, see
README "Why the base stage"). From its weights, LR-GRPO runs once per variant: the same
seed, the same batches in the same order and the same number of batches; only the
estimator, the advantage, the noise or the trust region differ (and the learning rate: the
config default and one higher). For every run the script records

  * the noise-free reward on the valid split (negative perplexity of the true next title,
    the quantity LR-GRPO maximises) at the start and after every `--every` batches, read
    back from the run's saved checkpoints;
  * the step diagnostics of its metrics.jsonl (reward_spread, adv_pos_frac, noise_rel,
    latent_drift, pathwise_cos, ...);
  * a "slot test" on the valid split: the reward with each user's own latent against the
    reward with another user's latent in the thought slot (the same prompts, the latents
    rotated by one within each batch), and how far the users' latents are from their mean.
    If the two rewards agree while the latents differ, the decoder does not use what the
    latent says about the user.
LR-GRPO and the valid-reward pass use one prompt bucket and one target bucket (one compile
per run); beam search uses the SFT run's buckets for every model.

Then, choosing on the valid split only: the `--top` variants with the highest final valid
reward and the SFT model are decoded with trie-constrained beam search on valid (HR/NDCG);
the SFT model and the `--test` best of those by valid NDCG@10 are decoded on test, once,
and compared with the SFT model user by user (study.paired_difference: 95% bootstrap
interval over users, sign-flip p-value), on valid and on test.

    nice -n 5 .venv/bin/python bench/grpo_study.py            # resumable; reruns skip what finished

With `--model smollm2` the SFT model is the pretrained SmolLM2-135M of configs/smollm2.py
(its `cpu` variant, no base stage), trained here or taken from an existing run with
`--sft-from` (e.g. bench/slot_study.py's release arm, same data options); each LR-GRPO
run's model is then its final step (grpo.select=last). `--runs` pairs variants with
their own learning rates:

    nice -n 5 .venv/bin/python bench/grpo_study.py --model smollm2 --dtype bfloat16 \
        --train-rows 640 --sft-epochs 1 --eval-rows 200 --max-target-len 32 \
        --target-buckets "(16,32)" --sft-from runs/smollm2_ablation/ratt \
        --workdir runs/grpo_smollm2 --name industrial_smollm2-135m_cpu-2core \
        --runs ppo_batch@5e-5,reinforce_rloo@1e-3,pathwise@1e-3 --every 12

Writes runs/grpo_study/ (every run), results/grpo_study_<name>.json and .png.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from latentr3_jax import config as config_lib  # noqa: E402
from latentr3_jax import data as D  # noqa: E402
from latentr3_jax import pipeline, study  # noqa: E402
from latentr3_jax.eval.evaluate import evaluate_run  # noqa: E402
from latentr3_jax.model import latent as latent_lib  # noqa: E402
from latentr3_jax.train import runs, setup  # noqa: E402
from latentr3_jax.train.grpo import loss as gl  # noqa: E402
from latentr3_jax.train.grpo import train_grpo  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402

DATASET = os.path.join(ROOT, "..", "shared", "data", "amazon18", "Industrial_and_Scientific")

# name, label, grpo.* overrides (besides the learning rate); the first is the release's
VARIANTS = (
    ("ppo_batch", "ppo + batch (release)", {}),
    ("ppo_rloo", "ppo + rloo", {"advantage": "rloo"}),
    ("ppo_group_mean", "ppo + group_mean", {"advantage": "group_mean"}),
    ("pathwise", "pathwise", {"estimator": "pathwise"}),
    ("reinforce_rloo", "reinforce + rloo", {"estimator": "reinforce", "advantage": "rloo"}),
    ("ppo_rloo_sigma0.5", "ppo + rloo, sigma 0.5", {"advantage": "rloo", "sigma": 0.5}),
    ("pathwise_trust", "pathwise + latent_trust 1", {"estimator": "pathwise", "latent_trust": 1.0}),
)
DIAG_KEYS = ("reward_eps0", "reward_noisy", "reward_spread", "adv_pos_frac", "latent_norm",
             "noise_rel", "latent_drift", "weight_drift", "clip_frac", "grad_norm", "loss",
             "pathwise_cos", "pathwise_update_cos")


# --------------------------------------------------------------------------- config


def add_setup_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `base_cfg` (data subsample, stage lengths, LR-GRPO batches), shared
    by the studies built on this one (slot_study, ensemble_study)."""
    p.add_argument("--train-rows", type=int, default=3500)
    p.add_argument("--eval-rows", type=int, default=400)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--buckets", default="(128,192,256)")
    p.add_argument("--max-target-len", type=int, default=48)
    p.add_argument("--target-buckets", default="(32,48)")
    p.add_argument("--base-epochs", type=int, default=2)
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--prompts", type=int, default=8, help="prompts per LR-GRPO batch")
    p.add_argument("--batches", type=int, default=36, help="LR-GRPO batches per run")
    p.add_argument("--every", type=int, default=6, help="batches between valid-reward points")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--recipe", choices=("d3", "bigrec"), default="d3",
                   help="d3: the D3 template and trie-constrained beam search (default); "
                        "bigrec: the BIGRec (Alpaca) template, free generation grounded to "
                        "the catalog by L2 distance")
    return p


def setup_defaults(**over) -> argparse.Namespace:
    """`add_setup_args`' defaults, with `over` (e.g. dataset, workdir, seed) on top."""
    ns = add_setup_args(argparse.ArgumentParser()).parse_args([])
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def recipe_overrides(recipe: str) -> list:
    """The prompt template and evaluation mode of a recipe (d3 | bigrec, SPEC sections 3, 7)."""
    if recipe == "d3":
        return []
    if recipe == "bigrec":
        return ["--config.data.template=bigrec", "--config.eval.mode=bigrec"]
    raise ValueError(f"recipe must be d3 or bigrec, got {recipe!r}")


def shared_overrides(args) -> list:
    """The config overrides every study built on `add_setup_args` sets: the folder, the
    run directory and seed, the subsample and lengths, the SFT epochs, and evaluation on
    valid (never test) during training."""
    return [
        f"--config.dataset_dir={os.path.abspath(args.dataset)}",
        f"--config.workdir={os.path.abspath(args.workdir)}",
        f"--config.seed={args.seed}",
        f"--config.data.max_train_rows={args.train_rows}",
        f"--config.data.max_eval_rows={args.eval_rows}",
        f"--config.data.cutoff={args.cutoff}",
        f"--config.data.buckets={args.buckets}",
        f"--config.data.max_target_len={args.max_target_len}",
        f"--config.data.target_buckets={args.target_buckets}",
        f"--config.sft.epochs={args.sft_epochs}",
    ] + recipe_overrides(getattr(args, "recipe", "d3")) + [
        "--config.eval.split=valid",
        "--config.eval.progress=False",
        f"--config.eval.batch_size={args.eval_batch}",
    ]


def grpo_overrides(args) -> list:
    """The LR-GRPO settings every run of this study shares: batches of `--prompts` prompts
    x G = 8, one pass of `--batches` batches, a checkpoint (and a diagnostics probe) every
    `--every` batches, all of them kept for the valid-reward curve."""
    return [
        f"--config.grpo.prompts_per_batch={args.prompts}",
        "--config.grpo.group_size=8",
        "--config.grpo.epochs=1",
        f"--config.grpo.max_steps={args.batches}",
        f"--config.grpo.warmup_steps={args.warmup}",
        f"--config.grpo.checkpoint_every={args.every}",
        f"--config.grpo.keep_checkpoints={args.batches // args.every + 2}",
        "--config.grpo.log_every=6",
        f"--config.grpo.diagnose_every={args.every}",
        "--config.grpo.evaluate=False",
    ]


def base_cfg(args):
    """The demo's config pointed at the real folder, subsampled and with short prompts."""
    over = ["--config.dataset=d3"] + shared_overrides(args) + [
        f"--config.pipeline.base_epochs={args.base_epochs}",
        "--config.sft.log_every=20",
    ] + grpo_overrides(args) + ([f"--config.sft.slot_bottleneck={args.slot_bottleneck:g}"]
         if getattr(args, "slot_bottleneck", 0.0) else [])
    cfg, _ = config_lib.parse_config(["--config", os.path.join(ROOT, "configs", "demo.py")] + over)
    return cfg, over


def _smollm2_config_module():
    """configs/smollm2.py as a module (its MODEL path and DATASETS names)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "smollm2_config", os.path.join(ROOT, "configs", "smollm2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SMOLLM2 = _smollm2_config_module()
SMOLLM2_GGUF, SMOLLM2_DATASETS = _SMOLLM2.MODEL, _SMOLLM2.DATASETS


def add_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--model and the options of `smollm2_cfg` (shared with slot_study)."""
    p.add_argument("--model", choices=("scratch", "smollm2"), default="scratch",
                   help="scratch: the demo decoder after an N=0 base stage; smollm2: the "
                        "pretrained SmolLM2-135M of configs/smollm2.py (its cpu variant), no "
                        "base stage")
    p.add_argument("--dtype", default="float32", help="compute dtype (--model smollm2)")
    p.add_argument("--sft-batch", type=int, default=16, help="SFT batch (--model smollm2)")
    return p


def check_model(args) -> None:
    """--model smollm2 needs the GGUF file in ../shared/models."""
    if args.model == "smollm2" and not os.path.exists(SMOLLM2_GGUF):
        raise SystemExit(f"--model smollm2 needs {SMOLLM2_GGUF} (../shared/models); not found")


def smollm2_cfg(args, grpo: bool = False):
    """configs/smollm2.py:<dataset>,cpu from the pretrained checkpoint (no base stage), with
    this study's subsample, prompt cut and stage length; SFT evaluated on valid only.
    `grpo`: with this study's LR-GRPO settings (grpo_overrides) on top."""
    dataset = os.path.basename(os.path.normpath(args.dataset))
    short = {v: k for k, v in SMOLLM2_DATASETS.items()}.get(dataset)
    if short is None:
        raise SystemExit(f"--model smollm2: --dataset must be one of {sorted(SMOLLM2_DATASETS.values())}")
    over = shared_overrides(args) + [
        f"--config.model.dtype={args.dtype}",
        f"--config.sft.batch_size={args.sft_batch}",
        "--config.sft.log_every=4",
    ] + (grpo_overrides(args) + [
        # the study reads every checkpoint itself; each run's model is its final step
        "--config.grpo.select=last"] if grpo else [])
    cfg, _ = config_lib.parse_config(
        ["--config", os.path.join(ROOT, "configs", f"smollm2.py:{short},cpu")] + over)
    return cfg, over


def parse_runs(spec: str, lrs: list, variants: str) -> list:
    """[(variant name, label, overrides, lr)]: `spec` as 'name@lr,...' (e.g.
    'ppo_batch@5e-5,reinforce_rloo@1e-3'), or, when empty, every variant of `variants`
    (comma list) at every learning rate of `lrs`."""
    by_name = {v[0]: v for v in VARIANTS}
    if not spec:
        wanted = [n for n in variants.split(",") if n]
        for n in wanted:
            if n not in by_name:
                raise SystemExit(f"--variants: unknown variant {n!r}; known: {', '.join(by_name)}")
        return [(*by_name[n], lr) for lr in lrs for n in by_name if n in wanted]
    out = []
    for item in (t.strip() for t in spec.split(",") if t.strip()):
        name, sep, lr = item.partition("@")
        if not sep or name not in by_name:
            raise SystemExit(f"--runs: {item!r} must be VARIANT@LR with VARIANT one of "
                             f"{', '.join(by_name)}")
        try:
            out.append((*by_name[name], float(lr)))
        except ValueError:
            raise SystemExit(f"--runs: {item!r}: {lr!r} is not a learning rate") from None
    return out


def one_shape(cfg, args):
    """cfg with one prompt bucket and one target bucket: LR-GRPO and the valid-reward pass
    compile once per run instead of once per bucket pair (its batches are small, so the
    padding costs less than the compiles on this CPU)."""
    c = copy.deepcopy(cfg)
    c.data.buckets = (int(args.cutoff),)
    c.data.target_buckets = (int(args.max_target_len),)
    return c


def grpo_cfg(cfg, sft_dir: str, name: str, overrides: dict, lr: float):
    c = copy.deepcopy(cfg)
    c.workdir = os.path.join(os.path.abspath(cfg.workdir), "grpo", f"{name}_lr{lr:g}")
    c.grpo.init_from = sft_dir
    c.grpo.learning_rate = float(lr)
    c.model.num_thoughts = 1
    for k, v in overrides.items():
        c.grpo[k] = v
    return c


# --------------------------------------------------------------------------- valid reward


def valid_batches(cfg, run) -> tuple:
    """(a BatchIterator over the valid split in order, 32 rows a batch, number of rows)
    with `run`'s tokenizer."""
    enc = setup.encode_split(cfg, run.tokenizer, D.load_dataset(cfg), "valid")
    it = D.BatchIterator(enc, 32, buckets=tuple(cfg.data.buckets),
                         target_buckets=setup.target_buckets(cfg), pad_id=run.tokenizer.pad_id,
                         seed=0, shuffle=False, drop_last=False, process_index=0,
                         process_count=1)
    return it, len(enc)


def per_row(it, rows: int, fn, params) -> list:
    """fn(params, device batch) -> per-row arrays, gathered over one pass of `it` into
    [rows, ...] arrays in the split's row order (filler rows dropped)."""
    out = None
    for b in it.epoch(0, start=0):
        dev = {k: jnp.asarray(b[k]) for k in ("prompt_ids", "prompt_mask", "target_ids",
                                               "target_mask")}
        got = [np.asarray(x) for x in jax.device_get(fn(params, dev))]
        if out is None:
            out = [np.full((rows,) + x.shape[1:], np.nan) for x in got]
        real = np.asarray(b["valid"], bool) & (np.asarray(b["row"]) >= 0)
        idx = np.asarray(b["row"])[real]
        for o, x in zip(out, got):
            o[idx] = x[real]
    assert out is not None and not np.isnan(out[0]).any(), "valid rows missing from the pass"
    return out


class ValidReward:
    """Per-row noise-free reward on the valid split, and the slot test (another user's
    latent in the thought slot), for any params of the SFT run's model."""

    def __init__(self, cfg, sft, probes: bool = False, sigma: float = 1.5, blind: bool = False):
        """`probes`: also the reward with a zero latent and with one N(0, sigma^2) draw added
        to it (how far the slot's content and the exploration noise move the reward).
        `blind`: every reward with the prompt hidden from the slot and the title (as in
        sft.slot_bottleneck's blind rows), so the latent is all the decoder sees of the user."""
        self.sft = sft   # cfg: one_shape(...)
        self.probes = bool(probes)
        self.model_config = setup.execution_config(cfg, sft.model_config)
        self.it, self.rows = valid_batches(cfg, sft)
        mc, nt, lm = self.model_config, sft.num_thoughts, sft.latent_mode

        def rewards(params, b):
            kw = dict(num_thoughts=nt, latent_mode=lm, dtype=jnp.float32)
            if blind:
                kw["blind_rows"] = jnp.ones(b["prompt_ids"].shape[:1], bool)
            logits, lat = latent_lib.latent_forward(mc, params, b["prompt_ids"], b["prompt_mask"],
                                                    b["target_ids"], b["target_mask"], **kw)
            own = gl.negative_perplexity(latent_lib.target_logprobs(logits, b["target_ids"]),
                                         b["target_mask"])
            r = lat[:, -1]
            # another user's latent: the batch's latents rotated by one (fillers copy row 0,
            # so a real row never gets its own latent back unless the batch has one real row)
            swap = jnp.roll(r, 1, axis=0) - r
            logits2, _ = latent_lib.latent_forward(mc, params, b["prompt_ids"], b["prompt_mask"],
                                                   b["target_ids"], b["target_mask"],
                                                   latent_noise=swap, **kw)
            other = gl.negative_perplexity(latent_lib.target_logprobs(logits2, b["target_ids"]),
                                           b["target_mask"])
            if not probes:
                return own, other, r, own, own
            extra = []
            for noise in (-r, sigma * jax.random.normal(jax.random.PRNGKey(0), r.shape)):
                lg, _ = latent_lib.latent_forward(mc, params, b["prompt_ids"], b["prompt_mask"],
                                                  b["target_ids"], b["target_mask"],
                                                  latent_noise=noise, **kw)
                extra.append(gl.negative_perplexity(
                    latent_lib.target_logprobs(lg, b["target_ids"]), b["target_mask"]))
            return (own, other, r, *extra)

        self._fn = jax.jit(rewards)

    def __call__(self, params) -> dict:
        # lat: [rows, K * d] with K latent factors (the probes swap, zero or perturb all K)
        own, other, lat, zero, noisy = per_row(self.it, self.rows, self._fn, params)
        norm = np.linalg.norm(lat, axis=-1)
        # how much the latent differs between users: RMS distance to the mean latent,
        # relative to the mean norm (0: one latent for everybody)
        user_rms = float(np.sqrt(np.mean(np.sum((lat - lat.mean(0)) ** 2, axis=-1))))
        out = {"reward": float(own.mean()), "reward_other_latent": float(other.mean()),
               "latent_norm": float(norm.mean()), "latent_user_rms": user_rms,
               "latent_user_rel": user_rms / float(norm.mean()), "per_row": own.tolist()}
        if latent_lib.num_factors(params) > 1:   # how alike the K factors are (0: orthogonal)
            out["factor_cos2"] = float(latent_lib.factor_diversity(self.model_config,
                                                                   jnp.asarray(lat)))
        if self.probes:
            out.update(reward_zero_latent=float(zero.mean()), reward_noisy_latent=float(noisy.mean()),
                       per_row_other=other.tolist(), per_row_zero=zero.tolist())
        return out


def prompt_swap_reward(cfg, run) -> dict:
    """Mean valid reward with each user's own prompt and with another user's prompt (the
    batch's prompts rotated by one; the true titles stay), for any run, N = 0 included.
    With thoughts the latent comes from the prompt used. How much the whole history, not
    just the latent, moves the likelihood of the user's next title."""
    mc = setup.execution_config(cfg, run.model_config)
    kw = dict(num_thoughts=run.num_thoughts, latent_mode=run.latent_mode, dtype=jnp.float32)

    def rewards(params, b):
        out = []
        for shift in (0, 1):
            logits, _ = latent_lib.latent_forward(
                mc, params, jnp.roll(b["prompt_ids"], shift, axis=0),
                jnp.roll(b["prompt_mask"], shift, axis=0), b["target_ids"], b["target_mask"],
                **kw)
            out.append(gl.negative_perplexity(latent_lib.target_logprobs(logits, b["target_ids"]),
                                              b["target_mask"]))
        return out

    own, other = per_row(*valid_batches(cfg, run), jax.jit(rewards), run.params)
    return {"reward_own_prompt": float(own.mean()), "reward_other_prompt": float(other.mean())}


def checkpoint_params(run_dir: str) -> dict:
    """{step: params} of every kept checkpoint of a run's latest/ manager."""
    root = os.path.join(run_dir, runs.CHECKPOINTS, "latest")
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))
    try:
        out = {}
        for step in sorted(mngr.all_steps()):
            got = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
            out[int(step)] = jax.tree.map(jnp.asarray, got["params"])
        return out
    finally:
        mngr.close()


# --------------------------------------------------------------------------- stages


def train_sft_stage(cfg) -> str:
    """Base (N=0) then LatentR³ (N=1) SFT, evaluated on valid by the pipeline; resumable."""
    sft_dir = os.path.join(os.path.abspath(cfg.workdir), "sft_latentr3")
    done = os.path.join(sft_dir, f"eval_valid_{cfg.eval.mode}", "metrics.json")
    if os.path.exists(os.path.join(sft_dir, "train_summary.json")) and os.path.exists(done):
        print(f"[sft] done ({sft_dir}); skipping", flush=True)
        return sft_dir
    pipeline.run_pipeline(cfg, variants=["sft_latentr3"])
    return sft_dir


def run_variant(vcfg, reward: ValidReward) -> dict:
    """Train one LR-GRPO run (resumable), then its valid-reward curve from its checkpoints."""
    out = os.path.join(vcfg.workdir, "study_curve.json")
    if os.path.exists(out):
        return read_json(out)
    marker = os.path.join(vcfg.workdir, "train_summary.json")
    if not os.path.exists(marker):
        t0 = time.perf_counter()
        summary = train_grpo(vcfg, progress=False)
        summary = {k: v for k, v in summary.items() if k != "curve"}
        summary["wall_s"] = time.perf_counter() - t0
        write_json(marker, summary)
    summary = read_json(marker)
    curve = []
    for step, params in checkpoint_params(vcfg.workdir).items():
        r = reward(params)
        curve.append({"step": step, **{k: v for k, v in r.items() if k != "per_row"}})
        last_rows = r["per_row"]
    steps = [rec for rec in runs.read_metrics(vcfg.workdir) if rec.get("split") == "train"]
    diag = {k: [rec.get(k) for rec in steps] for k in DIAG_KEYS}
    result = {"workdir": vcfg.workdir, "grpo": vcfg.grpo.to_dict(), "curve": curve,
              "train_steps": [rec["batch"] for rec in steps], "diagnostics": diag,
              "final_valid_reward": curve[-1]["reward"], "final_per_row": last_rows,
              "train_wall_s": summary.get("wall_s"), "steps": summary.get("steps")}
    write_json(out, result)
    return result


def decode(cfg, run_dir: str, split: str, out_name: str = "") -> dict:
    """The evaluator's ranking (`cfg.eval.mode`: trie-constrained beam search, or BIGRec
    grounding) of a run's final weights on `split` (resumable), into `run_dir`/`out_name`
    (default eval_<split>_<mode>, e.g. eval_valid_constrained)."""
    out_dir = os.path.join(run_dir, out_name or f"eval_{split}_{cfg.eval.mode}")
    metrics = os.path.join(out_dir, "metrics.json")
    cfg = copy.deepcopy(cfg)
    cfg.eval.data_from_run = False   # every model decoded on the same rows, buckets and beams
    if os.path.exists(metrics):
        m = read_json(metrics)
    else:
        print(f"  decoding {os.path.basename(run_dir)} on {split} ...", flush=True)
        m = evaluate_run(cfg, run_dir, split=split, out_dir=out_dir, print_table=False)
    return {"metrics": {k: m.get(k) for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10",
                                              "HR@10_id", "NDCG@10_id", "users",
                                              "users_per_s_after_compile")},
            "predictions": os.path.join(out_dir, "predictions.jsonl")}


def paired(a_pred: str, b_pred: str, rows: int, resamples: int) -> dict:
    """Per-user NDCG@10 and HR@10 (title rule) of a minus b on the same rows."""
    ra = study.per_user(study.prediction_ranks(a_pred, rows)["title"])
    rb = study.per_user(study.prediction_ranks(b_pred, rows)["title"])
    return {m: study.paired_difference(ra[m][None], rb[m][None], resamples=resamples)
            for m in ("NDCG@10", "HR@10")}


# --------------------------------------------------------------------------- report


def plot(res: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    lrs = res["learning_rates"]
    names = [v[0] for v in VARIANTS]
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    styles = {lr: s for lr, s in zip(lrs, ("-", "--", ":"))}
    sft_r = res["sft"]["valid_reward"]["reward"]
    reward_axes = {lr: ax for lr, ax in zip(lrs, axes[0])}   # one panel per learning rate
    ax_s, ax_n = axes[1]
    for key, run in res["runs"].items():
        c, ls = colors[run["variant"]], styles[run["lr"]]
        steps = [p["step"] for p in run["curve"]]
        ax_r = reward_axes.get(run["lr"])
        if ax_r is not None:
            ax_r.plot(steps, [p["reward"] - sft_r for p in run["curve"]], "-", color=c,
                      marker="o", ms=3, label=run["label"])
        x = run["train_steps"]
        lab = f"{run['label']}, lr {run['lr']:g}"
        ax_s.plot(x, run["diagnostics"]["reward_spread"], ls, color=c, lw=1, label=lab)
        ax_n.plot(x, run["diagnostics"]["latent_drift"], ls, color=c, lw=1)
    for lr, ax_r in reward_axes.items():
        ax_r.axhline(0.0, color="grey", lw=1)
        ax_r.set_title(f"lr {lr:g}: valid reward minus the SFT model's ({sft_r:.3f}), "
                       f"{res['valid_rows']} valid rows", fontsize=9)
        ax_r.set_xlabel("LR-GRPO batch")
        ax_r.legend(fontsize=7)
    ax_s.set_title("reward_spread: within-group std of the train rewards "
                   "(solid / dashed: first / second lr)", fontsize=9)
    ax_s.legend(fontsize=6, ncol=2)
    ax_n.set_title(f"latent_drift ||r - r_sft|| on the train batch (SFT latent norm "
                   f"{res['sft']['valid_reward']['latent_norm']:.2f})", fontsize=9)
    for ax in (ax_s, ax_n):
        ax.set_xlabel("LR-GRPO batch")
    fig.suptitle(res["title"], fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def markdown(res: dict) -> str:
    sft = res["sft"]
    lines = [f"SFT: valid reward {sft['valid_reward']['reward']:.4f} (another user's latent: "
             f"{sft['valid_reward']['reward_other_latent']:.4f}; latent norm "
             f"{sft['valid_reward']['latent_norm']:.3f}, RMS between users "
             f"{sft['valid_reward'].get('latent_user_rms', float('nan')):.3f}), valid NDCG@10 "
             f"{sft['valid']['NDCG@10']:.4f}" + (f", test NDCG@10 {sft['test']['NDCG@10']:.4f}"
                                                 if sft.get("test") else ""), "",
             "| run | final valid reward | Δ vs SFT [95%] | other-latent reward | spread | "
             "noise_rel | drift | valid NDCG@10 | test NDCG@10 | test Δ NDCG@10 vs SFT [95%], p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, run in sorted(res["runs"].items(), key=lambda kv: -kv[1]["final_valid_reward"]):
        d = run["valid_reward_vs_sft"]
        dg = run["diagnostics"]
        mean = lambda xs: float(np.nanmean([x for x in xs if x is not None])) if any(
            x is not None for x in xs) else float("nan")
        vn = run.get("valid", {}).get("NDCG@10")
        tn = run.get("test", {}).get("NDCG@10")
        td = run.get("test_vs_sft", {}).get("NDCG@10")
        lines.append(
            f"| {key} | {run['final_valid_reward']:.4f} | {d['diff']:+.4f} [{d['lo']:+.4f}, "
            f"{d['hi']:+.4f}] | {run.get('final_latent', run['curve'][-1])['reward_other_latent']:.4f} | "
            f"{mean(dg['reward_spread']):.4f} | {mean(dg['noise_rel']):.2f} | "
            f"{dg['latent_drift'][-1] if dg['latent_drift'][-1] is not None else float('nan'):.3f} | "
            + (f"{vn:.4f}" if vn is not None else "-") + " | "
            + (f"{tn:.4f}" if tn is not None else "-") + " | "
            + (f"{td['diff']:+.4f} [{td['lo']:+.4f}, {td['hi']:+.4f}], p {td['p']:.3g}"
               if td else "-") + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "grpo_study"))
    p.add_argument("--name", default="industrial_scratch_cpu-2core")
    p.add_argument("--seed", type=int, default=0)
    add_setup_args(p)
    p.add_argument("--lrs", default="5e-5,1e-3", help="LR-GRPO learning rates (first: default)")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    p.add_argument("--top", type=int, default=3, help="variants decoded on valid")
    p.add_argument("--test", type=int, default=2, help="of those, decoded on test")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--until", choices=("sft", "grpo", "valid", "all"), default="all")
    p.add_argument("--slot-bottleneck", type=float, default=0.0,
                   help="sft.slot_bottleneck of the LatentR³ SFT run the variants start from")
    p.add_argument("--runs", default="",
                   help="VARIANT@LR comma list (e.g. ppo_batch@5e-5,reinforce_rloo@1e-3) "
                        "instead of every --variants at every --lrs")
    add_model_args(p)
    p.add_argument("--sft-from", default="",
                   help="an existing LatentR³ SFT run directory (e.g. one of bench/slot_study.py's "
                        "arms, trained with the same data options) to start from instead of "
                        "training one")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    check_model(args)
    lrs = [float(x) for x in args.lrs.split(",") if x]
    planned = parse_runs(args.runs, lrs, args.variants)
    if args.runs:
        lrs = list(dict.fromkeys(lr for *_, lr in planned))

    cfg, overrides = smollm2_cfg(args, grpo=True) if args.model == "smollm2" else base_cfg(args)
    if args.sft_from:
        sft_dir = os.path.abspath(args.sft_from)
        if not os.path.exists(os.path.join(sft_dir, "train_summary.json")):
            raise SystemExit(f"--sft-from {args.sft_from}: no finished SFT run there "
                             "(train_summary.json missing)")
    else:
        sft_dir = train_sft_stage(cfg)
    if args.until == "sft":
        calls_path = os.path.join(os.path.abspath(cfg.workdir), "calls.json")
        calls = read_json(calls_path) if os.path.exists(calls_path) else []
        calls.append({"until": "sft", "wall_s": time.perf_counter() - t_start, "end": time.time()})
        write_json(calls_path, calls)
        return
    sft = runs.load_run(sft_dir)
    if not sft.num_thoughts:
        raise SystemExit(f"{sft_dir}: an N = 0 run has no latent for LR-GRPO to train")
    gcfg = one_shape(cfg, args)
    reward = ValidReward(gcfg, sft)
    sft_reward = reward(sft.params)
    print(f"[sft] valid reward {sft_reward['reward']:.4f}, another user's latent "
          f"{sft_reward['reward_other_latent']:.4f}, latent norm {sft_reward['latent_norm']:.2f}, "
          f"between users (RMS to the mean latent) {sft_reward['latent_user_rms']:.3f}",
          flush=True)

    res_runs = {}
    for name, label, over, lr in planned:
        vcfg = grpo_cfg(gcfg, sft_dir, name, over, lr)
        t0 = time.perf_counter()
        r = run_variant(vcfg, reward)
        key = f"{name} lr {lr:g}"
        r.update(variant=name, label=label, lr=lr)
        if r["curve"][0]["step"] != 0:   # the starting point: the SFT model itself
            r["curve"].insert(0, {"step": 0, **{k: v for k, v in sft_reward.items()
                                                if k != "per_row"}})
        last = r["curve"][-1]
        # the last checkpoint is the final step's unless --batches is not a multiple of --every
        fin = last if last["step"] == r.get("steps") else reward(
            runs.load_run(vcfg.workdir, which="latest").params)
        r["final_latent"] = {k: fin.get(k) for k in ("reward", "reward_other_latent",
                                                 "latent_norm", "latent_user_rms",
                                                 "latent_user_rel")}
        r["valid_reward_vs_sft"] = study.paired_difference(
            np.asarray(r["final_per_row"])[None], np.asarray(sft_reward["per_row"])[None],
            resamples=args.bootstrap)
        res_runs[key] = r
        print(f"[{key}] final valid reward {r['final_valid_reward']:.4f} "
              f"(SFT {sft_reward['reward']:.4f}; diff {r['valid_reward_vs_sft']['diff']:+.5f} "
              f"[{r['valid_reward_vs_sft']['lo']:+.5f}, {r['valid_reward_vs_sft']['hi']:+.5f}]) "
              f"curve {[round(c['reward'], 4) for c in r['curve']]}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.until == "grpo":
        return

    rows = {}
    for split in ("valid", "test"):
        ds_rows = D.load_dataset(cfg).splits[split]
        rows[split] = len(ds_rows)
    sft_valid = decode(cfg, sft_dir, "valid")
    ranked = sorted(res_runs, key=lambda k: -res_runs[k]["final_valid_reward"])
    top = ranked[:args.top]
    for key in top:
        r = res_runs[key]
        dv = decode(cfg, r["workdir"], "valid")
        r["valid"] = dv["metrics"]
        r["valid_predictions"] = dv["predictions"]
        r["valid_vs_sft"] = paired(dv["predictions"], sft_valid["predictions"], rows["valid"],
                                   args.bootstrap)
        print(f"[{key}] valid NDCG@10 {dv['metrics']['NDCG@10']:.4f} (SFT "
              f"{sft_valid['metrics']['NDCG@10']:.4f})", flush=True)
    model = ("SmolLM2-135M-Instruct (pretrained), no base stage" if args.model == "smollm2"
             else "demo decoder from scratch")
    res = {"title": f"LR-GRPO estimators, {os.path.basename(os.path.normpath(args.dataset))} "
                    f"({args.train_rows} train rows), {model}, seed {args.seed}"
                    + (f", SFT with slot bottleneck {args.slot_bottleneck:g}"
                       if args.slot_bottleneck else ""),
           "dataset": os.path.basename(os.path.normpath(args.dataset)),
           "command": "nice -n 5 .venv/bin/python bench/grpo_study.py " + " ".join(argv or sys.argv[1:]),
           "config_overrides": overrides, "args": vars(args), "learning_rates": lrs,
           "valid_rows": rows["valid"], "test_rows": rows["test"],
           "sft": {"run": sft_dir, "valid_reward": {k: v for k, v in sft_reward.items()
                                                    if k != "per_row"},
                   "valid": sft_valid["metrics"],
                   "train_summary": read_json(os.path.join(sft_dir, "train_summary.json"))},
           "ranked_by_valid_reward": ranked, "decoded_on_valid": top, "runs": res_runs}
    base_summary = os.path.join(os.path.abspath(cfg.workdir), "base", "train_summary.json")
    if os.path.exists(base_summary):
        res["base_summary"] = read_json(base_summary)
    if args.until != "valid":
        chosen = sorted(top, key=lambda k: -res_runs[k]["valid"]["NDCG@10"])[:args.test]
        res["decoded_on_test"] = chosen
        sft_test = decode(cfg, sft_dir, "test")
        res["sft"]["test"] = sft_test["metrics"]
        for key in chosen:
            r = res_runs[key]
            dt = decode(cfg, r["workdir"], "test")
            r["test"] = dt["metrics"]
            r["test_vs_sft"] = paired(dt["predictions"], sft_test["predictions"], rows["test"],
                                      args.bootstrap)
    for r in res_runs.values():
        r.pop("final_per_row", None)
    res["wall_s_this_call"] = time.perf_counter() - t_start
    # every call of the script on this workdir (the SFT-only call, the main one, reruns)
    calls_path = os.path.join(os.path.abspath(cfg.workdir), "calls.json")
    calls = read_json(calls_path) if os.path.exists(calls_path) else []
    calls.append({"until": args.until, "wall_s": res["wall_s_this_call"], "end": time.time()})
    write_json(calls_path, calls)
    res["calls"] = calls
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    stem = os.path.join(ROOT, "results", f"grpo_study_{args.name}")
    write_json(stem + ".json", res)
    plot(res, stem + ".png")
    md = markdown(res)
    print("\n" + md)
    print(f"\nwrote {stem}.json, {stem}.png ({res['wall_s_this_call']:.0f} s this call)")


if __name__ == "__main__":
    main()
