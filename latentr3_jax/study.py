"""`latentr3 study`: the variants of `latentr3 run` over several seeds, with error bars.

    latentr3 study --config configs/smollm2.py:cds,cpu --config.study.seeds=0,1,2 \\
        --config.workdir=runs/study_cds

Each seed is one `latentr3 run` under `<workdir>/seed_<s>` (resumable: rerunning the
command skips what finished). The study then reads every variant's per-user predictions
and writes `study.json`, `study.md` and `study.png`:

- per variant, the mean over seeds of HR@5/10 and NDCG@5/10 under both matching rules
  (title, item id) with a 95% t-interval over seeds;
- the model-free recommenders and SASRec (trained per seed on the same train split) on the
  same users with the same metric code;
- for LatentR³ − N=0 and LR-GRPO − SFT: the paired difference per user, pooled over seeds
  (each user's mean over seeds), a 95% bootstrap interval over users, and a two-sided
  sign-flip permutation p-value over users.

The split evaluated is `eval.split`: choose hyperparameters with `--config.eval.split=valid`
and read test once, with the final configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np

from latentr3_jax import config as config_lib
from latentr3_jax import data as D
from latentr3_jax import pipeline
from latentr3_jax.data import baselines, sasrec
from latentr3_jax.errors import InputError
from latentr3_jax.eval import metrics as M
from latentr3_jax.utils.atomic import atomic_write_text
from latentr3_jax.utils.jsonio import write_json

METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10")
RULES = ("title", "id")
PAIRS = (("sft_latentr3", "sft_baseline", "LatentR³ − N=0"),
         ("lr_grpo", "sft_latentr3", "LR-GRPO − SFT"))
# two-sided 97.5% quantile of Student's t by degrees of freedom (normal beyond 30)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df <= 0:
        return float("nan")
    known = [d for d in sorted(_T975) if d <= df]
    return _T975[known[-1]] if df <= 30 else 1.96


# --------------------------------------------------------------------------- per-user metrics


def per_user(ranks: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-user HR@K / NDCG@K from 0-based ranks (-1 or >= K: a miss)."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {}
    for name in METRICS:
        kind, k = name.split("@")
        hit = (r >= 0) & (r < int(k))
        out[name] = hit.astype(np.float64) if kind == "HR" else \
            np.where(hit, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
    return out


def prediction_ranks(pred_path: str, num_rows: int) -> Dict[str, np.ndarray]:
    """{'title', 'id'}: per-row ranks from a predictions.jsonl ([num_rows], -1 = missed)."""
    out = {rule: np.full(num_rows, -1, np.int64) for rule in RULES}
    seen = np.zeros(num_rows, bool)
    for row in M.read_predictions(pred_path):
        i = int(row["row"])
        if 0 <= i < num_rows:
            out["title"][i], out["id"][i], seen[i] = int(row["rank_title"]), int(row["rank_id"]), True
    if not seen.all():
        raise RuntimeError(f"{pred_path}: {int((~seen).sum())} of {num_rows} rows missing "
                           f"(rerun the study to finish the evaluation)")
    return out


def baseline_ranks(dataset, split: str, rows: Sequence, method: str) -> Dict[str, np.ndarray]:
    view = dataclasses.replace(dataset, splits={**dataset.splits, split: list(rows)})
    sc = baselines.scores(method, view.splits["train"], rows, view.catalog)
    return {"title": baselines.ranks(sc, rows, view.catalog, title_rule=True),
            "id": baselines.ranks(sc, rows, view.catalog, title_rule=False)}


# --------------------------------------------------------------------------- statistics


def seed_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t-interval over seeds."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "lo": None, "hi": None, "seeds": len(v)}
    half = t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "seeds": len(v)}


def paired_difference(a: np.ndarray, b: np.ndarray, *, resamples: int, seed: int = 0) -> dict:
    """a, b: [seeds, users] per-user metric of two variants on the same users. The
    difference per user is averaged over seeds; the mean over users gets a percentile
    bootstrap interval (users resampled) and a two-sided sign-flip permutation p-value."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=0)     # [users]
    n = len(d)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    flips = np.empty(resamples)
    for i in range(resamples):
        boot[i] = d[rng.integers(0, n, n)].mean()
        flips[i] = (d * rng.choice((-1.0, 1.0), n)).mean()
    obs = float(d.mean())
    p = (1 + int(np.sum(np.abs(flips) >= abs(obs) - 1e-15))) / (resamples + 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": obs, "lo": float(lo), "hi": float(hi), "p": float(p), "users": n,
            "base_mean": float(np.asarray(b).mean()), "rel": obs / float(np.asarray(b).mean())
            if float(np.asarray(b).mean()) else None}


