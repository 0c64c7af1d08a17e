"""The SmolLM2 studies on one lent accelerator, sized to the minutes there are.

    python launch/device_study.py --out $OUT --budget-s 540 --model /tmp/smol/model.gguf

Runs `latentr3 study` for each dataset in `--datasets` (CDs first), one seed more at a
time and seed-major (every dataset's first seed before any second seed), in this one
process (a shape compiles once; JAX's persistent compilation cache keeps compiled steps
across the seeds' runs). After every seed the study so far (its table over the finished
seeds, the paired differences, SASRec and the model-free rows) is copied to `--out` as
study_<dataset>_smollm2-135m_<where>.json, with the runs' small files (configs, training
curves, metrics, predictions) in runs_smollm2-135m_<where>.tar.gz, so a run cut off by the time limit
still returns every seed that finished. A seed is started only when the time left exceeds
`--start-fraction` of the dataset's last seed's time (for its first seed, the shortest
first seed of the datasets before it, or `--min-start-s` for the very first). Every
`--pack-every-s` the runs' small files are packed again, so a seed cut off still returns
the variants it finished (N=0 and LatentR³ SFT come first). Checkpoints stay in
`--workdir`.

After each dataset's first seed, the slot probes of bench/slot_study.py run on that seed's
LatentR³ SFT model over the valid split (the reward with the user's own latent, another
user's, a zero latent and sigma = 1.5 noise): does the pretrained model's thought slot
carry anything user-specific? Then the reward with another user's whole prompt, for the
LatentR³ and the N=0 runs: how much does the history move the title's likelihood at all?
They go to slot_probes_<dataset>_smollm2-135m_<where>.json (`--no-probes` skips them).

`launch/device_study.sh` shows the calls that bring the GGUF file (94 MB, over one call's
64 MiB) in two parts. `--config-spec` and `--extra` let the same driver run a tiny
configuration on a CPU as a check of its own logic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import threading
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
    ap.add_argument("--start-fraction", type=float, default=1.0,
                    help="start a seed when the time left is at least this fraction of the "
                         "time it should take (below 1: a seed cut off still returns its "
                         "finished variants through the packed runs)")
    ap.add_argument("--no-probes", action="store_true", help="skip the slot probes")
    ap.add_argument("--pack-every-s", type=float, default=45.0,
                    help="also pack the runs' small files this often (0 = after seeds only)")
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
    # Every `--pack-every-s` the runs' small files are packed to --out as well, so a seed
    # cut off by the time limit still returns its finished variants' metrics and curves.
    stop = threading.Event()
    tarball = os.path.join(args.out, f"runs_smollm2-135m_{args.where}.tar.gz")

    def packer() -> None:
        while not stop.wait(args.pack_every_s):
            try:
                pack_runs(args.workdir, tarball)
            except Exception as e:   # noqa: BLE001  (a failed pack must not stop the study)
                log(f"packing the runs failed: {type(e).__name__}: {e}")

    if args.pack_every_s > 0:
        threading.Thread(target=packer, daemon=True).start()
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = [d for d in args.datasets.split(",") if d]
    flags_of, last, done = {}, {}, {}
    for dataset in datasets:
        spec = args.config_spec.format(dataset=dataset)
        file, _, arg = spec.partition(":")
        flags = ["--config", os.path.join(ROOT, file) + (f":{arg}" if arg else ""),
                 f"--config.workdir={os.path.join(args.workdir, dataset)}", *args.extra]
        if args.model:
            flags.append(f"--config.model.hf_path={args.model}")
        if args.data_root:
            named = parse_config(flags)[0].dataset_dir
            flags.append(f"--config.dataset_dir="
                         f"{os.path.join(os.path.abspath(args.data_root), os.path.basename(named))}")
        flags_of[dataset] = flags
    # Seed-major: every dataset's first seed before any dataset's second, so a short
    # budget gives one seed of each dataset rather than several of the first.
    stopped = set()
    for k in range(1, len(seeds) + 1):
        for dataset in datasets:
            if dataset in stopped:
                continue
            left = args.budget_s - (time.monotonic() - t0)
            # the time this seed should take: this dataset's last seed, else another
            # dataset's first seed (same model and buckets: the compiled steps are cached)
            need = last.get(dataset, min(last.values(), default=args.min_start_s))
            if left < args.start_fraction * need:
                log(f"{dataset}: stopping before seed {seeds[k - 1]} ({left:.0f} s left, a "
                    f"seed should take {need:.0f} s)")
                stopped.add(dataset)
                continue
            root = os.path.join(args.workdir, dataset)
            cfg = parse_config(flags_of[dataset]
                               + [f"--config.study.seeds={','.join(map(str, seeds[:k]))}"])[0]
            t = time.monotonic()
            log(f"{dataset}: seeds {seeds[:k]} ...")
            study = run_study(cfg)
            last[dataset] = time.monotonic() - t
            stem = f"study_{dataset}_smollm2-135m_{args.where}"
            # study.json alone (latentr3_jax.study.markdown and .plot make the .md and .png
            # from it): the lent machine returns at most 8 files
            shutil.copyfile(os.path.join(root, "study.json"),
                            os.path.join(args.out, f"{stem}.json"))
            pack_runs(args.workdir, tarball)
            done[dataset] = seeds[:k]
            if not args.no_probes and k == 1:
                probe_seed(cfg, root, seeds[k - 1],
                           os.path.join(args.out, f"slot_probes_{dataset}_smollm2-135m_{args.where}.json"),
                           log)
            pair = [p for p in study["pairs"] if p["metric"] == "NDCG@10" and p["rule"] == "title"]
            log(f"{dataset}: seeds {seeds[:k]} done in {last[dataset]:.0f} s; " + "; ".join(
                f"{p['pair']} {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" for p in pair))
    stop.set()
    pack_runs(args.workdir, tarball)
    log(f"finished: {done}")
    return 0


_PACK_LOCK = threading.Lock()


def pack_runs(root: str, out_path: str) -> None:
    """The small files of every run under `root` (configs, metrics.jsonl with the training
    curves, evaluation metrics and predictions; no checkpoints, tokenizers or caches) as
    one tar.gz, written beside `root`, copied next to `out_path` and renamed into place
    (never a partial file under that name)."""
    keep = ("config.json", "model_config.json", "metrics.jsonl", "metrics.json",
            "predictions.jsonl", "train_summary.json", "eval_meta.json")
    tmp = os.path.join(root, ".runs.tar.gz.tmp")
    part = os.path.join(os.path.dirname(out_path), "." + os.path.basename(out_path) + ".part")
    with _PACK_LOCK:   # the periodic packer and the end of a seed share these paths
        with tarfile.open(tmp, "w:gz") as tar:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if "checkpoint" not in d
                                     and d not in ("tokenizer", "jax_cache"))
                for name in sorted(filenames):
                    if name in keep or name.startswith("study."):
                        full = os.path.join(dirpath, name)
                        tar.add(full, arcname=os.path.relpath(full, os.path.dirname(root)))
        shutil.copyfile(tmp, part)
        os.replace(part, out_path)
        os.remove(tmp)


def probe_seed(cfg, root: str, seed: int, out_path: str, log) -> None:
    """Slot probes of one finished seed's LatentR³ SFT run on valid, added to `out_path`
    (a JSON object keyed by seed). A failure is logged, never fatal: the study comes first."""
    import copy
    import json
    import types

    try:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        import grpo_study as gs
        from latentr3_jax.train import runs

        t = time.monotonic()
        run_dir = os.path.join(root, f"seed_{seed}", "sft_latentr3")
        c = copy.deepcopy(cfg)
        c.eval.split = "valid"
        if not 0 < int(c.data.max_eval_rows) <= 1024:
            c.data.max_eval_rows = 1024   # the first 1,024 valid rows: a probe, not a metric
        shape = types.SimpleNamespace(cutoff=int(c.data.cutoff),
                                      max_target_len=int(c.data.max_target_len))
        run = runs.load_run(run_dir)
        pc = gs.one_shape(c, shape)
        r = gs.ValidReward(pc, run, probes=True)(run.params)
        got = {k: v for k, v in r.items() if not k.startswith("per_row")}
        got["rows"], got["run"] = len(r["per_row"]), run_dir
        # how much the user's whole history moves the title's likelihood, with and
        # without the thought slot (another user's prompt, the true title kept)
        got.update(gs.prompt_swap_reward(pc, run))
        base_dir = os.path.join(root, f"seed_{seed}", "sft_baseline")
        if os.path.isdir(base_dir):
            got["n0"] = gs.prompt_swap_reward(pc, runs.load_run(base_dir))
        old = {}
        if os.path.exists(out_path):
            with open(out_path, encoding="utf-8") as f:
                old = json.load(f)
        old[str(seed)] = got
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(old, f, indent=2)
        os.replace(tmp, out_path)
        log(f"slot probes seed {seed} ({time.monotonic() - t:.0f} s): reward own "
            f"{got['reward']:.3f}, another user's {got['reward_other_latent']:.3f}, zero "
            f"{got['reward_zero_latent']:.3f}, sigma 1.5 {got['reward_noisy_latent']:.3f}; "
            f"another user's prompt {got['reward_other_prompt']:.3f}"
            + (f" (N=0: own {got['n0']['reward_own_prompt']:.3f}, another user's "
               f"{got['n0']['reward_other_prompt']:.3f})" if "n0" in got else ""))
    except Exception as e:   # noqa: BLE001  (reported; the study's results are already out)
        log(f"slot probes seed {seed} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
