"""LatentRATT and the LatentR³ forward pass (SPEC.md section 4).

The release runs the whole sequence through the LLM twice: once to get the hidden states
that LatentRATT reads, once with the latent in the thought slot. Attention is causal, so
the prompt part of both passes is identical. `latent_forward` runs the prompt once into
the KV cache, computes the latent(s) from its hidden states, and runs only
[latent, target] on the cache. `reference_forward` is the release's way, kept as the
independent reference for tests and benchmarks.

Batch layout shared by SFT, GRPO and evaluation:
  prompt_ids, prompt_mask  [batch, prompt_len]  left-padded
  target_ids, target_mask  [batch, target_len]  right-padded (`"Title"\\n` + EOS)
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from latentr3_jax.model import decoder, mixed
from latentr3_jax.model.config import DecoderConfig

LATENT_MODES = ("ratt", "hidden")  # LatentRATT, or the ablation "raw hidden state as latent"
LATENT_INITS = ("normal", "identity")  # LatentRATT's first weights (model.latent_init)


def latent_param_shapes(config: DecoderConfig) -> dict:
    """Shape of every LatentRATT weight (Q, K, V: d x d with bias), in the params' layout."""
    d = config.hidden_size
    return {name: {"kernel": (d, d), "bias": (d,)} for name in ("q", "k", "v")}


def latent_param_axes() -> dict:
    lin = {"kernel": ("embed", "latent"), "bias": ("latent",)}
    return {"q": dict(lin), "k": dict(lin), "v": dict(lin)}


def init_latent_params(config: DecoderConfig, rng: jax.Array, std: float = 0.02,
                       init: str = "normal") -> dict:
    """Q, K, V: d x d with bias; weights N(0, std), biases zero (the release's).

    `init="identity"` makes V the identity instead (Q and K as before), so the first
    latent is an attention-weighted mean of the prompt's last hidden states: a vector on
    the scale and in the basis the decoder already reads, rather than a random projection
    of them (the same random draws are used for Q and K either way).
    """
    if init not in LATENT_INITS:
        raise ValueError(f"latent init must be one of {LATENT_INITS}, got {init!r}")
    d = config.hidden_size
    keys = jax.random.split(rng, 3)
    out = {name: {"kernel": std * jax.random.normal(k, (d, d), jnp.float32),
                  "bias": jnp.zeros((d,), jnp.float32)}
           for name, k in zip(("q", "k", "v"), keys)}
    if init == "identity":
        out["v"]["kernel"] = jnp.eye(d, dtype=jnp.float32)
    return out


