"""SFT and LR-GRPO step throughput on one accelerator (GPU): JAX against the release's
PyTorch way.

Four steps, each side by side on the same data and the same device:
  * latent: this project's LatentR³ step (N=1, prompt prefix once into the KV cache) vs
    the release's two full transformers passes (bench/torch_reference.py);
  * plain:  the same work in both, one forward + backward + AdamW over [prompt, target]
    (JAX decoder vs transformers with sdpa attention);
  * grpo:   one LR-GRPO step with G = 8 in prompts per second, two comparisons
    (bench/bench_grpo.py): the whole method (this project's fused rollout + update over a
    batch of prompts vs the release's four full passes per group, one group at a time)
    and the engine alone (key grpo_same: torch running this project's passes on the very
    batches JAX times).
Three model shapes with random weights (a step's time does not depend on their values):
SPEC.md section 9's small decoder (hidden 256, 4 layers, vocab 8,001), SmolLM2-135M's
(30 layers, hidden 576, 9/3 heads, vocab 49,152 + 1, on prompts tokenized by its own
tokenizer) and the paper's Qwen2.5-1.5B (hidden 1536, MLP 8960, 28 layers, 12/2 heads,
tied, vocab 151,936). bfloat16 is mixed precision in both (float32 weights and AdamW,
bf16 matmuls with float32 accumulation: `model.dtype=bfloat16` here, torch.autocast
there; the release-way LR-GRPO row casts its frozen model to bf16 as the release loads
it); float32 is true float32 in both (JAX under jax.default_matmul_precision('highest'),
torch with TF32 off and float32_matmul_precision 'highest'). Every row has its FLOP count
(bench/common.py), FLOP/s and fraction of the GPU's datasheet dense peak
(common.GPU_PEAKS; a measured 8192^3 matmul is recorded beside it).

The batches are real CDs train prompts, tokenized here (the data stays in ../shared):
  python bench/bench_gpu.py --make-batches bench_data/gpu_batches.npz
(with ../shared/models present, the SmolLM2-tokenized set is written beside it as
bench_data/gpu_batches.npz.smollm2.npz) then, on the GPU machine, with those files
carried along:
  python bench/bench_gpu.py --batches bench_data/gpu_batches.npz [--shapes small,smollm2-135m,qwen2.5-1.5b]
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
from latentr3_jax.parallel import make_mesh
from latentr3_jax.train import setup
from latentr3_jax.utils.jsonio import read_json, write_json

SHAPES = common.SHAPES


def shape_config(shape: str, vocab: int):
    return common.shape_config(shape, vocab)


def smollm2_batches(path: str) -> str:
    """Where `make_batches` puts the SmolLM2-tokenized set beside `path`."""
    return path + ".smollm2.npz"


def batches_for(path: str, shape: str) -> str:
    """The batch file a shape runs on: SmolLM2's own tokenization for smollm2-135m when
    it was made (else the BPE set, with a note in the result), the BPE set otherwise."""
    alt = smollm2_batches(path)
    return alt if shape == "smollm2-135m" and os.path.exists(alt + ".json") else path


def make_batches(path: str, batch: int, num_batches: int, tokenizer: str = "bpe") -> dict:
    """The SFT batches (bench_sft's), the LR-GRPO prompts and tokenizer (bench_grpo's) and
    an info file, all beside `path`; `tokenizer` 'bpe' or 'smollm2'."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = bench_sft.make_batches(path, batch, num_batches, tokenizer)
    info.update(batch=batch, num_batches=num_batches)
    tok, enc, source = bench_grpo.cds_prompts(tokenizer=tokenizer)
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


def _peaks(engine: str, dtypes, device: str, name: str) -> dict:
    return {d: common.peak(engine, d, device, name) for d in dtypes}


def _sft_fields(r: dict, config, batches, kind: str, engine: str, dname: str, pk: dict) -> dict:
    r.update(precision=common.precision_note(engine, dname),
             **common.flop_fields(bench_sft.step_flops(config, batches, kind, engine), r["step_s"], pk))
    return r


