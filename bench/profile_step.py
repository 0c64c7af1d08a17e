"""Where a training step's time goes, per op class, in JAX and in torch side by side.

Runs the same-work plain step (or the LatentR³ step) of bench_sft.py at a shape, traces
`--steps` steps of each engine after warm-up (`jax.profiler` / `torch.profiler`), and
prints the time per op class: matmuls (forward and gradient), attention, the LM head and
loss, elementwise and reductions, copies and transposes, the optimizer. Both engines run
their kernels on 2 cores, XLA sometimes two at once, so class totals can exceed the
step's wall time; the table gives each class's share of the engine's summed op time and
its total per step. The engines run one after the other in separate processes.

    python bench/profile_step.py --shape smollm2-135m --dtype float32 [--kind plain] [--steps 2]
Writes bench/results/profile_<kind>_<shape>_<dtype>.json (the top ops of each engine too).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import common  # noqa: E402
import bench_sft  # noqa: E402


def _hlo_kinds(hlo_text: str) -> dict:
    """instruction name -> class, from a compiled module's text: fusions are classed by
    what their fused computation holds (a dot, a reduce, else elementwise)."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
            continue
        if cur is not None and line.strip() == "}":
            cur = None
            continue
        if cur is not None:
            comps[cur].append(line)
    ops = {}
    for name, lines in comps.items():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(", line)
            if not m:
                m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
            if not m:
                continue
            inst, opcode = m.group(1), m.group(2)
            kind = opcode
            if opcode == "fusion":
                c = re.search(r"calls=%?([\w.\-]+)", line)
                body = "\n".join(comps.get(c.group(1), [])) if c else ""
                if re.search(r" (dot|convolution)\(", body):
                    kind = "dot"
                elif re.search(r" (reduce|reduce-window)\(", body):
                    kind = "reduce"
                elif re.search(r" (transpose|copy)\(", body) and not re.search(
                        r" (exponential|multiply|add|subtract|divide|tanh|logistic)\(", body):
                    kind = "copy"
                else:
                    kind = "elementwise"
            ops[inst] = kind
    return ops


CLASS = {"dot": "matmul", "custom-call": "matmul", "convolution": "matmul",
         "reduce": "reduction", "elementwise": "elementwise", "copy": "copy/transpose",
         "transpose": "copy/transpose", "scatter": "scatter/gather", "gather": "scatter/gather",
         "dynamic-update-slice": "copy/transpose", "concatenate": "copy/transpose",
         "pad": "copy/transpose", "slice": "copy/transpose"}


def worker_jax(args) -> dict:
    from latentr3_jax.utils import cpu_alloc
    batches, vocab, _ = bench_sft.load_batches(args.batches)
    shape_config = common.shape_config(args.shape, vocab)
    cpu_alloc.configure(num_params=shape_config.num_params())   # as `latentr3` does
    import jax
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import setup

    config = shape_config.with_execution(
        scan_layers=setup.scan_layers_option("auto", shape_config.num_layers))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with common.jax_precision(args.dtype):
        st, step = bench_sft.make_train_step(config, mesh, args.kind, common.jax_dtype(args.dtype))
        holder = {"s": st}

        def run(i):
            holder["s"], m = step(holder["s"], batches[i % len(batches)])
            jax.block_until_ready(m["loss"])
        for i in range(2):
            run(i)
        hlo = step.compiled_for(holder["s"], step.shard_batch(batches[0])).as_text()
        kinds = _hlo_kinds(hlo)
        tmp = tempfile.mkdtemp(prefix="jaxprof_")
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(args.steps):
                run(i)
        wall = (time.perf_counter() - t0) / args.steps
    path = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, "jax_step.hlo.txt"), "w") as f:
            f.write(hlo)
        with open(os.path.join(args.dump, "jax_events.json"), "w") as f:
            json.dump([e for e in events if e.get("ph") == "X"], f)
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            per_op[e["name"]] += e.get("dur", 0) * 1e-6
    per_class = collections.Counter()
    for name, t in per_op.items():
        per_class[CLASS.get(kinds[name], kinds[name])] += t / args.steps
    return {"wall_s": wall, "classes": dict(per_class),
            "top": [(n, kinds[n], t / args.steps) for n, t in per_op.most_common(40)]}


