"""The LR-GRPO step: rollout, then `iterations` optimizer updates through the shared
TrainStep; or, when a batch is used once, rollout and update fused into one pass.

Besides the objective, every step reports diagnostics (see `record`): the rewards with and
without noise and their spread within groups, the share of positive advantages, the
latent's norm, the noise relative to it and the latent's drift from the starting weights;
and, every `grpo.diagnose_every` batches, the cosine between the estimator's gradient and
the pathwise gradient of the mean noisy reward (make_pathwise_probe)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from latentr3_jax.model import latent as latent_lib
from latentr3_jax.parallel import mesh as mesh_lib
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.grpo import rollout
from latentr3_jax.train.loop import device_batch
from latentr3_jax.train.step import PROBE_KEYS, TrainStep


def _reinforce_sigma(sigma, rows: int):
    """The Gaussian's sigma per sample row for the REINFORCE density: a number as is, one
    value per prompt [P] repeated over its G rows."""
    return sigma if isinstance(sigma, (int, float)) else jnp.repeat(sigma, rows, axis=0)


def _add_latent_trust(s: gl.GRPOSettings, loss_sum, aux: dict, latent, ref_latent, target_mask,
                      valid) -> tuple:
    """loss_sum + latent_trust * sum_units ||r - r_sft||^2 (loss.latent_trust_sum)."""
    if not s.latent_trust:
        return loss_sum, aux
    trust = gl.latent_trust_sum(latent, ref_latent, gl.objective_units(s, target_mask, valid))
    return loss_sum + s.latent_trust * trust, {**aux, "trust_sum": trust}


def _sample_rewards(s: gl.GRPOSettings, scored, tmask, neg_valid, G: int):
    """Per-sample rewards [P * G] (with their gradient) from scored log-probs [P * G, (J,) T]
    and the prompts' title masks [P, (J,) T] (rollout.scored_targets)."""
    rep = lambda x: None if x is None else jnp.repeat(x, G, axis=0)
    return gl.sample_rewards(s, scored, rep(tmask), rep(neg_valid))


def make_grpo_loss(model_config, s: gl.GRPOSettings):
    """loss_fn(params, micro_batch, rng) -> (loss sum, count, aux) for the shared TrainStep,
    on a micro-batch of prompts carrying the rollout's outputs (noise, old log-probs,
    advantages, r_sft with a latent trust region, ...). aux sums: clipped elements, the KL
    term, |ratio - 1|, and the trust term."""
    G = s.group_size

    def loss_fn(params, mb, rng):
        del rng
        p = mb["target_ids"].shape[0]
        valid = mb.get("valid", jnp.ones((p,), bool))
        rep = lambda x: jnp.repeat(x, G, axis=0)
        flat = lambda x: x.reshape((p * G,) + x.shape[2:])
        kw = {"valid_rows": rep(valid), "advantages": flat(mb["advantages"])}
        if s.estimator == "reinforce":
            latents, _, _ = rollout.prompt_latents(model_config, params, mb["prompt_ids"],
                                                   mb["prompt_mask"], suffix_len=0, **s.forward_kw)
            r = latents[:, -1]
            kw.update(latent=rep(r.astype(jnp.float32)), sampled=flat(mb["sampled"]),
                      old_logdens=flat(mb["old_logdens"]))
            if s.sigma_decays:
                kw["sigma"] = _reinforce_sigma(rollout.batch_sigma(s, mb), G)
        else:
            # pathwise differentiates the reward itself, which may score other titles too
            ids, tmask, neg_valid = (rollout.scored_targets(s, mb) if s.estimator == "pathwise"
                                     else (mb["target_ids"], mb["target_mask"], None))
            scored, r = rollout.group_logprobs(model_config, params, mb["prompt_ids"],
                                               mb["prompt_mask"], ids, tmask, mb["noise"],
                                               **s.forward_kw)
            logp = (rollout.own_title(s, scored, mb["target_ids"].shape[-1]) if ids.ndim == 3
                    else scored)
            kw.update(logp=logp, old_logp=flat(mb["old_logp"]),
                      ref_logp=flat(mb["ref_logp"]) if s.kl_beta else logp,
                      mask=rep(mb["target_mask"].astype(jnp.float32) * valid[:, None]))
            if s.estimator == "pathwise":
                kw["rewards"] = _sample_rewards(s, scored, tmask, neg_valid, G)
        loss_sum, count, aux = gl.objective(s, **kw)
        loss_sum, aux = _add_latent_trust(s, loss_sum, aux, r, mb.get("ref_latent"),
                                          mb["target_mask"], valid)
        return loss_sum, count, aux

    return loss_fn


def _fused_noise(model_config, s: gl.GRPOSettings, params: dict, batch: dict, rng):
    """The fused step's noise [P, G, d] (d: the latent width, K * hidden with K factors),
    drawn from the step's key as the rollout does."""
    P = batch["target_ids"].shape[0]
    return rollout.sample_noise(jax.random.fold_in(rng, rollout.ROLLOUT_SALT), P, s.group_size,
                                latent_lib.latent_width(model_config, params),
                                rollout.batch_sigma(s, batch))