def latent_ratt(config: DecoderConfig, lparams: dict, hidden: jax.Array, key_mask: jax.Array,
                positions: jax.Array) -> jax.Array:
    """One latent from hidden states [batch, seq, d]; the query is the last slot.

    Single head over the full width, RoPE base `config.latent_rope_theta` (1000) on Q and
    K, scale 1/sqrt(d), no output projection, residual or norm.
    """
    dt = hidden.dtype
    d = hidden.shape[-1]
    inv = decoder.rope_inv_freq(d, config.latent_rope_theta)
    cos, sin = decoder.rope_cos_sin(positions, inv, dt)                       # [B, S, d]
    q = decoder.apply_rope(decoder.dense(lparams["q"], hidden[:, -1:]), cos[:, -1:], sin[:, -1:])
    k = decoder.apply_rope(decoder.dense(lparams["k"], hidden), cos, sin)     # [B, S, d]
    v = decoder.dense(lparams["v"], hidden)                                   # [B, S, d]
    scores = mixed.einsum("bqd,bsd->bqs", q, k, jnp.float32) / math.sqrt(d)
    scores = jnp.where(key_mask[:, None, :].astype(bool), scores, decoder.NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return mixed.einsum("bqs,bsd->bqd", probs, v)[:, 0]            # [B, d]


def init_model_params(config: DecoderConfig, rng: jax.Array, with_latent: bool = True) -> dict:
    """Random decoder params and, with `with_latent`, LatentRATT's under "latent" (`rng`
    split in two: the decoder's key, LatentRATT's key)."""
    dec_rng, lat_rng = jax.random.split(rng)
    params = dict(decoder.init_params(config, dec_rng))
    if with_latent:
        params["latent"] = init_latent_params(config, lat_rng)
    return params


def model_param_axes(config: DecoderConfig, with_latent: bool = True) -> dict:
    """Logical axes of `init_model_params`' tree."""
    axes = decoder.param_axes(config)
    if with_latent:
        axes["latent"] = latent_param_axes()
    return axes


def _one_latent(config, params, hidden, mask, positions, latent_mode):
    if latent_mode == "ratt":
        return latent_ratt(config, params["latent"], hidden, mask, positions)
    if latent_mode == "hidden":
        return hidden[:, -1]
    raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")


def prompt_positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def prefill_and_latents(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, *,
                        num_thoughts: int, latent_mode: str = "ratt", suffix_len: int = 0,
                        dtype=jnp.float32, llm_params: Optional[dict] = None,
                        return_prompt_hidden: bool = False):
    """Run the prompt into a KV cache and compute the thought latents.

    The cache has room for `suffix_len` more tokens after the prompt and the first
    num_thoughts - 1 latents (latent i >= 2 is computed after running latent i-1).
    `llm_params` (default: `params`) are the decoder weights; pass stop-gradiented ones
    to freeze the LLM while LatentRATT trains.
    Returns (latents [B, N, d], cache, last_hidden [B, d]): `last_hidden` is the final
    hidden state before the next slot (the prompt's last one when N = 0). With
    `return_prompt_hidden`, a fourth value: the prompt's hidden states [B, P, d], from which
    `latent_from_prompt` computes the first latent under other LatentRATT weights.
    """
    llm = params if llm_params is None else llm_params
    B, P = prompt_ids.shape
    cache = decoder.init_cache(config, B, P + max(num_thoughts - 1, 0) + suffix_len, dtype)
    _, hidden, cache = decoder.apply(config, llm, prompt_ids, attention_mask=prompt_mask,
                                     cache=cache, dtype=dtype, return_logits=False)
    prompt_hidden = hidden
    mask = prompt_mask.astype(bool)
    positions = prompt_positions(prompt_mask)
    latents = []
    for i in range(num_thoughts):
        r = _one_latent(config, params, hidden, mask, positions, latent_mode)
        latents.append(r)
        if i < num_thoughts - 1:
            _, h_r, cache = decoder.apply(config, llm, inputs_embeds=r[:, None], cache=cache,
                                          dtype=dtype, return_logits=False)
            hidden = jnp.concatenate([hidden, h_r], axis=1)
            mask = jnp.concatenate([mask, jnp.ones((B, 1), bool)], axis=1)
            positions = jnp.concatenate([positions, positions[:, -1:] + 1], axis=1)
    lat = jnp.stack(latents, axis=1) if latents else jnp.zeros((B, 0, config.hidden_size), dtype)
    if return_prompt_hidden:
        return lat, cache, hidden[:, -1], prompt_hidden
    return lat, cache, hidden[:, -1]


def latent_from_prompt(config: DecoderConfig, params: dict, prompt_hidden: jax.Array,
                       prompt_mask: jax.Array, latent_mode: str = "ratt") -> jax.Array:
    """The first thought latent [B, d] from the prompt's hidden states [B, P, d] (as
    `prefill_and_latents` returns them), with `params["latent"]` as LatentRATT's weights."""
    return _one_latent(config, params, prompt_hidden, prompt_mask.astype(bool),
                       prompt_positions(prompt_mask), latent_mode)


def suffix_logits(config: DecoderConfig, params: dict, cache: dict, last_latent, last_hidden,
                  target_ids, target_mask, *, dtype=jnp.float32, return_hidden: bool = False):
    """Logits [B, T, V] predicting each target token, given a prefilled cache.

    With a latent: runs [latent, target[:-1]] on the cache. Without (N = 0): the first
    target token is predicted from `last_hidden`, the rest from target[:-1].
    """
    tgt_in = decoder.embed_tokens(config, params, target_ids[:, :-1], dtype)
    tmask = target_mask[:, :-1].astype(bool)
    B = target_ids.shape[0]
    if last_latent is not None:
        embeds = jnp.concatenate([last_latent[:, None].astype(dtype), tgt_in], axis=1)
        mask = jnp.concatenate([jnp.ones((B, 1), bool), tmask], axis=1)
        logits, hidden, _ = decoder.apply(config, params, inputs_embeds=embeds,
                                          attention_mask=mask, cache=cache, dtype=dtype)
    else:
        logits, hidden, _ = decoder.apply(config, params, inputs_embeds=tgt_in,
                                          attention_mask=tmask, cache=cache, dtype=dtype)
        first = decoder.lm_head(config, params, last_hidden[:, None].astype(dtype))
        logits = jnp.concatenate([first, logits], axis=1)
        hidden = jnp.concatenate([last_hidden[:, None].astype(hidden.dtype), hidden], axis=1)
    return (logits, hidden) if return_hidden else logits


def latent_forward(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, target_ids,
                   target_mask, *, num_thoughts: int = 1, latent_mode: str = "ratt",
                   dtype=jnp.float32, latent_noise=None):
    """Prefix-cached LatentR³ forward. Returns (target logits [B, T, V] f32, latents [B, N, d]).

    `latent_noise` [B, d], if given, is added to the last latent (LR-GRPO exploration).
    """
    T = target_ids.shape[1]
    latents, cache, last_hidden = prefill_and_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=T, dtype=dtype)
    last = latents[:, -1] if num_thoughts else None
    if latent_noise is not None and last is not None:
        last = last + latent_noise.astype(last.dtype)
    logits = suffix_logits(config, params, cache, last, last_hidden, target_ids, target_mask,
                           dtype=dtype)
    return logits, latents