# --------------------------------------------------------------------------- the study


def _seed_config(cfg, seed: int, root: str):
    c = copy.deepcopy(cfg)
    c.seed = int(seed)
    c.workdir = os.path.join(root, f"seed_{seed}")
    return c


def run_study(cfg, variants: Optional[Sequence[str]] = None) -> dict:
    """Run the pipeline for each seed in cfg.study.seeds, then the tables; returns the
    study dict (also written to <workdir>/study.json)."""
    config_lib.validate(cfg, stage="study")
    root = os.path.abspath(cfg.workdir)
    os.makedirs(root, exist_ok=True)
    seeds = [int(s) for s in cfg.study.seeds]
    split = cfg.eval.split
    labels = {}
    if cfg.study.report_only:
        labels = finished_variants(root, seeds, f"eval_{split}_{cfg.eval.mode}", variants)
    else:
        for seed in seeds:
            print(f"\n===== study seed {seed} =====", flush=True)
            for row in pipeline.run_pipeline(_seed_config(cfg, seed, root), variants):
                labels.setdefault(row["name"], row["variant"])

    dataset = D.load_dataset(_seed_config(cfg, seeds[0], root))   # the data every seed's run read
    rows = list(dataset.splits[split])
    if cfg.eval.max_users >= 0:
        rows = rows[:cfg.eval.max_users]
    ranks: Dict[str, list] = {}        # variant -> per seed {'title', 'id'} ranks
    for name, _, _ in pipeline.VARIANTS:
        if name in labels:
            ranks[name] = [prediction_ranks(os.path.join(
                root, f"seed_{s}", name, f"eval_{split}_{cfg.eval.mode}", "predictions.jsonl"),
                len(rows)) for s in seeds]
    for method, label in baselines.LABELS.items():
        labels[method] = label
        ranks[method] = [baseline_ranks(dataset, split, rows, method)] * len(seeds)
    if cfg.study.sasrec:
        labels["sasrec"] = sasrec.VARIANT
        ranks["sasrec"] = [sasrec_ranks(dataset, split, rows, seed) for seed in seeds]

    users = {name: [{rule: per_user(r[rule]) for rule in RULES} for r in per_seed]
             for name, per_seed in ranks.items()}
    table = []
    for name, per_seed in users.items():
        row = {"name": name, "variant": labels[name], "users": len(rows), "seeds": len(seeds)}
        for rule in RULES:
            for m in METRICS:
                row[f"{m}_{rule}"] = seed_interval([u[rule][m].mean() for u in per_seed])
        table.append(row)
    pairs = []
    for a, b, label in PAIRS:
        if a in users and b in users:
            for rule in RULES:
                for m in METRICS:
                    pairs.append({"pair": label, "a": a, "b": b, "rule": rule, "metric": m,
                                  **paired_difference(
                                      np.stack([u[rule][m] for u in users[a]]),
                                      np.stack([u[rule][m] for u in users[b]]),
                                      resamples=int(cfg.study.bootstrap))})
    study = {"split": split, "mode": cfg.eval.mode, "seeds": seeds, "users": len(rows),
             "dataset": dataset.name, "items": len(dataset.catalog), "table": table,
             "pairs": pairs, "config": cfg.to_dict()}
    write_json(os.path.join(root, "study.json"), study)
    atomic_write_text(os.path.join(root, "study.md"), markdown(study) + "\n")
    plot(study, os.path.join(root, "study.png"))
    print("\n" + markdown(study))
    print(f"\nwrote {os.path.join(root, 'study.md')}, study.json, study.png")
    return study


