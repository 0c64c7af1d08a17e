"""grpo.select_metric=ndcg: the LR-GRPO checkpoint chosen by valid NDCG@10 of the
evaluator's beam search (latentr3_jax/eval/selection.py), with the reward still logged."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from latentr3_jax import config as config_lib
from latentr3_jax.decode.grounding import params_fingerprint
from latentr3_jax.errors import InputError
from latentr3_jax.eval import selection
from latentr3_jax.eval.evaluate import evaluate_run
from latentr3_jax.train import grpo, runs, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo_train import _grpo_cfg, sft_run  # noqa: E402,F401  (the SFT run fixture)


def _cfg(workdir, sft, **over):
    base = {"data.max_eval_rows": 8, "grpo.select_metric": "ndcg", "grpo.eval_every": 1,
            "grpo.max_steps": 3, "grpo.learning_rate": 0.3, "grpo.estimator": "pathwise",
            "eval.batch_size": 8, "eval.num_beams": 4}
    return _grpo_cfg(workdir, sft, **{**base, **over})


def _valid_records(run_dir) -> list:
    return [r for r in runs.read_metrics(str(run_dir)) if r.get("split") == "valid"]


def test_config_and_missing_ranker(sft_run, tmp_path):
    cfg = config_lib.base_config()
    cfg.grpo.select_metric = "ndcg@5"
    with pytest.raises(InputError, match="grpo.select_metric"):
        config_lib.validate(cfg)
    cfg = config_lib.base_config()
    cfg.grpo.select_users = 0
    with pytest.raises(InputError, match="grpo.select_users"):
        config_lib.validate(cfg)
    with pytest.raises(InputError, match="valid_ranking=latentr3_jax.eval.selection.valid_ndcg"):
        grpo.train_grpo(_cfg(tmp_path / "g", sft_run), progress=False)


def test_the_run_keeps_the_checkpoint_with_the_highest_valid_ndcg(sft_run, tmp_path):
    """A ranker whose values are fixed per validation (0.2, 0.1, 0.5, 0.3 at batches 0-3):
    the run's model is the weights it was shown third (after batch 2), although the valid
    reward, logged beside it, says nothing about that."""
    values, shown = [0.2, 0.1, 0.5, 0.3], []

    def ranking(cfg, sft, model_config, inputs, progress=True):
        def value(params):
            shown.append(jax.tree.map(np.asarray, params["latent"]))
            return values[len(shown) - 1]
        return value

    out = grpo.train_grpo(_cfg(tmp_path / "g", sft_run), progress=False, valid_ranking=ranking)
    assert out["best_step"] == 2 and out["best_valid"] == 0.5
    assert out["select_metric"] == "ndcg10" and out["best_valid_reward"] is None
    recs = _valid_records(tmp_path / "g")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert [r["ndcg10"] for r in recs] == values
    assert all(np.isfinite(r["reward"]) and r["reward"] < 0 for r in recs)
    assert (out["valid_reward_start"], out["valid_reward_end"]) == (recs[0]["reward"],
                                                                    recs[-1]["reward"])
    assert len({r["reward"] for r in recs}) > 1       # the latent moved
    best = runs.load_run(str(tmp_path / "g"))
    assert best.which == "best" and best.step == 2
    for x, y in zip(jax.tree.leaves(best.params["latent"]), jax.tree.leaves(shown[2])):
        np.testing.assert_array_equal(x, y)
    last = runs.load_run(str(tmp_path / "g"), which="latest").params["latent"]
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(last), jax.tree.leaves(shown[2])))


def test_valid_ndcg_is_what_the_evaluator_reports(sft_run, tmp_path, monkeypatch):
    """The real ranker: each logged NDCG@10 is `evaluate_run`'s for the same weights over
    the first select_users valid users; one rankings folder per distinct weights, and a
    resumed run reads the start's rankings back instead of decoding them again."""
    over = {"grpo.select_users": 6, "grpo.max_steps": 2}
    out = grpo.train_grpo(_cfg(tmp_path / "g", sft_run, **over), progress=False,
                          valid_ranking=selection.valid_ndcg)
    recs = _valid_records(tmp_path / "g")
    assert [r["step"] for r in recs] == [0, 1, 2]
    folders = sorted(os.listdir(tmp_path / "g" / selection.SELECT_DIR))
    # one folder per distinct weights (the first batch's warm-up step has lr 0)
    assert len(folders) == len({r["reward"] for r in recs}) == 2
    for f in folders:
        preds = [json.loads(x) for x in open(tmp_path / "g" / selection.SELECT_DIR / f /
                                              "predictions.jsonl")]
        assert sorted(int(p["row"]) for p in preds) == list(range(6))
    # the weights after batch 2 (the latest checkpoint), evaluated on their own
    run = runs.load_run(str(tmp_path / "g"), which="latest")
    ecfg = _cfg(tmp_path / "e", sft_run, **over)
    ecfg.eval.max_users = 6
    ref = evaluate_run(ecfg, split="valid", out_dir=str(tmp_path / "e_out"), print_table=False,
                       model_config=run.model_config, params=run.params,
                       tokenizer=run.tokenizer, num_thoughts=run.num_thoughts,
                       latent_mode=run.latent_mode)
    assert ref["users"] == 6
    sft = runs.load_run(str(sft_run), which="latest")
    mc = setup.execution_config(ecfg, run.model_config)   # the config the run ranked with
    assert {params_fingerprint(mc, p)[:16] for p in (run.params, sft.params)} == set(folders)
    np.testing.assert_allclose(recs[-1]["ndcg10"], ref["NDCG@10"], rtol=1e-12)
    # the start's value is the SFT weights' (evaluated the same way)
    ref0 = evaluate_run(ecfg, split="valid", out_dir=str(tmp_path / "e0"), print_table=False,
                        model_config=run.model_config, params=sft.params,
                        tokenizer=sft.tokenizer, num_thoughts=1, latent_mode="ratt")
    np.testing.assert_allclose(recs[0]["ndcg10"], ref0["NDCG@10"], rtol=1e-12)
    assert out["best_valid"] == max(r["ndcg10"] for r in recs)
    # a rerun in the same folder after deleting its checkpoints starts over: the start's
    # rankings (same weights) are read back, none decoded
    import shutil
    shutil.rmtree(tmp_path / "g" / runs.CHECKPOINTS)
    calls = []
    real = selection.evaluate_run

    def counting(*a, **k):
        got = real(*a, **k)
        calls.append(got["evaluated_now"])
        return got
    monkeypatch.setattr(selection, "evaluate_run", counting)
    grpo.train_grpo(_cfg(tmp_path / "g", sft_run, **over), progress=False,
                    valid_ranking=selection.valid_ndcg)
    assert calls == [0, 0, 0]
