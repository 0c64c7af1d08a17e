"""LatentRATT and the LatentR³ forward pass (SPEC.md section 4).

The release runs the whole sequence through the LLM twice: once to get the hidden states
that LatentRATT reads, once with the latent in the thought slot. Attention is causal, so
the prompt part of both passes is identical. `latent_forward` runs the prompt once into
the KV cache, computes the latent(s) from its hidden states, and runs only
[latent, target] on the cache. `reference_forward` is the release's way, kept as the
independent reference for tests and benchmarks.

Factorised latents (`model.latent_factors` = K > 1, with N = 1): K LatentRATT heads, each
with its own Q, K, V (stacked on a leading factor axis of the "latent" weights), read the
same prompt hidden states in parallel and write K thought slots before the target. Every
function here takes the K factors of a user as one vector of width K * d (the factors
concatenated, `latent_width`), so LR-GRPO's noise, norms and trust region and the
test-time ensembles perturb all K at once without knowing about factors; only the slots
see them as K vectors (`factor_slots`). K is read from the weights' shapes.

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


def latent_param_shapes(config: DecoderConfig, factors: int = 1) -> dict:
    """Shape of every LatentRATT weight (Q, K, V: d x d with bias), in the params' layout;
    with `factors` = K > 1, each with a leading factor axis of size K."""
    d = config.hidden_size
    lead = (int(factors),) if int(factors) > 1 else ()
    return {name: {"kernel": lead + (d, d), "bias": lead + (d,)} for name in ("q", "k", "v")}


def latent_param_axes(factors: int = 1) -> dict:
    """Logical axes of LatentRATT's weights (the factor axis, when K > 1, is replicated)."""
    lead = (None,) if int(factors) > 1 else ()
    lin = {"kernel": lead + ("embed", "latent"), "bias": lead + ("latent",)}
    return {"q": dict(lin), "k": dict(lin), "v": dict(lin)}


def num_factors(params: Optional[dict]) -> int:
    """K, the number of latent factors, from LatentRATT's weights (1 without them)."""
    lat = (params or {}).get("latent")
    if not lat:
        return 1
    kernel = lat["q"]["kernel"]
    return int(kernel.shape[0]) if len(kernel.shape) == 3 else 1


def latent_width(config: DecoderConfig, params: Optional[dict]) -> int:
    """Width of one user's latent as the functions here pass it: K * d (K = num_factors)."""
    return num_factors(params) * config.hidden_size


