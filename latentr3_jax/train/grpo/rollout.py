"""LR-GRPO rollouts in latent space with a shared prompt prefix (SPEC.md section 6).

A rollout never decodes: for each prompt the latent r is perturbed G times,
r_k = r + eps_k with eps_k ~ N(0, sigma^2 I) and eps_1 = 0, and each sample is scored by
one teacher-forced pass over the ground-truth target.

The release runs G full sequences [prompt, r_k, target] per prompt. The prompt part is the
same for all G samples and, with the LLM frozen, needs no gradient; so here the prompt
runs once per prompt into a KV cache (under stop_gradient), the cache is repeated G
times, and only [r_k, target] runs per sample. The latent r itself still gets its
gradient through LatentRATT, whose input hidden states are constants.

With `grpo.reward=contrastive` each noisy sample also scores `grpo.negatives` other
prompts' titles of the same batch on the same cache rows (J = 1 + negatives suffixes per
sample, one pass), and its reward is the log-probability that its own title wins a softmax
over them (loss.contrastive_reward).
"""

from __future__ import annotations

import math
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
                 sigma) -> jax.Array:
    """Exploration noise [P, G, d]: N(0, sigma^2 I), sample 0 of every group exactly zero.
    `sigma` is a number or one value per prompt [P] (a decaying noise). With K latent
    factors `dim` is K * d (`latent.latent_width`): every factor is perturbed."""
    z = jax.random.normal(rng, (num_prompts, group_size, dim), jnp.float32)
    if isinstance(sigma, (int, float)):
        eps = sigma * z
    else:
        eps = jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1) * z
    return eps.at[:, 0].set(0.0)


def batch_sigma(s: gl.GRPOSettings, batch: dict):
    """This batch's noise standard deviation: `s.sigma`, or with a decaying noise the
    per-prompt values [P] the step put in the batch (GRPOStep, from loss.sigma_at)."""
    if not s.sigma_decays:
        return s.sigma
    if "sigma" not in batch:
        raise ValueError("grpo.sigma_final >= 0 needs the batch's per-prompt 'sigma' "
                         "(GRPOStep adds it)")
    return batch["sigma"].astype(jnp.float32)


def shares_prompt_pass(num_thoughts: int, latent_mode: str, train_llm: bool) -> bool:
    """Whether the starting weights' latent r_sft comes from this step's own prompt pass:
    one thought, LatentRATT, frozen LLM (the prompt's hidden states are then the same under
    both weights, and r_sft costs one LatentRATT over them)."""
    return num_thoughts == 1 and latent_mode == "ratt" and not train_llm


def wants_reference(s: gl.GRPOSettings, ref_params: Optional[dict]) -> bool:
    """Compute r_sft this step: always for the latent trust region, and for the latent-drift
    diagnostic when it is cheap (shares_prompt_pass)."""
    if s.latent_trust and not ref_params:
        raise ValueError("grpo.latent_trust > 0 needs the starting weights (ref_params)")
    cheap = shares_prompt_pass(s.num_thoughts, s.latent_mode, s.train_llm)
    return bool(ref_params) and (bool(s.latent_trust) or (cheap and "latent" in ref_params))


def llm_view(params: dict, train_llm: bool) -> dict:
    """The decoder weights as the rollout uses them: gradient-free unless the LLM trains."""
    llm = {k: v for k, v in params.items() if k != "latent"}
    return llm if train_llm else jax.lax.stop_gradient(llm)


def prompt_latents(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, *,
                   num_thoughts: int, latent_mode: str, suffix_len: int, dtype,
                   train_llm: bool = False):
    """Prefill the prompts once. Returns (latents [P, N, d], cache, last_hidden [P, d])."""
    return prompt_latents_with_reference(
        config, params, None, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=suffix_len, dtype=dtype, train_llm=train_llm)[:3]


