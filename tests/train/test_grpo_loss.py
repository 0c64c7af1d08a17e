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


# --------------------------------------------------------------------------- baselines


def test_rloo_advantage_formula():
    """G = 3: each noisy sample's baseline is the one other noisy sample."""
    a = gl.rloo_advantage(jnp.asarray(REWARDS))
    # group 1 noisy [-1, -3]: A = [-1 - -3, -3 - -1]; group 2 noisy [-4, -2]: [-2, 2]
    np.testing.assert_allclose(a, [[0.0, 2.0, -2.0], [0.0, -2.0, 2.0]], rtol=1e-6)


def test_rloo_advantage_matches_leave_one_out_loop():
    rewards = np.array([[-5.0, -1.0, -2.0, -6.0], [-3.0, -3.5, -0.5, -1.0]], np.float32)
    expect = np.zeros_like(rewards)
    for p in range(2):
        for k in range(1, 4):
            others = [rewards[p, j] for j in range(1, 4) if j != k]
            expect[p, k] = rewards[p, k] - sum(others) / len(others)
    np.testing.assert_allclose(gl.rloo_advantage(jnp.asarray(rewards)), expect, rtol=1e-6)
    masked = gl.rloo_advantage(jnp.asarray(rewards), jnp.array([False, True]))
    np.testing.assert_allclose(masked, expect * np.array([[0.0], [1.0]]), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size >= 3"):
        gl.rloo_advantage(jnp.asarray(rewards[:, :2]))


def test_group_mean_advantage_formula():
    a = gl.group_mean_advantage(jnp.asarray(REWARDS))
    centred = np.array([[0.0, 1.0, -1.0], [-2 / 3, -2 / 3, 4 / 3]])   # s - group mean
    np.testing.assert_allclose(a, centred / (math.sqrt(np.sum(centred ** 2)) + 1e-6), rtol=1e-6)
    # the same direction as grpo's on a single group, only scaled differently
    one = jnp.asarray(REWARDS[1:])
    ratio = np.asarray(gl.group_mean_advantage(one)) / np.asarray(gl.grpo_advantage(one))
    np.testing.assert_allclose(ratio, ratio[0, 0] * np.ones((1, 3)), rtol=1e-4)


def test_new_advantages_dispatch():
    r = jnp.asarray(REWARDS)
    np.testing.assert_array_equal(gl.compute_advantages("rloo", r), gl.rloo_advantage(r))
    np.testing.assert_array_equal(gl.compute_advantages("group_mean", r),
                                  gl.group_mean_advantage(r))


def test_adv_pos_frac_counts_noisy_samples_of_real_groups():
    a = jnp.array([[5.0, -1.0, 2.0], [3.0, 9.0, 1.0]])
    st = gl.advantage_stats(a, jnp.array([True, False]))
    assert float(st["adv_pos_frac"]) == 0.5          # [-1, 2]; column 0 and group 2 left out
    # the release's objective: from the eps = 0 baseline most noisy samples score lower
    st = gl.advantage_stats(gl.batch_advantage(jnp.asarray(REWARDS)))
    assert float(st["adv_pos_frac"]) == 0.5          # centred noisy: [2, 0], [-1, 1]


# --------------------------------------------------------------------------- noise schedule


@pytest.mark.parametrize("schedule,expect", [
    ("linear", [1.5, 1.25, 1.0, 0.75, 0.5, 0.5]),
    ("cosine", [1.5, 0.5 + 0.5 * (1 + math.cos(math.pi / 4)), 1.0,
                0.5 + 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.5, 0.5]),
])
def test_sigma_schedule_values(schedule, expect):
    s = gl.GRPOSettings(sigma=1.5, sigma_final=0.5, sigma_schedule=schedule)
    got = [float(gl.sigma_at(s, b, 5)) for b in (0, 1, 2, 3, 4, 9)]   # 5 batches; 9 is past the end
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_sigma_constant_by_default():
    s = gl.GRPOSettings(sigma=1.5)
    assert not s.sigma_decays and gl.sigma_at(s, 3, 10) == 1.5


def test_gaussian_log_density_per_row_sigma():
    x = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    sig = jnp.array([2.0, 0.5])
    got = gl.gaussian_log_density(x, jnp.zeros(2), sig)
    expect = [gl.gaussian_log_density(x[i], jnp.zeros(2), float(sig[i])) for i in range(2)]
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_reinforce_gradient_with_per_row_sigma():
    r = jnp.array([[0.1, -0.2], [0.0, 0.5]])
    eps = jnp.array([[1.0, 0.5], [-2.0, 0.25]])
    sig = jnp.array([1.5, 0.5])
    sampled = r + eps
    old = gl.gaussian_log_density(sampled, r, sig)
    adv = jnp.array([0.4, -0.9])
    g = jax.grad(lambda m: gl.reinforce_objective(m, sampled, old, adv, jnp.ones(2), sigma=sig,
                                                  clip_low=0.2, clip_high=0.28)["loss_sum"])(r)
    np.testing.assert_allclose(g, -adv[:, None] * eps / sig[:, None] ** 2, rtol=1e-5)


# --------------------------------------------------------------------------- estimators


def test_pathwise_gradient_formula():
    """loss = -sum_b s_b, s_b = -exp(-m_b), m_b the mean target log-prob of row b:
    d loss / d logp_bt = -exp(-m_b) * mask_bt / |y_b| (a positive weight on every token's
    log-likelihood: the pathwise estimator never pushes a sample's likelihood down)."""
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.7], [0.2, 0.6, 0.9]]))
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    valid = jnp.array([True, True])
    out = gl.pathwise_objective(gl.negative_perplexity(logp, mask), valid)
    m0 = (math.log(0.5) + math.log(0.25)) / 2
    m1 = (math.log(0.2) + math.log(0.6) + math.log(0.9)) / 3
    np.testing.assert_allclose(out["loss_sum"], math.exp(-m0) + math.exp(-m1), rtol=1e-6)
    g = jax.grad(lambda lp: gl.pathwise_objective(gl.negative_perplexity(lp, mask),
                                                 valid)["loss_sum"])(logp)
    expect = -np.array([[math.exp(-m0) / 2] * 3, [math.exp(-m1) / 3] * 3]) * np.asarray(mask)
    np.testing.assert_allclose(g, expect, rtol=1e-5)
    g = jax.grad(lambda lp: gl.pathwise_objective(gl.negative_perplexity(lp, mask),
                                                 jnp.array([True, False]))["loss_sum"])(logp)
    np.testing.assert_allclose(g[1], 0.0)


