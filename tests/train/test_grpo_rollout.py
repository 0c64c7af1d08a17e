"""Shared-prefix latent rollouts against the release's way: G full sequences per prompt."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax.model import decoder
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.model.config import tiny_config
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.grpo import rollout

G, SIGMA = 3, 1.5


def _setup(num_thoughts=1):
    cfg = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                      num_kv_heads=2)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
    params = decoder.init_params(cfg, k1, std=0.2)
    params["latent"] = latent_lib.init_latent_params(cfg, k2, std=0.2)
    P, S, T = 2, 7, 4
    prompt_ids = jax.random.randint(k3, (P, S), 0, cfg.vocab_size - 1)
    prompt_mask = jnp.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])   # left padding
    target_ids = jax.random.randint(k4, (P, T), 0, cfg.vocab_size - 1)
    target_mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])                      # right padding
    noise = rollout.sample_noise(k5, P, G, cfg.hidden_size, SIGMA)
    return cfg, params, (prompt_ids, prompt_mask, target_ids, target_mask), noise


def _shared(cfg, params, batch, noise, num_thoughts, train_llm):
    logp, _ = rollout.group_logprobs(cfg, params, *batch, noise, num_thoughts=num_thoughts,
                                     train_llm=train_llm)
    return logp


def _full_sequences(cfg, params, batch, noise, num_thoughts, train_llm):
    """G independent full passes per prompt, noise on the latent, LLM frozen by stop_gradient."""
    prompt_ids, prompt_mask, target_ids, target_mask = batch
    p = dict(params)
    if not train_llm:
        p = {k: (v if k == "latent" else jax.lax.stop_gradient(v)) for k, v in params.items()}
    per_k = []
    for k in range(noise.shape[1]):
        logits = latent_lib.reference_forward(cfg, p, prompt_ids, prompt_mask, target_ids,
                                              target_mask, thought_id=cfg.vocab_size - 1,
                                              num_thoughts=num_thoughts, latent_noise=noise[:, k])
        per_k.append(latent_lib.target_logprobs(logits, target_ids))
    return jnp.stack(per_k, axis=1).reshape(-1, target_ids.shape[1])   # row p * G + k


def _loss(logp_fn, cfg, params, batch, noise, num_thoughts, train_llm, kind):
    tmask = jnp.repeat(batch[3], G, axis=0)
    logp = logp_fn(cfg, params, batch, noise, num_thoughts, train_llm)
    rewards = gl.negative_perplexity(logp, tmask).reshape(-1, G)
    adv = jax.lax.stop_gradient(gl.compute_advantages(kind, rewards)).reshape(-1)
    out = gl.token_objective(logp, jax.lax.stop_gradient(logp) - 0.1, logp, adv, tmask,
                             clip_low=0.2, clip_high=0.28, kl_beta=0.0)
    return out["loss_sum"] / tmask.sum(), rewards


@pytest.mark.parametrize("num_thoughts,train_llm,kind", [(1, False, "batch"), (2, True, "grpo")])
def test_shared_prefix_matches_full_sequences(num_thoughts, train_llm, kind):
    cfg, params, batch, noise = _setup()
    grad_fn = lambda f: jax.jit(jax.value_and_grad(
        lambda p: _loss(f, cfg, p, batch, noise, num_thoughts, train_llm, kind), has_aux=True))
    (l1, r1), g1 = grad_fn(_shared)(params)
    (l2, r2), g2 = grad_fn(_full_sequences)(params)
    np.testing.assert_allclose(r1, r2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2)
    for (path, a), b in zip(flat1, flat2):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5, err_msg=str(path))
    assert float(jnp.max(jnp.abs(g1["latent"]["q"]["kernel"]))) > 0
    llm_grad = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(
        {k: v for k, v in g1.items() if k != "latent"}))
    assert (llm_grad > 0) == train_llm


def test_noise_first_sample_is_zero_and_sigma():
    eps = rollout.sample_noise(jax.random.PRNGKey(1), 64, 8, 128, 1.5)
    assert float(jnp.max(jnp.abs(eps[:, 0]))) == 0.0
    np.testing.assert_allclose(float(jnp.std(eps[:, 1:])), 1.5, rtol=0.02)


def test_noise_per_prompt_sigma():
    """A decaying noise gives one sigma per prompt; the unit draws are the constant case's."""
    key = jax.random.PRNGKey(1)
    sig = jnp.array([0.5, 1.0, 2.0, 4.0])
    eps = rollout.sample_noise(key, 4, 8, 256, sig)
    assert float(jnp.max(jnp.abs(eps[:, 0]))) == 0.0
    np.testing.assert_allclose(jnp.std(eps[:, 1:], axis=(1, 2)), sig, rtol=0.08)
    unit = rollout.sample_noise(key, 4, 8, 256, 1.0)
    np.testing.assert_allclose(eps, unit * sig[:, None, None], rtol=1e-6)


