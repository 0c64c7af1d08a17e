"""SFT step throughput: JAX LatentR³ (prefix-cached) vs the release's two passes in torch,
and the same-work plain step (JAX decoder vs transformers Qwen2ForCausalLM).

SPEC.md section 9 setup: hidden 256, MLP 1024, 4 layers, 4/2 heads, tied, BPE vocab ~8001
trained on the CDs catalog and prompts, real CDs train prompts, batch 8, float32 and
bfloat16, 2 threads. `--shape smollm2-135m` times SmolLM2-135M's shape instead (30 layers,
hidden 576, 9/3 heads, vocab 49,152 + 1), on prompts tokenized by its own tokenizer (read
from ../shared/models; random weights: a step's time does not depend on their values).
Each engine runs in its own process (XLA flags are per process) and measures its own
matmul peak there (bench/common.py); the two processes take turns (one runs at a time,
their timed steps alternate: common.run_workers_in_turns), and every row has its FLOP
count, FLOP/s and fraction of that peak. float32 is true float32 on both sides (common.jax_precision, torch TF32 off).
Both processes start with the host setting `latentr3` would start this model with
(cpu_alloc.hugepage_env: glibc malloc on transparent huge pages above 32M parameters;
recorded as host_env).
The parent prints a table and writes bench/results/sft.json (sft_<shape>.json).

  python bench/bench_sft.py                  # main table
  python bench/bench_sft.py --shape smollm2-135m --steps 5
  python bench/bench_sft.py --investigate    # + XLA flag / formulation / allocator variants
  python bench/bench_sft.py --investigate --variants scan_layers,plain_bf16_einsum
"""

from __future__ import annotations

import argparse
import gc
import os
import string
import sys
import tempfile
import time
from typing import Optional

import numpy as np

import common
from latentr3_jax import data  # (neither this nor cpu_alloc loads JAX)
from latentr3_jax.utils import cpu_alloc

# JAX, torch and the latentr3_jax modules that load JAX are imported inside the functions
# that use them: each worker process runs one engine, and the JAX worker sets its allocator
# policy (cpu_alloc) before XLA starts.

BATCH = 8
NUM_BATCHES = 4


# --------------------------------------------------------------------------- data


