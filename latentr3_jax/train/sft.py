"""Stage 1: supervised fine-tuning with latent thoughts (SPEC.md section 5).

`latentr3 sft --config configs/<name>.py --config.<key>=<value>` or `train_sft(cfg)`.
Rerunning the same command resumes from the run directory's latest whole checkpoint with
the same data order and RNG; SIGTERM / SIGINT save at the next step boundary first.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax.errors import InputError
from latentr3_jax.model import latent
from latentr3_jax.parallel import distributed, mesh as mesh_lib
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train import optim, runs, setup
from latentr3_jax.train.signals import GracefulStop, StopRequested
from latentr3_jax.train.state import create_sharded_state
from latentr3_jax.train.step import NonFiniteError, TrainStep

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses


def make_sft_loss(model_config, *, num_thoughts: int, latent_mode: str = "ratt", dtype=jnp.float32):
    """loss_fn(params, batch, rng) -> (sum of target-token NLL, number of target tokens, {}).

    Only target tokens (`"Title"\\n` + EOS) count; prompt, thought slots, padding and
    filler rows (valid = False) are masked.
    """
    def loss_fn(params, batch, rng):
        del rng
        logits, _ = latent.latent_forward(
            model_config, params, batch["prompt_ids"], batch["prompt_mask"], batch["target_ids"],
            batch["target_mask"], num_thoughts=num_thoughts, latent_mode=latent_mode, dtype=dtype)
        mask = batch["target_mask"].astype(jnp.float32)
        if "valid" in batch:
            mask = mask * batch["valid"].astype(jnp.float32)[:, None]
        loss_sum, count = latent.target_cross_entropy(logits, batch["target_ids"], mask)
        return loss_sum, count, {}
    return loss_fn


DEVICE_KEYS = ("prompt_ids", "prompt_mask", "target_ids", "target_mask", "valid")


def device_batch(batch: dict) -> dict:
    """The arrays the step needs (drops host-only fields such as `row`)."""
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}


def count_tokens(batch: dict) -> int:
    """Non-pad prompt + target tokens of the real rows (host numpy; no device sync)."""
    valid = np.asarray(batch.get("valid", np.ones(batch["prompt_mask"].shape[0], bool)))
    return int((np.asarray(batch["prompt_mask"]).sum(1) + np.asarray(batch["target_mask"]).sum(1))[valid].sum())


class Evaluator:
    """Validation loss: a jitted forward per batch shape, summed on device."""

    def __init__(self, loss_fn, mesh, params_sharding):
        rep = mesh_lib.replicated(mesh)
        self.mesh = mesh
        self.batch_sharding = mesh_lib.batch_sharding(mesh)

        def fn(params, batch):
            s, n, _ = loss_fn(params, batch, None)
            return s, n
        self._fn = jax.jit(fn, in_shardings=(params_sharding, self.batch_sharding),
                           out_shardings=(rep, rep))

    def __call__(self, params, iterator) -> float:
        total, count = jnp.zeros(()), jnp.zeros(())
        for batch in iterator.epoch(0, start=0):
            b = {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                 for k, v in device_batch(batch).items()}
            with jax.set_mesh(self.mesh):
                s, n = self._fn(params, b)
            total, count = total + s, count + n
        count = float(count)
        return float(total) / count if count else float("nan")


# --------------------------------------------------------------------------- setup


def check_sft_config(cfg) -> None:
    s = cfg.sft
    if s.batch_size <= 0:
        raise InputError(f"config sft.batch_size must be positive, got {s.batch_size}")
    if s.micro_batch_size < 0 or (s.micro_batch_size and s.batch_size % s.micro_batch_size):
        raise InputError(f"config sft.micro_batch_size {s.micro_batch_size} must divide "
                         f"sft.batch_size {s.batch_size} (0 = no accumulation)")
    if s.epochs <= 0 and s.max_steps <= 0:
        raise InputError("config sft.epochs or sft.max_steps must be positive")
    if not s.learning_rate > 0:
        raise InputError(f"config sft.learning_rate must be positive, got {s.learning_rate}")
    if s.max_bad_steps < 1:
        raise InputError(f"config sft.max_bad_steps must be >= 1, got {s.max_bad_steps}")
    setup.check_model_options(cfg)


def get_tokenizer(cfg, dataset, run_dir: str):
    """The run's tokenizer: the one saved in the run directory (resuming), a given local
    directory, the HF model's, the sft.init_from run's, or a byte-level BPE trained on the
    dataset."""
    from latentr3_jax import data
    saved = os.path.join(run_dir, runs.TOKENIZER)
    if os.path.isdir(saved):
        return data.load_tokenizer(saved)
    if setup.init_from_run(cfg) and not cfg.tokenizer.get("path", ""):
        init_dir = os.path.abspath(setup.init_from_run(cfg))
        if not os.path.isdir(init_dir):
            raise InputError(f"config sft.init_from: run directory {init_dir} not found")
        return runs.load_run_tokenizer(init_dir)
    return data.make_tokenizer(cfg, dataset)


# --------------------------------------------------------------------------- training


def train_sft(cfg, *, progress: bool = True, resume_hint: Optional[str] = None,
              stop_at_step: Optional[int] = None) -> dict:
    """Train stage 1 into `cfg.workdir`; returns a summary dict.

    `stop_at_step` acts like a stop signal arriving during that step (save, then raise
    StopRequested): a planned preemption.

    Raises StopRequested (after saving) on SIGTERM/SIGINT, NonFiniteError after
    `cfg.sft.max_bad_steps` consecutive non-finite steps, InputError on bad input.
    """
    from latentr3_jax import data

    check_sft_config(cfg)
    distributed.maybe_initialize(cfg.distributed)
    primary = jax.process_index() == 0
    run_dir = os.path.abspath(cfg.workdir)
    s = cfg.sft
    num_thoughts, latent_mode = int(cfg.model.num_thoughts), str(cfg.model.latent_mode)
    dtype = setup.compute_dtype(cfg)

    dataset = data.load_dataset(cfg)
    tok = get_tokenizer(cfg, dataset, run_dir)
    train_enc = setup.encode_split(cfg, tok, dataset, "train")
    valid_enc = setup.encode_split(cfg, tok, dataset, "valid")
    if not train_enc:
        raise InputError("the train split is empty")

    mesh = mesh_lib.make_mesh(cfg.mesh)
    micro = int(s.micro_batch_size) or int(s.batch_size)
    num_micro = int(s.batch_size) // micro
    per_step = num_micro * mesh_lib.batch_size_multiple(mesh)
    if s.batch_size % per_step:
        raise InputError(f"config sft.batch_size {s.batch_size} must be a multiple of "
                         f"{per_step} (micro-batches x data-parallel devices)")
    buckets, t_buckets = tuple(cfg.data.buckets), setup.target_buckets(cfg)
    train_it = data.BatchIterator(train_enc, int(s.batch_size), buckets=buckets,
                                  target_buckets=t_buckets, pad_id=tok.pad_id, seed=int(cfg.seed),
                                  shuffle=True, drop_last=True)
    if train_it.steps_per_epoch == 0:
        raise InputError(f"sft.batch_size {s.batch_size} is larger than every length bucket's "
                         f"share of the {len(train_enc)} train rows; lower it")
    eval_bs = int(s.get("eval_batch_size", 0)) or micro
    eval_bs = max(eval_bs // mesh_lib.batch_size_multiple(mesh), 1) * mesh_lib.batch_size_multiple(mesh)
    valid_it = data.BatchIterator(valid_enc, eval_bs, buckets=buckets, target_buckets=t_buckets,
                                  pad_id=tok.pad_id, seed=0, shuffle=False,
                                  drop_last=False) if valid_enc else None

    steps_per_epoch = train_it.steps_per_epoch
    total = steps_per_epoch * int(s.epochs) if s.epochs > 0 else int(s.max_steps)
    if s.max_steps > 0:
        total = min(total, int(s.max_steps))

    # model, optimizer, sharded state
    key = jax.random.PRNGKey(int(cfg.seed))
    model_key, state_key = jax.random.split(key)
    schedule = optim.linear_warmup_decay(float(s.learning_rate), int(s.warmup_steps), total)
    tx = optim.adamw(schedule, weight_decay=float(s.weight_decay), grad_clip=float(s.grad_clip))
    if cfg.model.hf_path or setup.init_from_run(cfg):
        model_config, params = setup.build_model(cfg, tok, model_key)
        axes = setup.params_axes(model_config, params)
        state, shardings = create_sharded_state(None, axes, tx, state_key, mesh, params=params)
        del params
    else:
        model_config = setup.scratch_config(cfg, tok)
        init = setup.init_fn(cfg, model_config)
        axes = setup.params_axes(model_config, jax.eval_shape(init, model_key))
        state, shardings = create_sharded_state(lambda _: init(model_key), axes, tx, state_key, mesh)
    fingerprint = ckpt_lib.make_fingerprint(model_config, tok, num_thoughts=num_thoughts,
                                            latent_mode=latent_mode)
    runs.prepare_run_dir(run_dir, cfg, model_config, tok, num_thoughts=num_thoughts,
                         latent_mode=latent_mode, fingerprint=fingerprint, is_primary=primary)

    loss_fn = make_sft_loss(model_config, num_thoughts=num_thoughts, latent_mode=latent_mode,
                            dtype=dtype)
    train_step = TrainStep(loss_fn, tx, mesh, shardings, num_micro_batches=num_micro,
                           schedule=schedule)
    evaluator = Evaluator(loss_fn, mesh, shardings.params) if valid_it is not None else None
    ckpt = ckpt_lib.Checkpointer(os.path.join(run_dir, runs.CHECKPOINTS), fingerprint=fingerprint,
                                 keep=int(s.keep_checkpoints))

    # resume
    trainer = {"best_valid_loss": None, "best_step": None, "bad_epochs": 0, "valid_losses": [],
               "stopped_early": False}
    abstract = jax.eval_shape(lambda x: x, state)
    restored = ckpt.restore_latest(abstract, shardings)
    if restored is not None:
        state, data_state, meta = restored
        train_it.set_state(data_state)
        trainer.update(meta.get("trainer", {}))
        log.info("resumed from step %d", int(jax.device_get(state.step)))
    step = int(jax.device_get(state.step))
    start_step = step
    metrics_out = runs.MetricsWriter(run_dir, enabled=primary)
    bar = runs.Progress(total, initial=step, desc="sft", enabled=progress and primary)
    hint = resume_hint or f"train_sft with the same config (workdir {run_dir})"
    summary_last = {}
    t_start = time.perf_counter()
    tokens_seen = 0
    max_bad = int(s.max_bad_steps)

    def save(force_extra=None):
        ckpt.save(state, train_it.get_state(), extra={"trainer": trainer, **(force_extra or {})})

    def check_bad(m):
        bad = int(jax.device_get(m["bad_steps"]))
        if bad >= max_bad:
            ckpt.wait()
            good = ckpt.latest_step()
            raise NonFiniteError(
                f"{bad} consecutive steps had a non-finite loss or gradient (up to step "
                f"{int(jax.device_get(m['step']))}); updates were skipped. Last good checkpoint: "
                f"{'step ' + str(good) if good is not None else 'none'} in "
                f"{os.path.join(run_dir, runs.CHECKPOINTS, ckpt_lib.LATEST)}. Lower "
                f"sft.learning_rate or check the data.")

    try:
        # multi-host: the hosts agree on a stop at logging steps, where the host syncs anyway
        with GracefulStop(sync_every=int(s.log_every)) as stop:
            it = iter(train_it)
            prev = None
            window_tokens = 0
            while step < total and not trainer["stopped_early"]:
                batch = next(it)
                n_tok = count_tokens(batch)
                state, m = train_step(state, device_batch(batch))
                step += 1
                tokens_seen += n_tok
                window_tokens += n_tok
                if prev is not None:
                    check_bad(prev)  # one step late: the device is busy with this step meanwhile
                prev = m
                if step % int(s.log_every) == 0 or step == total:
                    host = jax.device_get(m)
                    rate = bar.update(step, float(host["loss"]), window_tokens)
                    window_tokens = 0
                    rec = {"split": "train", "step": step, "epoch": (step - 1) // steps_per_epoch,
                           "loss": float(host["loss"]), "grad_norm": float(host["grad_norm"]),
                           "lr": float(host["lr"]), "target_tokens": float(host["tokens"]),
                           "skipped": int(not bool(host["finite"])),
                           "bad_steps_total": int(jax.device_get(state.total_bad_steps)),
                           "compiles": train_step.compile_count, **rate}
                    metrics_out.write(rec)
                    summary_last = rec
                epoch_end = step % steps_per_epoch == 0 or step == total
                if epoch_end and evaluator is not None:
                    check_bad(m)
                    vloss = evaluator(state.params, valid_it)
                    trainer["valid_losses"].append([step, vloss])
                    metrics_out.write({"split": "valid", "step": step, "loss": vloss,
                                       "epoch": (step - 1) // steps_per_epoch})
                    best = trainer["best_valid_loss"]
                    if math.isfinite(vloss) and (best is None or vloss < best):
                        trainer.update(best_valid_loss=vloss, best_step=step, bad_epochs=0)
                        ckpt.save_best(state, vloss)
                    else:
                        trainer["bad_epochs"] += 1
                        if trainer["bad_epochs"] >= int(s.patience):
                            trainer["stopped_early"] = True
                            metrics_out.write({"event": "early_stop", "step": step,
                                               "best_step": trainer["best_step"]})
                if step % int(s.checkpoint_every) == 0 or epoch_end or step == total \
                        or trainer["stopped_early"]:
                    save()
                if stop.should_stop(step) or (stop_at_step is not None and step >= stop_at_step):
                    save()
                    ckpt.wait()
                    why = stop.received or "stop_at_step"
                    metrics_out.write({"event": "stopped", "signal": why, "step": step})
                    raise StopRequested(why, step, hint)
            if prev is not None:
                check_bad(prev)
            save()
            ckpt.wait()
    finally:
        bar.close()
        metrics_out.close()
        try:
            ckpt.wait()
        finally:
            ckpt.close()

    elapsed = time.perf_counter() - t_start
    return {"run_dir": run_dir, "steps": step, "start_step": start_step, "total_steps": total,
            "steps_per_epoch": steps_per_epoch, "final_loss": summary_last.get("loss"),
            "best_valid_loss": trainer["best_valid_loss"], "best_step": trainer["best_step"],
            "valid_losses": trainer["valid_losses"], "stopped_early": trainer["stopped_early"],
            "compile_count": train_step.compile_count,
            "bad_steps_total": int(jax.device_get(state.total_bad_steps)),
            "tokens_per_s": tokens_seen / elapsed if elapsed > 0 and step > start_step else None,
            "num_thoughts": num_thoughts, "latent_mode": latent_mode}


def main(argv: Sequence[str]) -> int:
    from latentr3_jax.train.signals import run_training_command
    code, summary = run_training_command("sft", argv, train_sft)
    if summary is None:
        return code
    best = summary["best_valid_loss"]
    print(f"sft done: {summary['steps']} steps, final train loss "
          f"{summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}"
          f", best valid loss {best if best is None else round(best, 4)} at step "
          f"{summary['best_step']}; run directory {summary['run_dir']}")
    return 0