def factor_slots(config: DecoderConfig, latent: jax.Array) -> jax.Array:
    """[..., K * d] -> [..., K, d]: the K thought slots of one latent vector."""
    d = config.hidden_size
    if latent.shape[-1] % d:
        raise ValueError(f"latent width {latent.shape[-1]} is not a multiple of hidden {d}")
    return latent.reshape(latent.shape[:-1] + (latent.shape[-1] // d, d))


def init_latent_params(config: DecoderConfig, rng: jax.Array, std: float = 0.02,
                       init: str = "normal", factors: int = 1) -> dict:
    """Q, K, V: d x d with bias; weights N(0, std), biases zero (the release's).

    `init="identity"` makes V the identity instead (Q and K as before), so the first
    latent is an attention-weighted mean of the prompt's last hidden states: a vector on
    the scale and in the basis the decoder already reads, rather than a random projection
    of them (the same random draws are used for Q and K either way).
    `factors` = K > 1: K independent heads, stacked on a leading axis (each drawn from its
    own key; with `identity` every head's V is the identity).
    """
    if init not in LATENT_INITS:
        raise ValueError(f"latent init must be one of {LATENT_INITS}, got {init!r}")
    K = int(factors)
    if K < 1:
        raise ValueError(f"latent factors must be >= 1, got {factors}")
    if K > 1:
        heads = [init_latent_params(config, k, std, init) for k in jax.random.split(rng, K)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *heads)
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


def latent_ratt_factors(config: DecoderConfig, lparams: dict, hidden: jax.Array,
                        key_mask: jax.Array, positions: jax.Array) -> jax.Array:
    """K latents [B, K * d] from stacked heads (leading axis K), each `latent_ratt` over
    the same hidden states."""
    per = jax.vmap(lambda lp: latent_ratt(config, lp, hidden, key_mask, positions))(lparams)
    return jnp.moveaxis(per, 0, 1).reshape(hidden.shape[0], -1)                 # [B, K*d]


def init_model_params(config: DecoderConfig, rng: jax.Array, with_latent: bool = True,
                      factors: int = 1) -> dict:
    """Random decoder params and, with `with_latent`, LatentRATT's under "latent" (`rng`
    split in two: the decoder's key, LatentRATT's key)."""
    dec_rng, lat_rng = jax.random.split(rng)
    params = dict(decoder.init_params(config, dec_rng))
    if with_latent:
        params["latent"] = init_latent_params(config, lat_rng, factors=factors)
    return params


def model_param_axes(config: DecoderConfig, with_latent: bool = True, factors: int = 1) -> dict:
    """Logical axes of `init_model_params`' tree."""
    axes = decoder.param_axes(config)
    if with_latent:
        axes["latent"] = latent_param_axes(factors)
    return axes


def _one_latent(config, params, hidden, mask, positions, latent_mode):
    if latent_mode == "ratt":
        if num_factors(params) > 1:
            return latent_ratt_factors(config, params["latent"], hidden, mask, positions)
        return latent_ratt(config, params["latent"], hidden, mask, positions)
    if latent_mode == "hidden":
        return hidden[:, -1]
    raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")


def check_factors(params: dict, num_thoughts: int, latent_mode: str) -> int:
    """K for these weights, after checking that factors go with N = 1 in 'ratt' mode."""
    K = num_factors(params) if latent_mode == "ratt" else 1
    if K > 1 and num_thoughts != 1:
        raise ValueError(f"{K} latent factors need num_thoughts = 1, got {num_thoughts}")
    return K


def prompt_positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def prefill_and_latents(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, *,
                        num_thoughts: int, latent_mode: str = "ratt", suffix_len: int = 0,
                        dtype=jnp.float32, llm_params: Optional[dict] = None,
                        return_prompt_hidden: bool = False):
    """Run the prompt into a KV cache and compute the thought latents.

    The cache has room for `suffix_len` more tokens after the prompt and the first
    num_thoughts - 1 latents (latent i >= 2 is computed after running latent i-1), plus
    K - 1 slots with K latent factors (the suffix then starts with K slots, not one).
    `llm_params` (default: `params`) are the decoder weights; pass stop-gradiented ones
    to freeze the LLM while LatentRATT trains.
    Returns (latents [B, N, d], cache, last_hidden [B, d]): `last_hidden` is the final
    hidden state before the next slot (the prompt's last one when N = 0). With
    `return_prompt_hidden`, a fourth value: the prompt's hidden states [B, P, d], from which
    `latent_from_prompt` computes the first latent under other LatentRATT weights.
    """
    llm = params if llm_params is None else llm_params
    B, P = prompt_ids.shape
    K = check_factors(params, num_thoughts, latent_mode) if num_thoughts else 1
    cache = decoder.init_cache(config, B, P + max(num_thoughts - 1, 0) + (K - 1) + suffix_len,
                               dtype)
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
    # (with K factors: [B, 1, K * d])
    if return_prompt_hidden:
        return lat, cache, hidden[:, -1], prompt_hidden
    return lat, cache, hidden[:, -1]


def latent_from_prompt(config: DecoderConfig, params: dict, prompt_hidden: jax.Array,
                       prompt_mask: jax.Array, latent_mode: str = "ratt") -> jax.Array:
    """The first thought latent [B, d] ([B, K * d] with K factors) from the prompt's hidden
    states [B, P, d] (as `prefill_and_latents` returns them), with `params["latent"]` as
    LatentRATT's weights."""
    return _one_latent(config, params, prompt_hidden, prompt_mask.astype(bool),
                       prompt_positions(prompt_mask), latent_mode)


def suffix_logits(config: DecoderConfig, params: dict, cache: dict, last_latent, last_hidden,
                  target_ids, target_mask, *, dtype=jnp.float32, return_hidden: bool = False):
    """Logits [B, T, V] predicting each target token, given a prefilled cache.

    With a latent: runs [latent, target[:-1]] on the cache. Without (N = 0): the first
    target token is predicted from `last_hidden`, the rest from target[:-1]. A latent of
    width K * d (K factors) fills K slots: [factor 1..K, target[:-1]], and the target is
    predicted from factor K's slot on.
    """
    tgt_in = decoder.embed_tokens(config, params, target_ids[:, :-1], dtype)
    tmask = target_mask[:, :-1].astype(bool)
    B = target_ids.shape[0]
    if last_latent is not None:
        slots = factor_slots(config, last_latent.astype(dtype))                  # [B, K, d]
        K = slots.shape[1]
        embeds = jnp.concatenate([slots, tgt_in], axis=1)
        mask = jnp.concatenate([jnp.ones((B, K), bool), tmask], axis=1)
        _, hidden, _ = decoder.apply(config, params, inputs_embeds=embeds, attention_mask=mask,
                                     cache=cache, dtype=dtype, return_logits=False)
        hidden = hidden[:, K - 1:]   # the first K - 1 factor slots predict nothing
        logits = decoder.lm_head(config, params, hidden)
    else:
        logits, hidden, _ = decoder.apply(config, params, inputs_embeds=tgt_in,
                                          attention_mask=tmask, cache=cache, dtype=dtype)
        first = decoder.lm_head(config, params, last_hidden[:, None].astype(dtype))
        logits = jnp.concatenate([first, logits], axis=1)
        hidden = jnp.concatenate([last_hidden[:, None].astype(hidden.dtype), hidden], axis=1)
    return (logits, hidden) if return_hidden else logits


def hide_prefix(cache: dict, rows: jax.Array) -> dict:
    """The cache with everything written so far hidden from later tokens in `rows` [B] bool.

    After `prefill_and_latents`, the suffix of such a row (its last thought slot(s) and the
    target) attends only to itself: the prompt reaches it through the latent alone
    (sft.slot_bottleneck). Position ids still continue after the prompt.
    """
    return {**cache, "mask": cache["mask"] & ~rows.astype(bool)[:, None]}


def latent_forward(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, target_ids,
                   target_mask, *, num_thoughts: int = 1, latent_mode: str = "ratt",
                   dtype=jnp.float32, latent_noise=None, blind_rows=None):
    """Prefix-cached LatentR³ forward. Returns (target logits [B, T, V] f32, latents [B, N, d]).

    `latent_noise` [B, d], if given, is added to the last latent (LR-GRPO exploration).
    With K latent factors the latents are [B, 1, K * d] and the noise [B, K * d].
    `blind_rows` [B] bool, if given (with thoughts): in those rows the last slot(s) and the
    target do not attend to the prompt (or earlier thoughts), only to each other
    (`hide_prefix`).
    """
    T = target_ids.shape[1]
    latents, cache, last_hidden = prefill_and_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=T, dtype=dtype)
    if blind_rows is not None:
        if not num_thoughts:
            raise ValueError("blind_rows needs num_thoughts >= 1: without a latent the target "
                             "would see nothing of the prompt")
        cache = hide_prefix(cache, blind_rows)
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
    With K latent factors (N = 1): K `<|Thought|>` slots, one pass gives the K latents from
    the hidden states before the first slot, the second the logits.
    """
    B, P = prompt_ids.shape
    K = check_factors(params, num_thoughts, latent_mode)
    if K > 1:
        return _reference_factors(config, params, prompt_ids, prompt_mask, target_ids,
                                  target_mask, thought_id=thought_id, factors=K, dtype=dtype,
                                  latent_noise=latent_noise)
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


def _reference_factors(config, params, prompt_ids, prompt_mask, target_ids, target_mask, *,
                       thought_id, factors, dtype, latent_noise):
    """`reference_forward` with K factor slots: full passes, no cache, each head written
    out as `latent_ratt` (not `latent_ratt_factors`) over the prompt's hidden states."""
    B, P = prompt_ids.shape
    K, T = factors, target_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, jnp.full((B, K), thought_id, prompt_ids.dtype),
                           target_ids], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((B, K), bool),
                            target_mask.astype(bool)], axis=1)
    positions = prompt_positions(mask)
    embeds = decoder.embed_tokens(config, params, ids, dtype)
    _, hidden, _ = decoder.apply(config, params, inputs_embeds=embeds, attention_mask=mask,
                                 positions=positions, dtype=dtype, return_logits=False)
    heads = [latent_ratt(config, jax.tree.map(lambda w: w[k], params["latent"]), hidden[:, :P],
                         mask[:, :P], positions[:, :P]) for k in range(K)]
    r = jnp.stack(heads, axis=1)                                               # [B, K, d]
    if latent_noise is not None:
        r = r + factor_slots(config, latent_noise).astype(r.dtype)
    embeds = embeds.at[:, P:P + K].set(r.astype(dtype))
    logits, _, _ = decoder.apply(config, params, inputs_embeds=embeds, attention_mask=mask,
                                 positions=positions, dtype=dtype)
    return logits[:, P + K - 1: P + K - 1 + T]


