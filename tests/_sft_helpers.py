"""Small builders shared by the SFT / sharding / checkpoint tests."""

import jax
import numpy as np

from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import tiny_config
from latentr3_jax.train import optim, sft, state as state_lib


def tiny_model(vocab=97, hidden=32, layers=2):
    return tiny_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_layers=layers, num_heads=4, num_kv_heads=2)


def init_params_fn(config):
    def init(rng):
        k1, k2 = jax.random.split(rng)
        p = dict(decoder.init_params(config, k1))
        p["latent"] = latent.init_latent_params(config, k2)
        return p
    return init


def params_axes(config):
    axes = decoder.param_axes(config)
    axes["latent"] = latent.latent_param_axes()
    return axes


def random_batch(seed, vocab, B=8, P=12, T=6):
    """A batch in the agreed layout: left-padded prompts, right-padded targets."""
    r = np.random.default_rng(seed)
    p_len = r.integers(2, P + 1, B)
    t_len = r.integers(1, T + 1, B)
    prompt_mask = (np.arange(P)[None] >= (P - p_len)[:, None]).astype(np.int32)
    target_mask = (np.arange(T)[None] < t_len[:, None]).astype(np.int32)
    return {"prompt_ids": (r.integers(1, vocab - 1, (B, P)) * prompt_mask).astype(np.int32),
            "prompt_mask": prompt_mask,
            "target_ids": (r.integers(1, vocab - 1, (B, T)) * target_mask).astype(np.int32),
            "target_mask": target_mask,
            "valid": np.ones(B, bool)}


def make_tx(lr=1e-2, total=20):
    sched = optim.linear_warmup_decay(lr, 2, total)
    return optim.adamw(sched, grad_clip=1.0, weight_decay=0.01), sched


def make_sgd_tx(lr=1e-2):
    """Plain SGD: an update is -lr * gradient, so comparing parameters after a step compares
    gradients. (Adam divides by sqrt(v): a near-zero gradient component's float32 rounding,
    which differs between processors, can move its parameter by up to lr.)"""
    import optax
    return optax.sgd(lr), optax.constant_schedule(lr)


def sft_loss(config, num_thoughts=1):
    return sft.make_sft_loss(config, num_thoughts=num_thoughts, latent_mode="ratt")


def new_state(config, tx, mesh, seed=0):
    return state_lib.create_sharded_state(init_params_fn(config), params_axes(config), tx,
                                          jax.random.PRNGKey(seed), mesh)
