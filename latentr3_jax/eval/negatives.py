"""Hard negatives for the contrastive reward: the starting model's own top titles per prompt.

With `grpo.reward=contrastive grpo.negative_source=model`, each noisy sample's title
competes with the `grpo.negatives` titles the SFT model ranks highest for that user (its
trie-constrained beam search at the noise-free latent, `grpo.negatives + 1` beams), the
user's own title and any item with the same title left out. Those are the titles that
stand between the user's title and the top of the ranking, so raising the reward means
moving the title up the list that beam search returns; in-batch negatives
(`negative_source=batch`) are drawn by popularity instead.

The negatives are mined once, before the first step, for the train split and the valid
split (whose noise-free reward `grpo.select=best` compares), by the same search as
`latentr3 evaluate`, into `<workdir>/negatives_<split>/predictions.jsonl` (resumable: a
rerun reads what finished). They stay fixed while the latent trains, unless
`grpo.remine_every` = K > 0: then the train split's are mined again from the current
latent after every K batches (`Mined.wrap`). Each batch then
carries, per row, `neg_ids`/`neg_mask` [b, C, T] (T = data.max_target_len, the titles as
the model emits them, EOS included) and `neg_valid` [b, C] (False where the search
returned fewer than C other titles). With several hosts the run directory must be shared
(the primary host writes the mined rankings, every host reads them), as for checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np

from latentr3_jax import data as D
from latentr3_jax.errors import InputError
from latentr3_jax.eval import metrics as M
from latentr3_jax.eval.evaluate import PREDICTIONS, evaluate_run


def mine(cfg, sft, model_config, dataset, split: str, out_dir: str, *,
         progress: bool = True) -> list:
    """Ranked catalog ids per row of `split` (row order) from the SFT model's constrained
    beam search with grpo.negatives + 1 beams at the noise-free latent."""
    ecfg = copy.deepcopy(cfg)
    ecfg.eval.num_beams = int(cfg.grpo.negatives) + 1
    ecfg.eval.max_users = -1
    ecfg.eval.latent_samples = 1
    ecfg.eval.progress = bool(progress and cfg.eval.progress)
    ecfg.eval.resume = True
    ecfg.eval.data_from_run = False
    evaluate_run(ecfg, model_config=model_config, params=sft.params, tokenizer=sft.tokenizer,
                 num_thoughts=sft.num_thoughts, latent_mode=sft.latent_mode, dataset=dataset,
                 split=split, mode="constrained", out_dir=out_dir, print_table=False)
    ranked = read_mined(out_dir, len(dataset.splits[split]))
    if ranked is None:
        raise InputError(f"{os.path.join(out_dir, PREDICTIONS)}: some {split} rows have no mined "
                         f"negatives; rerun to finish")
    return ranked


def table(samples: Sequence, ranked: Sequence[Sequence[int]], catalog, title_ids: dict,
          negatives: int, max_len: int, pad_id: int, eos_id: int) -> dict:
    """Per row the first `negatives` ranked items whose title differs from the row's target
    title, as token ids: {'neg_ids', 'neg_mask' [N, C, max_len], 'neg_valid' [N, C]}.
    `title_ids`: item id -> target ids (prompts.catalog_target_ids); a title longer than
    max_len is cut as the targets are (its last label stays EOS)."""
    N, C = len(samples), int(negatives)
    ids = np.full((N, C, max_len), pad_id, np.int32)
    mask = np.zeros((N, C, max_len), np.int32)
    valid = np.zeros((N, C), bool)
    for n, (s, items) in enumerate(zip(samples, ranked)):
        c = 0
        for item in items:
            if c == C:
                break
            if catalog.titles[item] == s.target_title:
                continue
            t = list(title_ids[item])
            if len(t) > max_len:
                t = t[:max_len - 1] + [eos_id]
            ids[n, c, :len(t)] = t
            mask[n, c, :len(t)] = 1
            valid[n, c] = True
            c += 1
    return {"neg_ids": ids, "neg_mask": mask, "neg_valid": valid}


def row_hook(tab: dict):
    """A BatchIterator `extra` hook: the rows' negatives (filler rows, -1, get row 0's,
    marked invalid)."""
    def hook(rows: np.ndarray) -> dict:
        r = np.asarray(rows)
        take = np.where(r >= 0, r, 0)
        out = {k: v[take] for k, v in tab.items()}
        out["neg_valid"] = out["neg_valid"] & (r >= 0)[:, None]
        return out
    return hook


class Mined:
    """The mined negatives of a run: the valid split's (fixed) and the train split's, which
    with grpo.remine_every = K > 0 are mined again from the current latent after every K
    batches (negatives that follow the model, so that demoting one set brings up the
    next). `complete`: {split: share of rows with all C negatives} of the first mining.

    Re-mining happens in the step wrapper (`wrap`), before the batch after a multiple of K:
    its negatives are replaced from the table of the last re-mining, each kept in
    `<workdir>/negatives_train_b<k>/`. A resumed run reads that table back from disk, so
    the data a batch sees does not depend on where the run was interrupted."""

    def __init__(self, cfg, sft, model_config, inputs, *, progress: bool = True):
        self.cfg, self.sft, self.model_config, self.inputs = cfg, sft, model_config, inputs
        tok, dataset = inputs.tokenizer, inputs.dataset
        self._title_ids = D.catalog_target_ids(tok, dataset.catalog, cfg.data.template)
        self._max_len = max(int(cfg.data.max_target_len),
                            *(int(b) for b in cfg.data.target_buckets or ()))
        self.every = int(cfg.grpo.get("remine_every", 0))
        self.complete = {}
        self._last = (0, None)   # (batch after which the train table was mined, the table)
        for split, it in (("train", inputs.train_it), ("valid", inputs.valid_it)):
            if it is None:
                continue
            ranked = mine(cfg, sft, model_config, dataset, split, self._dir(split, 0),
                          progress=progress)
            tab = self._table(split, ranked)
            it.extra = row_hook(tab)
            self.complete[split] = float(tab["neg_valid"].all(1).mean())
        self.remined = []   # the batches after which train negatives were mined again

    def _dir(self, split: str, after: int) -> str:
        tail = f"_b{after}" if after else ""
        return os.path.join(self.inputs.run_dir, f"negatives_{split}{tail}")

    def _table(self, split: str, ranked) -> dict:
        tok, dataset = self.inputs.tokenizer, self.inputs.dataset
        return table(dataset.splits[split], ranked, dataset.catalog, self._title_ids,
                     int(self.cfg.grpo.negatives), self._max_len, tok.pad_id, tok.eos_id)

    def train_table(self, after: int, params) -> dict:
        """The train negatives mined after batch `after` (a multiple of K): read back when
        that mining finished, else mined now from `params` (the weights after that batch)."""
        if self._last[0] != after:
            out_dir = self._dir("train", after)
            rows = len(self.inputs.dataset.splits["train"])
            ranked = read_mined(out_dir, rows)
            if ranked is None:
                sft = dataclasses.replace(self.sft, params=params)
                ranked = mine(self.cfg, sft, self.model_config, self.inputs.dataset, "train",
                              out_dir, progress=False)
                self.remined.append(after)
            self._last = (after, self._table("train", ranked))
        return self._last[1]

    def wrap(self, step_fn: Callable, iterations: int) -> Callable:
        """step_fn(state, host batch) with the batch's train negatives taken from the last
        re-mining (unchanged when K = 0)."""
        if self.every <= 0:
            return step_fn
        done = {"batches": None}

        def step(state, batch):
            if done["batches"] is None:   # once per process: the restored batch count
                done["batches"] = int(state.step) // iterations
            after = done["batches"] // self.every * self.every
            if after:
                batch = {**batch, **row_hook(self.train_table(after, state.params))(batch["row"])}
            state, metrics = step_fn(state, batch)
            done["batches"] += 1
            return state, metrics
        return step


def read_mined(out_dir: str, rows: int) -> Optional[list]:
    """A finished mining's ranked ids per row, or None when it is missing or incomplete."""
    path = os.path.join(out_dir, PREDICTIONS)
    if not os.path.exists(path):
        return None
    ranked = [None] * rows
    for r in M.read_predictions(path):
        i = int(r["row"])
        if 0 <= i < rows:
            ranked[i] = [int(x) for x in r["ranked_ids"]]
    return None if any(x is None for x in ranked) else ranked


def attach(cfg, sft, model_config, inputs, *, progress: bool = True) -> Mined:
    """Mine the train and valid negatives and have the inputs' batches carry them."""
    return Mined(cfg, sft, model_config, inputs, progress=progress)
