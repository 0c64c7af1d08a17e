"""Recommendations from a trained model: the `Recommender` API behind `latentr3 recommend`
and `latentr3 serve`.

    from latentr3_jax import Recommender
    rec = Recommender.from_run("runs/demo/lr_grpo")          # a run, or an HF export folder
    rec.recommend([["Abbey Road", "Let It Be"]], k=10)        # -> [[Recommendation, ...]]

A history is a list of item titles, oldest first; titles outside the catalog are fine
(they are only text in the prompt). The prompt is the one the model was trained with (the
run's template, category word and cutoff). A history whose prompt is longer than the
run's `data.cutoff` tokens (or the largest prompt bucket) keeps its last tokens, as in
training, so the oldest items drop out; `recommend_with_info` says which rows were cut.

Settings follow `latentr3 evaluate`: the eval section (mode, beams, batch size, length
penalty) and model.dtype come from `config` (default: the run's own config), the data
settings from the run. Histories are batched by prompt bucket into static-shape batches
of eval.batch_size rows, so a bucket compiles once; the same rows in the same order give
exactly the rankings `latentr3 evaluate` writes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from latentr3_jax import config as config_lib
from latentr3_jax import data as D
from latentr3_jax.errors import InputError
from latentr3_jax.eval.ranker import Ranker, ensemble_options
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train import runs
from latentr3_jax.train.setup import compute_dtype, execution_config

log = logging.getLogger(__name__)


class Recommendation(NamedTuple):
    item_id: int
    title: str
    score: float    # length-penalised beam log-probability, or minus the L2 distance (bigrec)


@dataclasses.dataclass
class Ranked:
    """One history's answer: the ranked items and whether its prompt was cut."""

    items: list
    truncated: bool
    generated: Optional[str] = None   # bigrec: the generated title


def _eval_settings(run_config, config) -> ml_collections.ConfigDict:
    """The run's config with `config`'s eval section and model.dtype (as evaluate does);
    eval keys the run's config lacks take their defaults."""
    cfg = ml_collections.ConfigDict(run_config.to_dict())
    source = config if config is not None else run_config
    ev = config_lib.base_config().eval.to_dict()
    ev.update(source.get("eval", {}).to_dict() if "eval" in source else {})
    cfg.eval = ml_collections.ConfigDict(ev)
    if config is not None:
        cfg.model.dtype = config.model.dtype
    return cfg