def prompt_latents_with_reference(config: DecoderConfig, params: dict,
                                  ref_params: Optional[dict], prompt_ids, prompt_mask, *,
                                  num_thoughts: int, latent_mode: str, suffix_len: int, dtype,
                                  train_llm: bool = False):
    """`prompt_latents` plus r_sft [P, d], the last latent of the same prompts under the
    starting weights `ref_params` laid over `params` (None when ref_params is None), without
    gradient. From this pass's hidden states when shares_prompt_pass, else from a second
    prompt pass under the starting weights."""
    if num_thoughts < 1:
        raise ValueError("LR-GRPO needs at least one latent thought (model.num_thoughts >= 1)")
    shared = (ref_params is not None and "latent" in ref_params
              and shares_prompt_pass(num_thoughts, latent_mode, train_llm))
    out = latent_lib.prefill_and_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=suffix_len, dtype=dtype,
        llm_params=llm_view(params, train_llm), return_prompt_hidden=shared)
    if ref_params is None:
        return (*out, None)
    if shared:
        latents, cache, last_hidden, hidden = out
        r_ref = latent_lib.latent_from_prompt(config, {"latent": ref_params["latent"]},
                                              jax.lax.stop_gradient(hidden), prompt_mask,
                                              latent_mode)
    else:
        latents, cache, last_hidden = out
        ref_lat, _, _ = latent_lib.prefill_and_latents(
            config, jax.lax.stop_gradient(_with_ref(params, ref_params)), prompt_ids,
            prompt_mask, num_thoughts=num_thoughts, latent_mode=latent_mode, suffix_len=0,
            dtype=dtype)
        r_ref = ref_lat[:, -1]
    return latents, cache, last_hidden, jax.lax.stop_gradient(r_ref)


def group_logprobs(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, target_ids,
                   target_mask, noise, *, num_thoughts: int = 1, latent_mode: str = "ratt",
                   dtype=jnp.float32, train_llm: bool = False):
    """Target log-probs of G noisy-latent samples per prompt, prompt prefix shared.

    prompt_ids/mask [P, S] (left-padded), target_ids/mask [P, T] (right-padded),
    noise [P, G, d]. Returns (token_logp [P * G, T] float32, latent [P, d]): row p * G + k
    is log pi(y_t | x_p, r_p + eps_pk, y_<t); `latent` is the noise-free last latent r_p.
    """
    logp, r, _ = group_logprobs_with_reference(
        config, params, None, prompt_ids, prompt_mask, target_ids, target_mask, noise,
        num_thoughts=num_thoughts, latent_mode=latent_mode, dtype=dtype, train_llm=train_llm)
    return logp, r


def group_logprobs_with_reference(config: DecoderConfig, params: dict,
                                  ref_params: Optional[dict], prompt_ids, prompt_mask,
                                  target_ids, target_mask, noise, *, num_thoughts: int = 1,
                                  latent_mode: str = "ratt", dtype=jnp.float32,
                                  train_llm: bool = False):
    """`group_logprobs` plus r_sft [P, d] (see prompt_latents_with_reference; None when
    ref_params is None): (token_logp [P * G, T], latent [P, d], r_sft).

    target_ids/mask may also be [P, J, T], J titles per prompt (contrastive_targets): every
    noisy sample then scores all J under its latent, and token_logp is [P * G, J, T]."""
    P, G, d = noise.shape
    T = target_ids.shape[-1]
    J = target_ids.shape[1] if target_ids.ndim == 3 else 1
    latents, cache, last_hidden, r_ref = prompt_latents_with_reference(
        config, params, ref_params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=T, dtype=dtype, train_llm=train_llm)
    r = latents[:, -1]                                                    # [P, d]
    noisy = (r[:, None, :].astype(jnp.float32) + noise).reshape(P * G, d)  # [P*G, d]
    cache = decoder.repeat_cache(cache, G * J)
    rep = lambda x: jnp.repeat(x, G * J, axis=0)
    # rows p * G * J + k * J + j: prompt p, sample k, title j
    tiled = lambda x: jnp.broadcast_to(x.reshape(P, 1, J, T), (P, G, J, T)).reshape(P * G * J, T)
    ids, mask = tiled(target_ids), tiled(target_mask)
    logits = latent_lib.suffix_logits(config, llm_view(params, train_llm), cache,
                                      jnp.repeat(noisy, J, axis=0), rep(last_hidden), ids, mask,
                                      dtype=dtype)                        # [P*G*J, T, V]
    logp = latent_lib.target_logprobs(logits, ids)
    return (logp.reshape(P * G, J, T) if target_ids.ndim == 3 else logp), r, r_ref


def contrastive_targets(target_ids, target_mask, valid, negatives: int) -> tuple:
    """Each prompt's own title and `negatives` other prompts' titles of the same batch:
    prompt p gets those of prompts p + 1, ..., p + negatives (mod P).

    target_ids/mask [P, T], valid [P] -> (ids [P, J, T], mask [P, J, T], neg_valid [P, J - 1])
    with J = 1 + negatives; a negative counts when its prompt is real and its title differs
    from the prompt's own (the same item bought by two users of a batch is no negative)."""
    P = target_ids.shape[0]
    idx = (jnp.arange(P)[:, None] + jnp.arange(negatives + 1)[None, :]) % P     # [P, J]
    ids, mask = target_ids[idx], target_mask[idx]
    m = mask.astype(bool)
    own_ids, own_m = ids[:, :1], m[:, :1]
    differs = jnp.any((jnp.where(m, ids, -1) != jnp.where(own_m, own_ids, -1)), axis=-1)
    neg_valid = (valid[idx] & differs)[:, 1:]
    return ids, mask, neg_valid