TORCH_CLASS = [
    (r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$", "matmul"),
    (r"scaled_dot_product|flash_attention|_efficient_attention", "attention (fused)"),
    (r"log_softmax|nll_loss|cross_entropy|_softmax", "softmax/loss"),
    (r"adam|_foreach|lerp|addcmul|addcdiv|sqrt", "optimizer"),
    (r"copy_|contiguous|clone|cat|transpose|permute|index|embedding|slice|stack", "copy/transpose"),
    (r"sum|mean|norm|max|pow", "reduction"),
]


def worker_torch(args) -> dict:
    import torch
    import torch_reference as ref
    from torch.profiler import profile, ProfilerActivity
    torch.set_num_threads(2)
    common.torch_strict_fp32()
    batches, vocab, thought = bench_sft.load_batches(args.batches)
    config = common.shape_config(args.shape, vocab)
    model = ref.build_causal_lm(config, attn_implementation="sdpa")
    tb = [ref.to_torch(b) for b in batches]
    fn = ref.train_step_fn(args.kind, model, tb, thought, common.autocast_dtype(args.dtype))
    for i in range(2):
        fn(i)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            fn(i % len(tb))
    wall = (time.perf_counter() - t0) / args.steps
    per_class = collections.Counter()
    top = []
    for ev in prof.key_averages():
        self_s = ev.self_cpu_time_total * 1e-6 / args.steps
        cls = next((c for pat, c in TORCH_CLASS if re.search(pat, ev.key)), "elementwise/other")
        per_class[cls] += self_s
        top.append((ev.key, cls, self_s))
    top.sort(key=lambda r: -r[2])
    return {"wall_s": wall, "classes": dict(per_class), "top": top[:40]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(common.SHAPES))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--kind", default="plain", choices=("plain", "latent"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--engines", default="jax,torch")
    ap.add_argument("--worker", default="")
    ap.add_argument("--batches", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--dump", default="", help="folder for the JAX step's HLO text and trace events")
    args = ap.parse_args()
    if args.worker:
        common.emit((worker_jax if args.worker == "jax" else worker_torch)(args))
        return
    tmp = tempfile.mkdtemp(prefix="profstep_")
    batches = os.path.join(tmp, "batches.npz")
    info = bench_sft.make_batches(batches, tokenizer="bpe" if args.shape == "small" else "smollm2")
    res = {"shape": args.shape, "dtype": args.dtype, "kind": args.kind, "data": info,
           "machine": common.machine()}
    for eng in args.engines.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        res[eng] = common.run_worker(__file__, [
            "--worker", eng, "--batches", batches, "--shape", args.shape, "--dtype", args.dtype,
            "--kind", args.kind, "--steps", str(args.steps), "--dump", args.dump], env)
    classes = sorted({c for e in args.engines.split(",") for c in res[e].get("classes", {})})
    print(f"{args.kind} step, {args.shape}, {args.dtype}: seconds of op time per step")
    print(f"{'class':24s}" + "".join(f"{e:>12s}" for e in args.engines.split(",")))
    for c in classes:
        print(f"{c:24s}" + "".join(f"{res[e]['classes'].get(c, 0.0):12.3f}" for e in args.engines.split(",")))
    print(f"{'sum of ops':24s}" + "".join(f"{sum(res[e]['classes'].values()):12.3f}" for e in args.engines.split(",")))
    print(f"{'wall per step':24s}" + "".join(f"{res[e]['wall_s']:12.3f}" for e in args.engines.split(",")))
    for e in args.engines.split(","):
        print(f"\ntop ops, {e}:")
        for name, cls, t in res[e]["top"][:20]:
            print(f"  {t * 1e3:9.1f} ms  {cls:18s} {name}")
    out = args.out or os.path.join(common.RESULTS, f"profile_{args.kind}_{args.shape}_{args.dtype}.json")
    common.write_result(out, res)
    print("wrote", out)


if __name__ == "__main__":
    main()
