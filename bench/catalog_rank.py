"""Where the true title ranks among the whole catalog by likelihood, without beam search.

For every valid row, every catalog title is scored teacher-forced under the row's prompt and
its noise-free latent, by its mean token log-likelihood (the score beam search ranks
finished titles by, length_penalty 1), and the true title's rank among them gives a
full-ranking NDCG@10 / HR@10. Beam search only approximates this ranking (it prunes by
prefixes), so comparing the two tells whether a change in beam-search NDCG comes from the
model's likelihoods or from the search. Brute force: (1 + catalog) titles per row, so meant
for the demo's 320-item catalog.

    python bench/catalog_rank.py RUN_DIR [RUN_DIR ...] [--out FILE.json]   # one line per run

With --out, writes each run's full-ranking metrics beside its beam-search NDCG@10 on valid
(from the run's eval_valid_constrained, when it has one).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import grpo_study as gs  # noqa: E402
from latentr3_jax import data as D  # noqa: E402
from latentr3_jax.model import latent as latent_lib  # noqa: E402
from latentr3_jax.train import runs  # noqa: E402
from latentr3_jax.train.grpo import loss as gl  # noqa: E402
from latentr3_jax.train.grpo import rollout  # noqa: E402
from latentr3_jax.utils.jsonio import read_json, write_json  # noqa: E402


def catalog_ranks(run_dir: str, chunk: int = 4) -> np.ndarray:
    """0-based rank of each valid row's true title among the catalog's other titles (number
    of distinct titles with a strictly higher mean token log-likelihood), in row order."""
    cfg = ml_collections.ConfigDict(read_json(os.path.join(run_dir, "config.json")))
    cfg.eval.split = "valid"
    run = runs.load_run(run_dir)
    catalog = D.load_dataset(cfg).catalog
    titles = list({tuple(v) for v in D.catalog_target_ids(run.tokenizer, catalog,
                                                          cfg.data.template).values()})
    it, rows = gs.valid_batches(cfg, run)
    width = max(max(len(t) for t in titles), max(int(b) for b in gs.setup.target_buckets(cfg)))
    cat_ids = np.zeros((len(titles), width), np.int32)
    cat_mask = np.zeros((len(titles), width), np.int32)
    for i, t in enumerate(titles):
        cat_ids[i, :len(t)], cat_mask[i, :len(t)] = t, 1
    cat_ids, cat_mask = jnp.asarray(cat_ids), jnp.asarray(cat_mask)
    d = latent_lib.latent_width(run.model_config, run.params)

    @jax.jit
    def ranks(params, prompt_ids, prompt_mask, own_ids, own_mask):
        P = prompt_ids.shape[0]
        ids = jnp.concatenate([own_ids[:, None], jnp.broadcast_to(cat_ids, (P,) + cat_ids.shape)], 1)
        mask = jnp.concatenate([own_mask[:, None], jnp.broadcast_to(cat_mask, (P,) + cat_mask.shape)], 1)
        logp, _ = rollout.group_logprobs(run.model_config, params, prompt_ids, prompt_mask, ids,
                                         mask, jnp.zeros((P, 1, d)), num_thoughts=run.num_thoughts,
                                         latent_mode=run.latent_mode)
        s = gl.title_score(logp, mask)                                       # [P, 1 + I]
        same = jnp.all(jnp.where(mask[:, 1:] > 0, ids[:, 1:], -1)
                       == jnp.where(own_mask[:, None] > 0, own_ids[:, None], -1), -1)
        return jnp.sum((s[:, 1:] > s[:, :1]) & ~same, -1)

    out = np.full(rows, -1, np.int64)
    for b in it.epoch(0, start=0):
        own_ids = np.zeros((len(b["row"]), width), np.int32)
        own_mask = np.zeros_like(own_ids)
        T = b["target_ids"].shape[1]
        own_ids[:, :T], own_mask[:, :T] = b["target_ids"], b["target_mask"]
        for lo in range(0, len(b["row"]), chunk):
            sl = slice(lo, lo + chunk)
            r = np.asarray(ranks(run.params, jnp.asarray(b["prompt_ids"][sl]),
                                 jnp.asarray(b["prompt_mask"][sl]), jnp.asarray(own_ids[sl]),
                                 jnp.asarray(own_mask[sl])))
            real = np.asarray(b["valid"][sl], bool) & (np.asarray(b["row"][sl]) >= 0)
            out[np.asarray(b["row"][sl])[real]] = r[real]
    assert (out >= 0).all(), "valid rows missing"
    return out


def metrics(rank: np.ndarray) -> dict:
    hit = rank < 10
    return {"NDCG@10": float(np.mean(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0))),
            "HR@10": float(np.mean(hit)), "mean_rank": float(np.mean(rank))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    res = {"command": "python bench/catalog_rank.py " + " ".join(args.runs), "runs": {}}
    for r in args.runs:
        m = metrics(catalog_ranks(r))
        beam = os.path.join(r, "eval_valid_constrained", "metrics.json")
        if os.path.exists(beam):
            m["beam_NDCG@10"] = read_json(beam)["NDCG@10"]
        res["runs"][r] = m
        print(r, m, flush=True)
        if args.out:
            write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