def mined_targets(batch: dict) -> tuple:
    """Each prompt's own title then its mined negatives (batch neg_ids/neg_mask [P, C, Tn],
    neg_valid [P, C]): (ids [P, 1 + C, T'], mask, neg_valid) with T' = max(T, Tn), the shorter
    side right-padded with masked positions."""
    own_ids, own_mask = batch["target_ids"], batch["target_mask"]
    neg_ids, neg_mask = batch["neg_ids"], batch["neg_mask"]
    width = max(own_ids.shape[-1], neg_ids.shape[-1])

    def pad(x):
        extra = width - x.shape[-1]
        return x if not extra else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    ids = jnp.concatenate([pad(own_ids)[:, None], pad(neg_ids)], axis=1)
    mask = jnp.concatenate([pad(own_mask)[:, None], pad(neg_mask)], axis=1)
    valid = batch.get("valid", jnp.ones(own_ids.shape[:1], bool))
    return ids, mask, batch["neg_valid"] & valid[:, None]


def scored_targets(s: gl.GRPOSettings, batch: dict) -> tuple:
    """(target ids, target mask, neg_valid) a batch's samples are scored on: the batch's own
    [P, T] and None with the perplexity reward; with the contrastive one, mined_targets when
    the batch carries mined negatives, else contrastive_targets (in-batch negatives)."""
    if s.reward != "contrastive":
        return batch["target_ids"], batch["target_mask"], None
    if "neg_ids" in batch:
        return mined_targets(batch)
    P = batch["target_ids"].shape[0]
    if s.negatives >= P:
        raise ValueError(f"grpo.negatives = {s.negatives} needs more prompts per (micro-)batch "
                         f"than that, got {P}")
    valid = batch.get("valid", jnp.ones((P,), bool))
    return contrastive_targets(batch["target_ids"], batch["target_mask"], valid, s.negatives)


def own_title(s: gl.GRPOSettings, token_logp, width: int):
    """The log-probs of each sample's own title: token_logp [..., J, T'] -> [..., width] with
    the contrastive reward (T' >= width when mined negatives are longer than the batch's
    targets; the own title's positions past `width` are padding), as is otherwise."""
    return token_logp[..., 0, :width] if s.reward == "contrastive" else token_logp


def rollout_metrics(rewards, advantages, valid) -> dict:
    """Reward and advantage statistics of the real groups: rewards, advantages [P, G].

    reward_eps0 is the mean reward of the noise-free samples, reward_noisy that of the noisy
    ones, reward_spread the mean over groups of the (population) std of the G rewards: near
    0, the decoder's output hardly depends on the thought slot."""
    v = valid.astype(jnp.float32)
    n = jnp.maximum(v.sum(), 1.0)
    G = rewards.shape[1]
    out = {"reward_mean": (rewards.mean(1) * v).sum() / n,
           "reward_eps0": (rewards[:, 0] * v).sum() / n,
           "reward_max": jnp.max(jnp.where(v[:, None] > 0, rewards, -jnp.inf)),
           **gl.advantage_stats(advantages, valid)}
    # from a separate copy of the rewards, so that these reductions leave the fusion (and
    # the rounding) of the ones above as they were
    r = jax.lax.optimization_barrier(rewards)
    out["reward_noisy"] = (r[:, 1:].sum(1) / (G - 1) * v).sum() / n
    out["reward_spread"] = (r.std(1) * v).sum() / n
    return out


