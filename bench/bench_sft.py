"""SFT step throughput: JAX LatentR³ (prefix-cached) vs the release's two passes in torch,
and the same-work plain step (JAX decoder vs transformers Qwen2ForCausalLM).

SPEC.md section 9 setup: hidden 256, MLP 1024, 4 layers, 4/2 heads, tied, BPE vocab ~8001
trained on the CDs catalog and prompts, real CDs train prompts, batch 8, float32 and
bfloat16, 2 threads. Each engine runs in its own process (XLA flags are per process);
the parent prints a table and writes bench/results/sft.json.

  python bench/bench_sft.py                  # main table
  python bench/bench_sft.py --investigate    # + XLA flag / formulation / allocator variants
  python bench/bench_sft.py --investigate --variants scan_layers,plain_bf16_einsum
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

CDS = os.path.join(ROOT, "..", "shared", "data", "amazon18", "CDs_and_Vinyl")
BATCH = 8
NUM_BATCHES = 4


# --------------------------------------------------------------------------- data


def make_batches(out_path: str) -> dict:
    """NUM_BATCHES batches of 8 real CDs train prompts, padded to one (P, T); or synthetic
    lengths with the same statistics when the data is absent."""
    rng = np.random.default_rng(0)
    info = {}
    if os.path.exists(os.path.join(CDS, "info.txt")):
        from latentr3_jax import data
        ds = data.read_d3(CDS)
        train = ds.splits["train"]
        corpus = data.tokenizer_corpus(ds, "latentr3")
        tok = data.train_tokenizer(corpus, 8001)
        enc = data.encode_split(tok, train, ds.category_word, "latentr3", 512)
        rows = rng.choice(len(enc), BATCH * NUM_BATCHES, replace=False)
        prompts = [enc[i].prompt_ids for i in rows]
        targets = [enc[i].target_ids for i in rows]
        vocab, pad, thought = tok.vocab_size, tok.pad_id, tok.thought_id
        info.update(data="CDs_and_Vinyl train prompts, byte-level BPE trained on CDs catalog + "
                    "train prompts", mean_prompt_all=float(np.mean([len(e.prompt_ids) for e in enc])),
                    mean_target_all=float(np.mean([len(e.target_ids) for e in enc])))
    else:
        vocab, pad, thought = 8001, 0, 8000
        plen = np.clip(rng.normal(97, 25, BATCH * NUM_BATCHES), 40, 200).astype(int)
        tlen = np.clip(rng.normal(7.5, 2.5, BATCH * NUM_BATCHES), 3, 20).astype(int)
        prompts = [list(rng.integers(1, vocab - 1, n)) for n in plen]
        targets = [list(rng.integers(1, vocab - 1, n)) for n in tlen]
        info.update(data="synthetic lengths (CDs data absent): prompts ~N(97, 25), targets ~N(7.5, 2.5)")
    P = int(max(len(p) for p in prompts))
    T = int(max(len(t) for t in targets))
    P, T = -(-P // 8) * 8, -(-T // 4) * 4
    n = len(prompts)
    pi = np.full((n, P), pad, np.int32); pm = np.zeros((n, P), np.int32)
    ti = np.full((n, T), pad, np.int32); tm = np.zeros((n, T), np.int32)
    for j, (p, t) in enumerate(zip(prompts, targets)):
        pi[j, P - len(p):], pm[j, P - len(p):] = p, 1
        ti[j, :len(t)], tm[j, :len(t)] = t, 1
    np.savez(out_path, prompt_ids=pi, prompt_mask=pm, target_ids=ti, target_mask=tm,
             vocab=vocab, thought=thought)
    info.update(vocab=int(vocab), padded_prompt_len=P, padded_target_len=T,
                mean_prompt=float(pm.sum(1).mean()), mean_target=float(tm.sum(1).mean()),
                tokens_per_batch=float((pm.sum() + tm.sum()) / NUM_BATCHES))
    return info


def load_batches(path: str):
    z = np.load(path)
    out = []
    for b in range(NUM_BATCHES):
        s = slice(b * BATCH, (b + 1) * BATCH)
        out.append({k: z[k][s] for k in ("prompt_ids", "prompt_mask", "target_ids", "target_mask")})
    return out, int(z["vocab"]), int(z["thought"])


def _time(fn, batches, steps: int, warmup: int = 2) -> dict:
    for i in range(warmup):
        fn(batches[i % len(batches)])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        fn(batches[i % len(batches)])
        times.append(time.perf_counter() - t)
    tokens = np.mean([b["prompt_mask"].sum() + b["target_mask"].sum() for b in batches])
    med = float(np.median(times))
    return {"step_s": med, "min_s": float(np.min(times)), "tokens_per_s": float(tokens / med)}


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
    from latentr3_jax.model import decoder, latent
    from latentr3_jax.train import optim, state as state_lib
    from latentr3_jax.train.sft import make_sft_loss
    from latentr3_jax.train.step import TrainStep

    with_latent = kind == "latent"
    sched = optim.linear_warmup_decay(3e-4, 20, 1000)
    tx = optim.adamw(sched, grad_clip=1.0)

    def init(r):
        k1, k2 = jax.random.split(r)
        p = dict(decoder.init_params(config, k1))
        if with_latent:
            p["latent"] = latent.init_latent_params(config, k2)
        return p
    axes = decoder.param_axes(config)
    if with_latent:
        axes["latent"] = latent.latent_param_axes()
    st, sh = state_lib.create_sharded_state(init, axes, tx, jax.random.PRNGKey(0), mesh)
    loss = make_sft_loss(config, num_thoughts=1, dtype=dtype) if with_latent \
        else plain_loss(config, dtype)
    return st, TrainStep(loss, tx, mesh, sh, schedule=sched)


def worker_jax(args) -> dict:
    from latentr3_jax.utils import cpu_alloc
    cpu_alloc.configure()  # what `latentr3` does at start-up ($LATENTR3_CPU_MALLOC=system: off)
    import jax
    import jax.numpy as jnp
    from latentr3_jax.model import decoder
    from latentr3_jax.model.config import bench_config
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import setup

    if args.variant == "attn_dpa":
        def dpa(config, q, k, v, bias):  # XLA's fused dot_product_attention, GQA native
            out = jax.nn.dot_product_attention(q, k, v, bias=bias[:, None], implementation="xla")
            return out
        decoder._attention = dpa

    if args.variant == "naive_einsum":  # the batched-einsum projections decoder.py had before
        import string

        def einsum_mm(x, kernel, n_in=1, bias=None):
            lead = string.ascii_lowercase[:x.ndim - n_in]
            ins = string.ascii_uppercase[:n_in]
            outs = string.ascii_uppercase[n_in:kernel.ndim]
            y = jnp.einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, kernel.astype(x.dtype))
            return y if bias is None else y + bias.astype(x.dtype)
        decoder._tokens_matmul = einsum_mm

    if args.variant == "plain_bf16_einsum":  # bf16 dots without the float32-accumulate VJP
        from latentr3_jax.model import mixed

        def plain(spec, a, b, out_dtype=None, bias=None):
            y = jnp.einsum(spec, a, b.astype(a.dtype)).astype(out_dtype or a.dtype)
            return y if bias is None else y + bias.astype(y.dtype)
        mixed.einsum = plain

    batches, vocab, thought = load_batches(args.batches)
    config = bench_config(vocab_size=vocab)
    # what `latentr3 sft` runs for this model (model.scan_layers=auto), unless forced
    scan = args.variant == "scan_layers" or setup.scan_layers_option("auto", config.num_layers)
    config = config.with_execution(scan_layers=scan)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    res = {}

    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            dtype = jnp.bfloat16 if dname == "bfloat16" else jnp.float32
            st, step = make_train_step(config, mesh, kind, dtype)
            holder = {"s": st}

            def run(b):
                holder["s"], m = step(holder["s"], b)
                jax.block_until_ready(m["loss"])
            t0 = time.perf_counter()
            run(batches[0])
            compile_s = time.perf_counter() - t0
            r = _time(run, batches, args.steps)
            r["compile_s"] = compile_s
            res[f"{kind}/{dname}"] = r
            print(f"  jax[{args.variant}] {kind}/{dname}: {r['step_s'] * 1e3:.0f} ms", file=sys.stderr)
    return res


def worker_torch(args) -> dict:
    import torch
    from latentr3_jax.model.config import bench_config
    import torch_reference as ref
    torch.set_num_threads(args.threads)
    batches, vocab, thought = load_batches(args.batches)
    tb = [ref.to_torch(b) for b in batches]
    for b, t in zip(batches, tb):  # _time counts tokens on numpy
        t["prompt_mask_np"] = b["prompt_mask"]
    config = bench_config(vocab_size=vocab)
    res = {}
    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            ac = torch.bfloat16 if dname == "bfloat16" else None
            model = ref.build_qwen2(config, attn_implementation=args.variant if args.variant in
                                    ("eager", "sdpa") else "sdpa")
            if kind == "latent":
                ratt = ref.LatentRATT(config.hidden_size)
                opt = ref.make_optimizer([model, ratt])
                fn = lambda i: ref.release_sft_step(model, ratt, opt, tb[i], thought, ac)
            else:
                opt = ref.make_optimizer([model])
                fn = lambda i: ref.plain_step(model, opt, tb[i], ac)
            idx = {id(b): i for i, b in enumerate(batches)}
            r = _time(lambda b: fn(idx[id(b)]), batches, args.steps)
            res[f"{kind}/{dname}"] = r
            print(f"  torch {kind}/{dname}: {r['step_s'] * 1e3:.0f} ms", file=sys.stderr)
    return res


def check_parity(batches_path: str) -> dict:
    """The torch release step computes the same loss as our JAX reference (same weights)."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch_reference as ref
    from latentr3_jax.model import decoder, latent
    from latentr3_jax.model.config import bench_config
    batches, vocab, thought = load_batches(batches_path)
    config = bench_config(vocab_size=vocab)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = dict(decoder.init_params(config, k1))
    params["latent"] = latent.init_latent_params(config, k2)
    b = batches[0]
    logits, _ = latent.latent_forward(config, params, *(jnp.asarray(b[k]) for k in
                                      ("prompt_ids", "prompt_mask", "target_ids", "target_mask")))
    s, n = latent.target_cross_entropy(logits, jnp.asarray(b["target_ids"]), jnp.asarray(b["target_mask"]))
    model = ref.build_qwen2(config)
    ref.load_jax_params(model, config, jax.device_get(params))
    ratt = ref.LatentRATT(config.hidden_size)
    with torch.no_grad():
        for name in ("q", "k", "v"):
            getattr(ratt, name).weight.copy_(torch.from_numpy(np.asarray(params["latent"][name]["kernel"]).T.copy()))
            getattr(ratt, name).bias.copy_(torch.from_numpy(np.asarray(params["latent"][name]["bias"]).copy()))
        tl = float(ref.release_forward_loss(model, ratt, ref.to_torch(b), thought))
    return {"jax_prefix_cached_loss": float(s / n), "torch_release_loss": tl,
            "abs_diff": abs(float(s / n) - tl)}


