"""Mined hard negatives for the contrastive reward (grpo.negative_source=model): the table
by hand, the batch hook, the J-title targets against one pass per title, fused against
split, the valid reward, and a run whose mined titles are the SFT model's own beam search."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax import config as config_lib
from latentr3_jax import data
from latentr3_jax.errors import InputError
from latentr3_jax.eval import negatives as neg
from latentr3_jax.eval.evaluate import evaluate_run
from latentr3_jax.train import grpo
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.grpo import rollout
from latentr3_jax.train.grpo.train import reward_fn

from _grpo_helpers import assert_same_update, fused_and_split, tiny_problem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo_contrastive import _by_hand  # noqa: E402
from test_grpo_train import _grpo_cfg, _make_sft_run  # noqa: E402


@dataclasses.dataclass
class _Row:
    target_title: str


@dataclasses.dataclass
class _Catalog:
    titles: dict


def test_table_by_hand():
    """First C ranked items whose title differs from the target's, cut like the targets
    (EOS kept last); rows with fewer are marked invalid past what they have."""
    catalog = _Catalog({1: "a", 2: "b", 3: "c", 4: "a", 5: "dddd"})
    title_ids = {1: [11, 99], 2: [12, 99], 3: [13, 13, 99], 4: [14, 99], 5: [15, 15, 15, 15, 99]}
    rows = [_Row("a"), _Row("b"), _Row("c")]
    ranked = [[1, 4, 2, 5, 3],   # the target and its same-title twin are skipped
              [2],               # only the target: no negative
              [5, 1]]            # the long title is cut to 3 with EOS last
    t = neg.table(rows, ranked, catalog, title_ids, negatives=2, max_len=3, pad_id=0, eos_id=99)
    np.testing.assert_array_equal(t["neg_valid"], [[True, True], [False, False], [True, True]])
    np.testing.assert_array_equal(t["neg_ids"][0], [[12, 99, 0], [15, 15, 99]])
    np.testing.assert_array_equal(t["neg_mask"][0], [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(t["neg_ids"][2], [[15, 15, 99], [11, 99, 0]])
    assert t["neg_mask"][1].sum() == 0


def test_batch_iterator_carries_the_rows_negatives():
    enc = [data.Encoded(prompt_ids=[1, 2, i + 3], target_ids=[7, 8], item_id=i, line=i)
           for i in range(5)]
    tab = {"neg_ids": np.arange(5 * 2 * 3).reshape(5, 2, 3).astype(np.int32),
           "neg_mask": np.ones((5, 2, 3), np.int32), "neg_valid": np.ones((5, 2), bool)}
    it = data.BatchIterator(enc, 4, buckets=(8,), target_buckets=(4,), shuffle=True, seed=3,
                            drop_last=False, process_index=0, process_count=1)
    it.extra = neg.row_hook(tab)
    seen = 0
    for b in it.epoch(0):
        for j, r in enumerate(b["row"]):
            if r >= 0:
                np.testing.assert_array_equal(b["neg_ids"][j], tab["neg_ids"][r])
                assert b["neg_valid"][j].all() and b["prompt_ids"][j, -1] == r + 3
                seen += 1
            else:   # filler rows carry no valid negative
                assert not b["neg_valid"][j].any()
    assert seen == 5


def _mined_batch(P=4, T=3, C=2, Tn=5):
    cfg, params, batch = tiny_problem(P=P, T=T)
    k = jax.random.PRNGKey(11)
    neg_ids = jax.random.randint(k, (P, C, Tn), 0, 96)
    neg_mask = jnp.ones((P, C, Tn), jnp.int32).at[:, 0, 3:].set(0).at[1, 1, 2:].set(0)
    neg_valid = jnp.array([[True, True], [True, False], [True, True], [False, False]])
    return cfg, params, {**batch, "neg_ids": neg_ids, "neg_mask": neg_mask,
                         "neg_valid": neg_valid}


def test_mined_targets_pad_and_stack():
    _, _, b = _mined_batch()
    b = {**b, "valid": jnp.array([True, True, False, True])}
    ids, mask, nv = rollout.mined_targets(b)
    assert ids.shape == (4, 3, 5) and mask.shape == (4, 3, 5)
    np.testing.assert_array_equal(ids[:, 0, :3], b["target_ids"])
    np.testing.assert_array_equal(mask[:, 0, 3:], 0)
    np.testing.assert_array_equal(ids[:, 1:], b["neg_ids"])
    # an invalid row has no valid negative
    np.testing.assert_array_equal(nv, b["neg_valid"] & b["valid"][:, None])
    s = gl.GRPOSettings(reward="contrastive", negatives=2, negative_source="model")
    got = rollout.scored_targets(s, b)
    for x, y in zip(got, (ids, mask, nv)):
        np.testing.assert_array_equal(x, y)


def test_rollout_and_valid_rewards_are_the_formula_on_each_title():
    """Noise-free rollout reward and valid reward with mined negatives equal the
    contrastive formula on one-title passes."""
    cfg, params, b = _mined_batch()
    s = grpo.GRPOSettings(group_size=3, reward="contrastive", negatives=2,
                          negative_source="model", advantage="group_mean")
    _, m = jax.jit(lambda p, x: grpo.make_rollout_fn(cfg, s)(p, {}, x, jax.random.PRNGKey(4)))(
        params, b)
    ids, mask, nv = rollout.mined_targets(b)
    zero = jnp.zeros((4, 1, cfg.hidden_size))
    lp = np.stack([np.asarray(rollout.group_logprobs(cfg, params, b["prompt_ids"],
                                                     b["prompt_mask"], ids[:, j], mask[:, j],
                                                     zero)[0]) for j in range(3)], 1)
    want = _by_hand(lp, np.asarray(mask, np.float32), np.asarray(nv))
    np.testing.assert_allclose(float(m["reward_eps0"]), want.mean(), rtol=1e-5)
    total, count = jax.jit(reward_fn(cfg, s))(params, b)
    assert float(count) == 4
    np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["ppo", "reinforce", "pathwise"])
def test_fused_matches_split_with_mined_negatives(estimator):
    cfg, params, b = _mined_batch()
    s = grpo.GRPOSettings(group_size=4, estimator=estimator, advantage="rloo",
                          reward="contrastive", negatives=2, negative_source="model")
    fused_state, fm, step_in, rm, split_state, sm = fused_and_split(cfg, params, b, s)
    assert step_in["old_logp"].shape == (4, 4, b["target_ids"].shape[1])
    for k in ("reward_mean", "reward_eps0", "adv_std"):
        np.testing.assert_allclose(fm[k], rm[k], rtol=1e-5)
    np.testing.assert_allclose(fm["loss"], sm["loss"], rtol=1e-5, atol=1e-7)
    assert float(fm["grad_norm"]) > 0
    assert_same_update(fused_state.params, split_state.params, params)


def test_config_allows_more_mined_negatives_than_prompts():
    cfg = config_lib.base_config()
    cfg.grpo.reward = "contrastive"
    cfg.grpo.prompts_per_batch = 4
    cfg.grpo.negatives = 6
    with pytest.raises(InputError, match="grpo.negatives"):
        config_lib.validate(cfg)
    cfg.grpo.negative_source = "model"
    config_lib.validate(cfg)


def test_run_mines_the_sft_models_own_top_titles(tmp_path):
    """A run with negative_source=model needs the miner; with it, the mined file is the SFT
    model's constrained beam search over train with negatives + 1 beams (the evaluator run
    on its own gives the same rankings), and the run trains on the contrastive reward."""
    sft = tmp_path / "sft"
    _make_sft_run(sft, _grpo_cfg(sft, sft))
    over = {"grpo.reward": "contrastive", "grpo.negative_source": "model",
            "grpo.negatives": 5, "grpo.estimator": "reinforce", "grpo.advantage": "rloo",
            "grpo.max_steps": 2, "grpo.log_every": 1, "eval.batch_size": 8}
    cfg = _grpo_cfg(tmp_path / "g", sft, **over)
    with pytest.raises(InputError, match="negatives=latentr3_jax.eval.negatives.attach"):
        grpo.train_grpo(cfg, progress=False)
    out = grpo.train_grpo(_grpo_cfg(tmp_path / "g2", sft, **over), progress=False,
                          negatives=neg.attach)
    assert out["finished"] and set(out["negatives_complete"]) == {"train"}
    mined = [json.loads(x) for x in open(tmp_path / "g2" / "negatives_train" / "predictions.jsonl")]
    # the same search run as `latentr3 evaluate` would run it
    ecfg = _grpo_cfg(tmp_path / "e", sft, **over)
    ecfg.eval.num_beams = 6
    ref = evaluate_run(ecfg, str(sft), split="train", out_dir=str(tmp_path / "e_out"),
                       print_table=False)
    assert ref["complete"]
    want = {int(r["row"]): r["ranked_ids"]
            for r in map(json.loads, open(tmp_path / "e_out" / "predictions.jsonl"))}
    assert {int(r["row"]): r["ranked_ids"] for r in mined} == want
    assert all(len(v) == 6 for v in want.values())
    rows = [json.loads(x) for x in open(tmp_path / "g2" / "metrics.jsonl")]
    train_rows = [r for r in rows if "reward_eps0" in r]
    assert train_rows and all(np.isfinite(r["reward_eps0"]) and r["reward_eps0"] < 0
                              for r in train_rows)


def test_remining_follows_the_latent_and_resumes_exactly(tmp_path):
    """grpo.remine_every = 2 over 4 batches: the train negatives are mined again after batch
    2 from the weights of that moment (an evaluator run on those weights gives the same
    rankings), and a run stopped after batch 3 and resumed ends with the same weights as
    one run straight through."""
    from latentr3_jax.train import runs
    sft = tmp_path / "sft"
    _make_sft_run(sft, _grpo_cfg(sft, sft))
    over = {"grpo.reward": "contrastive", "grpo.negative_source": "model",
            "grpo.negatives": 3, "grpo.estimator": "pathwise", "grpo.advantage": "batch",
            "grpo.max_steps": 4, "grpo.learning_rate": 0.3, "grpo.remine_every": 2,
            "grpo.checkpoint_every": 1, "eval.batch_size": 8}
    full = grpo.train_grpo(_grpo_cfg(tmp_path / "full", sft, **over), progress=False,
                           negatives=neg.attach)
    assert full["negatives_remined_after"] == [2]
    part = _grpo_cfg(tmp_path / "part", sft, **over)
    grpo.train_grpo(part, progress=False, negatives=neg.attach, stop_after=3)
    rest = grpo.train_grpo(part, progress=False, negatives=neg.attach)
    assert rest["negatives_remined_after"] == []      # read back from disk, not mined again
    a = runs.load_run(str(tmp_path / "full"), which="latest").params["latent"]
    b = runs.load_run(str(tmp_path / "part"), which="latest").params["latent"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # the mining after batch 2 is the evaluator's search with the weights after batch 2
    two = grpo.train_grpo(_grpo_cfg(tmp_path / "two", sft, **{**over, "grpo.max_steps": 2}),
                          progress=False, negatives=neg.attach)
    assert two["negatives_remined_after"] == []
    run = runs.load_run(str(tmp_path / "two"), which="latest")
    ecfg = _grpo_cfg(tmp_path / "e", sft, **over)
    ecfg.eval.num_beams = 4
    evaluate_run(ecfg, split="train", out_dir=str(tmp_path / "e_out"), print_table=False,
                 model_config=run.model_config, params=run.params, tokenizer=run.tokenizer,
                 num_thoughts=run.num_thoughts, latent_mode=run.latent_mode)
    ranked = lambda p: {int(r["row"]): r["ranked_ids"] for r in map(json.loads, open(p))}  # noqa
    after2 = ranked(tmp_path / "full" / "negatives_train_b2" / "predictions.jsonl")
    assert after2 == ranked(tmp_path / "e_out" / "predictions.jsonl")


def test_remined_table_replaces_the_batch_negatives_from_the_next_batch():
    """Mined.wrap with K = 2: batches 1-2 keep the negatives the iterator put in, batches
    3-4 get the table mined after batch 2 (row by row), also in a process that resumes
    after batch 3; the weights it mines from are those after batch 2."""
    tab0 = {"neg_ids": np.zeros((6, 2, 3), np.int32), "neg_mask": np.ones((6, 2, 3), np.int32),
            "neg_valid": np.ones((6, 2), bool)}
    tab2 = {**tab0, "neg_ids": np.arange(36, dtype=np.int32).reshape(6, 2, 3)}
    asked = []

    class FakeMined(neg.Mined):
        def __init__(self):
            self.every, self._tables, self.remined = 2, {0: tab0}, []

        def train_table(self, after, params):
            asked.append((after, params))
            return tab2

    class State:
        def __init__(self, step):
            self.step, self.params = step, f"weights after batch {step}"

    seen = []

    def inner(state, batch):
        seen.append(batch["neg_ids"].copy())
        return State(state.step + 1), {}

    rows = [np.array([0, 1, -1]), np.array([2, 3, 4]), np.array([5, 0, 1]), np.array([2, -1, 3])]
    batches = [{"row": r, **neg.row_hook(tab0)(r)} for r in rows]
    step = FakeMined().wrap(inner, iterations=1)
    state = State(0)
    for b in batches:
        state, _ = step(state, b)
    for k in (0, 1):
        np.testing.assert_array_equal(seen[k], 0)
    for k in (2, 3):
        np.testing.assert_array_equal(seen[k], tab2["neg_ids"][np.where(rows[k] >= 0, rows[k], 0)])
    assert asked[0] == (2, "weights after batch 2")
    seen.clear()
    resumed = FakeMined().wrap(inner, iterations=1)
    resumed(State(3), batches[3])
    np.testing.assert_array_equal(seen[0], tab2["neg_ids"][[2, 0, 3]])
