"""Orbax checkpoints of a training run, their integrity checks, and `load_run`.

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

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from latentr3_jax.errors import InputError
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


# --------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer) -> dict:
    """Vocabulary size, special ids and a hash of a probe encoding: enough to tell two
    tokenizers apart without reading their files."""
    probe = "Fingerprint: The Beatles - \"Abbey Road\" (1969) \u00e9\u00e8 123\n"
    ids = list(tokenizer.encode(probe))
    h = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return {"vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id),
            "pad_id": int(tokenizer.pad_id), "thought_id": int(tokenizer.thought_id),
            "probe_hash": h}


def make_fingerprint(model_config, tokenizer=None, **facts) -> dict:
    """What a checkpoint must agree on to be loaded into this run."""
    fp = {"model": model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)}
    if tokenizer is not None:
        fp["tokenizer"] = tokenizer_fingerprint(tokenizer)
    fp.update(facts)
    return json.loads(json.dumps(fp))  # normalize tuples -> lists


def _diff(a: Any, b: Any, prefix: str = "") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r} vs run {b!r}"]


def check_fingerprint(saved: dict, expected: dict, where: str) -> None:
    diffs = _diff(saved, expected)
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise InputError(f"{where}: checkpoint belongs to a different model or tokenizer: "
                         f"{'; '.join(diffs[:3])}{more}")


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

    def save(self, state: TrainState, data_state: Optional[dict] = None, *, force: bool = False,
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
        steps = sorted(self.latest.all_steps(), reverse=True)
        target_params = abstract_with_shardings(abstract_state.params, shardings.params)
        target_train = abstract_with_shardings(_train_part(abstract_state), _train_part(shardings))
        for i, step in enumerate(steps):
            step_dir = os.path.join(self.latest.directory, str(step))
            why = _step_dirs_complete(step_dir, ("params", "train", "data", "meta"))
            meta = None
            if why is None:
                meta = self._read_meta(self.latest, step)
                check_fingerprint(meta.get("fingerprint", {}), self.fingerprint, step_dir)
                try:
                    out = self.latest.restore(step, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(target_params),
                        train=ocp.args.StandardRestore(target_train),
                        data=ocp.args.JsonRestore()))
                    state = TrainState(params=out["params"], **out["train"])
                    return state, dict(out["data"] or {}), meta
                except Exception as e:  # a damaged array file, truncated metadata, ...
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else \
                "no older checkpoint; starting from scratch"
            warnings.warn(f"checkpoint {step_dir} is damaged ({why}); {fallback}",
                          CheckpointWarning, stacklevel=2)
        return None

    @staticmethod
    def _read_meta(mngr, step: int) -> dict:
        path = os.path.join(mngr.directory, str(step), "meta", "metadata")
        with open(path) as f:
            return json.load(f)

    def latest_step(self) -> Optional[int]:
        self.latest.reload()
        return self.latest.latest_step()


# --------------------------------------------------------------------------- params only


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
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{root}: no complete checkpoint")
        for i, step in enumerate(steps):
            step_dir = os.path.join(root, str(step))
            why = _step_dirs_complete(step_dir, ("params", "meta"))
            if why is None:
                meta = Checkpointer._read_meta(mngr, step)
                if fingerprint is not None:
                    check_fingerprint(meta.get("fingerprint", {}), fingerprint, step_dir)
                try:
                    args = ocp.args.StandardRestore(abstract_params) if abstract_params is not None \
                        else ocp.args.StandardRestore()
                    out = mngr.restore(step, args=ocp.args.Composite(params=args))
                    return out["params"], meta
                except Exception as e:
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
            warnings.warn(f"checkpoint {step_dir} is damaged ({why}); {fallback}",
                          CheckpointWarning, stacklevel=2)
        raise InputError(f"{root}: every checkpoint is damaged")
    finally:
        mngr.close()


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass
class RunArtifacts:
    """What a finished (or running) training run gives to the next stage."""
    run_dir: str
    config: Any             # ml_collections.ConfigDict the run was started with
    model_config: Any       # DecoderConfig
    params: dict            # incl. 'latent' when the run had thoughts in 'ratt' mode
    tokenizer: Any
    num_thoughts: int
    latent_mode: str
    thought_id: int
    step: int
    which: str
    meta: dict


def load_run(run_dir: str, which: str = BEST) -> RunArtifacts:
    """Load a run directory written by `latentr3 sft` (or grpo): config, model config,
    tokenizer and params from its best (default; falls back to latest) or latest checkpoint."""
    import ml_collections

    from latentr3_jax.model.config import DecoderConfig
    from latentr3_jax.train import runs

    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run directory not found")
    model_facts = runs.read_json(run_dir, runs.MODEL_CONFIG)
    cfg_dict = runs.read_json(run_dir, runs.CONFIG)
    try:
        model_config = DecoderConfig.from_dict(model_facts["decoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{os.path.join(run_dir, runs.MODEL_CONFIG)}: bad decoder config ({e})") from None
    tokenizer = runs.load_run_tokenizer(run_dir)
    ckpt = os.path.join(run_dir, runs.CHECKPOINTS)
    order = [which] if which == LATEST else [BEST, LATEST]
    last_err = None
    for w in order:
        try:
            params, meta = restore_params(ckpt, w)
            break
        except FileNotFoundError as e:
            last_err = e
    else:
        raise InputError(f"{run_dir}: no checkpoint found ({last_err})")
    params = jax.tree.map(lambda x: jax.numpy.asarray(x), params)
    expected = model_facts.get("fingerprint")
    if expected is not None:
        check_fingerprint(meta.get("fingerprint", {}), expected, os.path.join(ckpt, w))
    return RunArtifacts(run_dir=run_dir, config=ml_collections.ConfigDict(cfg_dict),
                        model_config=model_config, params=params, tokenizer=tokenizer,
                        num_thoughts=int(model_facts.get("num_thoughts", 0)),
                        latent_mode=str(model_facts.get("latent_mode", "ratt")),
                        thought_id=int(model_facts.get("thought_id", model_config.vocab_size - 1)),
                        step=int(meta.get("step", -1)), which=w, meta=meta)
