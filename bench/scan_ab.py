"""Layer scan or not, at the SmolLM2-135M shape: the plain SFT step (fwd + bwd + AdamW) in
float32 and bfloat16, scanned, unrolled (per-layer weights through `decoder.unstack_layers`,
whose gradient is one stack) and unrolled by plain indexing (`stack[i]`, whose gradient is
a zero-padded copy per layer, summed), all six compiled in one process and then run
alternately step by step, so that machine noise hits every variant alike. Each step also
records the CPU time the process used and the time the hypervisor stole from this VM
(/proc/stat), to tell a shared VM's steal from noise inside the process.

    python bench/scan_ab.py --rounds 2       # writes bench/results/scan_ab_smollm2-135m.json

The batches are bench_sft's (real CDs prompts, SmolLM2's tokenizer, batch 8, P=200, T=24).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import common
import bench_sft
from latentr3_jax.utils import cpu_alloc


MODES = ("scan", "unrolled", "unrolled_index")


def stolen_s() -> float:
    """CPU seconds the hypervisor has stolen from this VM since boot (all CPUs; 0 where
    /proc/stat does not say)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    except (OSError, ValueError):
        return 0.0


def index_layers(layers, num_layers: int) -> list:
    """What unrolled layers did before `decoder.unstack_layers`: index the stacked weights."""
    import jax
    return [jax.tree.map(lambda a: a[i], layers) for i in range(num_layers)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "scan_ab_smollm2-135m.json"))
    args = ap.parse_args()
    if not common.have_smollm2():
        print(f"skipped: {common.smollm2_missing()}")
        return
    cpu_alloc.configure()
    import jax
    from latentr3_jax.parallel import make_mesh

    path = os.path.join(tempfile.mkdtemp(), "batches.npz")
    info = bench_sft.make_batches(path, tokenizer="smollm2")
    batches, vocab, _ = bench_sft.load_batches(path)
    shape = common.shape_config("smollm2-135m", vocab)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    from latentr3_jax.model import decoder
    unstack = decoder.unstack_layers
    specs = [(d, s) for d in ("float32", "bfloat16") for s in MODES]
    runs = {}
    for dname, mode in specs:
        # read when the step is traced (its first call, below)
        decoder.unstack_layers = index_layers if mode == "unrolled_index" else unstack
        with common.jax_precision(dname):
            st, step = bench_sft.make_train_step(
                shape.with_execution(scan_layers=mode == "scan"), mesh, "plain",
                common.jax_dtype(dname))
            t = time.perf_counter()
            st, m = step(st, batches[0])
            jax.block_until_ready(m["loss"])
        runs[(dname, mode)] = {"state": st, "step": step, "times": [], "cpu_s": [],
                               "steal_s": [], "compile_s": time.perf_counter() - t}
    decoder.unstack_layers = unstack
    for r in range(args.rounds + 1):          # round 0: one untimed warm step each
        for dname, scan in specs:
            run = runs[(dname, scan)]
            with common.jax_precision(dname):
                steal, cpu, t = stolen_s(), time.process_time(), time.perf_counter()
                run["state"], m = run["step"](run["state"], batches[(r + 1) % len(batches)])
                jax.block_until_ready(m["loss"])
            if r:
                run["times"].append(time.perf_counter() - t)
                run["cpu_s"].append(time.process_time() - cpu)
                run["steal_s"].append(stolen_s() - steal)
        print(f"round {r}: " + "  ".join(f"{d}/{s} "
                                          f"{runs[(d, s)]['times'][-1]:.2f} s" for d, s in specs
                                          if runs[(d, s)]["times"]), flush=True)
    res = {"info": info, "rounds": args.rounds, "machine": common.machine(),
           "rows": [{"dtype": d, "layers": s, "scan_layers": s == "scan", "step_s": r["times"],
                     "median_s": statistics.median(r["times"]), "min_s": min(r["times"]),
                     "process_cpu_s": r["cpu_s"], "stolen_s": r["steal_s"],
                     "compile_s": r["compile_s"]}
                    for (d, s), r in runs.items()]}
    common.write_result(args.out, res)


if __name__ == "__main__":
    sys.exit(main())