class Recommender:
    """A trained model, its catalog and prompt settings, ready to rank (module docstring)."""

    def __init__(self, artifacts: runs.RunArtifacts, catalog: D.Catalog, category_word: str, *,
                 config: Optional[ml_collections.ConfigDict] = None, mode: Optional[str] = None,
                 mesh=None):
        if jax.process_count() > 1:
            raise InputError("Recommender runs in one process; use `latentr3 evaluate` on a "
                             "multi-host mesh")
        cfg = _eval_settings(artifacts.config, config)
        if mode is not None:
            cfg.eval.mode = mode
        self.config = cfg
        self.artifacts = artifacts
        self.catalog = catalog
        self.category_word = category_word
        self.tokenizer = artifacts.tokenizer
        self.template = cfg.data.template
        self.cutoff = int(cfg.data.cutoff)
        self.buckets = tuple(int(b) for b in cfg.data.buckets)
        self.batch_size = int(cfg.eval.batch_size)
        self.mode = cfg.eval.mode
        model_config = execution_config(cfg, artifacts.model_config)
        self.ranker = Ranker(model_config, artifacts.params, artifacts.tokenizer, catalog,
                             template=self.template, num_thoughts=artifacts.num_thoughts,
                             latent_mode=artifacts.latent_mode, mode=self.mode,
                             num_beams=int(cfg.eval.num_beams),
                             length_penalty=float(cfg.eval.length_penalty),
                             grounding_beams=int(cfg.eval.grounding_beams),
                             max_new_tokens=int(cfg.eval.max_new_tokens), top=max(cfg.eval.ks),
                             dtype=compute_dtype(cfg), mesh=mesh, **ensemble_options(cfg))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_run(cls, path: str, *, config: Optional[ml_collections.ConfigDict] = None,
                 mode: Optional[str] = None, which: str = ckpt_lib.BEST,
                 dataset: Optional[D.Dataset] = None, mesh=None) -> "Recommender":
        """From a run directory (its best checkpoint by default) or an HF export folder.

        The catalog is the export's catalog.json, else `dataset`'s, else the dataset named
        by the run's config (read again: a D3 folder must still be where it was)."""
        art = runs.load_run(path, which=which)
        stored = runs.load_export_catalog(art.run_dir) if dataset is None else None
        if stored is not None:
            catalog, word = stored
            if word is None:
                word = D.category_word(art.config.get("data", {}).get("category", "") or "item")
        else:
            if dataset is None:
                dataset = D.load_dataset(art.config)
            catalog, word = dataset.catalog, dataset.category_word
        return cls(art, catalog, word, config=config, mode=mode, mesh=mesh)

    # ------------------------------------------------------------------ input

    @property
    def max_k(self) -> int:
        return self.ranker.max_results

    def _check(self, histories) -> list:
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise InputError("histories must be a list of histories (each a list of titles)")
        out = []
        for n, h in enumerate(histories):
            if isinstance(h, (str, bytes)) or not isinstance(h, Sequence):
                raise InputError(f"history {n}: expected a list of item titles, got "
                                 f"{type(h).__name__}")
            if not h:
                raise InputError(f"history {n} is empty: give at least one item title")
            for j, t in enumerate(h):
                if not isinstance(t, str) or not t.strip():
                    raise InputError(f"history {n}, item {j}: expected a non-empty title string, "
                                     f"got {t!r}")
            out.append(tuple(h))
        return out

    def _check_k(self, k: Optional[int]) -> int:
        if k is None:
            return min(10, self.max_k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            what = ("eval.num_beams" if self.mode == "constrained" else "max(eval.ks)")
            raise InputError(f"k must be an integer in 1..{self.max_k} ({what}), got {k!r}")
        return int(k)

    def encode(self, histories) -> tuple:
        """(encoded prompts, truncated flags) of checked histories: the prompt ids
        `data.encode_split` gives (one tokenizer pass), with a placeholder target."""
        histories = self._check(histories)
        full = self.tokenizer.encode_batch([D.build_prompt(h, self.category_word, self.template)
                                            for h in histories])
        limit = min(self.cutoff if self.cutoff > 0 else 1 << 30, self.buckets[-1])
        truncated = [len(p) > limit for p in full]
        encoded = [D.Encoded(prompt_ids=p[-self.cutoff:] if self.cutoff > 0 else p,
                             target_ids=[self.tokenizer.eos_id], line=n)
                   for n, p in enumerate(full)]
        return encoded, truncated

    # ------------------------------------------------------------------ ranking

    def recommend_with_info(self, histories, k: Optional[int] = None, *,
                            progress: bool = False) -> list:
        """One `Ranked` per history (items best first, at most k; default 10, or fewer
        when the beams give fewer)."""
        k = self._check_k(k)
        encoded, truncated = self.encode(histories)
        if not encoded:
            return []
        if any(truncated):
            log.warning("%d of %d histories are longer than the prompt limit and keep their "
                        "last tokens", sum(truncated), len(truncated))
        it = D.BatchIterator(encoded, self.batch_size, buckets=self.buckets, target_buckets=(1,),
                             pad_id=self.tokenizer.pad_id, shuffle=False, drop_last=False,
                             process_index=0, process_count=1)
        plan = it.epoch_plan(0)
        steps = it.epoch(0)
        if progress:
            steps = tqdm(steps, total=len(plan), desc="recommend", unit="batch")
        out: list = [None] * len(encoded)
        for rows, batch in zip(plan, steps):
            ranked = self.ranker.rank(batch["prompt_ids"], batch["prompt_mask"])
            for r, row in enumerate(rows.tolist()):
                if row >= 0:
                    out[row] = Ranked(self._items(ranked[r], k), truncated[row],
                                      ranked[r]["generated"])
        return out

    def recommend(self, histories, k: Optional[int] = None, *, progress: bool = False) -> list:
        """Per history, up to k `Recommendation`s (item id, title, score), best first.

        In constrained mode a title shared by several catalog items yields each of them,
        with the title's score."""
        return [r.items for r in self.recommend_with_info(histories, k, progress=progress)]

    def _items(self, ranked: dict, k: int) -> list:
        titles = self.catalog.titles
        if self.mode == "constrained":
            out = [Recommendation(int(i), titles[i], float(score))
                   for group, score in zip(ranked["ranked_groups"], ranked["scores"])
                   for i in group]
            return out[:k]
        return [Recommendation(int(i), titles[i], float(s))
                for i, s in zip(ranked["ranked_ids"][:k], ranked["scores"][:k])]

    def describe(self) -> dict:
        """What /healthz and the CLI report about the model."""
        a = self.artifacts
        return {"run": a.run_dir, "checkpoint": a.which, "step": a.step, "mode": self.mode,
                "num_thoughts": a.num_thoughts, "latent_mode": a.latent_mode,
                "catalog_items": len(self.catalog), "max_k": self.max_k,
                "batch_size": self.batch_size, "model_type": a.model_config.model_type,
                "parameters": int(a.model_config.num_params())}

    def warm_up(self) -> None:
        """Compile the smallest prompt bucket now (a server's first request is then fast)."""
        title = self.catalog.titles[self.catalog.ids[0]] if len(self.catalog) else "item"
        self.recommend([[title]], k=1)