def factor_diversity(config: DecoderConfig, latents: jax.Array, valid=None) -> jax.Array:
    """Mean squared cosine between the K factors of each user (over the K(K-1)/2 pairs,
    then over the valid rows); 0 when K = 1. latents [B, 1, K * d] or [B, K * d]. The SFT
    regulariser `sft.latent_diversity` adds this times its weight to the token-mean loss:
    it is 0 when the factors are orthogonal and 1 when they are parallel."""
    r = factor_slots(config, latents.reshape(latents.shape[0], -1).astype(jnp.float32))
    K = r.shape[1]
    if K < 2:
        return jnp.zeros((), jnp.float32)
    u = r / jnp.maximum(jnp.linalg.norm(r, axis=-1, keepdims=True), 1e-6)
    cos = jnp.einsum("bkd,bjd->bkj", u, u)
    off = 1.0 - jnp.eye(K, dtype=jnp.float32)
    per_user = jnp.sum(cos * cos * off, axis=(1, 2)) / (K * (K - 1))
    w = jnp.ones_like(per_user) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(per_user * w) / jnp.maximum(w.sum(), 1.0)


def target_logprobs(logits: jax.Array, target_ids: jax.Array) -> jax.Array:
    """log p(target token) [B, T] in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, target_ids[..., None], axis=-1)[..., 0]


def target_cross_entropy(logits, target_ids, target_mask):
    """(sum of token NLL, number of target tokens): token mean = first / second."""
    m = target_mask.astype(jnp.float32)
    nll = -target_logprobs(logits, target_ids) * m
    return nll.sum(), m.sum()
