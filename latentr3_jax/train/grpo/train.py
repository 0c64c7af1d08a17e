"""Stage 2: LR-GRPO, reinforcement learning of the latent thought (SPEC.md section 6).

`latentr3 grpo --config configs/<name>.py --config.grpo.init_from=<SFT run dir>` or
`train_grpo(cfg)`. The LLM and lm_head stay frozen (grpo.train_llm=True trains them too);
LatentRATT learns from G noisy copies of its latent per prompt, scored by the negative
perplexity of the ground-truth target (or, with grpo.reward=contrastive, by how well the
target beats other titles under the same latent: other users' of the batch, or with
grpo.negative_source=model the SFT model's own top titles for the user).

One training step per batch of prompts:
  1. rollout (jitted, no gradient): noise eps [P, G, d] from the state's RNG, target
     log-probs of every sample with the prompt prefix shared (rollout.py), rewards, and
     advantages over the whole global batch;
  2. `grpo.iterations` optimizer updates (the shared TrainStep: gradient accumulation over
     micro-batches of prompts, non-finite skipping) on the objective (loss.py), reusing
     the stored noise and old log-probs.
With one iteration and no accumulation the two parts run as one pass (step.make_fused_loss).
Each step's record also carries diagnostics of the latent and the rewards (step.record).
The noise-free valid reward is measured at the start, every `grpo.eval_every` batches and
at each epoch's end; with `grpo.select=best` (the default) the run's model is the
checkpoint with the highest one, the SFT starting point included. With
`grpo.select_metric=ndcg` each of those validations also ranks the first
`grpo.select_users` valid users with the evaluator's beam search, and the checkpoint with
the highest valid NDCG@10 is the run's model instead (latentr3_jax/eval/selection.py).
Rerunning the same command resumes from the run directory's latest checkpoint with the same
data order and noise; SIGTERM / SIGINT save at the next step boundary first.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from latentr3_jax import config as config_lib
from latentr3_jax.errors import InputError
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.train import loop, optim, runs, setup
from latentr3_jax.train.grpo import loss as gl
from latentr3_jax.train.grpo import rollout
from latentr3_jax.train.grpo.step import GRPOStep, record
from latentr3_jax.train.state import create_sharded_state


def reward_fn(model_config, s: gl.GRPOSettings):
    """(params, batch) -> (sum, count) of the noise-free reward (s.reward) over the batch's
    real rows; the contrastive one against the batch's other titles, as in training."""
    def fn(params, batch):
        v = batch["valid"].astype(jnp.float32)
        if s.reward == "contrastive":
            P = batch["target_ids"].shape[0]
            negatives = min(s.negatives, P - 1)   # in-batch ones: a last, smaller batch
            if not negatives and "neg_ids" not in batch:
                return jnp.zeros((), jnp.float32), v.sum()   # a lone prompt wins every softmax
            ids, tmask, neg_valid = rollout.scored_targets(
                dataclasses.replace(s, negatives=negatives), batch)
            noise = jnp.zeros((P, 1, latent_lib.latent_width(model_config, params)), jnp.float32)
            scored, _ = rollout.group_logprobs(model_config, params, batch["prompt_ids"],
                                               batch["prompt_mask"], ids, tmask, noise,
                                               **s.forward_kw)
            r = gl.contrastive_reward(scored, tmask, neg_valid)
            return (r * v).sum(), v.sum()
        logits, _ = latent_lib.latent_forward(
            model_config, params, batch["prompt_ids"], batch["prompt_mask"],
            batch["target_ids"], batch["target_mask"], num_thoughts=s.num_thoughts,
            latent_mode=s.latent_mode, dtype=s.dtype)
        r = gl.negative_perplexity(latent_lib.target_logprobs(logits, batch["target_ids"]),
                                   batch["target_mask"])
        return (r * v).sum(), v.sum()
    return fn


def _reward_of(summary: dict, when: str, by_ndcg: bool):
    """The noise-free valid reward of the first or final validation (None if none ran)."""
    if not by_ndcg:
        return summary[f"valid_{when}"]
    fields = summary.get(f"valid_{when}_fields") or {}
    return fields.get("reward")


