"""The SmolLM2 studies on one lent accelerator, sized to the minutes there are.

    python launch/device_study.py --out $OUT --budget-s 540 --model /tmp/smol/model.gguf

Runs `latentr3 study` for each dataset in `--datasets` (CDs first), one seed more at a
time, in this one process (a shape compiles once; JAX's persistent compilation cache
keeps compiled steps across the seeds' runs). After every seed the study so far (its
table over the finished seeds, the paired differences, SASRec and the model-free rows) is
copied to `--out` as study_<dataset>_smollm2-135m_<where>.{json,md,png}, so a run cut off
by the time limit still returns every seed that finished. A seed is started only when
the time left exceeds the last seed's time (the first seed of a dataset always starts
when at least `--min-start-s` is left). Checkpoints stay in `--workdir`.

`launch/device_study.sh` shows the calls that bring the GGUF file (94 MB, over one call's
64 MiB) in two parts. `--config-spec` and `--extra` let the same driver run a tiny
configuration on a CPU as a check of its own logic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder the results are copied to ($OUT)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds this may run")
    ap.add_argument("--datasets", default="cds,industrial")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default="", help="model.hf_path (a .gguf or HF folder); "
                                                "default: the config's")
    ap.add_argument("--data-root", default="", help="folder holding the datasets' D3 folders "
                                                     "(default: the config's dataset_dir)")
    ap.add_argument("--workdir", default="/tmp/latentr3_device_study")
    ap.add_argument("--where", default="h200")
    ap.add_argument("--config-spec", default="configs/smollm2.py:{dataset}",
                    help="config file and argument, {dataset} filled in")
    ap.add_argument("--extra", action="append", default=[], help="one more --config.KEY=VALUE")
    ap.add_argument("--min-start-s", type=float, default=120.0)
    args = ap.parse_args()
    t0 = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.workdir, "jax_cache")
    os.makedirs(cache, exist_ok=True)

    import jax
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from latentr3_jax.config import parse_config
    from latentr3_jax.study import run_study

    log_path = os.path.join(args.out, "device_study.log")

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - t0:7.1f} s] {msg}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    log(f"devices: {jax.devices()}")
    seeds = [int(s) for s in args.seeds.split(",")]
    done = {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        spec = args.config_spec.format(dataset=dataset)
        file, _, arg = spec.partition(":")
        root = os.path.join(args.workdir, dataset)
        flags = ["--config", os.path.join(ROOT, file) + (f":{arg}" if arg else ""),
                 f"--config.workdir={root}", *args.extra]
        if args.model:
            flags.append(f"--config.model.hf_path={args.model}")
        if args.data_root:
            named = parse_config(flags)[0].dataset_dir
            flags.append(f"--config.dataset_dir="
                         f"{os.path.join(os.path.abspath(args.data_root), os.path.basename(named))}")
        last = None
        for k in range(1, len(seeds) + 1):
            left = args.budget_s - (time.monotonic() - t0)
            need = last if last is not None else args.min_start_s
            if left < need:
                log(f"{dataset}: stopping before seed {seeds[k - 1]} ({left:.0f} s left, the "
                    f"last seed took {need:.0f} s)")
                break
            cfg = parse_config(flags + [f"--config.study.seeds={','.join(map(str, seeds[:k]))}"])[0]
            t = time.monotonic()
            log(f"{dataset}: seeds {seeds[:k]} ...")
            study = run_study(cfg)
            last = time.monotonic() - t
            stem = f"study_{dataset}_smollm2-135m_{args.where}"
            for ext in ("json", "md", "png"):
                src = os.path.join(root, f"study.{ext}")
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(args.out, f"{stem}.{ext}"))
            done[dataset] = seeds[:k]
            pair = [p for p in study["pairs"] if p["metric"] == "NDCG@10" and p["rule"] == "title"]
            log(f"{dataset}: seeds {seeds[:k]} done in {last:.0f} s; " + "; ".join(
                f"{p['pair']} {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" for p in pair))
    log(f"finished: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
