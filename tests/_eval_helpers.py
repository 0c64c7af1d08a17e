"""Shared helpers of the decoding and evaluation tests."""

import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax.model import decoder


def random_params(config, seed=0, std=0.3, latent_std=None):
    """Random decoder weights made with numpy (fast: no per-leaf compile); norm scales 1."""
    rng = np.random.default_rng(seed)
    shapes = decoder.param_shapes(config)

    def make(path, shape):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, std, size=shape).astype(np.float32))

    params = jax.tree_util.tree_map_with_path(make, shapes, is_leaf=lambda x: isinstance(x, tuple))
    if latent_std is not None:
        d = config.hidden_size
        params["latent"] = {n: {"kernel": jnp.asarray(rng.normal(0, latent_std, (d, d)).astype(np.float32)),
                                "bias": jnp.zeros((d,), jnp.float32)} for n in ("q", "k", "v")}
    return params
