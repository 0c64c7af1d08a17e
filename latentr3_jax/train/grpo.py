"""Stage 2: LR-GRPO, reinforcement learning of the latent thought (SPEC.md section 6).

`latentr3 grpo --config configs/<name>.py --config.grpo.init_from=<SFT run dir>` or
`train_grpo(cfg)`. The LLM and lm_head stay frozen (grpo.train_llm=True trains them too);
LatentRATT learns from G noisy copies of its latent per prompt, scored by the negative
perplexity of the ground-truth target.

One training step per batch of prompts:
  1. rollout (jitted, no gradient): noise eps [P, G, d] from the state's RNG, target
     log-probs of every sample with the prompt prefix shared (rollout.py), rewards, and
     advantages over the whole global batch;
  2. `grpo.iterations` optimizer updates (the shared TrainStep: gradient accumulation over
     micro-batches of prompts, non-finite skipping) on the PPO-clip objective, reusing the
     stored noise and old log-probs.
Rerunning the same command resumes from the run directory's latest checkpoint with the same
data order and noise; SIGTERM / SIGINT save at the next step boundary first.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax.errors import InputError
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.parallel import distributed, mesh as mesh_lib
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train import grpo_loss as gl
from latentr3_jax.train import optim, rollout, runs, setup
from latentr3_jax.train.signals import GracefulStop, StopRequested
from latentr3_jax.train.state import create_sharded_state
from latentr3_jax.train.step import NonFiniteError, TrainStep, _split_micro

log = logging.getLogger(__name__)

ROLLOUT_SALT = 0x5EED  # the rollout's noise key: fold_in(fold_in(state.rng, step), ROLLOUT_SALT)
DEVICE_KEYS = ("prompt_ids", "prompt_mask", "target_ids", "target_mask", "valid")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The static choices a GRPO step is compiled for."""
    group_size: int = 8
    sigma: float = 1.5
    advantage: str = "batch"
    estimator: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_beta: float = 0.0
    iterations: int = 1
    train_llm: bool = False
    num_thoughts: int = 1
    latent_mode: str = "ratt"
    dtype: Any = jnp.float32
    num_micro_batches: int = 1
    fuse: bool = True   # one forward + backward when a batch is used once (see make_fused_loss)

    @property
    def fused(self) -> bool:
        return self.fuse and self.iterations == 1 and self.num_micro_batches == 1 and not self.kl_beta

    @classmethod
    def from_config(cls, cfg, *, num_thoughts: int, latent_mode: str, num_micro_batches: int = 1):
        g = cfg.grpo
        return cls(group_size=int(g.group_size), sigma=float(g.sigma), advantage=str(g.advantage),
                   estimator=str(g.get("estimator", "ppo")), clip_low=float(g.clip_low),
                   clip_high=float(g.clip_high), kl_beta=float(g.kl_beta),
                   iterations=int(g.iterations), train_llm=bool(g.train_llm),
                   num_thoughts=int(num_thoughts), latent_mode=str(latent_mode),
                   dtype=setup.compute_dtype(cfg), num_micro_batches=int(num_micro_batches))


# --------------------------------------------------------------------------- pure pieces


def _map_micro(fn, batch: dict, num_micro: int):
    """Apply `fn` to micro-batches of prompts one after another (bounded memory) and put the
    rows back in their original order. Uses the same row interleaving as the train step."""
    if num_micro <= 1:
        return fn(batch)
    micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
    out = jax.lax.map(fn, micro)

    def merge(y):  # [M, P/M, ...] -> [P, ...], row j * M + m <- micro m, position j
        y = jnp.swapaxes(y, 0, 1)
        return y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])
    return jax.tree.map(merge, out)


def _with_ref(params: dict, ref_params: Optional[dict]) -> dict:
    """The frozen reference model: the current params with the initial ones laid over them
    (only the latent module when the LLM is frozen, since the LLM then never changes)."""
    return {**params, **(ref_params or {})}


