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
rerun reads what finished). They stay fixed while the latent trains. Each batch then
carries, per row, `neg_ids`/`neg_mask` [b, C, T] (T = data.max_target_len, the titles as
the model emits them, EOS included) and `neg_valid` [b, C] (False where the search
returned fewer than C other titles). With several hosts the run directory must be shared
(the primary host writes the mined rankings, every host reads them), as for checkpoints.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import numpy as np

from latentr3_jax import data as D
from latentr3_jax.errors import InputError
from latentr3_jax.eval import metrics as M
from latentr3_jax.eval.evaluate import evaluate_run

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
    rows = len(dataset.splits[split])
    ranked = [None] * rows
    for r in M.read_predictions(os.path.join(out_dir, "predictions.jsonl")):
        i = int(r["row"])
        if 0 <= i < rows:
            ranked[i] = [int(x) for x in r["ranked_ids"]]
    missing = [i for i, x in enumerate(ranked) if x is None]
    if missing:
        raise InputError(f"{out_dir}/predictions.jsonl: {len(missing)} of {rows} {split} rows "
                         f"have no mined negatives (first: row {missing[0]}); rerun to finish")
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


def attach(cfg, sft, model_config, inputs, *, progress: bool = True) -> dict:
    """Mine the train and valid negatives and have the inputs' batches carry them; returns
    {split: share of rows with all C negatives}."""
    tok, dataset = inputs.tokenizer, inputs.dataset
    title_ids = D.catalog_target_ids(tok, dataset.catalog, cfg.data.template)
    max_len = max(int(cfg.data.max_target_len), *(int(b) for b in cfg.data.target_buckets or ()))
    full = {}
    for split, it in (("train", inputs.train_it), ("valid", inputs.valid_it)):
        if it is None:
            continue
        out_dir = os.path.join(inputs.run_dir, f"negatives_{split}")
        ranked = mine(cfg, sft, model_config, dataset, split, out_dir, progress=progress)
        tab = table(dataset.splits[split], ranked, dataset.catalog, title_ids,
                    int(cfg.grpo.negatives), max_len, tok.pad_id, tok.eos_id)
        it.extra = row_hook(tab)
        full[split] = float(tab["neg_valid"].all(1).mean())
    return full