def worker_jax(args) -> dict:
    path = batches_for(args.batches, args.shape)
    batches, vocab, thought, _ = load_batches(path)
    config = shape_config(args.shape, vocab)
    config = config.with_execution(scan_layers=setup.scan_layers_option("auto", config.num_layers))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    res = common.machine()
    dev = jax.devices()[0]
    dtypes = args.dtypes.split(",")
    res["peak"] = _peaks("jax", dtypes, dev.platform, dev.device_kind)
    res["batch_file"] = os.path.basename(path)

    for kind in args.kinds.split(","):
        for dname in dtypes:
            if kind == "grpo":
                tok, enc = load_grpo_prompts(path)
                r = bench_grpo.bench_jax(tok, enc, dname, args.grpo_prompts, args.steps,
                                         cfg=shape_config(args.shape, tok.vocab_size), one_shape=True)
                common.set_peak(r, res["peak"][dname])
                res[f"{kind}/{dname}"] = r
                print(f"  jax {args.shape} grpo/{dname}: {r['prompts_per_s']:.1f} prompts/s",
                      file=sys.stderr)
                continue
            for impl in args.attention_impls.split(","):
                # the einsum rows keep their old keys; other attention paths get their own
                key = f"{kind}/{dname}" + ("" if impl == "einsum" else f"/{impl}")
                if impl == "cudnn" and dname == "float32":
                    continue                       # cuDNN's fused kernel: bf16 / fp16 only
                cimpl = config.with_execution(attention_impl=impl)
                try:
                    with common.jax_precision(dname):
                        st, step = bench_sft.make_train_step(cimpl, mesh, kind,
                                                             common.jax_dtype(dname))
                        devb = [step.shard_batch(b) for b in batches]   # on the device
                        r = bench_sft.time_train_step(step, st, batches, args.steps, warmup=3,
                                                      inputs=devb)
                except Exception as e:   # e.g. a cuDNN version or shape the kernel refuses
                    if impl == "einsum":
                        raise
                    res[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(f"  jax {args.shape} {key}: failed ({res[key]['error']})", file=sys.stderr)
                    continue
                res[key] = dict(_sft_fields(r, cimpl, batches, kind, "jax", dname,
                                            res["peak"][dname]), attention_impl=impl)
                print(f"  jax {args.shape} {key}: {r['step_s'] * 1e3:.1f} ms", file=sys.stderr)
                del st, step, devb
    return res


def worker_torch(args) -> dict:
    import torch  # optional, heavy: only the torch worker loads it
    import torch_reference as ref

    path = batches_for(args.batches, args.shape)
    batches, vocab, thought, _ = load_batches(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common.torch_strict_fp32()
    tb = [ref.to_torch(b, device) for b in batches]
    config = shape_config(args.shape, vocab)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    dtypes = args.dtypes.split(",")
    res = {"device": name, "torch": torch.__version__, "batch_file": os.path.basename(path),
           "peak": _peaks("torch", dtypes, device, name)}
    for kind in args.kinds.split(","):
        for dname in dtypes:
            if kind == "grpo":
                tok, enc = load_grpo_prompts(path)
                cfg = shape_config(args.shape, tok.vocab_size)
                for key, fn in (("grpo", lambda: bench_grpo.bench_torch(
                                    tok, enc, dname, args.steps, cfg=cfg, device=device)),
                                ("grpo_same", lambda: bench_grpo.bench_torch_same_passes(
                                    tok, enc, dname, args.grpo_prompts, args.steps, cfg=cfg,
                                    device=device, one_shape=True))):
                    r = common.set_peak(fn(), res["peak"][dname])
                    res[f"{key}/{dname}"] = r
                    print(f"  torch {args.shape} {key}/{dname}: {r['prompts_per_s']:.2f} prompts/s",
                          file=sys.stderr)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                continue
            model = ref.build_causal_lm(config).to(device)
            fn = ref.train_step_fn(kind, model, tb, thought, common.autocast_dtype(dname))
            # each step ends in float(loss): a device sync
            r = bench_sft.time_batches(fn, batches, args.steps, warmup=3)
            res[f"{kind}/{dname}"] = _sft_fields(r, config, batches, kind, "torch", dname,
                                                 res["peak"][dname])
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
        "--grpo-prompts", str(args.grpo_prompts), "--attention-impls", args.attention_impls],
        stderr_tail=3000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-batches", help="write batches of real CDs prompts to this .npz")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-batches", type=int, default=4)
    ap.add_argument("--batches", help="the .npz written by --make-batches")
    ap.add_argument("--worker", choices=["jax", "torch"])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--shapes", default="small,smollm2-135m,qwen2.5-1.5b")
    ap.add_argument("--kinds", default="latent,plain,grpo")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grpo-prompts", type=int, default=8, help="prompts per JAX LR-GRPO batch")
    ap.add_argument("--attention-impls", default="einsum",
                    help="JAX SFT rows per attention path (model.attention_impl): e.g. "
                         "einsum,cudnn times cuDNN's fused attention beside ours (bf16 only)")
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "gpu.json"))
    args = ap.parse_args()
    if args.make_batches:
        print(json.dumps(make_batches(args.make_batches, args.batch, args.num_batches), indent=1))
        if common.have_smollm2():
            print(json.dumps(make_batches(smollm2_batches(args.make_batches), args.batch,
                                          args.num_batches, "smollm2"), indent=1))
        else:
            print(f"no SmolLM2-tokenized batches: {common.smollm2_missing()}")
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
          f"{info['tokens_per_batch']:.0f} real tokens per batch (small shape's batch file)")
    pct = lambda r: f"{100 * r['fraction_of_peak']:.1f}%" if r.get("fraction_of_peak") else "n/a"
    print(f"{'shape':14s} {'step':10s} {'dtype':9s} {'JAX':>9s} {'FLOP/s':>8s} {'peak':>6s} "
          f"{'torch':>9s} {'FLOP/s':>8s} {'peak':>6s} {'speed-up':>9s}"
          "   (latent, plain: ms per step; grpo: prompts per second)")
    for shape, r in result["shapes"].items():
        keys = sorted(k for k in set(r["jax"]) | set(r["torch"]) if "/" in k)
        for key in keys:
            kind, d = key.split("/")
            j = r["jax"].get(key) or r["jax"].get(f"grpo/{d}" if kind == "grpo_same" else key, {})
            t = r["torch"].get(key, {})
            if "prompts_per_s" in j and "prompts_per_s" in t:
                print(f"{shape:14s} {kind:10s} {d:9s} {j['prompts_per_s']:9.1f} "
                      f"{common.fmt_flops(j.get('flops_per_s')):>8s} {pct(j):>6s} "
                      f"{t['prompts_per_s']:9.2f} {common.fmt_flops(t.get('flops_per_s')):>8s} "
                      f"{pct(t):>6s} {j['prompts_per_s'] / t['prompts_per_s']:8.2f}x")
                continue
            if "step_s" not in j or "step_s" not in t:
                continue
            print(f"{shape:14s} {kind:10s} {d:9s} {j['step_s'] * 1e3:9.1f} "
                  f"{common.fmt_flops(j.get('flops_per_s')):>8s} {pct(j):>6s} "
                  f"{t['step_s'] * 1e3:9.1f} {common.fmt_flops(t.get('flops_per_s')):>8s} "
                  f"{pct(t):>6s} {t['step_s'] / j['step_s']:8.2f}x")
    for shape, r in result["shapes"].items():
        for eng in ("jax", "torch"):
            if "error" in r[eng]:
                print(f"{shape} {eng}: ERROR {r[eng]['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