def make_rollout_fn(model_config, s: GRPOSettings):
    """rollout(params, ref_params, batch, rng) -> (step inputs dict, metrics dict).

    batch: prompt_ids/mask [P, S], target_ids/mask [P, T], valid [P]. Everything is
    computed without gradient; the advantages are normalised over all P groups.
    """
    G = s.group_size
    kw = dict(num_thoughts=s.num_thoughts, latent_mode=s.latent_mode, dtype=s.dtype,
              train_llm=s.train_llm)

    def rollout_fn(params, ref_params, batch, rng):
        params = jax.lax.stop_gradient(params)
        P, T = batch["target_ids"].shape
        valid = batch.get("valid", jnp.ones((P,), bool))
        noise = rollout.sample_noise(rng, P, G, model_config.hidden_size, s.sigma)

        def one(mb):
            args = (mb["prompt_ids"], mb["prompt_mask"], mb["target_ids"], mb["target_mask"],
                    mb["noise"])
            logp, r = rollout.group_logprobs(model_config, params, *args, **kw)
            out = {"old_logp": logp.reshape(-1, G, T), "latent": r.astype(jnp.float32)}
            if s.kl_beta:
                ref_logp, _ = rollout.group_logprobs(model_config, _with_ref(params, ref_params),
                                                     *args, **kw)
                out["ref_logp"] = ref_logp.reshape(-1, G, T)
            return out

        out = _map_micro(one, {**batch, "noise": noise}, s.num_micro_batches)
        rewards = gl.negative_perplexity(out["old_logp"], batch["target_mask"][:, None, :])  # [P, G]
        adv = gl.compute_advantages(s.advantage, rewards, valid)
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


def rollout_metrics(rewards, advantages, valid) -> dict:
    """Reward and advantage statistics of the real groups: rewards, advantages [P, G]."""
    v = valid.astype(jnp.float32)
    n = jnp.maximum(v.sum(), 1.0)
    return {"reward_mean": (rewards.mean(1) * v).sum() / n,
            "reward_eps0": (rewards[:, 0] * v).sum() / n,
            "reward_max": jnp.max(jnp.where(v[:, None] > 0, rewards, -jnp.inf)),
            **gl.advantage_stats(advantages, valid)}


def make_fused_loss(model_config, s: GRPOSettings):
    """Rollout and loss in one pass, for a batch used once (one iteration, no accumulation).

    The old log-probs would equal the current ones, so the target log-probs are computed
    once: rewards and advantages come from their stop-gradient copy (over the whole batch,
    which this loss sees in full), the PPO ratio is exp(logp - stop_gradient(logp)) = 1, and
    the same forward pass is differentiated. Same noise (same key), same loss and gradient
    as the rollout + update path, one forward pass fewer.
    """
    G = s.group_size
    kw = dict(num_thoughts=s.num_thoughts, latent_mode=s.latent_mode, dtype=s.dtype,
              train_llm=s.train_llm)

    def loss_fn(params, batch, rng):
        P, T = batch["target_ids"].shape
        valid = batch.get("valid", jnp.ones((P,), bool))
        noise = rollout.sample_noise(jax.random.fold_in(rng, ROLLOUT_SALT), P, G,
                                     model_config.hidden_size, s.sigma)
        logp, r = rollout.group_logprobs(model_config, params, batch["prompt_ids"],
                                         batch["prompt_mask"], batch["target_ids"],
                                         batch["target_mask"], noise, **kw)     # [P*G, T]
        old = jax.lax.stop_gradient(logp)
        rewards = gl.negative_perplexity(old.reshape(P, G, T), batch["target_mask"][:, None, :])
        adv = gl.compute_advantages(s.advantage, rewards, valid)
        rep = lambda x: jnp.repeat(x, G, axis=0)
        mask = rep(batch["target_mask"].astype(jnp.float32) * valid[:, None])
        if s.estimator == "ppo":
            out = gl.token_objective(logp, old, old, adv.reshape(-1), mask, clip_low=s.clip_low,
                                     clip_high=s.clip_high, kl_beta=0.0)
            count = mask.sum()
        elif s.estimator == "pathwise":
            out = gl.pathwise_objective(logp, mask, rep(valid))
            count = valid.astype(jnp.float32).sum() * G
        elif s.estimator == "reinforce":
            r = r.astype(jnp.float32)
            mean_old = jax.lax.stop_gradient(r)[:, None, :]
            sampled = mean_old + noise                                       # [P, G, d]
            old_logdens = gl.gaussian_log_density(sampled, mean_old, s.sigma)
            out = gl.reinforce_objective(rep(r), sampled.reshape(P * G, -1), old_logdens.reshape(-1),
                                         adv.reshape(-1), rep(valid), sigma=s.sigma,
                                         clip_low=s.clip_low, clip_high=s.clip_high)
            count = valid.astype(jnp.float32).sum() * G
        else:
            raise ValueError(f"grpo.estimator must be one of {gl.ESTIMATORS}, got {s.estimator!r}")
        aux = {"clipped": out["clipped_sum"], "kl_sum": out["kl_sum"],
               **rollout_metrics(rewards, adv, valid)}
        return out["loss_sum"], count, aux

    return loss_fn


