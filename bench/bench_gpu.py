"""SFT and LR-GRPO step throughput on one accelerator (GPU): JAX against the release's
PyTorch way.

Three steps, each side by side on the same data and the same device:
  * latent: this project's LatentR³ step (N=1, prompt prefix once into the KV cache) vs
    the release's two full transformers passes (bench/torch_reference.py);
  * plain:  the same work in both, one forward + backward + AdamW over [prompt, target]
    (JAX decoder vs transformers Qwen2ForCausalLM with sdpa attention);
  * grpo:   one LR-GRPO step with G = 8 (bench/bench_grpo.py's two implementations: this
    project's fused rollout + update over a batch of prompts, the release's two full
    passes per group, one group at a time), in prompts per second.
Two model shapes with random weights: SPEC.md section 9's small decoder (hidden 256,
4 layers, vocab 8,001) and the paper's Qwen2.5-1.5B shape (hidden 1536, MLP 8960,
28 layers, 12/2 heads, tied, vocab 151,936). bfloat16 is mixed precision in both (float32
weights and AdamW, bf16 matmuls with float32 accumulation: `model.dtype=bfloat16` here,
torch.autocast there); float32 is float32 throughout (torch's TF32 off).

The batches are real CDs train prompts, tokenized here (the data stays in ../shared):
  python bench/bench_gpu.py --make-batches bench_data/gpu_batches.npz
then, on the GPU machine, with that file carried along:
  python bench/bench_gpu.py --batches bench_data/gpu_batches.npz [--shapes small,qwen2.5-1.5b]
Each engine runs in its own process. Writes bench/results/gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

SHAPES = {
    "small": {},
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, vocab_size=151936),
}


def shape_config(shape: str, vocab: int):
    from latentr3_jax.model.config import bench_config
    over = dict(SHAPES[shape])
    over.setdefault("vocab_size", vocab)
    return bench_config(**over)


def make_batches(path: str, batch: int, num_batches: int) -> dict:
    import bench_sft
    bench_sft.BATCH, bench_sft.NUM_BATCHES = batch, num_batches
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = bench_sft.make_batches(path)
    info.update(batch=batch, num_batches=num_batches)
    import pickle

    import bench_grpo
    tok, enc, source = bench_grpo.cds_prompts()
    tok.save(path + ".tok")
    with open(path + ".grpo.pkl", "wb") as f:
        pickle.dump({"enc": enc, "source": source}, f)
    info["grpo_prompts"] = f"{len(enc)} {source} train rows"
    with open(path + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info


def load_grpo_prompts(path: str):
    import pickle

    from latentr3_jax import data
    with open(path + ".grpo.pkl", "rb") as f:
        enc = pickle.load(f)["enc"]
    return data.load_tokenizer(path + ".tok"), enc


def load_batches(path: str):
    z = np.load(path)
    with open(path + ".json") as f:
        info = json.load(f)
    B, n = int(info["batch"]), int(info["num_batches"])
    out = [{k: z[k][i * B:(i + 1) * B] for k in ("prompt_ids", "prompt_mask", "target_ids",
                                                  "target_mask")} for i in range(n)]
    return out, int(z["vocab"]), int(z["thought"]), info


def _time(fn, batches, steps: int, warmup: int = 3) -> dict:
    for i in range(warmup):
        fn(i % len(batches))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        fn(i % len(batches))
        times.append(time.perf_counter() - t)
    tokens = np.mean([b["prompt_mask"].sum() + b["target_mask"].sum() for b in batches])
    med = float(np.median(times))
    return {"step_s": med, "min_s": float(np.min(times)), "tokens_per_s": float(tokens / med)}


# --------------------------------------------------------------------------- workers


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    import bench_sft
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import setup

    batches, vocab, thought, _ = load_batches(args.batches)
    config = shape_config(args.shape, vocab)
    config = config.with_execution(scan_layers=setup.scan_layers_option("auto", config.num_layers))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}

    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            if kind == "grpo":
                import bench_grpo
                tok, enc = load_grpo_prompts(args.batches)
                r = bench_grpo.bench_jax(tok, enc, dname, args.grpo_prompts, args.steps,
                                         cfg=shape_config(args.shape, tok.vocab_size), one_shape=True)
                res[f"{kind}/{dname}"] = r
                print(f"  jax {args.shape} grpo/{dname}: {r['prompts_per_s']:.1f} prompts/s",
                      file=sys.stderr)
                continue
            dtype = jnp.bfloat16 if dname == "bfloat16" else jnp.float32
            st, step = bench_sft.make_train_step(config, mesh, kind, dtype)
            dev = [step.shard_batch(b) for b in batches]   # on the device, as torch's are
            holder = {"s": st}

            def run(i):
                holder["s"], m = step(holder["s"], dev[i])
                jax.block_until_ready(m["loss"])
            t0 = time.perf_counter()
            run(0)
            compile_s = time.perf_counter() - t0
            r = _time(run, batches, args.steps)
            r["compile_s"] = compile_s
            res[f"{kind}/{dname}"] = r
            print(f"  jax {args.shape} {kind}/{dname}: {r['step_s'] * 1e3:.1f} ms", file=sys.stderr)
            del holder, st, step, dev
    return res


def worker_torch(args) -> dict:
    import torch

    import torch_reference as ref

    batches, vocab, thought, _ = load_batches(args.batches)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tb = [ref.to_torch(b, device) for b in batches]
    config = shape_config(args.shape, vocab)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__}
    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            if kind == "grpo":
                import bench_grpo
                tok, enc = load_grpo_prompts(args.batches)
                r = bench_grpo.bench_torch(tok, enc, dname, args.steps,
                                           cfg=shape_config(args.shape, tok.vocab_size), device=device)
                res[f"{kind}/{dname}"] = r
                print(f"  torch {args.shape} grpo/{dname}: {r['prompts_per_s']:.2f} prompts/s",
                      file=sys.stderr)
                continue
            ac = torch.bfloat16 if dname == "bfloat16" else None
            model = ref.build_qwen2(config).to(device)
            if kind == "latent":
                ratt = ref.LatentRATT(config.hidden_size).to(device)
                opt = ref.make_optimizer([model, ratt])
                fn = lambda i: ref.release_sft_step(model, ratt, opt, tb[i], thought, ac)
            else:
                opt = ref.make_optimizer([model])
                fn = lambda i: ref.plain_step(model, opt, tb[i], ac)
            r = _time(fn, batches, args.steps)   # each step ends in float(loss): a device sync
            res[f"{kind}/{dname}"] = r
            print(f"  torch {args.shape} {kind}/{dname}: {r['step_s'] * 1e3:.1f} ms", file=sys.stderr)
            del model, opt, fn
            if device == "cuda":
                torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- driver


def _run_worker(engine: str, args, shape: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--batches",
           args.batches, "--shape", shape, "--kinds", args.kinds, "--dtypes", args.dtypes,
           "--steps", str(args.steps), "--grpo-prompts", str(args.grpo_prompts)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:] if out.returncode else "")
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-batches", help="write batches of real CDs prompts to this .npz")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-batches", type=int, default=4)
    ap.add_argument("--batches", help="the .npz written by --make-batches")
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--shapes", default="small,qwen2.5-1.5b")
    ap.add_argument("--kinds", default="latent,plain,grpo")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grpo-prompts", type=int, default=8, help="prompts per JAX LR-GRPO batch")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu.json"))
    args = ap.parse_args()
    if args.make_batches:
        print(json.dumps(make_batches(args.make_batches, args.batch, args.num_batches), indent=1))
        return 0
    if args.worker:
        res = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print("RESULT" + json.dumps(res))
        return 0
    if not args.batches:
        ap.error("--batches is needed (make them with --make-batches)")
    _, _, _, info = load_batches(args.batches)
    result = {"batches": info, "steps": args.steps, "shapes": {}}
    for shape in args.shapes.split(","):
        result["shapes"][shape] = {"jax": _run_worker("jax", args, shape),
                                   "torch": _run_worker("torch", args, shape)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"batch {info['batch']} x (P={info['padded_prompt_len']}, T={info['padded_target_len']}), "
          f"{info['tokens_per_batch']:.0f} real tokens per batch")
    print(f"{'shape':14s} {'step':7s} {'dtype':9s} {'JAX':>9s} {'torch':>9s} {'speed-up':>9s}"
          "   (latent, plain: ms per step; grpo: prompts per second)")
    for shape, r in result["shapes"].items():
        for key in sorted(k for k in r["jax"] if "/" in k):
            j, t = r["jax"][key], r["torch"].get(key, {})
            if "prompts_per_s" in j and "prompts_per_s" in t:
                kind, d = key.split("/")
                print(f"{shape:14s} {kind:7s} {d:9s} {j['prompts_per_s']:9.1f} {t['prompts_per_s']:9.2f} "
                      f"{j['prompts_per_s'] / t['prompts_per_s']:8.2f}x")
                continue
            if "step_s" not in j or "step_s" not in t:
                continue
            kind, d = key.split("/")
            print(f"{shape:14s} {kind:7s} {d:9s} {j['step_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} "
                  f"{t['step_s'] / j['step_s']:8.2f}x")
    for shape, r in result["shapes"].items():
        for eng in ("jax", "torch"):
            if "error" in r[eng]:
                print(f"{shape} {eng}: ERROR {r[eng]['error']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