def make_fused_loss(model_config, s: gl.GRPOSettings):
    """Rollout and loss in one pass, for a batch used once (one iteration, no accumulation).

    The old log-probs would equal the current ones, so the target log-probs are computed
    once: rewards and advantages come from their stop-gradient copy (over the whole batch,
    which this loss sees in full), the PPO ratio is exp(logp - stop_gradient(logp)) = 1, and
    the same forward pass is differentiated. Same noise (same key), same loss and gradient
    as the rollout + update path, one forward pass fewer.

    loss_fn(params, batch, rng, ref=None): `ref` holds the starting weights (at least
    LatentRATT's), for the latent trust region and the drift diagnostics.
    """
    G = s.group_size

    def loss_fn(params, batch, rng, ref: Optional[dict] = None):
        P, T = batch["target_ids"].shape
        valid = batch.get("valid", jnp.ones((P,), bool))
        sigma = rollout.batch_sigma(s, batch)
        noise = _fused_noise(model_config, s, params, batch, rng)
        ids, tmask, neg_valid = rollout.scored_targets(s, batch)
        scored, r, r_ref = rollout.group_logprobs_with_reference(
            model_config, params, ref if rollout.wants_reference(s, ref) else None,
            batch["prompt_ids"], batch["prompt_mask"], ids, tmask, noise,
            **s.forward_kw)                                           # [P*G, (J,) T]
        logp = rollout.own_title(s, scored, batch["target_ids"].shape[-1])
        old = jax.lax.stop_gradient(logp)
        rewards, adv = rollout.rewards_and_advantages(
            s, jax.lax.stop_gradient(scored).reshape((P, G) + scored.shape[1:]), tmask, valid,
            neg_valid)
        rep = lambda x: jnp.repeat(x, G, axis=0)
        kw = {"valid_rows": rep(valid), "advantages": adv.reshape(-1)}
        if s.estimator == "reinforce":
            r = r.astype(jnp.float32)
            mean_old = jax.lax.stop_gradient(r)[:, None, :]
            sampled = mean_old + noise                                           # [P, G, d]
            sig = sigma if isinstance(sigma, (int, float)) else sigma[:, None]
            kw.update(latent=rep(r), sampled=sampled.reshape(P * G, -1),
                      old_logdens=gl.gaussian_log_density(sampled, mean_old, sig).reshape(-1))
            if s.sigma_decays:
                kw["sigma"] = _reinforce_sigma(sigma, G)
        else:
            kw.update(logp=logp, old_logp=old, ref_logp=old,
                      mask=rep(batch["target_mask"].astype(jnp.float32) * valid[:, None]))
            if s.estimator == "pathwise":
                kw["rewards"] = _sample_rewards(s, scored, tmask, neg_valid, G)
        loss_sum, count, aux = gl.objective(s, **kw)
        loss_sum, aux = _add_latent_trust(s, loss_sum, aux, r, r_ref, batch["target_mask"], valid)
        return loss_sum, count, {**aux, **rollout.rollout_metrics(rewards, adv, valid),
                                 **rollout.latent_metrics(r, valid, sigma, r_ref),
                                 **rollout.weight_drift(params, ref)}

    return loss_fn


def make_pathwise_probe(model_config, s: gl.GRPOSettings):
    """probe(params, batch, rng) -> (-sum of the noisy samples' rewards, their count, {}):
    the objective whose gradient is the pathwise (reparameterised) estimate of
    -grad E_eps[s(r + eps)], on the same noise as the step (the batch's stored `noise`, or
    the fused step's draw from `rng`). Its gradient is compared with the estimator's, never
    applied. The noise-free sample is left out: it is not a draw of the Gaussian."""
    G = s.group_size

    def probe(params, batch, rng):
        P = batch["target_ids"].shape[0]
        valid = batch.get("valid", jnp.ones((P,), bool))
        noise = batch["noise"] if "noise" in batch else _fused_noise(model_config, s, params, batch, rng)
        ids, tmask, neg_valid = rollout.scored_targets(s, batch)
        scored, _ = rollout.group_logprobs(model_config, params, batch["prompt_ids"],
                                           batch["prompt_mask"], ids, tmask, noise,
                                           **s.forward_kw)
        rewards = _sample_rewards(s, scored, tmask, neg_valid, G).reshape(P, G)
        w = valid.astype(jnp.float32)[:, None] * (jnp.arange(G) >= 1).astype(jnp.float32)[None]
        return -jnp.sum(rewards * w), jnp.sum(w), {}

    return probe


