"""Host settings at the SmolLM2-135M shape: the plain SFT step (fwd + bwd + AdamW) of JAX
under each heap policy (and with XLA's oneDNN matmuls), and transformers', all in turns.

latentr3 sets glibc's heap policy at start-up (latentr3_jax/utils/cpu_alloc.py: `auto`
reuses the heap, one arena with no mmap-backed chunks and trimming only above 2 GiB, for
models of up to 32M parameters; `keep` turns trimming off). This runs, as separate processes whose timed steps alternate (so the
VM's drift hits each alike; bench/common.py, run_workers_in_turns), a choice of:

  jax_reuse          heap reuse (LATENTR3_CPU_MALLOC=reuse; `auto` for small models)
  jax_keep           heap reuse with trimming off (LATENTR3_CPU_MALLOC=keep)
  jax_system         glibc's defaults (LATENTR3_CPU_MALLOC=system)
  jax_auto           the start-up default (`auto`)
  jax_reuse_thp      heap reuse with glibc.malloc.hugetlb=1 (transparent huge pages on
                     malloc's memory, through GLIBC_TUNABLES)
  jax_system_thp     glibc's defaults with glibc.malloc.hugetlb=1
  jax_onednn         the start-up default with XLA's oneDNN matmuls
                     (XLA_FLAGS=--xla_cpu_use_onednn=true)
  jax_eigen          the start-up default with YNNPACK off, so every dot is Eigen's
                     (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=)
  jax_ynn_fused      the start-up default with YNNPACK also fusing dots with their
                     elementwise neighbours (...ynn_fusion_type=individual_dot,dot)
  torch              transformers, glibc's defaults
  torch_reuse        transformers under the same heap policy (through GLIBC_TUNABLES)

    python bench/malloc_ab.py [--arms a,b,...] [--steps 4] [--dtypes float32,bfloat16]

Default arms: jax_auto, jax_keep, torch. Every arm's process stays
alive while the others take their turns, and an arm under the heap-reuse policy holds its
step's whole heap meanwhile (about 8 GB for the 135M fp32 step): on a 24 GB machine run at
most two such arms at that shape (four arms, two of them keeping their heap, ran out of
memory: bench/results/malloc_ab_oom_smollm2-135m.json). Writes
bench/results/malloc_ab_<shape>.json (or --out). With --shape smollm2-135m it needs
../shared/models (the tokenizer of the batches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import common
import bench_sft

THP = "glibc.malloc.hugetlb=1"
ARMS = {   # name: (engine, environment, XLA_FLAGS)
    "jax_reuse": ("jax", {"LATENTR3_CPU_MALLOC": "reuse"}, ""),
    "jax_system": ("jax", {"LATENTR3_CPU_MALLOC": "system"}, ""),
    "jax_reuse_thp": ("jax", {"LATENTR3_CPU_MALLOC": "reuse", "GLIBC_TUNABLES": THP}, ""),
    "jax_system_thp": ("jax", {"LATENTR3_CPU_MALLOC": "system", "GLIBC_TUNABLES": THP}, ""),
    "jax_auto": ("jax", {}, ""),
    "jax_keep": ("jax", {"LATENTR3_CPU_MALLOC": "keep"}, ""),
    "jax_onednn": ("jax", {}, "--xla_cpu_use_onednn=true"),
    "jax_eigen": ("jax", {}, "--xla_cpu_experimental_ynn_fusion_type="),
    "jax_ynn_fused": ("jax", {}, "--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot"),
    "torch": ("torch", {}, ""),
    "torch_reuse": ("torch", {"GLIBC_TUNABLES": bench_sft.MALLOC["GLIBC_TUNABLES"]}, ""),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=("small", "smollm2-135m"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--arms", default="jax_auto,jax_keep,torch",
                    help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
    if args.shape == "smollm2-135m" and not common.have_smollm2():
        print(f"skipped: {common.smollm2_missing()}")
        return 0
    out = args.out or os.path.join(common.RESULTS, f"malloc_ab_{args.shape}.json")
    bpath = os.path.join(tempfile.mkdtemp(), "batches.npz")
    info = bench_sft.make_batches(bpath, tokenizer="smollm2" if args.shape == "smollm2-135m"
                                  else "bpe")
    specs = []
    for a in arms:
        engine, env, flags = ARMS[a]
        specs.append(bench_sft._worker_spec(engine, bpath, kinds="plain", dtypes=args.dtypes,
                                            steps=args.steps, threads=args.threads, env=env,
                                            shape=args.shape, xla_flags=flags))
    answers = common.run_workers_in_turns(specs)
    result = {"shape": args.shape, "info": info, "steps": args.steps, "threads": args.threads,
              "arms": {a: {"env": ARMS[a][1], "xla_flags": ARMS[a][2], **ans}
                       for a, ans in zip(arms, answers)},
              "machine": common.machine(),
              "thp": common.thp_mode(),
              "timing": "one process per arm, taking turns step by step (run_workers_in_turns)"}
    print(f"plain step at the {args.shape} shape, {args.steps} timed steps per arm "
          f"(THP: {result['thp']}):")
    torch = result["arms"].get("torch", {})
    for a in arms:
        r = result["arms"][a]
        if "error" in r:
            print(f"  {a:<16} ERROR {r['error']}")
            continue
        cells = []
        for d in args.dtypes.split(","):
            k = f"plain/{d}"
            if k in r:
                ratio = (torch[k]["step_s"] / r[k]["step_s"]) if k in torch and a != "torch" else None
                cells.append(f"{d} {r[k]['step_s']:.2f} s (min {r[k]['min_s']:.2f})"
                             + (f", {ratio:.2f}x torch" if ratio else ""))
        print(f"  {a:<16} " + "; ".join(cells))
    common.write_result(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
