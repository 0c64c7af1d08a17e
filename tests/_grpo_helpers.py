"""Shared pieces of the LR-GRPO tests: a tiny random problem and SGD on LatentRATT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latentr3_jax.model import decoder
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.model.config import tiny_config
from latentr3_jax.train import optim


def latent_sgd(params, lr):
    """SGD on the latent module only, the LLM frozen."""
    labels = jax.tree.map(lambda m: "train" if m else "freeze", optim.latent_only(params))
    return optax.multi_transform({"train": optax.sgd(lr), "freeze": optax.set_to_zero()},
                                 lambda _: labels)


def tiny_problem(P=4, S=6, T=3):
    cfg = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                      num_kv_heads=2)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = decoder.init_params(cfg, k[0], std=0.1)
    params["latent"] = latent_lib.init_latent_params(cfg, k[1], std=0.1)
    batch = {"prompt_ids": jax.random.randint(k[2], (P, S), 0, 96),
             "prompt_mask": jnp.ones((P, S), jnp.int32).at[0, :2].set(0),
             "target_ids": jax.random.randint(k[3], (P, T), 0, 96),
             "target_mask": jnp.ones((P, T), jnp.int32),
             "valid": jnp.ones((P,), bool)}
    return cfg, params, batch


def assert_same_update(new_a, new_b, start) -> None:
    """Two parameter trees after one SGD step from `start` moved by the same update, and
    moved at all. Rounding differs between two graphs at a few 1e-6 of the largest update,
    and an update read back as new - old parameter carries one rounding of the parameter
    itself (a float32 ulp of |p|); a different gradient would differ at the scale of the
    updates themselves."""
    moved = False
    for a, b, p in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b), jax.tree.leaves(start)):
        da, db = np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)
        ulp = 2 * float(np.spacing(np.abs(np.asarray(p, np.float32))).max())
        np.testing.assert_allclose(da, db, rtol=1e-4,
                                   atol=2e-5 * max(np.abs(db).max(), 1e-12) + ulp)
        moved |= not np.array_equal(a, p)
    assert moved


def fused_and_split(cfg, params, batch, s, lr=1e-2):
    """One SGD step on LatentRATT from the same state through the fused single-pass step
    and through rollout then update (same noise): (fused state, fused metrics, rollout
    outputs, rollout metrics, split state, split metrics)."""
    from latentr3_jax.train import grpo
    from latentr3_jax.train import state as state_lib
    from latentr3_jax.train import step as step_lib
    tx = latent_sgd(params, lr)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    fused_state, fm = jax.jit(step_lib.make_step_fn(grpo.make_fused_loss(cfg, s), tx))(state, batch)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), grpo.ROLLOUT_SALT)
    step_in, rm = jax.jit(lambda p, b: grpo.make_rollout_fn(cfg, s)(p, {}, b, key))(
        state.params, batch)
    split_state, sm = jax.jit(step_lib.make_step_fn(grpo.make_grpo_loss(cfg, s), tx))(
        state, {**batch, **step_in})
    return fused_state, fm, step_in, rm, split_state, sm
