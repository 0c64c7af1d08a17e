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

from typing import Optional

import jax
import jax.numpy as jnp

from latentr3_jax.model import decoder
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.model.config import DecoderConfig
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.step import split_micro

ROLLOUT_SALT = 0x5EED  # the rollout's noise key: fold_in(fold_in(state.rng, step), ROLLOUT_SALT)


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


def rollout_metrics(rewards, advantages, valid) -> dict:
    """Reward and advantage statistics of the real groups: rewards, advantages [P, G]."""
    v = valid.astype(jnp.float32)
    n = jnp.maximum(v.sum(), 1.0)
    return {"reward_mean": (rewards.mean(1) * v).sum() / n,
            "reward_eps0": (rewards[:, 0] * v).sum() / n,
            "reward_max": jnp.max(jnp.where(v[:, None] > 0, rewards, -jnp.inf)),
            **gl.advantage_stats(advantages, valid)}


def rewards_and_advantages(s: gl.GRPOSettings, token_logp, target_mask, valid) -> tuple:
    """Rewards [P, G] (negative perplexity of each sample's target) from the samples' token
    log-probs [P, G, T], and their advantages over the whole batch."""
    rewards = gl.negative_perplexity(token_logp, target_mask[:, None, :])
    return rewards, gl.compute_advantages(s.advantage, rewards, valid)


def _map_micro(fn, batch: dict, num_micro: int):
    """Apply `fn` to micro-batches of prompts one after another (bounded memory) and put the
    rows back in their original order. Uses the same row interleaving as the train step."""
    if num_micro <= 1:
        return fn(batch)
    out = jax.lax.map(fn, jax.tree.map(lambda x: split_micro(x, num_micro), batch))

    def merge(y):  # [M, P/M, ...] -> [P, ...], row j * M + m <- micro m, position j
        y = jnp.swapaxes(y, 0, 1)
        return y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])
    return jax.tree.map(merge, out)


def _with_ref(params: dict, ref_params: Optional[dict]) -> dict:
    """The frozen reference model: the current params with the initial ones laid over them
    (only the latent module when the LLM is frozen, since the LLM then never changes)."""
    return {**params, **(ref_params or {})}


def make_rollout_fn(model_config, s: gl.GRPOSettings):
    """rollout(params, ref_params, batch, rng) -> (step inputs dict, metrics dict).

    batch: prompt_ids/mask [P, S], target_ids/mask [P, T], valid [P]. Everything is
    computed without gradient; the advantages are normalised over all P groups.
    """
    G = s.group_size

    def rollout_fn(params, ref_params, batch, rng):
        params = jax.lax.stop_gradient(params)
        P, T = batch["target_ids"].shape
        valid = batch.get("valid", jnp.ones((P,), bool))
        noise = sample_noise(rng, P, G, model_config.hidden_size, s.sigma)

        def one(mb):
            args = (mb["prompt_ids"], mb["prompt_mask"], mb["target_ids"], mb["target_mask"],
                    mb["noise"])
            logp, r = group_logprobs(model_config, params, *args, **s.forward_kw)
            out = {"old_logp": logp.reshape(-1, G, T), "latent": r.astype(jnp.float32)}
            if s.kl_beta:
                ref_logp, _ = group_logprobs(model_config, _with_ref(params, ref_params), *args,
                                             **s.forward_kw)
                out["ref_logp"] = ref_logp.reshape(-1, G, T)
            return out

        out = _map_micro(one, {**batch, "noise": noise}, s.num_micro_batches)
        rewards, adv = rewards_and_advantages(s, out["old_logp"], batch["target_mask"], valid)
        step_in = {"noise": noise, "old_logp": out["old_logp"], "advantages": adv}
        if s.kl_beta:
            step_in["ref_logp"] = out["ref_logp"]
        if s.estimator == "reinforce":
            sampled = out["latent"][:, None, :] + noise                            # [P, G, d]
            step_in["sampled"] = sampled
            step_in["old_logdens"] = gl.gaussian_log_density(sampled, out["latent"][:, None, :],
                                                             s.sigma)
        return step_in, rollout_metrics(rewards, adv, valid)

    return rollout_fn
