"""Ranking the catalog for a batch of prompts: the one decoding path shared by
`latentr3 evaluate`, the `Recommender` API, `latentr3 recommend` and `latentr3 serve`.

A `Ranker` holds a model, its tokenizer and a catalog, prepared once (the title trie for
constrained beam search, or the catalog embeddings for BIGRec grounding), and turns a
left-padded prompt batch into one ranked list per row. Because every caller goes through
it with the same batching (data.BatchIterator over prompt buckets), the same rows in the
same batches give bit-identical rankings whichever front end asked.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from latentr3_jax import data as D
from latentr3_jax.decode.beam import constrained_beam_search
from latentr3_jax.decode.grounding import CatalogEmbeddings, ground
from latentr3_jax.decode.trie import ItemTrie
from latentr3_jax.errors import InputError
from latentr3_jax.eval import metrics as M
from latentr3_jax.model import decoder, latent
from latentr3_jax.parallel.mesh import batch_sharding, logical_sharding

MODES = ("constrained", "bigrec")


def shard_batch(mesh, tree):
    """Place host arrays on the mesh: leading dim over the batch axes (multi-host aware)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        tree)


def to_host(x) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place_params(mesh, model_config, params):
    if mesh is None:
        return params
    axes = decoder.param_axes(model_config)
    if "latent" in params:
        axes["latent"] = latent.latent_param_axes(latent.num_factors(params))
    return jax.device_put(params, logical_sharding(axes, mesh, params))


ROW_FIELDS = ("ranked_titles", "ranked_ids", "scores", "generated", "oov")


def ensemble_options(cfg) -> dict:
    """The Ranker's test-time latent ensemble settings from cfg.eval."""
    e = cfg.eval
    return {"latent_samples": int(e.get("latent_samples", 1)),
            "latent_sigma": float(e.get("latent_sigma", 0.5)),
            "latent_combine": str(e.get("latent_combine", "logmeanexp"))}


def ensemble_meta(cfg) -> dict:
    """The ensemble settings where they change rankings ({} without one, so outputs
    written before the option existed still resume)."""
    opts = ensemble_options(cfg)
    return opts if opts["latent_samples"] > 1 else {}


class Ranker:
    """Constrained beam search over the catalog's title trie (`mode='constrained'`) or
    free generation grounded to the nearest catalog titles (`mode='bigrec'`).

    `rank(prompt_ids, prompt_mask)` returns, per row, a dict with ranked_titles (one per
    distinct title, best first), ranked_ids (item ids; a title shared by several items
    lists all of them), scores (per ranked title: the length-penalised beam score, or
    minus the L2 distance), generated and oov (grounding only, else None), and, in
    constrained mode, ranked_groups (the item ids of each ranked title).
    """

    def __init__(self, model_config, params, tokenizer, catalog, *, template: str,
                 num_thoughts: int, latent_mode: str, mode: str = "constrained",
                 num_beams: int = 10, length_penalty: float = 1.0, grounding_beams: int = 4,
                 max_new_tokens: int = 32, top: int = 20, dtype=jnp.float32, mesh=None,
                 catalog_embeddings: Optional[CatalogEmbeddings] = None,
                 latent_samples: int = 1, latent_sigma: float = 0.5,
                 latent_combine: str = "logmeanexp"):
        if mode not in MODES:
            raise InputError(f"eval.mode={mode!r}: expected one of {', '.join(MODES)}")
        if int(latent_samples) > 1 and (mode != "constrained" or not num_thoughts):
            raise InputError(f"eval.latent_samples={latent_samples}: a latent ensemble needs "
                             f"constrained mode and a model with latent thoughts (mode {mode!r}, "
                             f"num_thoughts {num_thoughts})")
        if num_thoughts and latent_mode == "ratt" and "latent" not in params:
            raise InputError(f"model has num_thoughts={num_thoughts} in 'ratt' mode but no "
                             "latent weights")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.template = template
        self.num_thoughts = int(num_thoughts)
        self.latent_mode = latent_mode
        self.mode = mode
        self.num_beams = int(num_beams)
        self.length_penalty = float(length_penalty)
        self.grounding_beams = int(grounding_beams)
        self.max_new_tokens = int(max_new_tokens)
        self.top = int(top)
        self.latent_samples = int(latent_samples)
        self.latent_sigma = float(latent_sigma)
        self.latent_combine = str(latent_combine)
        self.dtype = dtype
        self.mesh = mesh
        self.params = place_params(mesh, model_config, params)
        if mode == "constrained":
            self.trie = ItemTrie(D.catalog_target_ids(tokenizer, catalog, template),
                                 model_config.vocab_size)
            self.trie_arrays = jax.device_put(self.trie.arrays())
            self.leaf_title = [catalog.titles[items[0]] for items in self.trie.leaf_items]
        else:
            cache = catalog_embeddings or CatalogEmbeddings()
            self.catalog_embeddings = cache.get(model_config, self.params, tokenizer, catalog,
                                                dtype=dtype)
            self.catalog_norm = {M.normalize_title(t) for t in catalog.titles.values()}

    @property
    def max_results(self) -> int:
        """The most ranked titles one row can get."""
        return self.num_beams if self.mode == "constrained" else min(self.top, len(self.catalog))

    def rank(self, prompt_ids, prompt_mask) -> list:
        prompt = shard_batch(self.mesh, {"ids": prompt_ids, "mask": prompt_mask})
        if self.mode == "constrained":
            res = constrained_beam_search(
                self.model_config, self.params, self.trie_arrays, prompt["ids"], prompt["mask"],
                max_len=self.trie.max_len, num_beams=self.num_beams,
                length_penalty=self.length_penalty, num_thoughts=self.num_thoughts,
                latent_mode=self.latent_mode, dtype=self.dtype,
                latent_samples=self.latent_samples, latent_sigma=self.latent_sigma,
                latent_combine=self.latent_combine)
            leaf, scores = to_host(res.leaf), to_host(res.scores)
            out = []
            for r in range(leaf.shape[0]):
                leaves = [int(j) for j in leaf[r] if j >= 0]
                out.append(dict(
                    ranked_titles=[self.leaf_title[j] for j in leaves],
                    ranked_ids=[i for j in leaves for i in self.trie.leaf_items[j]],
                    scores=[float(s) for s, j in zip(scores[r], leaf[r]) if j >= 0],
                    ranked_groups=[list(self.trie.leaf_items[j]) for j in leaves],
                    generated=None, oov=None))
            return out
        got = ground(self.model_config, self.params, self.tokenizer, self.catalog, prompt["ids"],
                     prompt["mask"], catalog_embeddings=self.catalog_embeddings,
                     num_beams=self.grounding_beams, max_new_tokens=self.max_new_tokens,
                     num_thoughts=self.num_thoughts, latent_mode=self.latent_mode, top=self.top,
                     dtype=self.dtype, catalog_titles=self.catalog_norm)
        return [dict(ranked_titles=[self.catalog.titles[i] for i in g["ranked_ids"]],
                     ranked_ids=g["ranked_ids"], scores=[-d for d in g["distances"]],
                     generated=g["generated"], oov=g["oov"]) for g in got]
