"""The contrastive LR-GRPO reward: hand-made numbers, in-batch negatives, the J-title pass
against one pass per title, the valid reward against full passes, fused against split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latentr3_jax import config as config_lib
from latentr3_jax.errors import InputError
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.train import grpo, optim
from latentr3_jax.train import state as state_lib
from latentr3_jax.train import step as step_lib
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.grpo import rollout
from latentr3_jax.train.grpo.train import reward_fn

from _grpo_helpers import assert_same_update, fused_and_split, tiny_problem as _tiny_problem


def _by_hand(token_logp, mask, neg_valid):
    """R = s_0 - log(exp s_0 + sum_{valid j} exp s_j), s_j the mean log-prob of title j."""
    out = []
    for lp, m, nv in zip(token_logp, mask, neg_valid):
        s = [float((l * k).sum() / k.sum()) for l, k in zip(lp, m)]
        keep = [True] + list(nv)
        out.append(s[0] - math.log(sum(math.exp(x) for x, k in zip(s, keep) if k)))
    return np.array(out)


def test_contrastive_reward_on_hand_made_numbers():
    lp = np.log(np.array([[[0.5, 0.4, 0.9], [0.2, 0.3, 0.1], [0.6, 0.6, 0.6]],
                          [[0.1, 0.2, 0.3], [0.7, 0.8, 0.5], [0.3, 0.3, 0.3]]], np.float32))
    mask = np.array([[[1, 1, 0], [1, 1, 1], [1, 0, 0]],
                     [[1, 1, 1], [1, 1, 0], [1, 1, 1]]], np.float32)
    nv = np.array([[True, True], [True, False]])
    got = np.asarray(gl.contrastive_reward(jnp.asarray(lp), jnp.asarray(mask), jnp.asarray(nv)))
    np.testing.assert_allclose(got, _by_hand(lp, mask, nv), rtol=1e-6)
    assert (got < 0).all()
    # a latent that makes every title likelier by the same factor per token changes nothing
    shifted = gl.contrastive_reward(jnp.asarray(lp) + 0.7, jnp.asarray(mask), jnp.asarray(nv))
    np.testing.assert_allclose(shifted, got, rtol=1e-6)
    # no valid negative: the own title wins a one-way softmax
    alone = gl.contrastive_reward(jnp.asarray(lp), jnp.asarray(mask), jnp.zeros((2, 2), bool))
    np.testing.assert_allclose(alone, 0.0, atol=1e-7)
    s = gl.GRPOSettings(reward="contrastive", negatives=2)
    np.testing.assert_allclose(gl.sample_rewards(s, jnp.asarray(lp), jnp.asarray(mask),
                                                 jnp.asarray(nv)), got, rtol=1e-6)
    with pytest.raises(ValueError, match="grpo.reward"):
        gl.sample_rewards(gl.GRPOSettings(reward="nope"), jnp.asarray(lp), jnp.asarray(mask))


def test_in_batch_negatives():
    """Prompt p's negatives are the titles of prompts p+1, p+2 (mod P); a filler prompt's
    title, or one equal to the prompt's own (same ids over the same length), is no negative."""
    ids = jnp.array([[5, 6, 0], [7, 8, 9], [5, 6, 0], [1, 2, 3]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    valid = jnp.array([True, True, True, False])
    got_ids, got_mask, nv = rollout.contrastive_targets(ids, mask, valid, 2)
    order = [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]
    np.testing.assert_array_equal(got_ids, np.asarray(ids)[order])
    np.testing.assert_array_equal(got_mask, np.asarray(mask)[order])
    np.testing.assert_array_equal(nv, [[True, False],    # prompt 2 bought prompt 0's item
                                       [True, False],    # prompt 3 is filler
                                       [False, False],   # filler, then prompt 0's = own
                                       [True, True]])
    # the same ids under a longer mask are another title
    _, _, nv = rollout.contrastive_targets(ids, mask.at[2, 2].set(1), valid, 2)
    assert bool(nv[0, 1])


def _title_batch(P=3, S=6, T=4, J=3):
    cfg, params, batch = _tiny_problem(P=P, S=S, T=T)
    ids = jax.random.randint(jax.random.PRNGKey(9), (P, J, T), 0, 96)
    mask = jnp.ones((P, J, T), jnp.int32).at[:, 1, 2:].set(0).at[0, 2, 3:].set(0)
    return cfg, params, batch, ids, mask


def test_title_pass_equals_one_pass_per_title():
    """Scoring J titles per noisy sample in one pass gives each title's log-probs as the
    tested one-title pass does, sample by sample."""
    cfg, params, batch, ids, mask = _title_batch()
    P, J, T = ids.shape
    G = 4
    noise = rollout.sample_noise(jax.random.PRNGKey(2), P, G, cfg.hidden_size, 1.5)
    got, r = rollout.group_logprobs(cfg, params, batch["prompt_ids"], batch["prompt_mask"],
                                    ids, mask, noise)
    assert got.shape == (P * G, J, T)
    for j in range(J):
        want, r1 = rollout.group_logprobs(cfg, params, batch["prompt_ids"], batch["prompt_mask"],
                                          ids[:, j], mask[:, j], noise)
        m = np.repeat(np.asarray(mask[:, j]), G, axis=0).astype(bool)
        np.testing.assert_allclose(np.asarray(got[:, j])[m], np.asarray(want)[m],
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, r1, rtol=1e-6)


def test_valid_reward_against_full_passes():
    """train.reward_fn with the contrastive reward equals the formula applied to full
    [prompt, latent, title] passes, one per (prompt, title)."""
    cfg, params, batch = _tiny_problem(P=4)
    batch = {**batch, "valid": jnp.array([True, True, True, False])}
    s = gl.GRPOSettings(reward="contrastive", negatives=2)
    total, count = jax.jit(reward_fn(cfg, s))(params, batch)
    ids, mask, nv = rollout.contrastive_targets(batch["target_ids"], batch["target_mask"],
                                                batch["valid"], 2)
    lp = []
    for j in range(3):
        logits, _ = latent_lib.latent_forward(cfg, params, batch["prompt_ids"],
                                              batch["prompt_mask"], ids[:, j], mask[:, j],
                                              num_thoughts=1)
        lp.append(np.asarray(latent_lib.target_logprobs(logits, ids[:, j])))
    per = _by_hand(np.stack(lp, 1), np.asarray(mask, np.float32), np.asarray(nv))
    assert float(count) == 3
    np.testing.assert_allclose(float(total), per[:3].sum(), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["ppo", "reinforce", "pathwise"])
def test_fused_matches_split_contrastive(estimator):
    """Same noise, same rewards, loss and gradient through the fused step as through
    rollout + update, for each estimator under the contrastive reward."""
    cfg, params, batch = _tiny_problem(P=4)
    s = grpo.GRPOSettings(group_size=4, estimator=estimator, advantage="rloo",
                          reward="contrastive", negatives=2)
    fused_state, fm, step_in, rm, split_state, sm = fused_and_split(cfg, params, batch, s)
    assert step_in["old_logp"].shape == (4, 4, batch["target_ids"].shape[1])
    for k in ("reward_mean", "reward_eps0", "adv_std"):
        np.testing.assert_allclose(fm[k], rm[k], rtol=1e-5)
    assert float(rm["reward_mean"]) < 0
    np.testing.assert_allclose(fm["loss"], sm["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fm["grad_norm"], sm["grad_norm"], rtol=1e-4)
    assert float(fm["grad_norm"]) > 0
    assert_same_update(fused_state.params, split_state.params, params)


def test_rollout_rewards_are_the_formula_on_each_title():
    """The rollout's noise-free rewards equal the contrastive formula on one-title passes."""
    cfg, params, batch = _tiny_problem(P=4)
    s = grpo.GRPOSettings(group_size=3, reward="contrastive", negatives=3, advantage="group_mean")
    key = jax.random.PRNGKey(4)
    _, m = jax.jit(lambda p, b: grpo.make_rollout_fn(cfg, s)(p, {}, b, key))(params, batch)
    ids, mask, nv = rollout.contrastive_targets(batch["target_ids"], batch["target_mask"],
                                                batch["valid"], 3)
    zero = jnp.zeros((4, 1, cfg.hidden_size))
    lp = np.stack([np.asarray(rollout.group_logprobs(cfg, params, batch["prompt_ids"],
                                                     batch["prompt_mask"], ids[:, j],
                                                     mask[:, j], zero)[0]) for j in range(4)], 1)
    want = _by_hand(lp, np.asarray(mask, np.float32), np.asarray(nv)).mean()
    np.testing.assert_allclose(float(m["reward_eps0"]), want, rtol=1e-5)


def test_pathwise_raises_the_contrastive_reward():
    """A fixed batch, pathwise on the contrastive reward: the noise-free reward rises."""
    cfg, params, batch = _tiny_problem(P=4)
    s = grpo.GRPOSettings(group_size=6, sigma=0.5, estimator="pathwise", reward="contrastive",
                          negatives=3)
    mask = optim.latent_only(params)
    tx = optim.adamw(optax.constant_schedule(3e-2), trainable=lambda _: mask)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    step = jax.jit(step_lib.make_step_fn(grpo.make_fused_loss(cfg, s), tx))
    curve = []
    for _ in range(10):
        state, m = step(state, batch)
        curve.append(float(m["reward_eps0"]))
    assert curve[-1] > curve[0] + 0.1 * abs(curve[0]), curve


def test_config_rejects_negatives_beyond_the_batch():
    cfg = config_lib.base_config()
    cfg.grpo.reward = "contrastive"
    cfg.grpo.prompts_per_batch = 4
    cfg.grpo.negatives = 4
    with pytest.raises(InputError, match="grpo.negatives"):
        config_lib.validate(cfg)
    cfg.grpo.negatives = 3
    config_lib.validate(cfg)
    cfg.grpo.micro_batch_size = 2
    with pytest.raises(InputError, match=r"\(micro-\)batch 2"):
        config_lib.validate(cfg)