def make_grpo_loss(model_config, s: GRPOSettings):
    """loss_fn(params, micro_batch, rng) -> (loss sum, count, aux) for the shared TrainStep.

    ppo: count = target tokens of the micro-batch's samples (token mean over the batch);
    reinforce: count = samples. aux sums: clipped elements and the KL term.
    """
    G = s.group_size
    kw = dict(num_thoughts=s.num_thoughts, latent_mode=s.latent_mode, dtype=s.dtype,
              train_llm=s.train_llm)

    def loss_fn(params, mb, rng):
        del rng
        p, T = mb["target_ids"].shape
        valid = mb.get("valid", jnp.ones((p,), bool))
        rep = lambda x: jnp.repeat(x, G, axis=0)
        flat = lambda x: x.reshape((p * G,) + x.shape[2:])
        if s.estimator in ("ppo", "pathwise"):
            logp, _ = rollout.group_logprobs(model_config, params, mb["prompt_ids"],
                                             mb["prompt_mask"], mb["target_ids"],
                                             mb["target_mask"], mb["noise"], **kw)
            mask = rep(mb["target_mask"].astype(jnp.float32) * valid[:, None])
        if s.estimator == "pathwise":
            out = gl.pathwise_objective(logp, mask, rep(valid))
            count = valid.astype(jnp.float32).sum() * G
        elif s.estimator == "ppo":
            ref = flat(mb["ref_logp"]) if s.kl_beta else logp
            out = gl.token_objective(logp, flat(mb["old_logp"]), ref, flat(mb["advantages"]),
                                     mask, clip_low=s.clip_low, clip_high=s.clip_high,
                                     kl_beta=s.kl_beta)
            count = mask.sum()
        elif s.estimator == "reinforce":
            latents, _, _ = rollout.prompt_latents(model_config, params, mb["prompt_ids"],
                                                   mb["prompt_mask"], suffix_len=0, **kw)
            r = latents[:, -1].astype(jnp.float32)
            out = gl.reinforce_objective(rep(r), flat(mb["sampled"]), flat(mb["old_logdens"]),
                                         flat(mb["advantages"]), rep(valid), sigma=s.sigma,
                                         clip_low=s.clip_low, clip_high=s.clip_high)
            count = valid.astype(jnp.float32).sum() * G
        else:
            raise ValueError(f"grpo.estimator must be one of {gl.ESTIMATORS}, got {s.estimator!r}")
        return out["loss_sum"], count, {"clipped": out["clipped_sum"], "kl_sum": out["kl_sum"]}

    return loss_fn


class GRPOStep:
    """Rollout then `iterations` sharded optimizer updates, each part compiled once per shape;
    or, when the batch is used once, the fused single-pass step."""

    def __init__(self, model_config, settings: GRPOSettings, tx, mesh, shardings, *,
                 schedule=None):
        self.settings = settings
        loss = make_fused_loss if settings.fused else make_grpo_loss
        self.train_step = TrainStep(loss(model_config, settings), tx, mesh, shardings,
                                    num_micro_batches=settings.num_micro_batches,
                                    schedule=schedule)
        self.batch_sharding = self.train_step.batch_sharding
        roll = make_rollout_fn(model_config, settings)

        def rollout_step(state, ref_params, batch):
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), ROLLOUT_SALT)
            return roll(state.params, ref_params, batch, rng)

        self._rollout = jax.jit(rollout_step, out_shardings=(self.batch_sharding,
                                                            mesh_lib.replicated(mesh)))

    def __call__(self, state, ref_params: Optional[dict], batch: dict):
        """(state, metrics of device arrays); `batch` is this process's numpy rows."""
        b = self.train_step.shard_batch({k: batch[k] for k in DEVICE_KEYS if k in batch})
        if self.settings.fused:
            return self.train_step(state, b)
        step_in, rmetrics = self._rollout(state, ref_params or {}, b)
        inputs = {**b, **step_in}
        for _ in range(self.settings.iterations):
            state, m = self.train_step(state, inputs)
        return state, {**rmetrics, **m}