def test_second_iteration_ratio_and_clip():
    """With the policy moved since the rollout (mu >= 2) the ratio leaves 1 and the clip
    acts: tokens past 1 + clip_high with A > 0 (or below 1 - clip_low with A < 0) count as
    clipped and carry no gradient."""
    old = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    ratio = np.array([[1.1, 1.5, 0.7], [1.5, 0.7, 0.9]], np.float32)
    logp = old + jnp.log(jnp.asarray(ratio))
    mask = jnp.ones((2, 3))
    adv = jnp.array([1.0, -1.0])

    def loss(lp):
        out = gl.token_objective(lp, old, lp, adv, mask, clip_low=0.2, clip_high=0.28, kl_beta=0.0)
        return out["loss_sum"], out

    (val, out), g = jax.value_and_grad(loss, has_aux=True)(logp)
    # A = 1: min(r, clip(r)) -> 1.1, 1.28 (clipped), 0.7; A = -1: max(r, clip(r)) -> 1.5, 0.8 (clipped), 0.9
    np.testing.assert_allclose(val, -(1.1 + 1.28 + 0.7) + (1.5 + 0.8 + 0.9), rtol=1e-5)
    assert float(out["clipped_sum"]) == 2.0
    np.testing.assert_allclose(out["ratio_dev_sum"], np.abs(ratio - 1).sum(), rtol=1e-5)
    np.testing.assert_allclose(g, [[-1.1, 0.0, -0.7], [1.5, 0.0, 0.9]], rtol=1e-5)


def test_objective_reports_ratio_deviation():
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    _, count, aux = gl.objective(gl.GRPOSettings(), valid_rows=jnp.ones(1), logp=logp,
                                 old_logp=logp, ref_logp=logp, advantages=jnp.ones(1),
                                 mask=jnp.ones((1, 2)))
    assert float(aux["ratio_dev"]) == 0.0 and float(count) == 2.0


# --------------------------------------------------------------------------- latent trust region


def test_latent_trust_sum_and_gradient():
    r = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    ref = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    units = jnp.array([3.0, 2.0])
    np.testing.assert_allclose(gl.latent_trust_sum(r, ref, units), 3 * 5 + 2 * 2)
    g = jax.grad(gl.latent_trust_sum)(r, ref, units)
    np.testing.assert_allclose(g, [[6.0, 12.0], [-4.0, -4.0]])     # 2 * units * (r - r_sft)
    assert float(jnp.abs(jax.grad(gl.latent_trust_sum, argnums=1)(r, ref, units)).sum()) == 0.0


def test_objective_units_match_the_count():
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    valid = jnp.array([True, True, False])
    ppo = gl.GRPOSettings(group_size=4)
    np.testing.assert_allclose(gl.objective_units(ppo, mask, valid), [8.0, 4.0, 0.0])
    other = gl.GRPOSettings(group_size=4, estimator="pathwise")
    np.testing.assert_allclose(gl.objective_units(other, mask, valid), [4.0, 4.0, 0.0])