def make_batches(out_path: str, batch: int = BATCH, num_batches: int = NUM_BATCHES,
                 tokenizer: str = "bpe") -> dict:
    """`num_batches` batches of `batch` real CDs train prompts, padded to one (P, T); or
    synthetic lengths with the same statistics when the data is absent. `tokenizer`:
    'bpe' (8,000 + 1 ids trained here on the CDs catalog and prompts) or 'smollm2'
    (SmolLM2's own, from ../shared/models)."""
    rng = np.random.default_rng(0)
    info = {"tokenizer": tokenizer}
    n = batch * num_batches
    if common.have_cds():
        ds = data.read_d3(common.CDS)
        train = ds.splits["train"]
        if tokenizer == "smollm2":
            tok = common.smollm2_tokenizer()
            how = "SmolLM2-135M's tokenizer (+ <|Thought|>)"
        else:
            tok = data.train_tokenizer(data.tokenizer_corpus(ds, "latentr3"), 8001)
            how = "byte-level BPE trained on CDs catalog + train prompts"
        enc = data.encode_split(tok, train, ds.category_word, "latentr3", 512)
        rows = rng.choice(len(enc), n, replace=False)
        prompts = [enc[i].prompt_ids for i in rows]
        targets = [enc[i].target_ids for i in rows]
        vocab, pad, thought = tok.vocab_size, tok.pad_id, tok.thought_id
        info.update(data=f"CDs_and_Vinyl train prompts, {how}",
                    mean_prompt_all=float(np.mean([len(e.prompt_ids) for e in enc])),
                    mean_target_all=float(np.mean([len(e.target_ids) for e in enc])))
    else:
        vocab = 49153 if tokenizer == "smollm2" else 8001
        pad, thought = 0, vocab - 1
        plen = np.clip(rng.normal(97, 25, n), 40, 200).astype(int)
        tlen = np.clip(rng.normal(7.5, 2.5, n), 3, 20).astype(int)
        prompts = [list(rng.integers(1, vocab - 1, k)) for k in plen]
        targets = [list(rng.integers(1, vocab - 1, k)) for k in tlen]
        info.update(data="synthetic lengths (CDs data absent): prompts ~N(97, 25), targets ~N(7.5, 2.5)")
    P = int(max(len(p) for p in prompts))
    T = int(max(len(t) for t in targets))
    P, T = -(-P // 8) * 8, -(-T // 4) * 4
    pi = np.full((n, P), pad, np.int32); pm = np.zeros((n, P), np.int32)
    ti = np.full((n, T), pad, np.int32); tm = np.zeros((n, T), np.int32)
    for j, (p, t) in enumerate(zip(prompts, targets)):
        pi[j, P - len(p):], pm[j, P - len(p):] = p, 1
        ti[j, :len(t)], tm[j, :len(t)] = t, 1
    np.savez(out_path, prompt_ids=pi, prompt_mask=pm, target_ids=ti, target_mask=tm,
             vocab=vocab, thought=thought)
    info.update(vocab=int(vocab), padded_prompt_len=P, padded_target_len=T,
                mean_prompt=float(pm.sum(1).mean()), mean_target=float(tm.sum(1).mean()),
                tokens_per_batch=float((pm.sum() + tm.sum()) / num_batches))
    return info


def load_batches(path: str, batch: int = BATCH, num_batches: Optional[int] = None):
    """(list of batch dicts, vocab size, thought id) from a `make_batches` file (all of
    its batches unless `num_batches`)."""
    z = np.load(path)
    out = []
    if num_batches is None:
        num_batches = len(z["prompt_ids"]) // batch
    for b in range(num_batches):
        s = slice(b * batch, (b + 1) * batch)
        out.append({k: z[k][s] for k in ("prompt_ids", "prompt_mask", "target_ids", "target_mask")})
    return out, int(z["vocab"]), int(z["thought"])


def time_batches(run, batches, steps: int, warmup: int = 2) -> dict:
    """step_stats of `run(i)` cycling over the batches (call i runs batch i mod n)."""
    times = common.time_steps(lambda i: run(i % len(batches)), steps, warmup)
    return common.step_stats(times, common.batch_tokens(batches))


def time_train_step(step, state, batches, steps: int, warmup: int = 2, inputs=None) -> dict:
    """`time_batches` of a TrainStep from `state`, plus compile_s (the first call, on batch
    0). `inputs`: what the step is fed (default: the batches; e.g. device copies)."""
    import jax

    inputs = batches if inputs is None else inputs
    holder = {"state": state}

    def run(i):
        holder["state"], m = step(holder["state"], inputs[i])
        jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    run(0)
    compile_s = time.perf_counter() - t0
    return {**time_batches(run, batches, steps, warmup), "compile_s": compile_s}


def step_flops(config, batches, kind: str, engine: str) -> float:
    """FLOPs of one step on the first batch's padded shape (all batches share it):
    common.flops_sft_prefix (ours) / flops_sft_release (the release's two passes) for the
    LatentR³ step, common.flops_plain for the plain one."""
    B, P = batches[0]["prompt_ids"].shape
    T = batches[0]["target_ids"].shape[1]
    if kind == "plain":
        return common.flops_plain(config, B, P, T)
    return (common.flops_sft_prefix if engine == "jax" else common.flops_sft_release)(config, B, P, T)


# --------------------------------------------------------------------------- workers


def plain_loss(config, dtype):
    """The same-work loss: one pass over [prompt, target], token-mean CE on the targets."""
    import jax.numpy as jnp
    from latentr3_jax.model import decoder, latent

    def loss_fn(params, b, rng):
        ids = jnp.concatenate([b["prompt_ids"], b["target_ids"]], 1)
        mask = jnp.concatenate([b["prompt_mask"], b["target_mask"]], 1)
        P, T = b["prompt_ids"].shape[1], b["target_ids"].shape[1]
        logits, _, _ = decoder.apply(config, params, ids, attention_mask=mask, dtype=dtype)
        return (*latent.target_cross_entropy(logits[:, P - 1:P - 1 + T], b["target_ids"],
                                             b["target_mask"]), {})
    return loss_fn


def make_train_step(config, mesh, kind: str, dtype):
    """(state, TrainStep) of the benchmarked step: kind 'latent' (LatentR³ N=1 SFT) or
    'plain', AdamW with clipping, params created sharded on `mesh`."""
    import jax
    from latentr3_jax.model import latent
    from latentr3_jax.train import optim, state as state_lib
    from latentr3_jax.train.sft import make_sft_loss
    from latentr3_jax.train.step import TrainStep

    with_latent = kind == "latent"
    sched = optim.linear_warmup_decay(3e-4, 20, 1000)
    tx = optim.adamw(sched, grad_clip=1.0)
    st, sh = state_lib.create_sharded_state(
        lambda r: latent.init_model_params(config, r, with_latent),
        latent.model_param_axes(config, with_latent), tx, jax.random.PRNGKey(0), mesh)
    loss = make_sft_loss(config, num_thoughts=1, dtype=dtype) if with_latent \
        else plain_loss(config, dtype)
    return st, TrainStep(loss, tx, mesh, sh, schedule=sched)


def worker_jax(args) -> dict:
    batches, vocab, thought = load_batches(args.batches)
    shape_config = common.shape_config(args.shape, vocab)
    # what `latentr3` does at start-up: heap reuse for small models ($LATENTR3_CPU_MALLOC)
    cpu_alloc.configure(num_params=shape_config.num_params())
    import jax
    import jax.numpy as jnp
    from latentr3_jax.model import decoder, mixed
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import setup

    if args.variant == "attn_dpa":
        def dpa(config, q, k, v, bias):  # XLA's fused dot_product_attention, GQA native
            return jax.nn.dot_product_attention(q, k, v, bias=bias[:, None], implementation="xla")
        decoder.attention = dpa

    if args.variant == "naive_einsum":  # the batched-einsum projections decoder.py had before
        def einsum_dense(p, x, n_in=1):
            kernel, bias = p["kernel"], p.get("bias")
            lead = string.ascii_lowercase[:x.ndim - n_in]
            ins = string.ascii_uppercase[:n_in]
            outs = string.ascii_uppercase[n_in:kernel.ndim]
            y = jnp.einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, kernel.astype(x.dtype))
            return y if bias is None else y + bias.astype(x.dtype)
        decoder.dense = einsum_dense

    if args.variant == "plain_bf16_einsum":  # bf16 dots without the float32-accumulate VJP
        def plain(spec, a, b, out_dtype=None, bias=None):
            y = jnp.einsum(spec, a, b.astype(a.dtype)).astype(out_dtype or a.dtype)
            return y if bias is None else y + bias.astype(y.dtype)
        mixed.einsum = plain

    # what `latentr3 sft` runs for this model (model.scan_layers=auto), unless a variant
    # forces the layer scan on or off
    config = shape_config.with_execution(
        scan_layers=args.variant == "scan_layers"
        if args.variant in ("scan_layers", "unrolled_layers")
        else setup.scan_layers_option("auto", shape_config.num_layers))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    res = {"peak": {}}

    for dname in args.dtypes.split(","):
        res["peak"][dname] = common.peak("jax", dname)
    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            with common.jax_precision(dname):
                st, step = make_train_step(config, mesh, kind, common.jax_dtype(dname))
                r = time_train_step(step, st, batches, args.steps)
            r.update(precision=common.precision_note("jax", dname), scan_layers=config.scan_layers,
                     **common.flop_fields(step_flops(config, batches, kind, "jax"), r["step_s"],
                                          res["peak"][dname]))
            res[f"{kind}/{dname}"] = r
            print(f"  jax[{args.variant}] {kind}/{dname}: {r['step_s'] * 1e3:.0f} ms", file=sys.stderr)
            del st, step   # the next row's heap does not stack on this one's (cpu_alloc)
            gc.collect()
            cpu_alloc.release()
    return _final_peaks(res, "jax")


