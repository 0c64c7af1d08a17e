"""LR-GRPO rollouts in latent space with a shared prompt prefix (SPEC.md section 6).

A rollout never decodes: for each prompt the latent r is perturbed G times,
r_k = r + eps_k with eps_k ~ N(0, sigma^2 I) and eps_1 = 0, and each sample is scored by
one teacher-forced pass over the ground-truth target.

The release runs G full sequences [prompt, r_k, target] per prompt. The prompt part is the
same for all G samples and, with the LLM frozen, needs no gradient; so here the prompt
runs once per prompt into a KV cache (under stop_gradient), the cache is repeated G
times, and only [r_k, target] runs per sample. The latent r itself still gets its
gradient through LatentRATT, whose input hidden states are constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from latentr3_jax.model import decoder
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.model.config import DecoderConfig


def sample_noise(rng: jax.Array, num_prompts: int, group_size: int, dim: int,
                 sigma: float) -> jax.Array:
    """Exploration noise [P, G, d]: N(0, sigma^2 I), sample 0 of every group exactly zero."""
    eps = sigma * jax.random.normal(rng, (num_prompts, group_size, dim), jnp.float32)
    return eps.at[:, 0].set(0.0)


def llm_view(params: dict, train_llm: bool) -> dict:
    """The decoder weights as the rollout uses them: gradient-free unless the LLM trains."""
    llm = {k: v for k, v in params.items() if k != "latent"}
    return llm if train_llm else jax.lax.stop_gradient(llm)


def prompt_latents(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, *,
                   num_thoughts: int, latent_mode: str, suffix_len: int, dtype,
                   train_llm: bool = False):
    """Prefill the prompts once. Returns (latents [P, N, d], cache, last_hidden [P, d])."""
    if num_thoughts < 1:
        raise ValueError("LR-GRPO needs at least one latent thought (model.num_thoughts >= 1)")
    return latent_lib.prefill_and_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=suffix_len, dtype=dtype,
        llm_params=llm_view(params, train_llm))


def group_logprobs(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, target_ids,
                   target_mask, noise, *, num_thoughts: int = 1, latent_mode: str = "ratt",
                   dtype=jnp.float32, train_llm: bool = False):
    """Target log-probs of G noisy-latent samples per prompt, prompt prefix shared.

    prompt_ids/mask [P, S] (left-padded), target_ids/mask [P, T] (right-padded),
    noise [P, G, d]. Returns (token_logp [P * G, T] float32, latent [P, d]): row p * G + k
    is log pi(y_t | x_p, r_p + eps_pk, y_<t); `latent` is the noise-free last latent r_p.
    """
    P, G, d = noise.shape
    T = target_ids.shape[1]
    latents, cache, last_hidden = prompt_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=T, dtype=dtype, train_llm=train_llm)
    r = latents[:, -1]                                                    # [P, d]
    noisy = (r[:, None, :].astype(jnp.float32) + noise).reshape(P * G, d)  # [P*G, d]
    cache = decoder.repeat_cache(cache, G)
    rep = lambda x: jnp.repeat(x, G, axis=0)
    logits = latent_lib.suffix_logits(config, llm_view(params, train_llm), cache, noisy,
                                      rep(last_hidden), rep(target_ids), rep(target_mask),
                                      dtype=dtype)                        # [P*G, T, V]
    return latent_lib.target_logprobs(logits, rep(target_ids)), r
