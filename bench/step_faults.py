"""Where a CPU training step's time goes outside the math: per step, wall time, user and
kernel CPU time, minor page faults, context switches and resident memory.

One engine, one step kind and one host-allocator setting per call, timed alone (not in
turns), so that per-step counters from `getrusage` belong to that step only:

    python bench/step_faults.py --engine jax --kind plain          # latentr3's heap policy
    LATENTR3_CPU_MALLOC=keep python bench/step_faults.py --engine jax --kind latent
    python bench/step_faults.py --engine torch --kind plain
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/step_faults.py --engine jax --tag thp
    python bench/step_faults.py --engine jax --pause 8 --tag pause8   # idle before each step

Shape: bench/bench_sft.py's (SmolLM2-135M, batch 8 of CDs prompts with SmolLM2's
tokenizer, random weights, fp32 AdamW, 2 threads; needs ../shared/models for the
tokenizer; `--batches FILE` reads batches made beforehand, so the process does no
tokenising before its steps). Each call adds its row to bench/results/step_faults_smollm2-135m.json under
'<engine>/<kind>/<dtype>/<allocator>[/<tag>]'; the latentr3 command line's own start-up
setting (malloc on huge pages for this model size, cpu_alloc.hugepage_env) is not applied
here: set GLIBC_TUNABLES yourself to time it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import common
import bench_sft
from latentr3_jax.utils import cpu_alloc
from latentr3_jax.utils.jsonio import read_json, write_json


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("jax", "torch"), required=True)
    ap.add_argument("--kind", choices=("plain", "latent"), default="plain")
    ap.add_argument("--dtype", choices=common.DTYPES, default="float32")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "step_faults_smollm2-135m.json"))
    ap.add_argument("--batches", default="", help="a bench_sft.make_batches file to read "
                    "instead of tokenising the batches in this process")
    ap.add_argument("--tag", default="", help="suffix of the row's key")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to sleep between "
                    "timed steps (untimed): as long as the other engine's step in a run that "
                    "takes turns, to see what an idle spell does to the next step")
    args = ap.parse_args(argv)
    if not common.have_smollm2():
        print(f"skipped: {common.smollm2_missing()}")
        return 0
    bpath = args.batches
    if not bpath:
        bpath = os.path.join(tempfile.mkdtemp(), "batches.npz")
        bench_sft.make_batches(bpath, tokenizer="smollm2")
    batches, vocab, thought = bench_sft.load_batches(bpath)
    config = common.shape_config("smollm2-135m", vocab)
    allocator = os.environ.get(cpu_alloc.ENV, "auto")
    if args.engine == "jax":
        applied = cpu_alloc.configure(num_params=config.num_params())   # as `latentr3` does
        import jax
        from latentr3_jax.parallel import make_mesh
        from latentr3_jax.train import setup
        config = config.with_execution(scan_layers=setup.scan_layers_option("auto",
                                                                            config.num_layers))
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        with common.jax_precision(args.dtype):
            state, step = bench_sft.make_train_step(config, mesh, args.kind,
                                                    common.jax_dtype(args.dtype))
        holder = {"state": state}

        def run(i):
            with common.jax_precision(args.dtype):
                holder["state"], m = step(holder["state"], batches[i % len(batches)])
            jax.block_until_ready(m["loss"])
    else:
        import torch
        import torch_reference as ref
        applied = None
        torch.set_num_threads(2)
        common.torch_strict_fp32()
        tb = [ref.to_torch(b) for b in batches]
        fn = ref.train_step_fn(args.kind, ref.build_causal_lm(config, attn_implementation="sdpa"),
                               tb, thought, common.autocast_dtype(args.dtype))

        def run(i):
            fn(i % len(tb))
    run(0)
    run(1)   # compile and first-touch, untimed
    rows = []
    for i in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run(i)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_s": t1 - t0, "user_s": r1.ru_utime - r0.ru_utime,
                     "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
                     "voluntary_switches": r1.ru_nvcsw - r0.ru_nvcsw,
                     "involuntary_switches": r1.ru_nivcsw - r0.ru_nivcsw, "rss_gib": rss_gib()})
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in rows[-1].items()), flush=True)
        time.sleep(args.pause)
    med = lambda k: sorted(r[k] for r in rows)[len(rows) // 2]   # noqa: E731
    key = f"{args.engine}/{args.kind}/{args.dtype}/{allocator if args.engine == 'jax' else 'glibc'}"
    key += f"/{args.tag}" if args.tag else ""
    res = read_json(args.out) if os.path.exists(args.out) else {"machine": common.machine(),
                                                                "rows": {}}
    res["rows"][key] = {"policy_applied": applied, "steps": rows,
                        "median": {k: med(k) for k in rows[0]},
                        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                        "command": "".join(f"{k}={os.environ[k]} " for k in (cpu_alloc.ENV,
                                                                             "GLIBC_TUNABLES")
                                           if os.environ.get(k))
                        + "python bench/step_faults.py " + " ".join(argv or sys.argv[1:])}
    write_json(args.out, res)
    print(f"{key}: median wall {med('wall_s'):.2f} s, sys {med('sys_s'):.2f} s, "
          f"{med('minor_faults')} faults; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