def _final_peaks(res: dict, engine: str) -> dict:
    """Measure the peaks again now and refresh every row's fraction of peak."""
    common.remeasure_peaks(res["peak"], engine)
    for key, r in res.items():
        if "/" in key and isinstance(r, dict) and "flops_per_s" in r:
            common.set_peak(r, res["peak"][key.split("/")[1]])
    return res


def worker_torch(args) -> dict:
    import torch
    import torch_reference as ref
    torch.set_num_threads(args.threads)
    common.torch_strict_fp32()
    batches, vocab, thought = load_batches(args.batches)
    tb = [ref.to_torch(b) for b in batches]
    config = common.shape_config(args.shape, vocab)
    res = {"peak": {d: common.peak("torch", d) for d in args.dtypes.split(",")}}
    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            model = ref.build_causal_lm(config, attn_implementation=args.variant if args.variant in
                                        ("eager", "sdpa") else "sdpa")
            fn = ref.train_step_fn(kind, model, tb, thought, common.autocast_dtype(dname))
            r = time_batches(fn, batches, args.steps)
            r.update(precision=common.precision_note("torch", dname),
                     **common.flop_fields(step_flops(config, batches, kind, "torch"), r["step_s"],
                                          res["peak"][dname]))
            res[f"{kind}/{dname}"] = r
            print(f"  torch {kind}/{dname}: {r['step_s'] * 1e3:.0f} ms", file=sys.stderr)
    return _final_peaks(res, "torch")


