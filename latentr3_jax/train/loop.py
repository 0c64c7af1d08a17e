"""The one training harness. A stage (SFT, LR-GRPO, ...) brings a step, a validation
function and its record fields; the loop does the rest, the same way for every stage:

- data: load, tokenise, bucket into a shuffled train iterator and a fixed valid iterator;
- a run directory with its config, model facts and tokenizer, and a fingerprint that
  refuses a checkpoint of another model;
- resume from the newest whole checkpoint (same data order, same RNG);
- SIGTERM / SIGINT: save at the next step boundary, then StopRequested (all hosts agree
  on the step); `stop_after`: save and return after that many steps (time-sliced jobs);
- non-finite steps: skipped on device, counted; after `<stage>.max_bad_steps` in a row,
  NonFiniteError naming the last good checkpoint;
- checkpoints every `<stage>.checkpoint_every` steps, at each epoch's end and at the end;
- validation at each epoch's end (and optionally before the first step), with a best
  checkpoint and early stopping when the stage keeps one;
- one metrics record per step (buffered: one host sync per `<stage>.log_every` steps) and
  a progress bar.

A new stage is a loss, a step object and a `Stage`; see sft.py for the shortest one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from latentr3_jax import data
from latentr3_jax.errors import InputError
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.parallel import distributed, mesh as mesh_lib
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train import runs, setup
from latentr3_jax.train.fingerprint import make_fingerprint
from latentr3_jax.train.signals import GracefulStop, StopRequested
from latentr3_jax.train.step import NonFiniteError
from latentr3_jax.utils import cpu_alloc

log = logging.getLogger(__name__)

DEVICE_KEYS = ("prompt_ids", "prompt_mask", "target_ids", "target_mask", "valid",
               "neg_ids", "neg_mask", "neg_valid")   # the last three: mined negatives


def device_batch(batch: dict) -> dict:
    """The arrays a step needs (drops host-only fields such as `row`)."""
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}


def count_tokens(batch: dict) -> int:
    """Non-pad prompt + target tokens of the real rows (host numpy; no device sync)."""
    valid = np.asarray(batch.get("valid", np.ones(batch["prompt_mask"].shape[0], bool)))
    return int((np.asarray(batch["prompt_mask"]).sum(1) + np.asarray(batch["target_mask"]).sum(1))[valid].sum())


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """What every stage trains on: data, tokenizer, mesh and the batch iterators."""
    run_dir: str
    primary: bool
    dataset: Any
    tokenizer: Any
    mesh: Any
    train_it: Any
    valid_it: Optional[Any]
    num_micro: int
    total: int            # steps (batches) of the whole run
    steps_per_epoch: int


def prepare_inputs(cfg, section: str, *, batch_key: str, tokenizer: Callable[[Any], Any],
                   eval_batch_size: int = 0) -> Inputs:
    """Everything before the model: `cfg.<section>` holds the stage's batch size
    (`batch_key`), micro_batch_size, epochs and max_steps; `tokenizer(dataset)` gives
    the run's tokenizer."""
    sec = cfg[section]
    distributed.maybe_initialize(cfg.distributed)
    dataset = data.load_dataset(cfg)
    tok = tokenizer(dataset)
    train_enc = setup.encode_split(cfg, tok, dataset, "train")
    valid_enc = setup.encode_split(cfg, tok, dataset, "valid")
    if not train_enc:
        raise InputError("the train split is empty")

    mesh = mesh_lib.make_mesh(cfg.mesh)
    batch = int(sec[batch_key])
    micro = int(sec.micro_batch_size) or batch
    num_micro = batch // micro
    dp = mesh_lib.batch_size_multiple(mesh)
    if batch % (num_micro * dp):
        raise InputError(f"config {section}.{batch_key} {batch} must be a multiple of "
                         f"{num_micro * dp} (micro-batches x data-parallel devices)")
    buckets, t_buckets = tuple(cfg.data.buckets), setup.target_buckets(cfg)
    train_it = data.BatchIterator(train_enc, batch, buckets=buckets, target_buckets=t_buckets,
                                  pad_id=tok.pad_id, seed=int(cfg.seed), shuffle=True,
                                  drop_last=True)
    if train_it.steps_per_epoch == 0:
        raise InputError(f"{section}.{batch_key} {batch} is larger than every length bucket's "
                         f"share of the {len(train_enc)} train rows; lower it")
    eval_bs = max((int(eval_batch_size) or micro) // dp, 1) * dp
    valid_it = data.BatchIterator(valid_enc, eval_bs, buckets=buckets, target_buckets=t_buckets,
                                  pad_id=tok.pad_id, seed=0, shuffle=False,
                                  drop_last=False) if valid_enc else None
    spe = train_it.steps_per_epoch
    total = spe * int(sec.epochs) if sec.epochs > 0 else int(sec.max_steps)
    if sec.max_steps > 0:
        total = min(total, int(sec.max_steps))
    return Inputs(run_dir=os.path.abspath(cfg.workdir), primary=jax.process_index() == 0,
                  dataset=dataset, tokenizer=tok, mesh=mesh, train_it=train_it,
                  valid_it=valid_it, num_micro=num_micro, total=total, steps_per_epoch=spe)


class Evaluator:
    """Mean of a per-batch (sum, count) over a split: a jitted function per batch shape,
    summed on device; `fn(params, batch) -> (sum, count)`."""

    def __init__(self, fn, mesh, params_sharding=None):
        rep = mesh_lib.replicated(mesh)
        self.mesh = mesh
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
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


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Stage:
    """What a training stage plugs into the loop."""
    name: str                                  # its config section ("sft", "grpo")
    step: Callable                             # (state, host batch) -> (state, device metrics)
    record: Callable[[dict], dict]             # a step's host metrics -> its own record fields
    train_step: Any                            # the TrainStep (compile count)
    evaluate: Optional[Callable] = None        # (params, valid iterator) -> validation value,
                                               # or a dict of values holding valid_key
    valid_key: str = "loss"                    # that value's name in the records
    keep_best: bool = False                    # best validation value: best checkpoint, patience
    higher_is_better: bool = False             # the validation value is a reward, not a loss
    eval_every: int = 0                        # batches between validations; 0 = epoch ends
    valid_at_start: bool = False               # also validate before the first step
    tokens: Optional[Callable[[dict], int]] = None   # host batch -> tokens, for throughput
    steps_per_batch: int = 1                   # optimizer steps per batch


class Progress:
    """tqdm bar with the loss and tokens/s; silent when disabled."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        mininterval=1.0) if enabled else None
        self._last_t, self._last_step = time.perf_counter(), initial

    def update(self, step: int, loss: Optional[float], tokens: Optional[float]) -> dict:
        now = time.perf_counter()
        dt, n = max(now - self._last_t, 1e-9), step - self._last_step
        rate = {"steps_per_s": n / dt, "tokens_per_s": None if tokens is None else tokens / dt}
        if self.bar is not None:
            post = {} if loss is None else {"loss": f"{loss:.4f}"}
            if tokens is not None:
                post["tok/s"] = f"{tokens / dt:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(n)
        self._last_t, self._last_step = now, step
        return rate

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _best_key(stage: Stage, value: float) -> float:
    """The number the best-checkpoint manager keeps the lowest of."""
    return -float(value) if stage.higher_is_better else float(value)


def _valid_value(stage: Stage, out) -> tuple:
    """(the value the stage selects on, the record's fields) of one validation."""
    if isinstance(out, dict):
        if stage.valid_key not in out:
            raise KeyError(f"{stage.name}: the validation returned {sorted(out)}, "
                           f"not {stage.valid_key!r}")
        return float(out[stage.valid_key]), {k: float(v) for k, v in out.items()}
    return float(out), {stage.valid_key: float(out)}


def train(cfg, inputs: Inputs, stage: Stage, state, shardings, *, model_config,
          num_thoughts: int, latent_mode: str, progress: bool = True,
          resume_hint: Optional[str] = None, stop_after: Optional[int] = None):
    """Run `stage` from `state` (or the run directory's newest checkpoint) to the end.

    Returns (state, summary). Raises StopRequested after saving on SIGTERM/SIGINT,
    NonFiniteError after `<stage>.max_bad_steps` consecutive non-finite steps.
    """
    sec = cfg[stage.name]
    run_dir, tok = inputs.run_dir, inputs.tokenizer
    train_it, valid_it, total, spe = inputs.train_it, inputs.valid_it, inputs.total, inputs.steps_per_epoch
    evaluate = stage.evaluate if valid_it is not None else None
    factors = latent_lib.num_factors(state.params) if num_thoughts else 1
    # K is recorded only when > 1, so the fingerprints of single-latent runs are unchanged
    fingerprint = make_fingerprint(model_config, tok, num_thoughts=num_thoughts,
                                   latent_mode=latent_mode,
                                   **({"latent_factors": factors} if factors > 1 else {}))
    runs.prepare_run_dir(run_dir, cfg, model_config, tok, num_thoughts=num_thoughts,
                         latent_mode=latent_mode, fingerprint=fingerprint,
                         is_primary=inputs.primary, latent_factors=factors)
    ckpt = ckpt_lib.Checkpointer(os.path.join(run_dir, runs.CHECKPOINTS), fingerprint=fingerprint,
                                 keep=int(sec.keep_checkpoints))
    trainer = {"batches": 0, "valid": [], "valid_start": None, "best": None, "best_step": None,
               "bad_epochs": 0, "stopped_early": False}
    try:
        restored = ckpt.restore_latest(jax.eval_shape(lambda x: x, state), shardings)
    except BaseException:   # a checkpoint of another model: nothing of this run is open
        ckpt.close()
        raise
    writer = runs.MetricsWriter(run_dir, enabled=inputs.primary)
    if restored is not None:
        state, data_state, meta = restored
        train_it.set_state(data_state)
        trainer.update(meta.get("trainer", {}))
        log.info("%s: resumed after step %d", stage.name, trainer["batches"])
    elif evaluate is not None and stage.valid_at_start:
        trainer["valid_start"], fields = _valid_value(stage, evaluate(state.params, valid_it))
        trainer["valid_start_fields"] = fields
        writer.write({"split": "valid", "step": 0, **fields})
        if stage.keep_best and math.isfinite(trainer["valid_start"]):
            # the starting point competes: a stage that only lowers the validation value
            # leaves its starting weights as the run's best
            trainer.update(best=trainer["valid_start"], best_step=0)
            ckpt.save_best(state, _best_key(stage, trainer["valid_start"]))
    step = start = int(trainer["batches"])
    bar = Progress(total, step, stage.name, progress and inputs.primary)
    hint = resume_hint or f"the same call again (workdir {run_dir})"
    max_bad, log_every = int(sec.max_bad_steps), max(int(sec.log_every), 1)
    pending: list = []          # (step, device metrics, tokens) not yet written
    curve: list = []
    tokens_seen = 0
    t_start = time.perf_counter()

    def save():
        ckpt.save(state, train_it.get_state(), extra={"trainer": trainer})

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
                f"{stage.name}.learning_rate or check the data.")

    def flush():
        """Write the buffered step records: one host sync for all of them."""
        if not pending:
            return
        hosts = jax.device_get([m for _, m, _ in pending])
        window = sum(n for _, _, n in pending) if stage.tokens is not None else None
        rate = bar.update(pending[-1][0], float(hosts[-1]["loss"]), window)
        for i, ((b, _, _), h) in enumerate(zip(pending, hosts)):
            rec = {"split": "train", "batch": b, "step": int(h["step"]), "epoch": (b - 1) // spe,
                   "loss": float(h["loss"]), "grad_norm": float(h["grad_norm"]),
                   "skipped": int(not bool(h["finite"])),
                   "bad_steps_total": int(h["total_bad_steps"]),
                   "compiles": stage.train_step.compile_count, **stage.record(h)}
            if "lr" in h:
                rec["lr"] = float(h["lr"])
            if i == len(pending) - 1:
                rec.update(rate)
            writer.write(rec)
            curve.append(rec)
        pending.clear()

    def validate():
        value, fields = _valid_value(stage, evaluate(state.params, valid_it))
        trainer["valid"].append([step, value])
        trainer["valid_last_fields"] = fields
        writer.write({"split": "valid", "step": step * stage.steps_per_batch,
                      "epoch": (step - 1) // spe, **fields})
        if not stage.keep_best:
            return
        best = trainer["best"]
        better = best is None or (value > best if stage.higher_is_better else value < best)
        if math.isfinite(value) and better:
            trainer.update(best=value, best_step=step, bad_epochs=0)
            ckpt.save_best(state, _best_key(stage, value))
        else:
            trainer["bad_epochs"] += 1
            patience = int(sec.get("patience", 0))
            if patience > 0 and trainer["bad_epochs"] >= patience:
                trainer["stopped_early"] = True
                writer.write({"event": "early_stop", "step": step, "best_step": trainer["best_step"]})

    try:
        # multi-host: the hosts agree on a stop at logging steps, where the host syncs anyway
        with GracefulStop(sync_every=log_every) as stop:
            it = iter(train_it)
            prev = None
            while step < total and not trainer["stopped_early"]:
                batch = next(it)
                n_tok = stage.tokens(batch) if stage.tokens is not None else 0
                state, m = stage.step(state, batch)
                step += 1
                trainer["batches"] = step
                tokens_seen += n_tok
                pending.append((step, m, n_tok))
                if prev is not None:
                    check_bad(prev)  # one step late: the device is busy with this step meanwhile
                prev = m
                if step % log_every == 0 or step == total:
                    flush()
                epoch_end = step % spe == 0 or step == total
                due = epoch_end or (stage.eval_every > 0 and step % stage.eval_every == 0)
                if due and evaluate is not None:
                    check_bad(m)
                    validate()
                stopping = stop.should_stop(step) or (stop_after is not None
                                                      and step - start >= stop_after)
                if (step % int(sec.checkpoint_every) == 0 or epoch_end or stopping
                        or trainer["stopped_early"]):
                    flush()
                    save()
                if stopping and step < total and not trainer["stopped_early"]:
                    ckpt.wait()
                    if stop.requested:
                        writer.write({"event": "stopped", "signal": stop.received, "step": step})
                        raise StopRequested(stop.received, step, hint)
                    break
            flush()
            if prev is not None:
                check_bad(prev)
            save()
            ckpt.wait()
    finally:
        bar.close()
        writer.close()
        try:
            ckpt.wait()
        finally:
            ckpt.close()
            cpu_alloc.release()   # the stage's heap, kept for its steps (utils/cpu_alloc.py)

    elapsed = time.perf_counter() - t_start
    ran = step - start
    valid_end = trainer["valid"][-1][1] if trainer["valid"] and trainer["valid"][-1][0] == step else None
    return state, {
        "run_dir": run_dir, "steps": step, "start_step": start, "total_steps": total,
        "steps_per_epoch": spe, "finished": step >= total or trainer["stopped_early"],
        "optimizer_steps": int(jax.device_get(state.step)), "curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "valid": trainer["valid"], "valid_start": trainer["valid_start"], "valid_end": valid_end,
        # every value of the first and the final validation (a dict-valued evaluate)
        "valid_start_fields": trainer.get("valid_start_fields"),
        "valid_end_fields": trainer.get("valid_last_fields") if valid_end is not None else None,
        "best_valid": trainer["best"], "best_step": trainer["best_step"],
        "stopped_early": trainer["stopped_early"],
        "compile_count": stage.train_step.compile_count,
        "bad_steps_total": int(jax.device_get(state.total_bad_steps)),
        "tokens_per_s": tokens_seen / elapsed if stage.tokens and ran and elapsed > 0 else None,
        "steps_per_s": ran / elapsed if ran and elapsed > 0 else None,
        "num_thoughts": num_thoughts, "latent_mode": latent_mode, "latent_factors": factors}
