"""Choosing the LR-GRPO checkpoint by the metric itself: valid NDCG@10 of the beam search.

With `grpo.select=best grpo.select_metric=ndcg`, each validation of stage 2 (before the
first step, every `grpo.eval_every` batches and at each epoch's end) ranks the catalog for
the first `grpo.select_users` valid users with the evaluator's search and its settings
(`eval.num_beams`, `eval.mode`, a test-time ensemble where `eval.latent_samples` asks for
one), and the run's model is the checkpoint with the highest NDCG@10 (title rule), the SFT
starting point included. The noise-free valid reward is still measured and logged beside
it, so the curves of the two can be compared: a reward that rises while the ranking gets
worse no longer decides which latent the run hands on.

Each validation writes its rankings to `<workdir>/select_valid/<weights fingerprint>/`
(`predictions.jsonl`, `metrics.json`): weights seen before, such as the SFT start of a
rerun, are read back instead of decoded again, and an interrupted decoding resumes. The
search is the one `latentr3 evaluate` runs, so the value is what that command reports for
the same weights and users. With several hosts the run directory must be shared and every
host gets the primary host's value.
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import jax
import numpy as np

from latentr3_jax.eval.evaluate import evaluate_run
from latentr3_jax.decode.grounding import params_fingerprint

SELECT_DIR = "select_valid"
METRIC = "NDCG@10"


def valid_ndcg(cfg, sft, model_config, inputs, *, progress: bool = True) -> Callable:
    """params -> NDCG@10 (title rule) of the first grpo.select_users valid users, with the
    run's eval settings; `sft` gives the tokenizer and the latent layout."""
    ecfg = copy.deepcopy(cfg)
    ecfg.eval.max_users = int(cfg.grpo.select_users)
    ecfg.eval.progress = bool(progress and cfg.eval.progress)
    ecfg.eval.resume = True
    ecfg.eval.data_from_run = False
    if 10 not in tuple(ecfg.eval.ks):
        ecfg.eval.ks = tuple(sorted(set(ecfg.eval.ks) | {10}))
    root = os.path.join(inputs.run_dir, SELECT_DIR)

    def value(params) -> float:
        fp = params_fingerprint(model_config, params)
        got = evaluate_run(ecfg, model_config=model_config, params=params,
                           tokenizer=sft.tokenizer, num_thoughts=sft.num_thoughts,
                           latent_mode=sft.latent_mode, dataset=inputs.dataset, split="valid",
                           mode=str(cfg.eval.mode), out_dir=os.path.join(root, fp[:16]),
                           mesh=inputs.mesh, print_table=False)
        v = np.float64(got.get(METRIC, np.nan))
        if jax.process_count() > 1:   # only the primary host reads the rankings back
            from jax.experimental import multihost_utils
            v = np.float64(multihost_utils.broadcast_one_to_all(np.float32(v)))
        return float(v)
    return value