def check_parity(batches_path: str, shape: str = "small") -> dict:
    """The torch release step computes the same loss as our JAX step (same weights, float32
    at highest precision on both sides)."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch_reference as ref
    from latentr3_jax.model import latent
    common.torch_strict_fp32()
    batches, vocab, thought = load_batches(batches_path)
    config = common.shape_config(shape, vocab)
    params = latent.init_model_params(config, jax.random.PRNGKey(0))
    b = batches[0]
    with common.jax_precision("float32"):
        logits, _ = latent.latent_forward(config, params, *(jnp.asarray(b[k]) for k in
                                          ("prompt_ids", "prompt_mask", "target_ids", "target_mask")))
        s, n = latent.target_cross_entropy(logits, jnp.asarray(b["target_ids"]),
                                           jnp.asarray(b["target_mask"]))
    model = ref.build_causal_lm(config)
    ref.load_jax_params(model, config, jax.device_get(params))
    ratt = ref.LatentRATT(config.hidden_size)
    ref.load_jax_latent(ratt, jax.device_get(params["latent"]))
    with torch.no_grad():
        tl = float(ref.release_forward_loss(model, ratt, ref.to_torch(b), thought))
    return {"jax_prefix_cached_loss": float(s / n), "torch_release_loss": tl,
            "abs_diff": abs(float(s / n) - tl)}


# --------------------------------------------------------------------------- driver


def _worker_spec(kind: str, batches: str, *, variant="default", xla_flags="", kinds="latent,plain",
                 dtypes="float32,bfloat16", steps=10, threads=2, env=None, shape="small") -> tuple:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    env["XLA_FLAGS"] = xla_flags
    return (__file__, [
        "--worker", kind, "--batches", batches, "--variant", variant, "--kinds", kinds,
        "--dtypes", dtypes, "--steps", str(steps), "--threads", str(threads),
        "--shape", shape], env)


def _run_worker(kind: str, batches: str, **kw) -> dict:
    return common.run_worker(*_worker_spec(kind, batches, **kw))


# (name, engine, XLA_FLAGS, code variant, dtypes, extra environment)
# latentr3_jax/utils/cpu_alloc.py's heap-reuse policy, for torch through glibc's tunables
MALLOC = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                            "glibc.malloc.trim_threshold=2147483647"}
VARIANTS = [
    ("scan_layers", "jax", "", "scan_layers", "float32,bfloat16", {}),
    ("unrolled_layers", "jax", "", "unrolled_layers", "float32,bfloat16", {}),
    ("plain_bf16_einsum", "jax", "", "plain_bf16_einsum", "bfloat16", {}),
    ("naive_einsum_projections", "jax", "", "naive_einsum", "float32", {}),
    ("no_thunk_runtime", "jax", "--xla_cpu_use_thunk_runtime=false", "default", "float32", {}),
    ("single_thread_eigen", "jax", "--xla_cpu_multi_thread_eigen=false", "default", "float32", {}),
    ("onednn", "jax", "--xla_cpu_use_onednn=true", "default", "float32", {}),
    ("no_xnnpack", "jax", "--xla_cpu_use_xnnpack=false", "default", "float32", {}),
    ("attn_dpa", "jax", "", "attn_dpa", "float32", {}),
    ("torch_eager_attn", "torch", "", "eager", "float32", {}),
    # the allocator policy: JAX with glibc's defaults, torch with latentr3's heap reuse
    ("jax_system_malloc", "jax", "", "default", "float32,bfloat16", {"LATENTR3_CPU_MALLOC": "system"}),
    ("torch_heap_reuse_malloc", "torch", "", "default", "float32,bfloat16", MALLOC),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--batches")
    ap.add_argument("--variant", default="default")
    ap.add_argument("--kinds", default="latent,plain")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="small", choices=("small", "smollm2-135m"))
    ap.add_argument("--turn-block", type=int, default=1, help="timed steps per turn: with "
                    "2 or more, each row also gives the median of steps that follow a step of "
                    "the same engine (back_to_back_step_s) and of steps that follow the other "
                    "engine's turn (after_turn_step_s)")
    ap.add_argument("--investigate", action="store_true")
    ap.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    ap.add_argument("--out", default="", help="default bench/results/sft.json (sft_<shape>.json)")
    args = ap.parse_args()
    if args.worker:
        common.take_turn()
        common.emit(worker_jax(args) if args.worker == "jax" else worker_torch(args))
        return
    if args.shape == "smollm2-135m" and not common.have_smollm2():
        print(f"skipped: {common.smollm2_missing()}")
        return
    out = args.out or os.path.join(common.RESULTS, "sft.json" if args.shape == "small"
                                   else f"sft_{args.shape}.json")

    tmp = tempfile.mkdtemp()
    bpath = os.path.join(tmp, "batches.npz")
    info = make_batches(bpath, tokenizer="smollm2" if args.shape == "smollm2-135m" else "bpe")
    print(f"data: {info['data']}; mean prompt {info['mean_prompt']:.1f}, target "
          f"{info['mean_target']:.1f} tokens; padded to P={info['padded_prompt_len']}, "
          f"T={info['padded_target_len']}; vocab {info['vocab']}")
    config = common.shape_config(args.shape, info["vocab"])
    result = {"info": info, "shape": args.shape, "model": config.to_dict(),
              "weights": "random (seed 0): a step's time does not depend on their values",
              "non_embedding_params": common.non_embedding_params(config),
              "threads": args.threads, "batch": BATCH, "steps": args.steps,
              "machine": common.machine()}
    result["parity"] = check_parity(bpath, args.shape)
    print(f"parity: JAX prefix-cached loss {result['parity']['jax_prefix_cached_loss']:.6f} vs "
          f"torch release two-pass {result['parity']['torch_release_loss']:.6f}")
    # the host setting `latentr3` starts a model this size with (cpu_alloc.hugepage_env:
    # malloc huge pages above 32M parameters), given to both engines alike
    start = cpu_alloc.hugepage_env(config.num_params(), dict(os.environ, JAX_PLATFORMS="cpu"),
                                   accelerator=False)
    host = {"GLIBC_TUNABLES": start["GLIBC_TUNABLES"]} if start else {}
    result["host_env"] = host
    # both engines in turns: their timed steps alternate, so the VM's drift hits both alike
    result["jax"], result["torch"] = common.run_workers_in_turns([
        _worker_spec("jax", bpath, steps=args.steps, shape=args.shape, env=host),
        _worker_spec("torch", bpath, steps=args.steps, threads=args.threads, shape=args.shape,
                     env=host)], block=args.turn_block)
    result["turn_block"] = args.turn_block
    result["timing"] = ("JAX and torch in two processes taking turns: one runs at a time, and "
                        "their timed steps alternate (bench/common.py, run_workers_in_turns)")
    if args.investigate:
        result["variants"] = {}
        chosen = [v for v in args.variants.split(",") if v]
        for name, engine, flags, code, dtypes, env in VARIANTS:
            if chosen and name not in chosen:
                continue
            result["variants"][name] = {"engine": engine, "xla_flags": flags, "code": code,
                                        "env": env, **_run_worker(
                engine, bpath, variant=code, xla_flags=flags, kinds="plain", dtypes=dtypes,
                steps=args.steps, threads=args.threads, env=env, shape=args.shape)}
    result["load_avg_end"] = os.getloadavg()

    rows = []
    for d in common.DTYPES:
        j, t = result["jax"].get(f"latent/{d}", {}), result["torch"].get(f"latent/{d}", {})
        jp, tp = result["jax"].get(f"plain/{d}", {}), result["torch"].get(f"plain/{d}", {})
        rows.append((f"LatentR3 SFT step N=1 ({d})", j, t))
        rows.append((f"plain fwd+bwd+AdamW ({d})", jp, tp))
    pct = lambda r: f"{100 * r['fraction_of_peak']:.0f}%" if r.get("fraction_of_peak") else "n/a"
    print(f"\n{'step':<36}{'JAX ms':>8}{'tok/s':>7}{'FLOP/s':>8}{'peak':>6}"
          f"{'torch ms':>9}{'tok/s':>7}{'FLOP/s':>8}{'peak':>6}{'JAX/torch':>10}")
    table = []
    for name, j, t in rows:
        if "step_s" not in j or "step_s" not in t:
            continue
        ratio = j["tokens_per_s"] / t["tokens_per_s"]
        table.append({"step": name, "jax_ms": j["step_s"] * 1e3, "jax_tokens_per_s": j["tokens_per_s"],
                      "jax_flops_per_s": j.get("flops_per_s"),
                      "jax_fraction_of_peak": j.get("fraction_of_peak"),
                      "torch_ms": t["step_s"] * 1e3, "torch_tokens_per_s": t["tokens_per_s"],
                      "torch_flops_per_s": t.get("flops_per_s"),
                      "torch_fraction_of_peak": t.get("fraction_of_peak"),
                      "speedup": ratio})
        print(f"{name:<36}{j['step_s'] * 1e3:>8.0f}{j['tokens_per_s']:>7.0f}"
              f"{common.fmt_flops(j.get('flops_per_s')):>8}{pct(j):>6}"
              f"{t['step_s'] * 1e3:>9.0f}{t['tokens_per_s']:>7.0f}"
              f"{common.fmt_flops(t.get('flops_per_s')):>8}{pct(t):>6}{ratio:>9.2f}x")
        for kind in ("back_to_back", "after_turn"):   # --turn-block > 1
            k = f"{kind}_step_s"
            if k in j and k in t:
                table[-1][f"jax_{k}"], table[-1][f"torch_{k}"] = j[k], t[k]
                table[-1][f"speedup_{kind}"] = t[k] / j[k]
                print(f"  {kind.replace('_', '-')} steps: JAX {j[k] * 1e3:.0f} ms, torch "
                      f"{t[k] * 1e3:.0f} ms, {t[k] / j[k]:.2f}x")
    for eng in ("jax", "torch"):
        for d, pk in result[eng].get("peak", {}).items():
            print(f"peak {eng} {d}: {common.fmt_flops(pk['peak_flops_per_s'])}FLOP/s ({pk['peak_source']})")
        if "error" in result[eng]:
            print(f"{eng}: ERROR {result[eng]['error']}")
    result["table"] = table
    if args.investigate:
        ms = lambda e, k: result[e].get(k, {}).get("step_s", float("nan")) * 1e3
        print(f"\nplain step variants, ms (defaults: JAX {ms('jax', 'plain/float32'):.0f} fp32 / "
              f"{ms('jax', 'plain/bfloat16'):.0f} bf16, torch {ms('torch', 'plain/float32'):.0f} / "
              f"{ms('torch', 'plain/bfloat16'):.0f}):")
        for name, v in result["variants"].items():
            cells = "  ".join(f"{k}: {v[k]['step_s'] * 1e3:.0f}" for k in ("plain/float32", "plain/bfloat16")
                              if isinstance(v.get(k), dict))
            print(f"  {name:<26}{cells or v.get('error', '')}")
    common.write_result(out, result)


if __name__ == "__main__":
    main()
