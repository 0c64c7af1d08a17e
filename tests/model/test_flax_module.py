"""The Linen wrapper declares exactly the pure decoder's parameters and computes the same."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax import model as M
from latentr3_jax.model.flax_module import LatentR3LM, unflatten_params


def test_flax_module_matches_pure_functions():
    c = M.tiny_config(vocab_size=97, tie_word_embeddings=False)
    mod = LatentR3LM(c)
    ids = jnp.array(np.random.RandomState(0).randint(0, 96, (2, 7)))
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    variables = mod.init(jax.random.PRNGKey(0), ids, mask)
    params = unflatten_params(variables)
    want = jax.tree.map(lambda s: s, M.param_shapes(c), is_leaf=lambda x: isinstance(x, tuple))
    got = jax.tree.map(lambda a: a.shape, {k: v for k, v in params.items() if k != "latent"})
    assert got == want
    # the pure init's scheme: unit norm scales, zero biases, N(0, 0.02) weights
    assert bool(jnp.all(params["final_norm"]["scale"] == 1.0))
    assert bool(jnp.all(params["layers"]["attn"]["q"]["bias"] == 0.0))
    assert abs(float(jnp.std(params["embed"]["embedding"])) - 0.02) < 0.004
    logits, _, _ = mod.apply(variables, ids, mask)
    np.testing.assert_allclose(logits, M.logits(c, params, ids, mask), atol=1e-6)
    # logical axis metadata is the decoder's table
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["layers/attn/q/kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["latent/q/kernel"]) == ("embed", "latent")
    tids = jnp.array([[5, 6, 0], [7, 0, 0]])
    tmask = jnp.array([[1, 1, 1], [1, 0, 0]])
    lg, lat = mod.apply(variables, ids, mask, tids, tmask, method=LatentR3LM.latent_forward)
    lg2, _ = M.latent_forward(c, params, ids, mask, tids, tmask, num_thoughts=1)
    np.testing.assert_allclose(lg, lg2, atol=1e-6)