def reference_forward(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, target_ids,
                      target_mask, *, thought_id: int, num_thoughts: int = 1,
                      latent_mode: str = "ratt", dtype=jnp.float32, latent_noise=None):
    """The release's way: full passes over [prompt, thoughts, target], N + 1 of them.

    Pass i sees latents 1..i-1 in their slots (the `<|Thought|>` embedding elsewhere) and
    yields latent i from the hidden states before slot i; the last pass gives the logits.
    """
    B, P = prompt_ids.shape
    N, T = num_thoughts, target_ids.shape[1]
    thought = jnp.full((B, N), thought_id, prompt_ids.dtype)
    ids = jnp.concatenate([prompt_ids, thought, target_ids], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((B, N), bool),
                            target_mask.astype(bool)], axis=1)
    positions = prompt_positions(mask)
    embeds = decoder.embed_tokens(config, params, ids, dtype)
    for i in range(N):
        _, hidden, _ = decoder.apply(config, params, inputs_embeds=embeds, attention_mask=mask,
                                     positions=positions, dtype=dtype, return_logits=False)
        upto = P + i  # hidden states of prompt and latents 1..i
        r = _one_latent(config, params, hidden[:, :upto], mask[:, :upto], positions[:, :upto],
                        latent_mode)
        if i == N - 1 and latent_noise is not None:
            r = r + latent_noise.astype(r.dtype)
        embeds = embeds.at[:, P + i].set(r.astype(dtype))
    logits, _, _ = decoder.apply(config, params, inputs_embeds=embeds, attention_mask=mask,
                                 positions=positions, dtype=dtype)
    return logits[:, P + N - 1: P + N - 1 + T]


def target_logprobs(logits: jax.Array, target_ids: jax.Array) -> jax.Array:
    """log p(target token) [B, T] in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, target_ids[..., None], axis=-1)[..., 0]


def target_cross_entropy(logits, target_ids, target_mask):
    """(sum of token NLL, number of target tokens): token mean = first / second."""
    m = target_mask.astype(jnp.float32)
    nll = -target_logprobs(logits, target_ids) * m
    return nll.sum(), m.sum()