def finished_variants(root: str, seeds: Sequence[int], eval_dir: str,
                      variants: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The variants whose predictions every seed has under <root>/seed_<s>/<variant>/<eval_dir>
    (for study.report_only); a variant some seeds have and others lack is an error naming
    the missing file, and so is finding none."""
    labels = {}
    for name, label, _ in pipeline.VARIANTS:
        if variants is not None and name not in variants:
            continue
        paths = [os.path.join(root, f"seed_{s}", name, eval_dir, "predictions.jsonl")
                 for s in seeds]
        have = [os.path.exists(p) for p in paths]
        if all(have):
            labels[name] = label
        elif any(have):
            missing = paths[have.index(False)]
            raise InputError(f"{missing}: missing (study.report_only needs the predictions of "
                             f"variant {name} for every seed of study.seeds)")
    if not labels:
        raise InputError(f"{root}: no variant has {eval_dir}/predictions.jsonl under "
                         f"seed_{seeds[0]}/ (study.report_only reads finished runs)")
    return labels


def sasrec_ranks(dataset, split: str, rows: Sequence, seed: int) -> Dict[str, np.ndarray]:
    view = dataclasses.replace(dataset, splits={**dataset.splits, split: list(rows)})
    cfg = sasrec.SASRecConfig()
    params, _ = sasrec.train_sasrec(view, cfg, seed=seed)
    sc = sasrec.scores(params, cfg, rows, view.catalog)
    return {"title": baselines.ranks(sc, rows, view.catalog, title_rule=True),
            "id": baselines.ranks(sc, rows, view.catalog, title_rule=False)}


# --------------------------------------------------------------------------- output


def _cell(iv: dict) -> str:
    if iv["lo"] is None:
        return f"{iv['mean']:.4f}"
    return f"{iv['mean']:.4f} ± {(iv['hi'] - iv['lo']) / 2:.4f}"


def markdown(study: dict) -> str:
    lines = [f"Dataset {study['dataset']} ({study['items']} items), split {study['split']}, "
             f"{study['users']} users, decoding {study['mode']}, seeds {study['seeds']}. "
             f"Mean ± 95% t-interval half-width over seeds.", ""]
    for rule, title in (("title", "title rule (the release's)"), ("id", "item-id rule")):
        lines += [f"**{title}**", "", "| variant | " + " | ".join(METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for row in study["table"]:
            lines.append(f"| {row['variant']} | " +
                         " | ".join(_cell(row[f"{m}_{rule}"]) for m in METRICS) + " |")
        lines.append("")
    if study["pairs"]:
        lines += ["**paired differences** (per user, averaged over seeds; 95% bootstrap "
                  "interval over users; sign-flip p-value)", "",
                  "| difference | rule | metric | diff | 95% interval | relative | p |",
                  "|---|---|---|---|---|---|---|"]
        for p in study["pairs"]:
            rel = "-" if p["rel"] is None else f"{100 * p['rel']:+.1f}%"
            lines.append(f"| {p['pair']} | {p['rule']} | {p['metric']} | {p['diff']:+.4f} | "
                         f"[{p['lo']:+.4f}, {p['hi']:+.4f}] | {rel} | {p['p']:.3g} |")
    return "\n".join(lines)


def plot(study: dict, path: str) -> str:
    """NDCG@10 per variant with its interval over seeds, and the paired differences."""
    # imported here: matplotlib is slow to import and only the plot needs it, and the
    # headless backend has to be chosen before pyplot loads
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    names = [r["variant"] for r in study["table"]]
    for j, rule in enumerate(RULES):
        iv = [r[f"NDCG@10_{rule}"] for r in study["table"]]
        mean = np.array([x["mean"] for x in iv])
        err = np.array([0.0 if x["lo"] is None else (x["hi"] - x["lo"]) / 2 for x in iv])
        ax1.barh(np.arange(len(names)) + 0.4 * j, mean, 0.4, xerr=err, capsize=3,
                 label=f"{rule} rule")
    ax1.set_yticks(np.arange(len(names)) + 0.2)
    ax1.set_yticklabels(names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"NDCG@10 ({study['split']}, mean over seeds, 95% interval)")
    ax1.legend(fontsize=8)
    pairs = [p for p in study["pairs"] if p["rule"] == "title"]
    ys = np.arange(len(pairs))
    ax2.errorbar([p["diff"] for p in pairs], ys,
                 xerr=[[p["diff"] - p["lo"] for p in pairs], [p["hi"] - p["diff"] for p in pairs]],
                 fmt="o", capsize=3)
    ax2.axvline(0.0, color="grey", lw=1)
    ax2.set_yticks(ys)
    ax2.set_yticklabels([f"{p['pair']} {p['metric']}" for p in pairs], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("paired difference per user (title rule), 95% bootstrap interval")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
