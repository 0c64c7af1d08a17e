"""Orbax checkpoints of a training run and their integrity checks.

Layout under `<run_dir>/checkpoints/`:
  latest/<step>/  params, train (step, optimizer state, RNG, fault counters), data (the
                  batch iterator's JSON state), meta (fingerprint); the last k are kept.
  best/<step>/    params and meta of the checkpoint with the lowest validation loss.

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted write never looks like a checkpoint. A finished checkpoint can still be
damaged later (truncated copy, disk fault); restoring falls back to the previous one with
a warning naming the bad one. A checkpoint whose model or tokenizer fingerprint differs
from the run's is refused with an InputError.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Optional

import jax
import orbax.checkpoint as ocp

from latentr3_jax.errors import InputError
from latentr3_jax.train.fingerprint import check_fingerprint
from latentr3_jax.train.state import TrainState

log = logging.getLogger(__name__)

LATEST, BEST = "latest", "best"


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped."""


class _QuietReadOnly(logging.Filter):
    """Orbax warns each time a checkpoint directory is opened read-only, which is how every
    params-only restore opens one: drop that line, keep the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


# --------------------------------------------------------------------------- helpers


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _train_part(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
            "bad_steps": state.bad_steps, "total_bad_steps": state.total_bad_steps}


def _snapshot(tree: dict) -> dict:
    """A deep, JSON-normalised copy of `tree`, taken at the call."""
    return json.loads(json.dumps(tree))


def _step_dirs_complete(step_dir: str, items: tuple) -> Optional[str]:
    """Why a finalized step directory is unusable, or None if it looks whole."""
    if not os.path.isdir(step_dir):
        return "missing"
    if not os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA")):
        return "no _CHECKPOINT_METADATA: the write never finished"
    for item in items:
        p = os.path.join(step_dir, item)
        if not os.path.isdir(p):
            return f"item {item!r} missing"
    meta = os.path.join(step_dir, "meta", "metadata")
    if not os.path.exists(meta):
        return "meta file missing"
    try:
        with open(meta) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"meta unreadable ({e.__class__.__name__})"
    return None


class Checkpointer:
    """Latest-k and best-by-validation checkpoints of one run."""

    def __init__(self, directory: str, *, fingerprint: dict, keep: int = 2,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint
        opts = dict(create=True, enable_async_checkpointing=async_save,
                    cleanup_tmp_directories=True)
        self.latest = ocp.CheckpointManager(
            os.path.join(self.directory, LATEST),
            options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), **opts))
        self.best = ocp.CheckpointManager(
            os.path.join(self.directory, BEST),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["valid_loss"],
                                                 best_mode="min", **opts))

    # ---- saving

    def save(self, state: TrainState, data_state: Optional[dict] = None, *,
             extra: Optional[dict] = None) -> bool:
        """Asynchronously save the full state at its step (returns at once)."""
        step = int(jax.device_get(state.step))
        if step in self.latest.all_steps():
            return False
        # A best checkpoint still being written finishes first: the trainer state saved here
        # names it, and a resume that found this step but not that best would lose it.
        self.best.wait_until_finished()
        # The JSON items are serialized on Orbax's background thread: snapshot them now, or
        # a caller that goes on mutating its dicts (a trainer's counters) saves later values.
        meta = _snapshot({"fingerprint": self.fingerprint, "step": step, **(extra or {})})
        return self.latest.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_part(state)),
            data=ocp.args.JsonSave(_snapshot(data_state or {})),
            meta=ocp.args.JsonSave(meta)), force=True)

    def save_best(self, state: TrainState, valid_loss: float, extra: Optional[dict] = None) -> bool:
        """Save the params if `valid_loss` beats the kept best (the manager keeps one)."""
        step = int(jax.device_get(state.step))
        if step in self.best.all_steps():
            return False
        meta = _snapshot({"fingerprint": self.fingerprint, "step": step,
                          "valid_loss": float(valid_loss), **(extra or {})})
        return self.best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), meta=ocp.args.JsonSave(meta)),
            metrics={"valid_loss": float(valid_loss)}, force=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    # ---- restoring

    def restore_latest(self, abstract_state: TrainState, shardings: TrainState):
        """(state, data_state, meta) from the newest whole checkpoint, or None if there is none.

        The state is placed on `shardings`, whatever mesh wrote it. Damaged checkpoints are
        skipped with a CheckpointWarning naming them.
        """
        self.latest.reload()
        target = ocp.args.Composite(
            params=ocp.args.StandardRestore(
                abstract_with_shardings(abstract_state.params, shardings.params)),
            train=ocp.args.StandardRestore(
                abstract_with_shardings(_train_part(abstract_state), _train_part(shardings))),
            data=ocp.args.JsonRestore())
        found = restore_newest(self.latest, ("params", "train", "data", "meta"), target,
                               fingerprint=self.fingerprint,
                               last_resort="no older checkpoint; starting from scratch")
        if found is None:
            return None
        out, meta = found
        return TrainState(params=out["params"], **out["train"]), dict(out["data"] or {}), meta

    def latest_step(self) -> Optional[int]:
        self.latest.reload()
        return self.latest.latest_step()


# --------------------------------------------------------------------------- restoring


def read_meta(mngr, step: int) -> dict:
    with open(os.path.join(mngr.directory, str(step), "meta", "metadata")) as f:
        return json.load(f)


def restore_newest(mngr, items: tuple, target, *, fingerprint: Optional[dict] = None,
                   last_resort: str = "none left"):
    """(restored items, meta) of the newest whole checkpoint in `mngr`, or None if it has
    none. A damaged one (missing item, unreadable metadata, an array file that fails to
    load) is skipped with a CheckpointWarning naming it; a checkpoint of a different model
    (fingerprint mismatch) is an InputError."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        step_dir = os.path.join(mngr.directory, str(step))
        why = _step_dirs_complete(step_dir, items)
        if why is None:
            meta = read_meta(mngr, step)
            if fingerprint is not None:
                check_fingerprint(meta.get("fingerprint", {}), fingerprint, step_dir)
            try:
                return mngr.restore(step, args=target), meta
            except Exception as e:  # a damaged array file, truncated metadata, ...
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else last_resort
        warnings.warn(f"checkpoint {step_dir} is damaged ({why}); {fallback}",
                      CheckpointWarning, stacklevel=3)
    return None


def restore_params(ckpt_dir: str, which: str = BEST, *, abstract_params=None,
                   fingerprint: Optional[dict] = None):
    """(params, meta) from `<run>/checkpoints/{best,latest}`, newest whole checkpoint first.

    With `abstract_params` (ShapeDtypeStructs with shardings) the arrays go straight onto
    those shardings; otherwise onto the default device.
    """
    if which not in (BEST, LATEST):
        raise InputError(f"which must be 'best' or 'latest', got {which!r}")
    root = os.path.join(ckpt_dir, which)
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))
    try:
        if not mngr.all_steps():
            raise FileNotFoundError(f"{root}: no complete checkpoint")
        args = ocp.args.StandardRestore(abstract_params) if abstract_params is not None \
            else ocp.args.StandardRestore()
        found = restore_newest(mngr, ("params", "meta"), ocp.args.Composite(params=args),
                               fingerprint=fingerprint)
        if found is None:
            raise InputError(f"{root}: every checkpoint is damaged")
        return found[0]["params"], found[1]
    finally:
        mngr.close()
