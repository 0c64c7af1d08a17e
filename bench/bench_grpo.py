"""LR-GRPO step throughput (SPEC.md section 9) and a short reward curve on synthetic data.

Part 1, speed: prompts/s of one GRPO step with G = 8 for the standard small config
(Qwen2-style, hidden 256, MLP 1024, 4 layers, 4/2 heads, tied, BPE vocab 8,000 + 1 trained on
the CDs catalog and prompts; real CDs train prompts), float32 and bfloat16:
  * jax: this project's step (prompt prefix once per prompt into a KV cache, G suffixes
    [r_k, target]; rollout pass + one forward/backward update), prompts per batch 1 and 8;
  * torch: the release's way with transformers, one prompt's group of 8 sequences at a
    time: rollout (latent pass + log-prob pass, no grad) then the loss (latent pass +
    log-prob pass, backward into LatentRATT), LLM frozen; torch.set_num_threads(2).
Part 2, learning: an SFT run on the synthetic dataset, then short GRPO runs with each
estimator, printing the noise-free reward per step.

    python bench/bench_grpo.py [--steps 6] [--skip-torch] [--skip-curve]
Writes bench/results/grpo.json.
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


def cds_prompts(vocab_size: int = 8000, rows: int = 256):
    """(tokenizer, encoded train rows) for real CDs prompts, or synthetic ones if absent."""
    if common.have_cds():
        ds = data.read_d3(common.CDS)
        source = "CDs_and_Vinyl"
    else:
        ds = data.read_d3(write_synthetic(tempfile.mkdtemp(), num_items=600, num_users=1500, seed=0))
        source = "synthetic (CDs data absent)"
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


def bench_jax(tok, enc, dtype: str, prompts: int, steps: int, fuse: bool = True, cfg=None,
              one_shape: bool = False) -> dict:
    """`cfg`: the decoder shape (default SPEC.md section 9's). `one_shape`: time only the
    batches of the commonest padded shape (one compile; for large models)."""
    cfg = cfg or bench_config(vocab_size=tok.vocab_size)
    params = latent_lib.init_model_params(cfg, jax.random.PRNGKey(0))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    settings = grpo.GRPOSettings(group_size=G, sigma=1.5, fuse=fuse, dtype=common.jax_dtype(dtype))
    mask = optim.latent_only(params)
    tx = optim.adamw(optim.cosine_warmup(5e-5, 10, 1000), trainable=lambda _: mask)
    state, sh = state_lib.create_sharded_state(None, latent_lib.model_param_axes(cfg), tx,
                                               jax.random.PRNGKey(1), mesh, params=params)
    step = grpo.GRPOStep(cfg, settings, tx, mesh, sh)
    it = data.BatchIterator(enc, prompts, buckets=(64, 96, 128, 160, 192, 256),
                            target_buckets=(16, 32), pad_id=tok.pad_id, seed=0, shuffle=True,
                            drop_last=True, process_index=0, process_count=1)
    batches = list(it.epoch(0))
    if one_shape:
        key_of = lambda b: (b["prompt_ids"].shape, b["target_ids"].shape)
        commonest = collections.Counter(map(key_of, batches)).most_common(1)[0][0]
        batches = [b for b in batches if key_of(b) == commonest]
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
                    {"padding_share": 1 - real_tokens / padded_tokens})


# --------------------------------------------------------------------------- torch


def bench_torch(tok, enc, dtype: str, groups: int, cfg=None, device: str = "cpu") -> dict:
    """`cfg`: the decoder shape (default SPEC.md section 9's); `device`: cpu (2 threads) or cuda."""
    import torch  # optional, heavy, and only after OMP_WAIT_POLICY is set
    import torch_reference as ref

    if device == "cpu":
        torch.set_num_threads(2)
    tdtype = common.torch_dtype(dtype)
    cfg = cfg or bench_config(vocab_size=tok.vocab_size)
    d = cfg.hidden_size
    model = ref.build_qwen2(cfg, tdtype).to(device).eval()   # seeds torch with 0
    for p in model.parameters():
        p.requires_grad_(False)
    ratt = ref.LatentRATT(d).to(tdtype).to(device)
    opt = torch.optim.AdamW(ratt.parameters(), lr=5e-5)
    thought = tok.thought_id
    embed = model.get_input_embeddings()

    def passes(ids, P, T, noise):
        """The release's two full passes: latent pass, then log-prob pass with r_k in the slot."""
        out = model(input_ids=ids, output_hidden_states=True)
        positions = torch.arange(P, device=device)[None].expand(G, -1)     # no padding
        r = ratt(out.hidden_states[-1][:, :P], torch.ones_like(positions), positions)
        emb = embed(ids).clone()
        emb[:, P] = r + noise
        logits = model(inputs_embeds=emb).logits[:, P:P + T].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, P + 1:P + 1 + T, None])[..., 0]
        return logp

    def group_step(e):
        prompt, target = e.prompt_ids, e.target_ids
        P, T = len(prompt), len(target)
        ids = torch.tensor([prompt + [thought] + target] * G, device=device)
        noise = 1.5 * torch.randn(G, d, dtype=tdtype, device=device)
        noise[0] = 0
        with torch.no_grad():                       # rollout: rewards and old log-probs
            old = passes(ids, P, T, noise)
            s = -torch.exp(-old.mean(1))
        adv = s - s[0]                              # one group = the whole batch here
        adv = adv / (adv.norm() + 1e-6)
        logp = passes(ids, P, T, noise)             # loss: same passes with gradient
        ratio = torch.exp(logp - old)
        loss = -torch.min(ratio * adv[:, None],
                          ratio.clamp(0.8, 1.28) * adv[:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    # warm-up on every timed group: each new sequence length can cost a one-off kernel
    # plan (cuDNN attention on GPU), which a long run pays once per length
    times = common.time_steps(lambda i: group_step(enc[1 + i]), groups, warmup=groups)
    return _summary("torch (release way)", dtype, 1, times, {"padding_share": 0.0})


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
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    result = {"machine": {**common.machine(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "speed": []}
    out = os.path.join(common.RESULTS, "grpo.json")
    previous = read_json(out) if os.path.exists(out) else {}
    if args.skip_speed:  # keep the parts of an earlier run that are not measured again
        result["speed"] = previous.get("speed", [])
        result["data"] = previous.get("data")
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
    tok, enc, source = cds_prompts()
    lens = [len(e.prompt_ids) for e in enc]
    tl = [len(e.target_ids) for e in enc]
    result["data"] = {"source": source, "vocab_size": tok.vocab_size, "rows": len(enc),
                      "prompt_tokens_mean": float(np.mean(lens)), "target_tokens_mean": float(np.mean(tl))}
    print(f"data: {source}, vocab {tok.vocab_size}, prompt tokens {np.mean(lens):.1f}, "
          f"target tokens {np.mean(tl):.1f}")
    for dtype in common.DTYPES:
        for prompts in (1, 8):
            result["speed"].append(bench_jax(tok, enc, dtype, prompts, args.steps if prompts > 1
                                             else 2 * args.steps))
            print(result["speed"][-1])
        if dtype == "float32":
            result["speed"].append(bench_jax(tok, enc, dtype, 8, args.steps, fuse=False))
            print(result["speed"][-1])
        if not args.skip_torch:
            result["speed"].append(bench_torch(tok, enc, dtype, args.groups))
            print(result["speed"][-1])
    print(f"\n{'impl':<27}{'dtype':<10}{'prompts/batch':>14}{'prompts/s':>11}{'(best)':>9}"
          f"{'s/prompt':>10}{'vs torch':>10}{'(best)':>8}")
    for r in result["speed"]:
        ref = [x for x in result["speed"] if x["impl"].startswith("torch") and x["dtype"] == r["dtype"]]
        r["speedup_vs_torch"] = None if not ref else r["prompts_per_s"] / ref[0]["prompts_per_s"]
        r["speedup_vs_torch_best"] = None if not ref else \
            r["prompts_per_s_best"] / ref[0]["prompts_per_s_best"]
        ratio = "n/a" if not ref else f"{r['speedup_vs_torch']:.2f}x"
        ratio_b = "n/a" if not ref else f"{r['speedup_vs_torch_best']:.2f}x"
        print(f"{r['impl']:<27}{r['dtype']:<10}{r['prompts_per_batch']:>14}"
              f"{r['prompts_per_s']:>11.2f}{r['prompts_per_s_best']:>9.2f}"
              f"{r['s_per_prompt']:>10.3f}{ratio:>10}{ratio_b:>8}")


if __name__ == "__main__":
    sys.exit(main())
