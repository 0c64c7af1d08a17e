"""LR-GRPO objective pieces against the SPEC.md section 6 formulas on hand-made numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax.train.grpo import loss as gl

REWARDS = np.array([[-2.0, -1.0, -3.0],
                    [-4.0, -4.0, -2.0]], np.float32)   # [P=2 groups, G=3], column 0: eps = 0


def test_negative_perplexity_formula():
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.9], [0.1, 0.1, 0.1]]))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    s = gl.negative_perplexity(logp, mask)
    # row 0: geometric mean prob = sqrt(0.5 * 0.25); perplexity = 1 / that
    np.testing.assert_allclose(s, [-1 / math.sqrt(0.125), -10.0], rtol=1e-6)


def test_batch_advantage_formula():
    a = gl.batch_advantage(jnp.asarray(REWARDS))
    b = (-2.0 + -4.0) / 2                          # mean of each group's eps = 0 reward
    centred = REWARDS - b                           # [[1, 2, 0], [-1, -1, 1]]
    expect = centred / (math.sqrt(8.0) + 1e-6)
    np.testing.assert_allclose(a, expect, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(a) ** 2)), 1.0, rtol=1e-5)


def test_batch_advantage_ignores_filler_groups():
    a = gl.batch_advantage(jnp.asarray(REWARDS), jnp.array([True, False]))
    expect = np.array([[0.0, 1.0, -1.0], [0, 0, 0]]) / (math.sqrt(2.0) + 1e-6)
    np.testing.assert_allclose(a, expect, rtol=1e-6, atol=1e-7)


def test_group_advantage_formula():
    a = gl.group_advantage(jnp.asarray(REWARDS))
    centred = np.array([[0.0, 1.0, -1.0], [0.0, 0.0, 2.0]])   # s - own eps=0 reward
    np.testing.assert_allclose(a, centred / (math.sqrt(6.0) + 1e-6), rtol=1e-6)


def test_grpo_advantage_formula():
    a = gl.grpo_advantage(jnp.asarray(REWARDS))
    g1 = np.array([0.0, 1.0, -1.0]) / (1.0 + 1e-4)           # mean -2, unbiased std 1
    dev2 = np.array([-2 / 3, -2 / 3, 4 / 3])
    g2 = dev2 / (math.sqrt(4 / 3) + 1e-4)                     # var = (4/9+4/9+16/9)/2
    np.testing.assert_allclose(a, np.stack([g1, g2]), rtol=1e-5)


def test_compute_advantages_dispatch_and_error():
    r = jnp.asarray(REWARDS)
    np.testing.assert_array_equal(gl.compute_advantages("group", r), gl.group_advantage(r))
    with pytest.raises(ValueError, match="grpo.advantage"):
        gl.compute_advantages("nope", r)


@pytest.mark.parametrize("adv,ratio,loss,clipped", [
    (1.0, 1.1, -1.1, False),    # inside the band
    (1.0, 1.5, -1.28, True),    # above 1 + 0.28: gain capped
    (1.0, 0.5, -0.5, False),    # below the band, A > 0: the smaller unclipped term wins
    (-1.0, 1.5, 1.5, False),    # above the band, A < 0: the unclipped (worse) term wins
    (-1.0, 0.5, 0.8, True),     # below 1 - 0.2, A < 0: capped
    (-1.0, 0.9, 0.9, False),
])
def test_ppo_clip_cases(adv, ratio, loss, clipped):
    logp = jnp.log(jnp.array([ratio], jnp.float32))
    old = jnp.zeros((1,), jnp.float32)
    got, was_clipped = gl.ppo_clip(logp, old, jnp.array([adv]), 0.2, 0.28)
    np.testing.assert_allclose(got, [loss], rtol=1e-6)
    assert bool(was_clipped[0]) == clipped


def test_ppo_clip_gradient_zero_when_clipped():
    g = jax.grad(lambda lp: gl.ppo_clip(lp, jnp.zeros(()), 1.0, 0.2, 0.28)[0])(jnp.log(1.5))
    assert float(g) == 0.0
    g = jax.grad(lambda lp: gl.ppo_clip(lp, jnp.zeros(()), 1.0, 0.2, 0.28)[0])(jnp.log(1.1))
    np.testing.assert_allclose(g, -1.1, rtol=1e-6)


def test_one_iteration_ratio_is_one_and_loss_is_weighted_loglik():
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.7], [0.2, 0.6, 0.9]]))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    adv = jnp.array([0.3, -0.7])

    def loss(lp):
        out = gl.token_objective(lp, jax.lax.stop_gradient(lp), lp, adv, mask,
                                 clip_low=0.2, clip_high=0.28, kl_beta=0.0)
        return out["loss_sum"] / mask.sum(), out

    (val, out), grad = jax.value_and_grad(loss, has_aux=True)(logp)
    np.testing.assert_allclose(val, -(0.3 * 2 - 0.7 * 3) / 5, rtol=1e-6)   # ratio == 1
    assert float(out["clipped_sum"]) == 0.0
    # gradient of -(1/N) sum_t A_b log p_t: the advantage-weighted log-likelihood
    np.testing.assert_allclose(grad, -adv[:, None] * mask / 5.0, rtol=1e-6)


def test_k3_kl_and_kl_term():
    logp, ref = jnp.log(0.5), jnp.log(0.25)
    d = math.log(0.25) - math.log(0.5)
    np.testing.assert_allclose(gl.k3_kl(logp, ref), math.exp(d) - d - 1, rtol=1e-6)
    assert float(gl.k3_kl(logp, logp)) == 0.0
    lp = jnp.full((1, 2), jnp.log(0.5))
    rf = jnp.full((1, 2), jnp.log(0.25))
    out = gl.token_objective(lp, lp, rf, jnp.zeros((1,)), jnp.ones((1, 2)), clip_low=0.2,
                             clip_high=0.28, kl_beta=0.1)
    np.testing.assert_allclose(out["loss_sum"], 0.1 * 2 * (math.exp(d) - d - 1), rtol=1e-5)


def test_gaussian_log_density_formula():
    x, mu, sigma = jnp.array([1.0, 2.0]), jnp.zeros(2), 2.0
    expect = sum(-0.5 * (xi / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi)) for xi in (1, 2))
    np.testing.assert_allclose(gl.gaussian_log_density(x, mu, sigma), expect, rtol=1e-6)


def test_reinforce_gradient_is_score_function():
    r = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.5, 1.0]])
    eps = jnp.array([[1.0, 0.5, -1.0], [-2.0, 0.0, 0.5]])
    sigma = 1.5
    sampled = r + eps
    old = gl.gaussian_log_density(sampled, r, sigma)
    adv = jnp.array([0.4, -0.9])

    def loss(mean):
        return gl.reinforce_objective(mean, sampled, old, adv, jnp.ones(2), sigma=sigma,
                                      clip_low=0.2, clip_high=0.28)["loss_sum"]

    np.testing.assert_allclose(loss(r), -jnp.sum(adv), rtol=1e-6)   # ratio 1
    g = jax.grad(loss)(r)
    np.testing.assert_allclose(g, -adv[:, None] * eps / sigma ** 2, rtol=1e-5)


def test_advantage_stats():
    a = jnp.array([[1.0, -1.0], [3.0, 9.0]])
    st = gl.advantage_stats(a, jnp.array([True, False]))
    np.testing.assert_allclose([st["adv_mean"], st["adv_std"], st["adv_max"]], [0.0, 1.0, 1.0])