@pytest.mark.parametrize("num_thoughts,train_llm", [(1, False), (2, False), (1, True)])
def test_reference_latent_is_the_starting_weights_latent(num_thoughts, train_llm):
    """r_sft from the shared prompt pass (one thought, frozen LLM) or from a second pass
    equals the latent the starting weights compute on their own, and has no gradient."""
    cfg, params, batch, noise = _setup()
    start = dict(params, latent=jax.tree.map(lambda x: x * 0.5 + 0.01, params["latent"]))
    ref = start if train_llm else {"latent": start["latent"]}
    kw = dict(num_thoughts=num_thoughts, latent_mode="ratt", dtype=jnp.float32, train_llm=train_llm)
    assert rollout.shares_prompt_pass(num_thoughts, "ratt", train_llm) == (num_thoughts == 1 and not train_llm)
    logp, r, r_ref = rollout.group_logprobs_with_reference(cfg, params, ref, *batch, noise, **kw)
    alone, _, _ = rollout.prompt_latents(cfg, start, batch[0], batch[1], suffix_len=0, **kw)
    np.testing.assert_allclose(r_ref, alone[:, -1], rtol=1e-5, atol=1e-6)
    logp0, r0 = rollout.group_logprobs(cfg, params, *batch, noise, **kw)
    np.testing.assert_array_equal(logp, logp0)
    np.testing.assert_array_equal(r, r0)
    g = jax.grad(lambda p: jnp.sum(rollout.group_logprobs_with_reference(
        cfg, p, ref, *batch, noise, **kw)[2]))(params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def test_rollout_metrics_on_hand_made_rewards():
    rewards = jnp.array([[-2.0, -1.0, -3.0], [-4.0, -4.0, -4.0], [9.0, 9.0, 9.0]])
    adv = jnp.array([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0], [0.0, 5.0, 5.0]])
    m = rollout.rollout_metrics(rewards, adv, jnp.array([True, True, False]))
    np.testing.assert_allclose(m["reward_eps0"], -3.0)
    np.testing.assert_allclose(m["reward_noisy"], (-2.0 - 4.0) / 2)
    np.testing.assert_allclose(m["reward_mean"], (-2.0 - 4.0) / 2)
    # population std per group: sqrt(2/3) and 0 (a decoder that ignores the thought slot)
    np.testing.assert_allclose(m["reward_spread"], math.sqrt(2 / 3) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["adv_pos_frac"], 1 / 4)


def test_latent_metrics_on_hand_made_latents():
    r = jnp.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0], [1.0, 1.0, 1.0, 1.0]])
    ref = jnp.array([[0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    valid = jnp.array([True, True, False])
    m = rollout.latent_metrics(r, valid, 1.5, ref)
    np.testing.assert_allclose(m["latent_norm"], 7.5)                   # (5 + 10) / 2
    np.testing.assert_allclose(m["sigma"], 1.5)
    np.testing.assert_allclose(m["sigma_rel"], 1.5 / 7.5, rtol=1e-6)
    np.testing.assert_allclose(m["noise_rel"], (1.5 * 2 / 5 + 1.5 * 2 / 10) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["latent_drift"], (3.0 + 0.0) / 2)
    m = rollout.latent_metrics(r, valid, jnp.array([1.0, 2.0, 7.0]))
    np.testing.assert_allclose(m["sigma"], 1.5)
    np.testing.assert_allclose(m["noise_rel"], (1.0 * 2 / 5 + 2.0 * 2 / 10) / 2, rtol=1e-6)
    assert "latent_drift" not in m


def test_weight_drift_is_relative_change():
    start = {"latent": {"q": {"kernel": jnp.array([[3.0, 0.0]]), "bias": jnp.array([4.0])}}}
    now = {"latent": {"q": {"kernel": jnp.array([[3.0, 1.0]]), "bias": jnp.array([4.0])}},
           "embed": jnp.ones(3)}
    np.testing.assert_allclose(rollout.weight_drift(now, start)["weight_drift"], 1 / 5)
    assert rollout.weight_drift(now, {}) == {}