def diagnose_when(s: gl.GRPOSettings):
    """On which optimizer steps the pathwise probe runs: the first update of every
    `diagnose_every`-th batch (batches diagnose_every, 2 * diagnose_every, ..., counted from
    1); None when off."""
    n, iters = int(s.diagnose_every), int(s.iterations)
    if n <= 0:
        return None
    return lambda step: (step % iters == 0) & ((step // iters + 1) % n == 0)


class GRPOStep:
    """Rollout then `iterations` sharded optimizer updates, each part compiled once per shape;
    or, when the batch is used once, the fused single-pass step.

    `total_batches`: the run's length, for a decaying noise (loss.sigma_at). `ref_keys`: the
    top-level params the caller passes as the starting weights `ref_params` on each call
    (the fused step takes them as an argument; the rollout reads them)."""

    def __init__(self, model_config, settings: gl.GRPOSettings, tx, mesh, shardings, *,
                 schedule=None, total_batches: Optional[int] = None,
                 ref_keys: Sequence[str] = ()):
        self.settings = settings
        self.ref_keys = tuple(ref_keys)
        if settings.sigma_decays and not total_batches:
            raise ValueError("a decaying noise (sigma_final >= 0) needs total_batches")
        self.total_batches = total_batches
        loss = make_fused_loss if settings.fused else make_grpo_loss
        extra = None
        if settings.fused and self.ref_keys:
            extra = {k: shardings.params[k] for k in self.ref_keys}
        when = diagnose_when(settings)
        self.train_step = TrainStep(loss(model_config, settings), tx, mesh, shardings,
                                    num_micro_batches=settings.num_micro_batches,
                                    schedule=schedule, extra_shardings=extra,
                                    probe=make_pathwise_probe(model_config, settings) if when else None,
                                    probe_when=when)
        roll = rollout.make_rollout_fn(model_config, settings)

        def rollout_step(state, ref_params, batch):
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), rollout.ROLLOUT_SALT)
            return roll(state.params, ref_params, batch, rng)

        self._rollout = jax.jit(rollout_step, out_shardings=(self.train_step.batch_sharding,
                                                            mesh_lib.replicated(mesh)))
        iters = int(settings.iterations)
        self._sigma_rows = jax.jit(
            lambda step, rows: jnp.full((rows,), gl.sigma_at(settings, step // iters,
                                                             total_batches or 1), jnp.float32),
            static_argnums=(1,), out_shardings=self.train_step.batch_sharding)

    def __call__(self, state, ref_params: Optional[dict], batch: dict):
        """(state, metrics of device arrays); `batch` is this process's numpy rows."""
        b = self.train_step.shard_batch(device_batch(batch))
        if self.settings.sigma_decays:
            b["sigma"] = self._sigma_rows(state.step, b["target_ids"].shape[0])
        ref = {k: ref_params[k] for k in self.ref_keys} if ref_params and self.ref_keys else None
        if self.settings.fused:
            if ref is None:
                return self.train_step(state, b)
            return self.train_step(state, b, ref)
        step_in, rmetrics = self._rollout(state, ref_params or {}, b)
        inputs = {**b, **step_in}
        first = None
        for _ in range(self.settings.iterations):
            state, m = self.train_step(state, inputs)
            first = m if first is None else first
        # the probe runs on the first update of a batch; the rest reports the last one
        return state, {**rmetrics, **m, **{k: first[k] for k in PROBE_KEYS if k in first}}


RECORD_KEYS = ("reward_mean", "reward_eps0", "reward_noisy", "reward_spread", "reward_max",
               "adv_mean", "adv_std", "adv_max", "adv_pos_frac", "latent_norm", "sigma",
               "sigma_rel", "noise_rel", "latent_drift", "weight_drift")


def record(h: dict) -> dict:
    """A step's LR-GRPO fields for its metrics record (host values).

    Per unit of the objective (target token for ppo, sample otherwise): clip_frac (share
    PPO-clipped), ratio_dev (mean |ratio - 1|; 0 with one iteration, the last update's with
    several), kl, and trust (mean ||r - r_sft||^2, with grpo.latent_trust > 0). On
    diagnosed batches: pathwise_cos, the cosine between the estimator's gradient and the
    pathwise gradient of the mean noisy reward (both as descent directions: > 0 means the
    estimator's step raises the smoothed reward to first order), and pathwise_update_cos,
    the same for the update the optimizer applied."""
    tokens = float(h["tokens"])
    rec = {k: float(h[k]) for k in RECORD_KEYS if k in h}
    rec["clip_frac"] = float(h["clipped"]) / max(tokens, 1.0)
    if "ratio_dev" in h:
        rec["ratio_dev"] = float(h["ratio_dev"]) / max(tokens, 1.0)
    rec["kl"] = float(h["kl_sum"]) / max(tokens, 1.0)
    if "trust_sum" in h:
        rec["trust"] = float(h["trust_sum"]) / max(tokens, 1.0)
    if bool(h.get("probe_on", False)):
        rec["pathwise_cos"] = float(h["probe_grad_cos"])
        rec["pathwise_update_cos"] = float(h["probe_update_cos"])
    rec["count"] = tokens
    return rec