def host_metrics(m: dict) -> dict:
    """A step's device metrics as a JSON-able record."""
    h = jax.device_get(m)
    tokens = float(h["tokens"])
    rec = {k: float(h[k]) for k in ("reward_mean", "reward_eps0", "reward_max", "adv_mean",
                                     "adv_std", "adv_max", "loss", "grad_norm") if k in h}
    rec["clip_frac"] = float(h["clipped"]) / max(tokens, 1.0)
    rec["kl"] = float(h["kl_sum"]) / max(tokens, 1.0)
    rec["count"] = tokens
    rec["skipped"] = int(not bool(h["finite"]))
    if "lr" in h:
        rec["lr"] = float(h["lr"])
    return rec


# --------------------------------------------------------------------------- validation


class RewardEvaluator:
    """Mean noise-free reward (negative perplexity of the target) over a split."""

    def __init__(self, model_config, s: GRPOSettings, mesh):
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        rep = mesh_lib.replicated(mesh)

        def fn(params, batch):
            logits, _ = latent_lib.latent_forward(
                model_config, params, batch["prompt_ids"], batch["prompt_mask"],
                batch["target_ids"], batch["target_mask"], num_thoughts=s.num_thoughts,
                latent_mode=s.latent_mode, dtype=s.dtype)
            r = gl.negative_perplexity(latent_lib.target_logprobs(logits, batch["target_ids"]),
                                       batch["target_mask"])
            v = batch["valid"].astype(jnp.float32)
            return (r * v).sum(), v.sum()
        self._fn = jax.jit(fn, out_shardings=(rep, rep))

    def __call__(self, params, iterator) -> float:
        total, count = jnp.zeros(()), jnp.zeros(())
        for batch in iterator.epoch(0, start=0):
            b = {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k]))
                 for k in DEVICE_KEYS}
            s_, n = self._fn(params, b)
            total, count = total + s_, count + n
        count = float(count)
        return float(total) / count if count else float("nan")


def _evaluate_ranking(cfg, run_dir: str, *, model_config, params, tokenizer, num_thoughts,
                      latent_mode, dataset, mesh) -> Optional[dict]:
    """HR/NDCG on the valid split (cfg.eval settings) with the trained params in memory."""
    try:
        mod = importlib.import_module("latentr3_jax.eval.evaluate")
    except ImportError:
        return None
    return mod.evaluate_run(cfg, run_dir, model_config=model_config, params=params,
                            tokenizer=tokenizer, num_thoughts=num_thoughts,
                            latent_mode=latent_mode, dataset=dataset, split="valid",
                            out_dir=os.path.join(run_dir, f"eval_valid_{cfg.eval.mode}"),
                            mesh=mesh, print_table=False)


# --------------------------------------------------------------------------- setup


