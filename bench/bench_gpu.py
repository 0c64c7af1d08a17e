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
import pickle
import sys

import jax

import bench_grpo
import bench_sft
import common
from latentr3_jax import data
from latentr3_jax.model.config import bench_config
from latentr3_jax.parallel import make_mesh
from latentr3_jax.train import setup
from latentr3_jax.utils.jsonio import read_json, write_json

SHAPES = {
    "small": {},
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, vocab_size=151936),
}


def shape_config(shape: str, vocab: int):
    over = dict(SHAPES[shape])
    over.setdefault("vocab_size", vocab)
    return bench_config(**over)


def make_batches(path: str, batch: int, num_batches: int) -> dict:
    """The SFT batches (bench_sft's), the LR-GRPO prompts and tokenizer (bench_grpo's) and
    an info file, all beside `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = bench_sft.make_batches(path, batch, num_batches)
    info.update(batch=batch, num_batches=num_batches)
    tok, enc, source = bench_grpo.cds_prompts()
    tok.save(path + ".tok")
    with open(path + ".grpo.pkl", "wb") as f:
        pickle.dump({"enc": enc, "source": source}, f)
    info["grpo_prompts"] = f"{len(enc)} {source} train rows"
    write_json(path + ".json", info, indent=1)
    return info


def load_grpo_prompts(path: str):
    with open(path + ".grpo.pkl", "rb") as f:
        enc = pickle.load(f)["enc"]
    return data.load_tokenizer(path + ".tok"), enc


def load_batches(path: str):
    info = read_json(path + ".json")
    batches, vocab, thought = bench_sft.load_batches(path, int(info["batch"]),
                                                     int(info["num_batches"]))
    return batches, vocab, thought, info


# --------------------------------------------------------------------------- workers


def worker_jax(args) -> dict:
    batches, vocab, thought, _ = load_batches(args.batches)
    config = shape_config(args.shape, vocab)
    config = config.with_execution(scan_layers=setup.scan_layers_option("auto", config.num_layers))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    res = common.machine()

    for kind in args.kinds.split(","):
        for dname in args.dtypes.split(","):
            if kind == "grpo":
                tok, enc = load_grpo_prompts(args.batches)
                r = bench_grpo.bench_jax(tok, enc, dname, args.grpo_prompts, args.steps,
                                         cfg=shape_config(args.shape, tok.vocab_size), one_shape=True)
                res[f"{kind}/{dname}"] = r
                print(f"  jax {args.shape} grpo/{dname}: {r['prompts_per_s']:.1f} prompts/s",
                      file=sys.stderr)
                continue
            st, step = bench_sft.make_train_step(config, mesh, kind, common.jax_dtype(dname))
            dev = [step.shard_batch(b) for b in batches]   # on the device, as torch's are
            r = bench_sft.time_train_step(step, st, batches, args.steps, warmup=3, inputs=dev)
            res[f"{kind}/{dname}"] = r
            print(f"  jax {args.shape} {kind}/{dname}: {r['step_s'] * 1e3:.1f} ms", file=sys.stderr)
            del st, step, dev
    return res


def worker_torch(args) -> dict:
    import torch  # optional, heavy: only the torch worker loads it
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
                tok, enc = load_grpo_prompts(args.batches)
                r = bench_grpo.bench_torch(tok, enc, dname, args.steps,
                                           cfg=shape_config(args.shape, tok.vocab_size), device=device)
                res[f"{kind}/{dname}"] = r
                print(f"  torch {args.shape} grpo/{dname}: {r['prompts_per_s']:.2f} prompts/s",
                      file=sys.stderr)
                continue
            model = ref.build_qwen2(config).to(device)
            fn = ref.train_step_fn(kind, model, tb, thought, common.autocast_dtype(dname))
            # each step ends in float(loss): a device sync
            r = bench_sft.time_batches(fn, batches, args.steps, warmup=3)
            res[f"{kind}/{dname}"] = r
            print(f"  torch {args.shape} {kind}/{dname}: {r['step_s'] * 1e3:.1f} ms", file=sys.stderr)
            del model, fn
            if device == "cuda":
                torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- driver


def _run_worker(engine: str, args, shape: str) -> dict:
    return common.run_worker(__file__, [
        "--worker", engine, "--batches", args.batches, "--shape", shape, "--kinds", args.kinds,
        "--dtypes", args.dtypes, "--steps", str(args.steps),
        "--grpo-prompts", str(args.grpo_prompts)], stderr_tail=3000)


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
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "gpu.json"))
    args = ap.parse_args()
    if args.make_batches:
        print(json.dumps(make_batches(args.make_batches, args.batch, args.num_batches), indent=1))
        return 0
    if args.worker:
        common.emit(worker_jax(args) if args.worker == "jax" else worker_torch(args))
        return 0
    if not args.batches:
        ap.error("--batches is needed (make them with --make-batches)")
    _, _, _, info = load_batches(args.batches)
    result = {"batches": info, "steps": args.steps, "shapes": {}}
    for shape in args.shapes.split(","):
        result["shapes"][shape] = {"jax": _run_worker("jax", args, shape),
                                   "torch": _run_worker("torch", args, shape)}
    common.write_result(args.out, result, indent=1)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