def latent_metrics(latent, valid, sigma, ref_latent=None) -> dict:
    """Statistics of the noise-free latent r [P, d] of the real prompts: latent_norm =
    mean ||r||; sigma (its mean over prompts when it varies); sigma_rel = sigma /
    latent_norm; noise_rel = mean of sigma * sqrt(d) / ||r|| (sigma * sqrt(d) is the noise's
    root-mean-square norm: above 1 the noise outweighs the latent); with r_sft [P, d],
    latent_drift = mean ||r - r_sft||. (Computed from sigma, not from the drawn noise, so
    that the noise feeds nothing but the forward pass.)"""
    v = valid.astype(jnp.float32)
    n = jnp.maximum(v.sum(), 1.0)
    r = jax.lax.stop_gradient(latent).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(r * r, axis=-1))                                # [P]
    latent_norm = (norm * v).sum() / n
    sig_p = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), norm.shape)  # [P]
    out = {"latent_norm": latent_norm, "sigma": (sig_p * v).sum() / n}
    out["sigma_rel"] = out["sigma"] / jnp.maximum(latent_norm, 1e-12)
    out["noise_rel"] = (sig_p * math.sqrt(r.shape[-1]) / jnp.maximum(norm, 1e-12) * v).sum() / n
    if ref_latent is not None:
        d = r - jax.lax.stop_gradient(ref_latent).astype(jnp.float32)
        out["latent_drift"] = (jnp.sqrt(jnp.sum(d * d, axis=-1)) * v).sum() / n
    return out


def weight_drift(params: dict, ref_params: Optional[dict]) -> dict:
    """{'weight_drift': ||theta - theta_sft|| / ||theta_sft||} over LatentRATT's weights, or
    {} when the starting ones are not given."""
    if not ref_params or "latent" not in ref_params or "latent" not in params:
        return {}
    now = jax.tree.leaves(jax.lax.stop_gradient(params["latent"]))
    start = jax.tree.leaves(ref_params["latent"])
    sq = lambda xs: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs)
    diff = sq([a.astype(jnp.float32) - b.astype(jnp.float32) for a, b in zip(now, start)])
    return {"weight_drift": jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(sq(start)), 1e-12)}


def rewards_and_advantages(s: gl.GRPOSettings, token_logp, target_mask, valid,
                           neg_valid=None) -> tuple:
    """Rewards [P, G] (loss.sample_rewards) from the samples' token log-probs [P, G, T]
    (or [P, G, J, T] with the contrastive reward, target_mask [P, J, T] and neg_valid
    [P, J - 1]), and their advantages over the whole batch."""
    extra = None if neg_valid is None else neg_valid[:, None]
    rewards = gl.sample_rewards(s, token_logp, target_mask[:, None], extra)
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
        sigma = batch_sigma(s, batch)
        noise = sample_noise(rng, P, G, latent_lib.latent_width(model_config, params), sigma)
        ref = ref_params if wants_reference(s, ref_params) else None

        def one(mb):
            ids, tmask, neg_valid = scored_targets(s, mb)
            args = (mb["prompt_ids"], mb["prompt_mask"], ids, tmask, mb["noise"])
            logp, r, r_ref = group_logprobs_with_reference(model_config, params, ref, *args,
                                                           **s.forward_kw)
            out = {"scored_logp": logp.reshape((-1, G) + logp.shape[1:]),
                   "scored_mask": tmask, "latent": r.astype(jnp.float32)}
            if neg_valid is not None:
                out["neg_valid"] = neg_valid
            if r_ref is not None:
                out["ref_latent"] = r_ref.astype(jnp.float32)
            if s.kl_beta:
                ref_logp, _ = group_logprobs(model_config, _with_ref(params, ref_params),
                                             mb["prompt_ids"], mb["prompt_mask"],
                                             mb["target_ids"], mb["target_mask"], mb["noise"],
                                             **s.forward_kw)
                out["ref_logp"] = ref_logp.reshape(-1, G, T)
            return out

        out = _map_micro(one, {**batch, "noise": noise}, s.num_micro_batches)
        rewards, adv = rewards_and_advantages(s, out["scored_logp"], out["scored_mask"], valid,
                                              out.get("neg_valid"))
        step_in = {"noise": noise, "old_logp": own_title(s, out["scored_logp"], T),
                   "advantages": adv}
        if s.kl_beta:
            step_in["ref_logp"] = out["ref_logp"]
        if s.latent_trust:
            step_in["ref_latent"] = out["ref_latent"]
        if s.estimator == "reinforce":
            sampled = out["latent"][:, None, :] + noise                            # [P, G, d]
            step_in["sampled"] = sampled
            step_in["old_logdens"] = gl.gaussian_log_density(
                sampled, out["latent"][:, None, :],
                sigma if isinstance(sigma, (int, float)) else sigma[:, None])
        metrics = {**rollout_metrics(rewards, adv, valid),
                   **latent_metrics(out["latent"], valid, sigma, out.get("ref_latent")),
                   **weight_drift(params, ref_params)}
        return step_in, metrics

    return rollout_fn
