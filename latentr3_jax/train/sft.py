"""Stage 1: supervised fine-tuning with latent thoughts (SPEC.md section 5).

`latentr3 sft --config configs/<name>.py --config.<key>=<value>` or `train_sft(cfg)`.
Rerunning the same command resumes from the run directory's latest whole checkpoint with
the same data order and RNG; SIGTERM / SIGINT save at the next step boundary first.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

from latentr3_jax import config as config_lib
from latentr3_jax import data
from latentr3_jax.errors import InputError
from latentr3_jax.model import latent
from latentr3_jax.train import loop, optim, runs, setup
from latentr3_jax.train.state import create_sharded_state
from latentr3_jax.train.step import TrainStep


def make_sft_loss(model_config, *, num_thoughts: int, latent_mode: str = "ratt", dtype=jnp.float32,
                  diversity: float = 0.0, slot_bottleneck: float = 0.0):
    """loss_fn(params, batch, rng) -> (sum of target-token NLL, number of target tokens, aux).

    Only target tokens (`"Title"\\n` + EOS) count; prompt, thought slots, padding and
    filler rows (valid = False) are masked. With K > 1 latent factors (read from the
    weights), `diversity` times the factors' mean squared cosine
    (`latent.factor_diversity`) is added to the token-mean loss (as `diversity * cos2 *
    tokens` to the sum), and aux carries `diversity_sum` (cos2 * tokens, summed like the
    loss) for the step record. With `slot_bottleneck` p > 0 each row is, with probability
    p (drawn from `rng`), trained blind to its prompt: its target attends to the thought
    slot(s) but not to the prompt (`latent.hide_prefix`), so only what LatentRATT put into
    the latent can predict the title.
    """
    if slot_bottleneck and not num_thoughts:
        raise ValueError("slot_bottleneck needs num_thoughts >= 1")

    def loss_fn(params, batch, rng):
        blind = None
        if slot_bottleneck:
            blind = jax.random.bernoulli(rng, slot_bottleneck, batch["prompt_ids"].shape[:1])
        logits, lat = latent.latent_forward(
            model_config, params, batch["prompt_ids"], batch["prompt_mask"], batch["target_ids"],
            batch["target_mask"], num_thoughts=num_thoughts, latent_mode=latent_mode, dtype=dtype,
            blind_rows=blind)
        mask = batch["target_mask"].astype(jnp.float32)
        if "valid" in batch:
            mask = mask * batch["valid"].astype(jnp.float32)[:, None]
        loss_sum, count = latent.target_cross_entropy(logits, batch["target_ids"], mask)
        if num_thoughts and latent_mode == "ratt" and latent.num_factors(params) > 1:
            cos2 = latent.factor_diversity(model_config, lat, batch.get("valid"))
            if diversity:
                loss_sum = loss_sum + diversity * cos2 * count
            return loss_sum, count, {"diversity_sum": cos2 * count}
        return loss_sum, count, {}
    return loss_fn


def get_tokenizer(cfg, dataset, run_dir: str):
    """The run's tokenizer: the one saved in the run directory (resuming), a given local
    directory, the HF model's, the sft.init_from run's, or a byte-level BPE trained on the
    dataset."""
    saved = os.path.join(run_dir, runs.TOKENIZER)
    if os.path.isdir(saved):
        return data.load_tokenizer(saved)
    if cfg.sft.init_from and not cfg.tokenizer.path:
        init_dir = os.path.abspath(cfg.sft.init_from)
        if not os.path.isdir(init_dir):
            raise InputError(f"config sft.init_from: run directory {init_dir} not found")
        return runs.load_run_tokenizer(init_dir)
    return data.make_tokenizer(cfg, dataset)


def train_sft(cfg, *, progress: bool = True, resume_hint: Optional[str] = None,
              stop_after: Optional[int] = None) -> dict:
    """Train stage 1 into `cfg.workdir`; returns a summary dict (see loop.train).

    `stop_after` saves and returns after that many steps of this call (a planned
    preemption; the next call resumes). Raises StopRequested (after saving) on
    SIGTERM/SIGINT, NonFiniteError after `sft.max_bad_steps` consecutive non-finite steps,
    InputError on bad input.
    """
    config_lib.validate(cfg, stage="sft")
    s = cfg.sft
    run_dir = os.path.abspath(cfg.workdir)
    inputs = loop.prepare_inputs(cfg, "sft", batch_key="batch_size",
                                 tokenizer=lambda ds: get_tokenizer(cfg, ds, run_dir),
                                 eval_batch_size=int(s.eval_batch_size))
    num_thoughts, latent_mode = int(cfg.model.num_thoughts), str(cfg.model.latent_mode)

    key = jax.random.PRNGKey(int(cfg.seed))
    model_key, state_key = jax.random.split(key)
    schedule = optim.linear_warmup_decay(float(s.learning_rate), int(s.warmup_steps), inputs.total)
    lr_scale = float(s.latent_lr_scale)
    tx = optim.adamw(schedule, weight_decay=float(s.weight_decay), grad_clip=float(s.grad_clip),
                     lr_scales=optim.latent_lr_scales(lr_scale) if lr_scale != 1.0 else None)
    if cfg.model.hf_path or cfg.sft.init_from:
        model_config, params = setup.build_model(cfg, inputs.tokenizer, model_key)
        axes = setup.params_axes(model_config, params)
        state, shardings = create_sharded_state(None, axes, tx, state_key, inputs.mesh, params=params)
        del params
    else:
        model_config = setup.scratch_config(cfg, inputs.tokenizer)
        init = setup.init_fn(cfg, model_config)
        axes = setup.params_axes(model_config, jax.eval_shape(init, model_key))
        state, shardings = create_sharded_state(lambda _: init(model_key), axes, tx, state_key,
                                                inputs.mesh)

    loss_fn = make_sft_loss(model_config, num_thoughts=num_thoughts, latent_mode=latent_mode,
                            dtype=setup.compute_dtype(cfg),
                            diversity=float(s.get("latent_diversity", 0.0)),
                            slot_bottleneck=float(s.get("slot_bottleneck", 0.0)))
    train_step = TrainStep(loss_fn, tx, inputs.mesh, shardings, num_micro_batches=inputs.num_micro,
                           schedule=schedule)
    # the valid loss is the target NLL alone, comparable across diversity weights
    valid_loss = make_sft_loss(model_config, num_thoughts=num_thoughts, latent_mode=latent_mode,
                               dtype=setup.compute_dtype(cfg))
    evaluator = loop.Evaluator(lambda p, b: valid_loss(p, b, None)[:2], inputs.mesh,
                               shardings.params)

    def record(h):
        out = {"target_tokens": float(h["tokens"])}
        if "diversity_sum" in h:   # K > 1: the factors' mean squared cosine this step
            out["factor_cos2"] = float(h["diversity_sum"]) / max(float(h["tokens"]), 1.0)
        return out

    stage = loop.Stage(
        name="sft", step=lambda st, b: train_step(st, loop.device_batch(b)),
        record=record, train_step=train_step,
        evaluate=evaluator, valid_key="loss", keep_best=True, tokens=loop.count_tokens)
    _, summary = loop.train(cfg, inputs, stage, state, shardings, model_config=model_config,
                            num_thoughts=num_thoughts, latent_mode=latent_mode,
                            progress=progress, resume_hint=resume_hint, stop_after=stop_after)
    return {**summary, "best_valid_loss": summary["best_valid"], "valid_losses": summary["valid"]}
