"""The LR-GRPO step: rollout, then `iterations` optimizer updates through the shared
TrainStep; or, when a batch is used once, rollout and update fused into one pass."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from latentr3_jax.parallel import mesh as mesh_lib
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.grpo import rollout
from latentr3_jax.train.loop import device_batch
from latentr3_jax.train.step import TrainStep


def make_grpo_loss(model_config, s: gl.GRPOSettings):
    """loss_fn(params, micro_batch, rng) -> (loss sum, count, aux) for the shared TrainStep,
    on a micro-batch of prompts carrying the rollout's outputs (noise, old log-probs,
    advantages, ...). aux sums: clipped elements and the KL term."""
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
            kw.update(latent=rep(latents[:, -1].astype(jnp.float32)), sampled=flat(mb["sampled"]),
                      old_logdens=flat(mb["old_logdens"]))
        else:
            logp, _ = rollout.group_logprobs(model_config, params, mb["prompt_ids"],
                                             mb["prompt_mask"], mb["target_ids"],
                                             mb["target_mask"], mb["noise"], **s.forward_kw)
            kw.update(logp=logp, old_logp=flat(mb["old_logp"]),
                      ref_logp=flat(mb["ref_logp"]) if s.kl_beta else logp,
                      mask=rep(mb["target_mask"].astype(jnp.float32) * valid[:, None]))
        return gl.objective(s, **kw)

    return loss_fn


def make_fused_loss(model_config, s: gl.GRPOSettings):
    """Rollout and loss in one pass, for a batch used once (one iteration, no accumulation).

    The old log-probs would equal the current ones, so the target log-probs are computed
    once: rewards and advantages come from their stop-gradient copy (over the whole batch,
    which this loss sees in full), the PPO ratio is exp(logp - stop_gradient(logp)) = 1, and
    the same forward pass is differentiated. Same noise (same key), same loss and gradient
    as the rollout + update path, one forward pass fewer.
    """
    G = s.group_size

    def loss_fn(params, batch, rng):
        P, T = batch["target_ids"].shape
        valid = batch.get("valid", jnp.ones((P,), bool))
        noise = rollout.sample_noise(jax.random.fold_in(rng, rollout.ROLLOUT_SALT), P, G,
                                     model_config.hidden_size, s.sigma)
        logp, r = rollout.group_logprobs(model_config, params, batch["prompt_ids"],
                                         batch["prompt_mask"], batch["target_ids"],
                                         batch["target_mask"], noise, **s.forward_kw)  # [P*G, T]
        old = jax.lax.stop_gradient(logp)
        rewards, adv = rollout.rewards_and_advantages(s, old.reshape(P, G, T),
                                                      batch["target_mask"], valid)
        rep = lambda x: jnp.repeat(x, G, axis=0)
        kw = {"valid_rows": rep(valid), "advantages": adv.reshape(-1)}
        if s.estimator == "reinforce":
            r = r.astype(jnp.float32)
            mean_old = jax.lax.stop_gradient(r)[:, None, :]
            sampled = mean_old + noise                                           # [P, G, d]
            kw.update(latent=rep(r), sampled=sampled.reshape(P * G, -1),
                      old_logdens=gl.gaussian_log_density(sampled, mean_old, s.sigma).reshape(-1))
        else:
            kw.update(logp=logp, old_logp=old, ref_logp=old,
                      mask=rep(batch["target_mask"].astype(jnp.float32) * valid[:, None]))
        loss_sum, count, aux = gl.objective(s, **kw)
        return loss_sum, count, {**aux, **rollout.rollout_metrics(rewards, adv, valid)}

    return loss_fn


class GRPOStep:
    """Rollout then `iterations` sharded optimizer updates, each part compiled once per shape;
    or, when the batch is used once, the fused single-pass step."""

    def __init__(self, model_config, settings: gl.GRPOSettings, tx, mesh, shardings, *,
                 schedule=None):
        self.settings = settings
        loss = make_fused_loss if settings.fused else make_grpo_loss
        self.train_step = TrainStep(loss(model_config, settings), tx, mesh, shardings,
                                    num_micro_batches=settings.num_micro_batches,
                                    schedule=schedule)
        roll = rollout.make_rollout_fn(model_config, settings)

        def rollout_step(state, ref_params, batch):
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), rollout.ROLLOUT_SALT)
            return roll(state.params, ref_params, batch, rng)

        self._rollout = jax.jit(rollout_step, out_shardings=(self.train_step.batch_sharding,
                                                            mesh_lib.replicated(mesh)))

    def __call__(self, state, ref_params: Optional[dict], batch: dict):
        """(state, metrics of device arrays); `batch` is this process's numpy rows."""
        b = self.train_step.shard_batch(device_batch(batch))
        if self.settings.fused:
            return self.train_step(state, b)
        step_in, rmetrics = self._rollout(state, ref_params or {}, b)
        inputs = {**b, **step_in}
        for _ in range(self.settings.iterations):
            state, m = self.train_step(state, inputs)
        return state, {**rmetrics, **m}


def record(h: dict) -> dict:
    """A step's LR-GRPO fields for its metrics record (host values)."""
    tokens = float(h["tokens"])
    rec = {k: float(h[k]) for k in ("reward_mean", "reward_eps0", "reward_max", "adv_mean",
                                     "adv_std", "adv_max") if k in h}
    rec["clip_frac"] = float(h["clipped"]) / max(tokens, 1.0)
    rec["kl"] = float(h["kl_sum"]) / max(tokens, 1.0)
    rec["count"] = tokens
    return rec
