"""`latentr3 run`: the whole LatentR³ recipe on one dataset, with one table at the end.

Three variants share the data, the tokenizer and the decoder shape:
  1. SFT without latent thoughts (the BIGRec/D3 baseline, N = 0);
  2. SFT with LatentR³ (N thought latents from LatentRATT);
  3. LR-GRPO, starting from variant 2.
With pipeline.base_epochs > 0, a shared N = 0 SFT stage ("base") runs first and variants 1
and 2 both start from its weights, as the paper's variants all fine-tune one pretrained
LLM; a decoder trained from scratch otherwise decides early, and by chance, whether the
thought slot is ever read. Each variant is evaluated on the test split with the configured
decoding (trie-constrained beam search by default). Every stage resumes: rerunning the
same command after an interruption picks up where it stopped, and finished stages are not
redone.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import time
from typing import Optional, Sequence

from latentr3_jax import config as config_lib
from latentr3_jax import data as D
from latentr3_jax import report
from latentr3_jax.data import baselines
from latentr3_jax.errors import InputError
from latentr3_jax.eval.evaluate import META, METRICS, PREDICTIONS, evaluate_run
from latentr3_jax.eval.negatives import attach
from latentr3_jax.eval.selection import valid_ndcg
from latentr3_jax.train.grpo import train_grpo
from latentr3_jax.train.runs import read_metrics, save_tokenizer
from latentr3_jax.train.sft import train_sft
from latentr3_jax.utils.jsonio import read_json, write_json

VARIANTS = (
    # name, label, stage
    ("sft_baseline", "SFT, no latent (BIGRec/D3 baseline)", "sft"),
    ("sft_latentr3", "SFT + LatentR³", "sft"),
    ("lr_grpo", "SFT + LatentR³ + LR-GRPO", "grpo"),
)


BASE = "base"


def _base_config(cfg, workdir: str):
    """The shared N = 0 warm-up stage, or None when pipeline.base_epochs is 0."""
    epochs = int(cfg.pipeline.base_epochs)
    if epochs == 0:
        return None
    if cfg.sft.init_from:
        raise InputError("config pipeline.base_epochs and sft.init_from are both set: the base "
                         "stage is where the variants start from")
    b = copy.deepcopy(cfg)
    b.workdir = os.path.join(workdir, BASE)
    b.model.num_thoughts = 0
    b.sft.slot_bottleneck = 0.0   # a latent option; the base stage has no slot
    b.sft.epochs = epochs
    return b


def _variant_config(cfg, name: str, workdir: str, base=None):
    v = copy.deepcopy(cfg)
    v.workdir = os.path.join(workdir, name)
    if base is not None and name != "lr_grpo":
        v.sft.init_from = base.workdir
        v.model.hf_path = ""   # the base run started from it; its weights are what carry on
    if name == "sft_baseline":
        v.model.num_thoughts = 0
        v.sft.slot_bottleneck = 0.0
    elif v.model.num_thoughts < 1:
        raise InputError("model.num_thoughts must be >= 1 for the LatentR³ variants of `run`")
    if name == "lr_grpo":
        v.grpo.init_from = os.path.join(workdir, "sft_latentr3")
    return v


def _shared_inputs(cfg, workdir: str):
    """Generate the dataset and the tokenizer once, so every variant sees the same ones."""
    if cfg.dataset == "synthetic" and not cfg.dataset_dir:
        cfg.dataset_dir = os.path.join(workdir, "synthetic_data")
    dataset = D.load_dataset(cfg)
    if not cfg.tokenizer.path and not cfg.model.hf_path:
        tok_dir = os.path.join(workdir, "tokenizer")
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            print(f"training a byte-level BPE tokenizer on {dataset.name} ...", flush=True)
            save_tokenizer(D.make_tokenizer(cfg, dataset), tok_dir)
        cfg.tokenizer.path = tok_dir
    sizes = {k: len(v) for k, v in dataset.splits.items()}
    print(f"dataset {dataset.name}: {len(dataset.catalog)} items, splits {sizes}", flush=True)
    return dataset


def _baseline_rows(cfg, dataset) -> list:
    """Model-free recommenders on the same evaluation rows, ranked by the same title rule."""
    split = cfg.eval.split
    rows = dataset.splits[split]
    if cfg.eval.max_users >= 0:
        rows = rows[:cfg.eval.max_users]
    view = dataclasses.replace(dataset, splits={**dataset.splits, split: rows})
    return baselines.table_rows(view, split, title_rule=True)


def _timed_stage(name: str, stage: str, vcfg) -> dict:
    marker = os.path.join(vcfg.workdir, "train_summary.json")
    if os.path.exists(marker):
        summary = read_json(marker)
        print(f"[{name}] already trained ({summary.get('train_time_s', 0):.1f} s); skipping",
              flush=True)
        return summary
    print(f"\n[{name}] training ({stage}) -> {vcfg.workdir}", flush=True)
    t0 = time.perf_counter()
    train = train_sft if stage == "sft" else functools.partial(train_grpo, negatives=attach,
                                                                   valid_ranking=valid_ndcg)
    summary = train(vcfg, resume_hint="latentr3 run with the same arguments")
    summary = {k: v for k, v in summary.items() if k != "curve"}
    summary["train_time_s"] = time.perf_counter() - t0 + float(summary.get("train_time_s", 0) or 0)
    write_json(marker, summary)
    return summary


def seed_evaluation(src: str, dst: str) -> bool:
    """Copy a finished evaluation's predictions and meta from `src` into `dst` when `dst`
    has none. evaluate_run resumes from them only when the meta (the weights' fingerprint,
    split, beams, template ...) equals its own, and starts over otherwise, so this never
    changes a result: it skips decoding a model another variant has just decoded."""
    files = (PREDICTIONS, META)
    if not all(os.path.exists(os.path.join(src, f)) for f in files) or \
            os.path.exists(os.path.join(dst, PREDICTIONS)):
        return False
    os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return True


def _evaluate(name: str, vcfg, reuse_from: Optional[str] = None) -> dict:
    print(f"[{name}] evaluating on {vcfg.eval.split} ({vcfg.eval.mode})", flush=True)
    out_dir = os.path.join(vcfg.workdir, f"eval_{vcfg.eval.split}_{vcfg.eval.mode}")
    if reuse_from and vcfg.eval.resume and seed_evaluation(reuse_from, out_dir):
        print(f"[{name}] the run kept its starting weights (grpo.select=best); its decoding "
              f"is reused from {reuse_from} if the weights' fingerprint matches", flush=True)
    return evaluate_run(vcfg, vcfg.workdir, out_dir=out_dir, print_table=False)


def run_pipeline(cfg, variants: Optional[Sequence[str]] = None) -> list:
    """Train and evaluate the variants; returns the table rows (also written to workdir)."""
    config_lib.validate(cfg, stage="run")
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    dataset = _shared_inputs(cfg, workdir)
    wanted = set(variants or [v[0] for v in VARIANTS])
    rows, curves = [], {}
    base = _base_config(cfg, workdir)
    base_time = 0.0
    if base is not None and wanted & {"sft_baseline", "sft_latentr3"}:
        base_time = float(_timed_stage(BASE, "sft", base).get("train_time_s") or 0.0)
        print(f"[{BASE}] shared N=0 stage: {base.sft.epochs} epochs, {base_time:.1f} s; "
              f"the SFT variants start from it", flush=True)
    for name, label, stage in VARIANTS:
        if name not in wanted:
            continue
        vcfg = _variant_config(cfg, name, workdir, base)
        summary = _timed_stage(name, stage, vcfg)
        # LR-GRPO that handed back its SFT start: the SFT variant's decoding is this one's
        reuse = (os.path.join(workdir, "sft_latentr3", f"eval_{cfg.eval.split}_{cfg.eval.mode}")
                 if stage == "grpo" and summary.get("best_step") == 0 else None)
        metrics = _evaluate(name, vcfg, reuse)
        # steady-state speed: variants share shapes, so only the first one pays the compile;
        # a reused decoding (same weights, nothing decoded now) has the speed measured for it
        timed = metrics
        reused = os.path.join(reuse or "", METRICS)
        if reuse and not metrics.get("evaluated_now") and os.path.exists(reused):
            timed = read_json(reused)
        ups = timed.get("users_per_s_after_compile") or timed.get("users_per_s") or 0.0
        rows.append({"variant": label, "name": name, "num_thoughts": int(vcfg.model.num_thoughts),
                     **{k: metrics.get(k) for k in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5",
                                                    "NDCG@10", "NDCG@20", "HR@5_id", "HR@10_id")},
                     "train_time_s": summary.get("train_time_s"),
                     "base_time_s": base_time if base is not None else None,
                     "ms_per_user": 1000.0 / ups if ups else None,
                     "users": metrics.get("users")})
        curves[label] = read_metrics(vcfg.workdir)
        print(f"[{name}] HR@5 {metrics.get('HR@5', 0):.4f}  NDCG@5 {metrics.get('NDCG@5', 0):.4f}",
              flush=True)
    rows += _baseline_rows(cfg, dataset)
    paths = report.write_tables(rows, workdir, stem="results")
    png = report.plot_pipeline(curves, rows, os.path.join(workdir, "results.png"))
    print("\n" + report.text_table(rows))
    print(f"\nwrote {paths['md']}, {paths['json']}, {png}")
    return rows
