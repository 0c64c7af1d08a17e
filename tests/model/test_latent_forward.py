"""The prefix-cached LatentR³ forward equals the release's full passes: loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import tiny_config


def _batch(rng, vocab, B=3, P=9, T=6):
    r = np.random.default_rng(rng)
    prompt_len = np.array([P, P - 3, 2])[:B]
    target_len = np.array([T, 3, 1])[:B]
    prompt_ids = r.integers(1, vocab - 1, (B, P)).astype(np.int32)
    target_ids = r.integers(1, vocab - 1, (B, T)).astype(np.int32)
    prompt_mask = (np.arange(P)[None] >= (P - prompt_len)[:, None]).astype(np.int32)  # left pad
    target_mask = (np.arange(T)[None] < target_len[:, None]).astype(np.int32)         # right pad
    prompt_ids = np.where(prompt_mask, prompt_ids, 0)
    target_ids = np.where(target_mask, target_ids, 0)
    return [jnp.asarray(x) for x in (prompt_ids, prompt_mask, target_ids, target_mask)]


def _loss(forward, config, **kw):
    def f(params, p_ids, p_mask, t_ids, t_mask):
        out = forward(config, params, p_ids, p_mask, t_ids, t_mask, **kw)
        logits = out[0] if isinstance(out, tuple) else out
        s, n = latent.target_cross_entropy(logits, t_ids, t_mask)
        return s / n
    return jax.jit(jax.value_and_grad(f))


@pytest.mark.parametrize("num_thoughts,mode", [(1, "ratt"), (2, "ratt"), (1, "hidden"), (0, "ratt")])
def test_prefix_cached_matches_full_passes(num_thoughts, mode):
    config = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                         num_kv_heads=2)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = dict(decoder.init_params(config, k1, std=0.2))
    params["latent"] = latent.init_latent_params(config, k2, std=0.2)
    batch = _batch(0, config.vocab_size)
    kw = dict(num_thoughts=num_thoughts, latent_mode=mode)
    loss_c, grad_c = _loss(latent.latent_forward, config, **kw)(params, *batch)
    loss_r, grad_r = _loss(latent.reference_forward, config, thought_id=config.vocab_size - 1,
                           **kw)(params, *batch)
    np.testing.assert_allclose(loss_c, loss_r, rtol=1e-5, atol=1e-6)
    flat_c = jax.tree_util.tree_leaves_with_path(grad_c)
    flat_r = dict(jax.tree_util.tree_leaves_with_path(grad_r))
    for path, g in flat_c:
        ref = flat_r[path]
        scale = float(jnp.max(jnp.abs(ref))) + 1e-8
        np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    lat = grad_c["latent"]["q"]["kernel"]
    if num_thoughts and mode == "ratt":
        assert float(jnp.abs(lat).max()) > 0, "LatentRATT must receive gradient"
    else:
        assert float(jnp.abs(lat).max()) == 0


def test_padding_rows_do_not_change_other_rows():
    """A row's loss does not depend on other rows' padding (masking is per row)."""
    config = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64)
    params = dict(decoder.init_params(config, jax.random.PRNGKey(1), std=0.2))
    params["latent"] = latent.init_latent_params(config, jax.random.PRNGKey(2), std=0.2)
    p_ids, p_mask, t_ids, t_mask = _batch(1, config.vocab_size)
    full, _ = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask, num_thoughts=1)
    # row 2 alone, with its padding removed
    n_p, n_t = int(p_mask[2].sum()), int(t_mask[2].sum())
    alone, _ = latent.latent_forward(config, params, p_ids[2:, -n_p:], p_mask[2:, -n_p:],
                                     t_ids[2:, :n_t], t_mask[2:, :n_t], num_thoughts=1)
    np.testing.assert_allclose(full[2, :n_t], alone[0], rtol=1e-4, atol=1e-4)


def test_identity_init_latent_is_an_attention_mean_of_the_hidden_states():
    """latent_init='identity': V = I, so the latent is softmax(q k^T / sqrt(d)) @ H over the
    prompt, computed here by hand with numpy from the same Q and K draws."""
    config = tiny_config(vocab_size=61, hidden_size=16, num_layers=1)
    key = jax.random.PRNGKey(3)
    normal = latent.init_latent_params(config, key)
    ident = latent.init_latent_params(config, key, init="identity")
    np.testing.assert_array_equal(ident["q"]["kernel"], normal["q"]["kernel"])
    np.testing.assert_array_equal(ident["k"]["kernel"], normal["k"]["kernel"])
    np.testing.assert_array_equal(ident["v"]["kernel"], np.eye(16))
    r = np.random.default_rng(0)
    H = r.normal(size=(2, 5, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
    pos = np.asarray(latent.prompt_positions(jnp.asarray(mask)))
    got = np.asarray(latent.latent_ratt(config, ident, jnp.asarray(H), jnp.asarray(mask),
                                        jnp.asarray(pos)))
    inv = 1.0 / config.latent_rope_theta ** (np.arange(0, 16, 2) / 16)
    for b in range(2):
        ang = np.concatenate([pos[b][:, None] * inv] * 2, -1)
        cos, sin = np.cos(ang), np.sin(ang)
        rot = lambda x: np.concatenate([-x[..., 8:], x[..., :8]], -1)
        q = H[b, -1] @ ident["q"]["kernel"]
        k = H[b] @ np.asarray(ident["k"]["kernel"])
        q, k = q * cos[-1] + rot(q) * sin[-1], k * cos + rot(k) * sin
        s = np.where(mask[b], k @ q / 4.0, -np.inf)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(got[b], p @ H[b], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="latent init"):
        latent.init_latent_params(config, key, init="zeros")