# --------------------------------------------------------------------------- driver


def _run_worker(kind: str, batches: str, *, variant="default", xla_flags="", kinds="latent,plain",
                dtypes="float32,bfloat16", steps=10, threads=2, env=None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    env["XLA_FLAGS"] = xla_flags
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--batches", batches,
           "--variant", variant, "--kinds", kinds, "--dtypes", dtypes, "--steps", str(steps),
           "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-600:] if out.returncode else "")
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


# (name, engine, XLA_FLAGS, code variant, dtypes, extra environment)
# latentr3_jax/utils/cpu_alloc.py's heap-reuse policy, for torch through glibc's tunables
MALLOC = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                            "glibc.malloc.trim_threshold=2147483647"}
VARIANTS = [
    ("scan_layers", "jax", "", "scan_layers", "float32,bfloat16", {}),
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
    ap.add_argument("--investigate", action="store_true")
    ap.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sft.json"))
    args = ap.parse_args()
    if args.worker:
        res = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print("RESULT" + json.dumps(res))
        return

    tmp = tempfile.mkdtemp()
    bpath = os.path.join(tmp, "batches.npz")
    info = make_batches(bpath)
    print(f"data: {info['data']}; mean prompt {info['mean_prompt']:.1f}, target "
          f"{info['mean_target']:.1f} tokens; padded to P={info['padded_prompt_len']}, "
          f"T={info['padded_target_len']}; vocab {info['vocab']}")
    result = {"info": info, "threads": args.threads, "batch": BATCH, "steps": args.steps,
              "load_avg_start": os.getloadavg()}
    result["parity"] = check_parity(bpath)
    print(f"parity: JAX prefix-cached loss {result['parity']['jax_prefix_cached_loss']:.6f} vs "
          f"torch release two-pass {result['parity']['torch_release_loss']:.6f}")
    result["jax"] = _run_worker("jax", bpath, steps=args.steps)
    result["torch"] = _run_worker("torch", bpath, steps=args.steps, threads=args.threads)
    if args.investigate:
        result["variants"] = {}
        chosen = [v for v in args.variants.split(",") if v]
        for name, engine, flags, code, dtypes, env in VARIANTS:
            if chosen and name not in chosen:
                continue
            result["variants"][name] = {"engine": engine, "xla_flags": flags, "code": code,
                                        "env": env, **_run_worker(
                engine, bpath, variant=code, xla_flags=flags, kinds="plain", dtypes=dtypes,
                steps=args.steps, threads=args.threads, env=env)}
    result["load_avg_end"] = os.getloadavg()

    rows = []
    for d in ("float32", "bfloat16"):
        j, t = result["jax"].get(f"latent/{d}", {}), result["torch"].get(f"latent/{d}", {})
        jp, tp = result["jax"].get(f"plain/{d}", {}), result["torch"].get(f"plain/{d}", {})
        rows.append((f"LatentR3 SFT step N=1 ({d})", j, t))
        rows.append((f"plain fwd+bwd+AdamW ({d})", jp, tp))
    print(f"\n{'step':<36}{'JAX ms':>9}{'JAX tok/s':>11}{'torch ms':>10}{'torch tok/s':>12}{'JAX/torch':>10}")
    table = []
    for name, j, t in rows:
        if "step_s" not in j or "step_s" not in t:
            continue
        ratio = j["tokens_per_s"] / t["tokens_per_s"]
        table.append({"step": name, "jax_ms": j["step_s"] * 1e3, "jax_tokens_per_s": j["tokens_per_s"],
                      "torch_ms": t["step_s"] * 1e3, "torch_tokens_per_s": t["tokens_per_s"],
                      "speedup": ratio})
        print(f"{name:<36}{j['step_s'] * 1e3:>9.0f}{j['tokens_per_s']:>11.0f}{t['step_s'] * 1e3:>10.0f}"
              f"{t['tokens_per_s']:>12.0f}{ratio:>9.2f}x")
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
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