def check_grpo_config(cfg) -> None:
    g = cfg.grpo
    if not g.init_from:
        raise InputError("grpo needs --config.grpo.init_from=<SFT run directory>")
    if g.group_size < 2:
        raise InputError(f"config grpo.group_size must be >= 2 (sample 1 is noise-free), "
                         f"got {g.group_size}")
    if not g.sigma > 0:
        raise InputError(f"config grpo.sigma must be positive, got {g.sigma}")
    if g.prompts_per_batch <= 0:
        raise InputError(f"config grpo.prompts_per_batch must be positive, got {g.prompts_per_batch}")
    if g.micro_batch_size < 0 or (g.micro_batch_size and g.prompts_per_batch % g.micro_batch_size):
        raise InputError(f"config grpo.micro_batch_size {g.micro_batch_size} must divide "
                         f"grpo.prompts_per_batch {g.prompts_per_batch} (0 = no accumulation)")
    if g.advantage not in gl.ADVANTAGES:
        raise InputError(f"config grpo.advantage must be one of {gl.ADVANTAGES}, got {g.advantage!r}")
    if g.get("estimator", "ppo") not in gl.ESTIMATORS:
        raise InputError(f"config grpo.estimator must be one of {gl.ESTIMATORS}, got {g.estimator!r}")
    if g.iterations < 1:
        raise InputError(f"config grpo.iterations must be >= 1, got {g.iterations}")
    if not (0 <= g.clip_low < 1 and g.clip_high >= 0):
        raise InputError(f"config grpo.clip_low must be in [0, 1) and clip_high >= 0, got "
                         f"{g.clip_low}, {g.clip_high}")
    if g.kl_beta < 0:
        raise InputError(f"config grpo.kl_beta must be >= 0, got {g.kl_beta}")
    if g.epochs <= 0 and g.max_steps <= 0:
        raise InputError("config grpo.epochs or grpo.max_steps must be positive")
    if not g.learning_rate > 0:
        raise InputError(f"config grpo.learning_rate must be positive, got {g.learning_rate}")
    if g.max_bad_steps < 1:
        raise InputError(f"config grpo.max_bad_steps must be >= 1, got {g.max_bad_steps}")
    setup.check_model_options(cfg)


# --------------------------------------------------------------------------- training


