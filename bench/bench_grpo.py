"""LR-GRPO step throughput (SPEC.md section 9) and a short reward curve on synthetic data.

Part 1, speed: prompts/s of one GRPO step with G = 8 for the standard small config
(Qwen2-style, hidden 256, MLP 1024, 4 layers, 4/2 heads, tied, BPE vocab 8,000 + 1 trained on
the CDs catalog and prompts; real CDs train prompts), float32 and bfloat16:
  * jax: this project's step (prompt prefix once per prompt into a KV cache, G suffixes
    [r_k, target]; rollout and update fused into one forward/backward, or run apart),
    prompts per batch 1 and 8;
  * torch, release way (the whole-method comparison): one prompt's group of 8 sequences
    at a time, four full passes: rollout (latent pass + log-prob pass, no grad) then the
    loss (the same two passes, backward into LatentRATT), LLM frozen, the model cast to
    the dtype as the release loads it; the log-prob pass keeps target logits only;
  * torch, same passes (the engine comparison): this project's step written with
    transformers (torch_reference.shared_prefix_grpo_step) on the very batches the JAX
    8-prompt row times: same prompts per batch, same padding, same passes, float32
    weights with autocast for bf16 as JAX's mixed precision.
torch.set_num_threads(2). Every row has its FLOP count (bench/common.py, the passes that
row runs), FLOP/s and fraction of a matmul peak measured in this process; float32 is
true float32 on both sides. `--shape smollm2-135m`: SmolLM2-135M's shape (random weights,
its own tokenizer from ../shared/models).
Part 2, learning: an SFT run on the synthetic dataset, then short GRPO runs with each
estimator, printing the noise-free reward per step.

    python bench/bench_grpo.py [--steps 6] [--groups 12] [--skip-torch] [--skip-curve]
    python bench/bench_grpo.py --shape smollm2-135m --groups 4   # speed only, one shape
Writes bench/results/grpo.json (grpo_<shape>.json for another shape: speed only).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import time

# The machine is shared: with OpenMP's default spin-waiting, torch's 2 threads slow down by
# 10-40x whenever other processes hold the cores. Passive waiting keeps torch's numbers
# stable (it does not touch XLA's own thread pool). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402  (puts the repository root on sys.path)
from latentr3_jax import data  # noqa: E402
from latentr3_jax.config import base_config  # noqa: E402
from latentr3_jax.data.synthetic import write_synthetic  # noqa: E402
from latentr3_jax.model import latent as latent_lib  # noqa: E402
from latentr3_jax.model.config import bench_config  # noqa: E402
from latentr3_jax.parallel import mesh as mesh_lib  # noqa: E402
from latentr3_jax.train import setup  # noqa: E402
from latentr3_jax.train import grpo, loop, optim, runs, state as state_lib  # noqa: E402
from latentr3_jax.train import step as step_lib  # noqa: E402
from latentr3_jax.train.sft import train_sft  # noqa: E402
from latentr3_jax.utils.jsonio import read_json  # noqa: E402

G = 8
# (name, estimator, learning rate) of the learning runs: ppo at the release's best learning
# rate and at a large one, the other estimators at the large one
ESTIMATOR_RUNS = (("ppo lr 5e-5", "ppo", 5e-5), ("ppo lr 3e-3", "ppo", 3e-3),
                  ("reinforce lr 3e-3", "reinforce", 3e-3), ("pathwise lr 3e-3", "pathwise", 3e-3))


# --------------------------------------------------------------------------- data


def cds_prompts(vocab_size: int = 8000, rows: int = 256, tokenizer: str = "bpe"):
    """(tokenizer, encoded train rows, source) for real CDs prompts, or synthetic ones if
    absent. `tokenizer`: 'bpe' (trained here) or 'smollm2' (SmolLM2's own)."""
    if common.have_cds():
        ds = data.read_d3(common.CDS)
        source = "CDs_and_Vinyl"
    else:
        ds = data.read_d3(write_synthetic(tempfile.mkdtemp(), num_items=600, num_users=1500, seed=0))
        source = "synthetic (CDs data absent)"
    if tokenizer == "smollm2":
        tok = common.smollm2_tokenizer()
        source += ", SmolLM2 tokenizer"
    else:
        tok = data.train_tokenizer(data.tokenizer_corpus(ds, "latentr3"), vocab_size)
    rng = np.random.default_rng(0)
    train = ds.splits["train"]
    pick = [train[i] for i in rng.choice(len(train), size=min(rows, len(train)), replace=False)]
    enc = data.encode_split(tok, pick, ds.category_word, "latentr3", 512, max_target_len=32)
    return tok, enc, source


# --------------------------------------------------------------------------- jax


def _summary(impl, dtype, prompts, times, extra=None) -> dict:
    """Per-step wall times -> throughput from the median step (and from the fastest one:
    the machine is shared, so the best step is the least disturbed estimate)."""
    times = np.asarray(times)
    med, best = float(np.median(times)), float(times.min())
    return {"impl": impl, "dtype": dtype, "prompts_per_batch": prompts, "steps": len(times),
            "step_s_median": med, "step_s_best": best, "prompts_per_s": prompts / med,
            "prompts_per_s_best": prompts / best, "s_per_prompt": med / prompts, **(extra or {})}


def _flops(flops_each, times) -> dict:
    """FLOP fields of a row whose steps differ in shape: the mean count per step and the
    rate over all timed steps (total FLOPs / total time)."""
    return common.flop_fields(float(np.mean(flops_each)), float(np.mean(times)))


def grpo_batches(tok, enc, prompts: int, one_shape: bool = False) -> list:
    """The padded batches the JAX step (and the torch same-passes row) time: `prompts`
    prompts each, bucketed, shuffled with seed 0. `one_shape`: only the batches of the
    commonest padded shape (one compile; for large models)."""
    it = data.BatchIterator(enc, prompts, buckets=(64, 96, 128, 160, 192, 256),
                            target_buckets=(16, 32), pad_id=tok.pad_id, seed=0, shuffle=True,
                            drop_last=True, process_index=0, process_count=1)
    batches = list(it.epoch(0))
    if one_shape:
        key_of = lambda b: (b["prompt_ids"].shape, b["target_ids"].shape)
        commonest = collections.Counter(map(key_of, batches)).most_common(1)[0][0]
        batches = [b for b in batches if key_of(b) == commonest]
    return batches


def _batch_flops(cfg, b, fused: bool = True) -> float:
    n, P = b["prompt_ids"].shape
    return common.flops_grpo_prefix(cfg, n, G, P, b["target_ids"].shape[1], fused)


def bench_jax(tok, enc, dtype: str, prompts: int, steps: int, fuse: bool = True, cfg=None,
              one_shape: bool = False) -> dict:
    """`cfg`: the decoder shape (default SPEC.md section 9's). `one_shape`: time only the
    batches of the commonest padded shape (one compile; for large models)."""
    cfg = cfg or bench_config(vocab_size=tok.vocab_size)
    with common.jax_precision(dtype):
        return _bench_jax(tok, enc, dtype, prompts, steps, fuse, cfg, one_shape)


def _bench_jax(tok, enc, dtype, prompts, steps, fuse, cfg, one_shape) -> dict:
    params = latent_lib.init_model_params(cfg, jax.random.PRNGKey(0))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    settings = grpo.GRPOSettings(group_size=G, sigma=1.5, fuse=fuse, dtype=common.jax_dtype(dtype))
    mask = optim.latent_only(params)
    tx = optim.adamw(optim.cosine_warmup(5e-5, 10, 1000), trainable=lambda _: mask)
    state, sh = state_lib.create_sharded_state(None, latent_lib.model_param_axes(cfg), tx,
                                               jax.random.PRNGKey(1), mesh, params=params)
    step = grpo.GRPOStep(cfg, settings, tx, mesh, sh)
    batches = grpo_batches(tok, enc, prompts, one_shape)
    shapes = {}
    for b in batches:  # compile every shape once, outside the timing
        key = (b["prompt_ids"].shape, b["target_ids"].shape)
        if key not in shapes:
            shapes[key] = b
            state, m = step(state, None, b)
    jax.block_until_ready(state.params)
    timed = batches[:steps]
    real_tokens = sum(int(b["prompt_mask"].sum() + b["target_mask"].sum()) for b in timed)
    padded_tokens = sum(b["prompt_ids"].size + b["target_ids"].size for b in timed)
    holder = {"state": state}

    def run(i):
        holder["state"], _ = step(holder["state"], None, timed[i])
        jax.block_until_ready(holder["state"].params)
    times = common.time_steps(run, len(timed))
    impl = "jax" + ("" if fuse else " (rollout+update)")
    return _summary(impl, dtype, prompts, times,
                    {"padding_share": 1 - real_tokens / padded_tokens,
                     "precision": common.precision_note("jax", dtype),
                     "passes": "prompt once into a KV cache (no grad), LatentRATT, G suffixes "
                               + ("fwd+bwd, rollout fused in" if settings.fused else
                                  "(rollout fwd, then update fwd+bwd)"),
                     **_flops([_batch_flops(cfg, b, settings.fused) for b in timed], times)})


# --------------------------------------------------------------------------- torch


def bench_torch(tok, enc, dtype: str, groups: int, cfg=None, device: str = "cpu") -> dict:
    """The release's way, one prompt's group at a time (torch_reference.release_grpo_group_step).
    `cfg`: the decoder shape (default SPEC.md section 9's); `device`: cpu (2 threads) or cuda."""
    import torch  # optional, heavy, and only after OMP_WAIT_POLICY is set
    import torch_reference as ref

    if device == "cpu":
        torch.set_num_threads(2)
    common.torch_strict_fp32()
    tdtype = common.torch_dtype(dtype)
    cfg = cfg or bench_config(vocab_size=tok.vocab_size)
    model = ref.build_causal_lm(cfg, tdtype).to(device).eval()   # seeds torch with 0
    for p in model.parameters():
        p.requires_grad_(False)
    ratt = ref.LatentRATT(cfg.hidden_size).to(tdtype).to(device)
    opt = torch.optim.AdamW(ratt.parameters(), lr=5e-5)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def group_step(e):
        ref.release_grpo_group_step(model, ratt, opt, e.prompt_ids, e.target_ids, tok.thought_id,
                                    G=G, sigma=1.5, generator=gen)
        sync()

    # warm-up on every timed group: each new sequence length can cost a one-off kernel
    # plan (cuDNN attention on GPU), which a long run pays once per length
    times = common.time_steps(lambda i: group_step(enc[1 + i]), groups, warmup=groups)
    flops = [common.flops_grpo_release_group(cfg, G, len(enc[1 + i].prompt_ids),
                                             len(enc[1 + i].target_ids)) for i in range(groups)]
    return _summary("torch (release way)", dtype, 1, times,
                    {"padding_share": 0.0, "precision": common.precision_note("torch", dtype, "cast"),
                     "passes": "one group of G rows: latent pass + log-prob pass without grad, "
                               "then both again with grad to LatentRATT",
                     **_flops(flops, times)})


def bench_torch_same_passes(tok, enc, dtype: str, prompts: int, steps: int, cfg=None,
                            device: str = "cpu", one_shape: bool = False) -> dict:
    """The engine comparison: torch_reference.shared_prefix_grpo_step on the batches the
    JAX row of `prompts` prompts times (grpo_batches), every shape warmed up first."""
    import torch
    import torch_reference as ref

    if device == "cpu":
        torch.set_num_threads(2)
    common.torch_strict_fp32()
    cfg = cfg or bench_config(vocab_size=tok.vocab_size)
    model = ref.build_causal_lm(cfg).to(device).eval()         # float32 weights
    for p in model.parameters():
        p.requires_grad_(False)
    ratt = ref.LatentRATT(cfg.hidden_size).to(device)
    opt = torch.optim.AdamW(ratt.parameters(), lr=5e-5)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    batches = grpo_batches(tok, enc, prompts, one_shape)
    timed = [ref.to_torch(b, device) for b in batches[:steps]]
    keys = ("prompt_ids", "prompt_mask", "target_ids", "target_mask")
    timed = [{k: b[k] for k in keys} for b in timed]

    def run(b):
        ref.shared_prefix_grpo_step(model, ratt, opt, b, G=G, sigma=1.5, generator=gen,
                                    autocast_dtype=common.autocast_dtype(dtype))
        sync()
    seen = set()
    for b in timed:  # one untimed step per shape, as JAX compiles each shape untimed
        key = (tuple(b["prompt_ids"].shape), tuple(b["target_ids"].shape))
        if key not in seen:
            seen.add(key)
            run(b)
    times = common.time_steps(lambda i: run(timed[i]), len(timed))
    return _summary("torch (same passes as jax)", dtype, prompts, times,
                    {"precision": common.precision_note("torch", dtype),
                     "passes": "prompt once into a KV cache (no grad), LatentRATT, G suffixes "
                               "fwd+bwd, rollout fused in (as the JAX row)",
                     **_flops([_batch_flops(cfg, b, True) for b in batches[:steps]], times)})


def check_parity(tok, enc, cfg) -> dict:
    """Our JAX target log-probs (shared prefix) against the torch same-passes forward, same
    weights and noise, float32 at highest precision. (That forward matches the release's
    full passes: tests/test_bench_reference.py.)"""
    import torch
    import torch_reference as ref
    from latentr3_jax.train.grpo import rollout

    common.torch_strict_fp32()
    params = latent_lib.init_model_params(cfg, jax.random.PRNGKey(0))
    b = grpo_batches(tok, enc, 2)[0]
    n, d = b["prompt_ids"].shape[0], cfg.hidden_size
    noise = 1.5 * np.random.default_rng(0).standard_normal((n, G, d)).astype(np.float32)
    noise[:, 0] = 0
    with common.jax_precision("float32"):
        jl, _ = rollout.group_logprobs(cfg, params, *(jnp.asarray(b[k]) for k in (
            "prompt_ids", "prompt_mask", "target_ids", "target_mask")), jnp.asarray(noise))
    jl = np.asarray(jl)
    model = ref.build_causal_lm(cfg).eval()
    ref.load_jax_params(model, cfg, jax.device_get(params))
    ratt = ref.LatentRATT(d)
    ref.load_jax_latent(ratt, jax.device_get(params["latent"]))
    tb = {k: torch.from_numpy(np.asarray(b[k])) for k in ("prompt_ids", "prompt_mask",
                                                          "target_ids", "target_mask")}
    tl = ref.shared_prefix_logprobs(model, ratt, tb, torch.from_numpy(noise)).numpy()
    m = np.repeat(b["target_mask"], G, axis=0).astype(bool)
    return {"rows": int(n * G), "max_abs_diff_jax_vs_torch_same_passes": float(np.abs(jl - tl)[m].max())}


# --------------------------------------------------------------------------- reward curve


def reward_curves(steps: int) -> dict:
    """SFT on the synthetic dataset, then GRPO with each estimator from the same start."""
    logging.disable(logging.WARNING)
    root = tempfile.mkdtemp(prefix="bench_grpo_")

    def cfg_for(workdir):
        c = base_config()
        c.workdir = os.path.join(root, workdir)
        c.dataset_dir = os.path.join(root, "synthetic")
        c.data.synthetic.num_items = 200
        c.data.synthetic.num_users = 400
        c.data.buckets = (128, 192)
        c.data.target_buckets = (24,)
        c.data.max_target_len = 24
        c.data.max_eval_rows = 32
        c.tokenizer.vocab_size = 1000
        c.model.hidden_size = 64
        c.model.intermediate_size = 128
        c.model.num_layers = 2
        c.sft.batch_size = 16
        c.sft.learning_rate = 3e-3
        c.sft.warmup_steps = 5
        c.sft.epochs = 1
        c.sft.max_steps = 30
        c.sft.log_every = 20
        return c

    t0 = time.perf_counter()
    sft = train_sft(cfg_for("sft"), progress=False)
    out = {"sft": {"steps": sft["steps"], "final_loss": sft["final_loss"],
                   "seconds": time.perf_counter() - t0}, "runs": {}}
    for name, est, lr in ESTIMATOR_RUNS:
        c = cfg_for(f"grpo_{est}_{lr:g}")
        c.grpo.init_from = os.path.join(root, "sft")
        c.grpo.estimator = est
        c.grpo.prompts_per_batch = 8
        c.grpo.max_steps = steps
        c.grpo.warmup_steps = 2
        c.grpo.learning_rate = lr
        c.grpo.log_every = 10
        c.grpo.checkpoint_every = 1000
        c.grpo.evaluate = False
        t0 = time.perf_counter()
        s = grpo.train_grpo(c, progress=False)
        out["runs"][name] = {
            "lr": lr, "seconds": time.perf_counter() - t0,
            "reward_eps0": [r["reward_eps0"] for r in s["curve"]],
            "reward_mean": [r["reward_mean"] for r in s["curve"]],
            "valid_reward_start": s["valid_reward_start"], "valid_reward_end": s["valid_reward_end"]}
    out["fixed_batch"] = fixed_batch_curves(os.path.join(root, "sft"))
    return out


def fixed_batch_curves(sft_dir: str, steps: int = 30) -> dict:
    """Each estimator on one fixed batch of 8 train prompts from the SFT model: the
    noise-free reward of that same batch every 5 steps (no batch-to-batch noise)."""
    art = runs.load_run(sft_dir)
    ds = data.load_dataset(art.config)
    enc = data.encode_split(art.tokenizer, ds.splits["train"][:8], ds.category_word, "latentr3",
                            512, max_target_len=24)
    it = data.BatchIterator(enc, 8, buckets=(192,), target_buckets=(24,),
                            pad_id=art.tokenizer.pad_id, shuffle=False, process_index=0,
                            process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iter(it.epoch(0))).items()
             if k in loop.DEVICE_KEYS}
    out = {}
    for name, est, lr in ESTIMATOR_RUNS:
        s = grpo.GRPOSettings(group_size=G, sigma=1.5, estimator=est)
        mask = optim.latent_only(art.params)
        tx = optim.adamw(optax.constant_schedule(lr), trainable=lambda _, m=mask: m)
        state = state_lib.new_state(art.params, tx, jax.random.PRNGKey(1))
        step = jax.jit(step_lib.make_step_fn(grpo.make_fused_loss(art.model_config, s), tx))
        curve = []
        for i in range(steps + 1):
            state, m = step(state, batch)
            if i % 5 == 0:
                curve.append(float(m["reward_eps0"]))
        out[name] = {"every": 5, "reward_eps0": curve}
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed JAX batches")
    ap.add_argument("--groups", type=int, default=12, help="timed torch groups")
    ap.add_argument("--curve-steps", type=int, default=60)
    ap.add_argument("--shape", default="small", choices=("small", "smollm2-135m"))
    ap.add_argument("--one-shape", action="store_true",
                    help="time only batches of the commonest padded shape (one compile per "
                         "row; the default for shapes other than small)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default="", help="default bench/results/grpo.json (grpo_<shape>.json)")
    args = ap.parse_args()
    if args.shape != "small":
        if not common.have_smollm2():
            print(f"skipped: {common.smollm2_missing()}")
            return 0
        args.skip_curve = True   # the learning part does not depend on the shape
        args.one_shape = True    # a compile per padded shape costs minutes at this size
    result = {"machine": {**common.machine(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "speed": []}
    out = args.out or os.path.join(common.RESULTS, "grpo.json" if args.shape == "small"
                                   else f"grpo_{args.shape}.json")
    previous = read_json(out) if os.path.exists(out) else {}
    if args.skip_speed:  # keep the parts of an earlier run that are not measured again
        for key in ("speed", "data", "peak", "parity", "model", "shape"):
            if key in previous:
                result[key] = previous[key]
    if args.skip_curve and "reward_curves" in previous:
        result["reward_curves"] = previous["reward_curves"]
    if not args.skip_speed:
        speed_part(args, result)
    if not args.skip_curve:
        curves = reward_curves(args.curve_steps)
        result["reward_curves"] = curves
    if "reward_curves" in result:
        curves = result["reward_curves"]
        print(f"\nSFT on synthetic data: {curves['sft']['steps']} steps, loss "
              f"{curves['sft']['final_loss']:.3f}")
        print("noise-free train reward, mean of each block of 10 steps (batches differ, so "
              "single steps are noisy), and the mean valid reward before -> after:")
        for est, run in curves["runs"].items():
            c = np.asarray(run["reward_eps0"])
            blocks = [float(c[i:i + 10].mean()) for i in range(0, len(c), 10)]
            pts = ", ".join(f"{x:.2f}" for x in blocks)
            print(f"  {est:<20} {pts};  valid {run['valid_reward_start']:.3f} -> "
                  f"{run['valid_reward_end']:.3f}")
        if "fixed_batch" in curves:
            print("one fixed batch of 8 train prompts, its noise-free reward every 5 steps:")
            for est, run in curves["fixed_batch"].items():
                print(f"  {est:<20} " + ", ".join(f"{x:.2f}" for x in run["reward_eps0"]))
    common.write_result(out, result)
    return 0


def speed_part(args, result) -> None:
    tok, enc, source = cds_prompts(tokenizer="smollm2" if args.shape == "smollm2-135m" else "bpe")
    cfg = common.shape_config(args.shape, tok.vocab_size)
    # what `latentr3 grpo` runs for this model and backend (model.scan_layers=auto)
    cfg = cfg.with_execution(scan_layers=setup.scan_layers_option("auto", cfg.num_layers))
    lens = [len(e.prompt_ids) for e in enc]
    tl = [len(e.target_ids) for e in enc]
    result["shape"], result["model"] = args.shape, cfg.to_dict()
    result["scan_layers"] = bool(cfg.scan_layers)
    result["weights"] = "random (seed 0): a step's time does not depend on their values"
    result["data"] = {"source": source, "vocab_size": tok.vocab_size, "rows": len(enc),
                      "prompt_tokens_mean": float(np.mean(lens)), "target_tokens_mean": float(np.mean(tl))}
    print(f"data: {source}, vocab {tok.vocab_size}, prompt tokens {np.mean(lens):.1f}, "
          f"target tokens {np.mean(tl):.1f}; shape {args.shape}")
    peaks = {"jax": {d: common.peak("jax", d) for d in common.DTYPES}}
    if not args.skip_torch:
        import torch  # after OMP_WAIT_POLICY; its peak with the threads its rows use
        torch.set_num_threads(2)
        peaks["torch"] = {d: common.peak("torch", d) for d in common.DTYPES}
        result["parity"] = check_parity(tok, enc, cfg)
        print(f"parity: JAX vs torch same-passes target log-probs, max |diff| "
              f"{result['parity']['max_abs_diff_jax_vs_torch_same_passes']:.2e}")
    for dtype in common.DTYPES:
        for prompts in (1, 8):
            result["speed"].append(bench_jax(tok, enc, dtype, prompts, args.steps if prompts > 1
                                             else 2 * args.steps, cfg=cfg, one_shape=args.one_shape))
            print(result["speed"][-1])
        if dtype == "float32":
            result["speed"].append(bench_jax(tok, enc, dtype, 8, args.steps, fuse=False, cfg=cfg,
                                             one_shape=args.one_shape))
            print(result["speed"][-1])
        if not args.skip_torch:
            result["speed"].append(bench_torch(tok, enc, dtype, args.groups, cfg=cfg))
            print(result["speed"][-1])
            result["speed"].append(bench_torch_same_passes(tok, enc, dtype, 8, args.steps, cfg=cfg,
                                                           one_shape=args.one_shape))
            print(result["speed"][-1])
    for engine, pk in peaks.items():
        common.remeasure_peaks(pk, engine)
    result["peak"] = peaks
    compare_rows(result["speed"], peaks)
    print_speed(result["speed"], peaks)


def compare_rows(rows: list, peaks: dict) -> None:
    """Each row's fraction of its engine's peak, and the two comparisons: every row
    against the release way (whole method), and the JAX fused 8-prompt row against torch
    running the same passes on the same batches (engine only)."""
    for r in rows:
        engine = "torch" if r["impl"].startswith("torch") else "jax"
        if engine in peaks:
            common.set_peak(r, peaks[engine][r["dtype"]])
        rel = [x for x in rows if x["impl"] == "torch (release way)" and x["dtype"] == r["dtype"]]
        same = [x for x in rows if x["impl"] == "torch (same passes as jax)" and x["dtype"] == r["dtype"]]
        r["speedup_vs_torch"] = None if not rel else r["prompts_per_s"] / rel[0]["prompts_per_s"]
        r["speedup_vs_torch_best"] = None if not rel else \
            r["prompts_per_s_best"] / rel[0]["prompts_per_s_best"]
        r["speedup_vs_torch_same_passes"] = None
        if same and r["impl"] == "jax" and r["prompts_per_batch"] == same[0]["prompts_per_batch"]:
            r["speedup_vs_torch_same_passes"] = r["prompts_per_s"] / same[0]["prompts_per_s"]


def print_speed(rows: list, peaks: dict) -> None:
    f = lambda x: "n/a" if x is None else f"{x:.2f}x"
    print(f"\n{'impl':<27}{'dtype':<10}{'prompts':>8}{'prompts/s':>11}{'(best)':>9}"
          f"{'FLOP/s':>9}{'peak':>6}{'vs release':>11}{'vs same passes':>15}")
    for r in rows:
        pct = f"{100 * r['fraction_of_peak']:.0f}%" if r.get("fraction_of_peak") else "n/a"
        print(f"{r['impl']:<27}{r['dtype']:<10}{r['prompts_per_batch']:>8}"
              f"{r['prompts_per_s']:>11.2f}{r['prompts_per_s_best']:>9.2f}"
              f"{common.fmt_flops(r.get('flops_per_s')):>9}{pct:>6}"
              f"{f(r.get('speedup_vs_torch')):>11}{f(r.get('speedup_vs_torch_same_passes')):>15}")
    for engine, pk in peaks.items():
        for d, p in pk.items():
            print(f"peak {engine} {d}: {common.fmt_flops(p['peak_flops_per_s'])}FLOP/s ({p['peak_source']})")


if __name__ == "__main__":
    sys.exit(main())