def train_grpo(cfg, *, progress: bool = True, resume_hint: Optional[str] = None,
               stop_after: Optional[int] = None, negatives: Optional[Callable] = None,
               valid_ranking: Optional[Callable] = None) -> dict:
    """Train stage 2 into `cfg.workdir`, starting from the SFT run `cfg.grpo.init_from`.

    `stop_after` saves and returns after that many steps (batches) of this call, as a
    planned preemption. `negatives(cfg, sft, model_config, inputs, progress=)` mines the
    hard negatives of grpo.negative_source=model and has the batches carry them
    (latentr3_jax.eval.negatives.attach, which `latentr3 grpo`, `run` and `study` pass).
    `valid_ranking(cfg, sft, model_config, inputs, progress=)` returns params -> valid
    NDCG@10 for grpo.select_metric=ndcg (latentr3_jax.eval.selection.valid_ndcg, passed by
    the same commands).
    Returns a summary dict (see loop.train). Raises StopRequested (after saving) on
    SIGTERM/SIGINT, NonFiniteError after `grpo.max_bad_steps` consecutive non-finite steps,
    InputError on bad input.
    """
    config_lib.validate(cfg, stage="grpo")
    g = cfg.grpo
    sft = runs.load_run(g.init_from)
    if sft.num_thoughts < 1:
        raise InputError(f"{sft.run_dir}: LR-GRPO needs an SFT run with latent thoughts "
                         f"(it has model.num_thoughts = {sft.num_thoughts})")
    if "latent" not in sft.params and not g.train_llm:
        raise InputError(f"{sft.run_dir}: latent_mode {sft.latent_mode!r} has no LatentRATT "
                         f"weights to train; set grpo.train_llm=True to train the LLM instead")
    model_config = setup.execution_config(cfg, sft.model_config)
    inputs = loop.prepare_inputs(cfg, "grpo", batch_key="prompts_per_batch",
                                 tokenizer=lambda _: sft.tokenizer)
    mined = None
    if g.reward == "contrastive" and g.negative_source == "model":
        if negatives is None:
            raise InputError("grpo.negative_source=model mines each prompt's negatives with the "
                             "SFT model's beam search: pass negatives=latentr3_jax.eval."
                             "negatives.attach to train_grpo (the CLI commands do)")
        mined = negatives(cfg, sft, model_config, inputs, progress=progress)
        print(f"grpo: hard negatives mined; rows with all {g.negatives}: "
              + ", ".join(f"{k} {v:.1%}" for k, v in mined.complete.items()), flush=True)
    by_ndcg = g.get("select_metric", "reward") == "ndcg"
    if by_ndcg and valid_ranking is None:
        raise InputError("grpo.select_metric=ndcg ranks the valid users with the evaluator's "
                         "beam search: pass valid_ranking=latentr3_jax.eval.selection.valid_ndcg "
                         "to train_grpo (the CLI commands do)")
    if by_ndcg and inputs.valid_it is None:
        raise InputError("grpo.select_metric=ndcg needs a valid split (the dataset has none)")
    iters = int(g.iterations)
    settings = gl.GRPOSettings.from_config(cfg, num_thoughts=sft.num_thoughts,
                                           latent_mode=sft.latent_mode,
                                           num_micro_batches=inputs.num_micro)
    schedule = optim.cosine_warmup(float(g.learning_rate), int(g.warmup_steps) * iters,
                                   inputs.total * iters)
    # a fixed mask (not a function of the params: optax may call it on placeholders)
    frozen_mask = optim.latent_only(sft.params)
    tx = optim.adamw(schedule, weight_decay=float(g.weight_decay), grad_clip=float(g.grad_clip),
                     trainable=None if g.train_llm else (lambda _: frozen_mask))
    axes = setup.params_axes(model_config, sft.params)
    state, shardings = create_sharded_state(None, axes, tx, jax.random.PRNGKey(int(cfg.seed)),
                                            inputs.mesh, params=sft.params)
    # the starting weights: LatentRATT's always (drift diagnostics, latent trust region), the
    # LLM's too when it trains and the KL or the trust region needs the starting model
    if settings.train_llm and (settings.kl_beta or settings.latent_trust):
        keys = list(sft.params)
    else:
        keys = [k for k in ("latent",) if k in sft.params]
    ref_params = jax.device_put({k: sft.params[k] for k in keys},
                                {k: shardings.params[k] for k in keys}) if keys else None

    grpo_step = GRPOStep(model_config, settings, tx, inputs.mesh, shardings, schedule=schedule,
                         total_batches=inputs.total, ref_keys=keys)

    def step(st, b):
        return grpo_step(st, ref_params, b)
    if mined is not None:   # with grpo.remine_every: the train negatives follow the latent
        step = mined.wrap(step, iters)
    reward_eval = loop.Evaluator(reward_fn(model_config, settings), inputs.mesh,
                                 shardings.params)
    evaluate = reward_eval
    if by_ndcg:   # select on the ranking; the reward is still logged beside it
        ndcg = valid_ranking(cfg, sft, model_config, inputs, progress=progress)
        evaluate = lambda params, valid_it: {   # noqa: E731
            "ndcg10": ndcg(params), "reward": reward_eval(params, valid_it)}
    stage = loop.Stage(
        name="grpo", step=step, record=record,
        train_step=grpo_step.train_step, evaluate=evaluate,
        valid_key="ndcg10" if by_ndcg else "reward", valid_at_start=True, steps_per_batch=iters,
        keep_best=g.select == "best", higher_is_better=True, eval_every=int(g.eval_every))
    _, summary = loop.train(cfg, inputs, stage, state, shardings, model_config=model_config,
                            num_thoughts=sft.num_thoughts, latent_mode=sft.latent_mode,
                            progress=progress, resume_hint=resume_hint, stop_after=stop_after)
    curve = summary["curve"]
    return {**summary,
            "final_reward_mean": curve[-1]["reward_mean"] if curve else None,
            "valid_reward_start": _reward_of(summary, "start", by_ndcg),
            "valid_reward_end": _reward_of(summary, "end", by_ndcg),
            "select": g.select, "select_metric": "ndcg10" if by_ndcg else "reward",
            "best_valid": summary["best_valid"],
            "best_valid_reward": None if by_ndcg else summary["best_valid"],
            "negatives_complete": None if mined is None else mined.complete,
            "negatives_remined_after": None if mined is None else mined.remined,
            "prompts_per_s": (summary["steps_per_s"] or 0) * int(g.prompts_per_batch) or None}