def train_grpo(cfg, *, progress: bool = True, resume_hint: Optional[str] = None,
               stop_after: Optional[int] = None) -> dict:
    """Train stage 2 into `cfg.workdir`, starting from the SFT run `cfg.grpo.init_from`.

    `stop_after` ends the call after that many steps of this session, saving first, as a
    stop signal would (for time-sliced jobs). Returns a summary dict. Raises StopRequested
    (after saving) on SIGTERM/SIGINT, NonFiniteError after `grpo.max_bad_steps` consecutive
    non-finite steps, InputError on bad input.
    """
    from latentr3_jax import data

    check_grpo_config(cfg)
    distributed.maybe_initialize(cfg.distributed)
    primary = jax.process_index() == 0
    run_dir = os.path.abspath(cfg.workdir)
    g = cfg.grpo

    sft = ckpt_lib.load_run(g.init_from)
    if sft.num_thoughts < 1:
        raise InputError(f"{sft.run_dir}: LR-GRPO needs an SFT run with latent thoughts "
                         f"(it has model.num_thoughts = {sft.num_thoughts})")
    if "latent" not in sft.params and not g.train_llm:
        raise InputError(f"{sft.run_dir}: latent_mode {sft.latent_mode!r} has no LatentRATT "
                         f"weights to train; set grpo.train_llm=True to train the LLM instead")
    model_config, tok = setup.execution_config(cfg, sft.model_config), sft.tokenizer
    num_thoughts, latent_mode = sft.num_thoughts, sft.latent_mode

    dataset = data.load_dataset(cfg)
    train_enc = setup.encode_split(cfg, tok, dataset, "train")
    valid_enc = setup.encode_split(cfg, tok, dataset, "valid")
    if not train_enc:
        raise InputError("the train split is empty")

    mesh = mesh_lib.make_mesh(cfg.mesh)
    prompts = int(g.prompts_per_batch)
    micro = int(g.micro_batch_size) or prompts
    num_micro = prompts // micro
    per_step = num_micro * mesh_lib.batch_size_multiple(mesh)
    if prompts % per_step:
        raise InputError(f"config grpo.prompts_per_batch {prompts} must be a multiple of "
                         f"{per_step} (micro-batches x data-parallel devices)")
    buckets, t_buckets = tuple(cfg.data.buckets), setup.target_buckets(cfg)
    train_it = data.BatchIterator(train_enc, prompts, buckets=buckets, target_buckets=t_buckets,
                                  pad_id=tok.pad_id, seed=int(cfg.seed), shuffle=True,
                                  drop_last=True)
    if train_it.steps_per_epoch == 0:
        raise InputError(f"grpo.prompts_per_batch {prompts} is larger than every length "
                         f"bucket's share of the {len(train_enc)} train rows; lower it")
    eval_bs = max(micro // mesh_lib.batch_size_multiple(mesh), 1) * mesh_lib.batch_size_multiple(mesh)
    valid_it = data.BatchIterator(valid_enc, eval_bs, buckets=buckets, target_buckets=t_buckets,
                                  pad_id=tok.pad_id, seed=0, shuffle=False,
                                  drop_last=False) if valid_enc else None

    batches_per_epoch = train_it.steps_per_epoch
    total = batches_per_epoch * int(g.epochs) if g.epochs > 0 else int(g.max_steps)
    if g.max_steps > 0:
        total = min(total, int(g.max_steps))
    iters = int(g.iterations)

    settings = GRPOSettings.from_config(cfg, num_thoughts=num_thoughts, latent_mode=latent_mode,
                                        num_micro_batches=num_micro)
    schedule = optim.cosine_warmup(float(g.learning_rate), int(g.warmup_steps) * iters, total * iters)
    # a fixed mask (not a function of the params: optax may call it on placeholders)
    frozen_mask = optim.latent_only(sft.params)
    trainable = None if g.train_llm else (lambda _: frozen_mask)
    tx = optim.adamw(schedule, weight_decay=float(g.get("weight_decay", 0.0)),
                     grad_clip=float(g.grad_clip), trainable=trainable)
    axes = setup.params_axes(model_config, sft.params)
    state_key = jax.random.PRNGKey(int(cfg.seed))
    init_params = sft.params
    state, shardings = create_sharded_state(None, axes, tx, state_key, mesh, params=init_params)
    ref_params = None
    if settings.kl_beta:
        keys = list(init_params) if settings.train_llm else ["latent"]
        ref_params = jax.device_put({k: init_params[k] for k in keys},
                                    {k: shardings.params[k] for k in keys})
    del init_params

    fingerprint = ckpt_lib.make_fingerprint(model_config, tok, num_thoughts=num_thoughts,
                                            latent_mode=latent_mode)
    runs.prepare_run_dir(run_dir, cfg, model_config, tok, num_thoughts=num_thoughts,
                         latent_mode=latent_mode, fingerprint=fingerprint, is_primary=primary)
    grpo_step = GRPOStep(model_config, settings, tx, mesh, shardings, schedule=schedule)
    evaluator = RewardEvaluator(model_config, settings, mesh) if valid_it is not None else None
    ckpt = ckpt_lib.Checkpointer(os.path.join(run_dir, runs.CHECKPOINTS), fingerprint=fingerprint,
                                 keep=int(g.keep_checkpoints))

    trainer = {"batches": 0, "valid_reward_start": None}
    restored = ckpt.restore_latest(jax.eval_shape(lambda x: x, state), shardings)
    if restored is not None:
        state, data_state, meta = restored
        train_it.set_state(data_state)
        trainer.update(meta.get("trainer", {}))
        log.info("resumed from batch %d (optimizer step %d)", trainer["batches"],
                 int(jax.device_get(state.step)))
    elif evaluator is not None:
        trainer["valid_reward_start"] = evaluator(state.params, valid_it)
    batch_i = int(trainer["batches"])
    start_batch = batch_i
    opt_step = int(jax.device_get(state.step))
    metrics_out = runs.MetricsWriter(run_dir, enabled=primary)
    if restored is None and trainer["valid_reward_start"] is not None:
        metrics_out.write({"split": "valid", "step": 0, "reward": trainer["valid_reward_start"]})
    bar = runs.Progress(total, initial=batch_i, desc="grpo", enabled=progress and primary)
    hint = resume_hint or f"train_grpo with the same config (workdir {run_dir})"
    max_bad = int(g.max_bad_steps)
    log_every = max(int(g.log_every), 1)
    pending: list = []
    curve: list = []
    t_start = time.perf_counter()

    def save():
        ckpt.save(state, train_it.get_state(), extra={"trainer": trainer})

    def flush():
        """Write the buffered per-batch records (one host sync per log_every batches)."""
        nonlocal pending
        for b_i, opt_step, m in pending:
            rec = {"split": "train", "batch": b_i, "step": opt_step, **host_metrics(m)}
            metrics_out.write(rec)
            curve.append(rec)
            if rec["skipped"]:
                bad = int(jax.device_get(m["bad_steps"]))
                if bad >= max_bad:
                    ckpt.wait()
                    good = ckpt.latest_step()
                    raise NonFiniteError(
                        f"{bad} consecutive steps had a non-finite loss or gradient (up to step "
                        f"{rec['step']}); updates were skipped. Last good checkpoint: "
                        f"{'step ' + str(good) if good is not None else 'none'} in "
                        f"{os.path.join(run_dir, runs.CHECKPOINTS, ckpt_lib.LATEST)}. Lower "
                        f"grpo.learning_rate or check the data.")
        if pending:
            last = curve[-1]
            bar.update(pending[-1][0], last.get("loss"))
        pending = []

    try:
        # multi-host: the hosts agree on a stop at logging steps, where the host syncs anyway
        with GracefulStop(sync_every=log_every) as stop:
            it = iter(train_it)
            while batch_i < total:
                batch = next(it)
                state, m = grpo_step(state, ref_params, batch)
                batch_i += 1
                trainer["batches"] = batch_i
                opt_step += iters
                pending.append((batch_i, opt_step, m))
                if batch_i % log_every == 0 or batch_i == total:
                    flush()
                stopping = stop.should_stop(batch_i) or (stop_after is not None
                                              and batch_i - start_batch >= stop_after)
                if batch_i % int(g.checkpoint_every) == 0 or batch_i == total or stopping:
                    flush()
                    save()
                if stopping and batch_i < total:
                    ckpt.wait()
                    if stop.requested:
                        metrics_out.write({"event": "stopped", "signal": stop.received,
                                           "batch": batch_i})
                        raise StopRequested(stop.received, batch_i, hint)
                    break
            flush()
            save()
            ckpt.wait()
    finally:
        bar.close()
        try:
            ckpt.wait()
        finally:
            ckpt.close()

    elapsed = time.perf_counter() - t_start
    finished = batch_i >= total
    valid_reward = evaluator(state.params, valid_it) if evaluator is not None and finished else None
    ranking = None
    if finished:
        if valid_reward is not None:
            metrics_out.write({"split": "valid", "step": int(jax.device_get(state.step)),
                               "reward": valid_reward})
        if g.get("evaluate", True):
            ranking = _evaluate_ranking(cfg, run_dir, model_config=model_config,
                                        params=state.params, tokenizer=tok,
                                        num_thoughts=num_thoughts, latent_mode=latent_mode,
                                        dataset=dataset, mesh=mesh)
            if ranking is not None:
                metrics_out.write({"split": "valid", "event": "ranking",
                                   **{k: v for k, v in ranking.items()
                                      if isinstance(v, (int, float, str, bool))}})
    metrics_out.close()
    n = batch_i - start_batch
    return {"run_dir": run_dir, "batches": batch_i, "start_batch": start_batch,
            "total_batches": total, "optimizer_steps": int(jax.device_get(state.step)),
            "finished": finished, "curve": curve,
            "final_reward_mean": curve[-1]["reward_mean"] if curve else None,
            "valid_reward_start": trainer["valid_reward_start"], "valid_reward_end": valid_reward,
            "ranking": ranking, "prompts_per_s": n * prompts / elapsed if n and elapsed > 0 else None,
            "compile_count": grpo_step.train_step.compile_count,
            "bad_steps_total": int(jax.device_get(state.total_bad_steps)),
            "num_thoughts": num_thoughts, "latent_mode": latent_mode}


def main(argv: Sequence[str]) -> int:
    from latentr3_jax.train.signals import run_training_command
    code, summary = run_training_command("grpo", argv, train_grpo)
    if summary is None:
        return code
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
    print(f"grpo done: {summary['batches']} batches ({summary['optimizer_steps']} optimizer "
          f"steps), last mean reward {fmt(summary['final_reward_mean'])}, valid reward "
          f"{fmt(summary['valid_reward_start'])} -> {fmt(summary['valid_reward_end'])}; "
          f"run directory {summary['run_dir']}")
    if summary["ranking"]:
        print("valid ranking: " + ", ".join(
            f"{k} {v:.4f}" for k, v in summary["ranking"].items()
            if (k.startswith("HR@") or k.startswith("NDCG@")) and not k.endswith("_id")))
    return 0
