"""sft.slot_bottleneck: rows whose thought slot and target see the latent, not the prompt.

The reference for a blind row is a separate decoder pass over [latent slot(s), target]
alone, with the position ids the row would have after its prompt: no cache, no prompt.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax import config as config_lib
from latentr3_jax.errors import InputError
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import tiny_config
from latentr3_jax.train.sft import make_sft_loss

from test_latent_forward import _batch


def _model(factors=1):
    config = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                         num_kv_heads=2)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    params = dict(decoder.init_params(config, k1, std=0.2))
    params["latent"] = latent.init_latent_params(config, k2, std=0.2, factors=factors)
    return config, params


def _alone(config, params, last_latent, prompt_mask, target_ids, target_mask, earlier_slots):
    """Target logits of a decoder pass over [slot(s), target[:-1]] with nothing before it."""
    slots = latent.factor_slots(config, last_latent)                       # [B, K, d]
    K = slots.shape[1]
    embeds = jnp.concatenate([slots, decoder.embed_tokens(config, params, target_ids[:, :-1])], 1)
    mask = jnp.concatenate([jnp.ones((slots.shape[0], K), bool),
                            target_mask[:, :-1].astype(bool)], axis=1)
    start = prompt_mask.sum(axis=1) + earlier_slots                       # positions go on
    positions = start[:, None] + jnp.arange(embeds.shape[1])[None]
    logits, _, _ = decoder.apply(config, params, inputs_embeds=embeds, attention_mask=mask,
                                 positions=positions)
    return logits[:, K - 1:]


@pytest.mark.parametrize("num_thoughts,mode,factors",
                         [(1, "ratt", 1), (2, "ratt", 1), (1, "hidden", 1), (1, "ratt", 2)])
def test_blind_rows_see_only_their_slots_and_other_rows_are_unchanged(num_thoughts, mode, factors):
    config, params = _model(factors)
    p_ids, p_mask, t_ids, t_mask = _batch(0, config.vocab_size)
    kw = dict(num_thoughts=num_thoughts, latent_mode=mode)
    full, lat = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask, **kw)
    blind = jnp.array([True, False, True])
    got, lat_b = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask,
                                       blind_rows=blind, **kw)
    np.testing.assert_array_equal(lat_b, lat)         # the latents still read the prompt
    want = _alone(config, params, lat[:, -1], p_mask, t_ids, t_mask, num_thoughts - 1)
    valid = np.asarray(t_mask, bool)
    for b in (0, 2):
        np.testing.assert_allclose(got[b][valid[b]], want[b][valid[b]], rtol=1e-4, atol=1e-5)
        # and it is not what the row gives with its prompt in view
        assert float(jnp.abs(got[b][valid[b]] - full[b][valid[b]]).max()) > 1e-3
    np.testing.assert_allclose(got[1], full[1], rtol=1e-6, atol=1e-6)


def test_blind_row_depends_on_the_history_only_through_the_latent():
    """Changing a blind row's prompt while pinning its latent leaves its logits alone."""
    config, params = _model()
    p_ids, p_mask, t_ids, t_mask = _batch(1, config.vocab_size)
    other = jnp.where(p_mask.astype(bool), (p_ids + 5) % (config.vocab_size - 2) + 1, 0)
    blind = jnp.ones((3,), bool)
    base, lat = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask,
                                      blind_rows=blind)
    # the other prompt's latent, replaced by the first prompt's through the noise input
    _, lat_o = latent.latent_forward(config, params, other, p_mask, t_ids, t_mask,
                                     blind_rows=blind)
    moved, _ = latent.latent_forward(config, params, other, p_mask, t_ids, t_mask,
                                     blind_rows=blind, latent_noise=lat[:, -1] - lat_o[:, -1])
    np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-5)
    seen, _ = latent.latent_forward(config, params, other, p_mask, t_ids, t_mask,
                                    latent_noise=lat[:, -1] - lat_o[:, -1])
    full, _ = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask)
    assert float(jnp.abs(seen - full).max()) > 1e-3   # with the prompt in view it does matter


def test_blind_rows_need_a_thought():
    config, params = _model()
    p_ids, p_mask, t_ids, t_mask = _batch(0, config.vocab_size)
    with pytest.raises(ValueError, match="num_thoughts"):
        latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask, num_thoughts=0,
                              blind_rows=jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="num_thoughts"):
        make_sft_loss(config, num_thoughts=0, slot_bottleneck=0.5)


def test_sft_loss_draws_blind_rows_from_the_step_rng():
    config, params = _model()
    p_ids, p_mask, t_ids, t_mask = _batch(2, config.vocab_size)
    batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "target_ids": t_ids,
             "target_mask": t_mask}
    plain = make_sft_loss(config, num_thoughts=1)
    s0, n0, _ = plain(params, batch, None)

    def by_rows(blind):
        logits, _ = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask,
                                          blind_rows=jnp.asarray(blind))
        return latent.target_cross_entropy(logits, t_ids, t_mask)[0]

    loss = jax.jit(make_sft_loss(config, num_thoughts=1, slot_bottleneck=0.5))
    seen = set()
    for i in range(12):
        rng = jax.random.PRNGKey(i)
        s, n, _ = loss(params, batch, rng)
        assert int(n) == int(n0)
        rows = np.asarray(jax.random.bernoulli(rng, 0.5, (3,)))
        np.testing.assert_allclose(float(s), float(by_rows(rows)), rtol=1e-5)
        seen.add(tuple(rows.tolist()))
    assert len(seen) > 2                          # the rows change with the rng
    drawn = np.array(sorted(seen))
    assert drawn.any() and not drawn.all()        # some rows blind, some not
    s_none, _, _ = jax.jit(make_sft_loss(config, num_thoughts=1, slot_bottleneck=0.0))(
        params, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(s_none), float(s0), rtol=1e-6)


def test_config_rules():
    cfg = config_lib.base_config()
    cfg.sft.slot_bottleneck = 1.0
    with pytest.raises(InputError, match="slot_bottleneck"):
        config_lib.validate(cfg, stage="sft")
    cfg = config_lib.base_config()
    cfg.model.num_thoughts, cfg.sft.slot_bottleneck = 0, 0.5
    with pytest.raises(InputError, match="slot_bottleneck.*num_thoughts"):
        config_lib.validate(cfg, stage="sft")
