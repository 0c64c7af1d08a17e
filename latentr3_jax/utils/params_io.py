"""A params pytree as an Orbax checkpoint directory, with its model config beside it.

Layout of DIR:
  model_config.json   {"decoder": DecoderConfig fields, ...extra facts (e.g. the source)},
                      the same shape as a run directory's model_config.json
  params/             Orbax StandardCheckpointer checkpoint of the params tree

The directory is built under a temporary name next to DIR and renamed into place, so a
reader sees either the whole checkpoint or none of it. Single-process use (conversion,
export); training runs keep their checkpoints with an Orbax CheckpointManager.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np

from latentr3_jax.errors import InputError, where
from latentr3_jax.model.config import DecoderConfig

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"


def save_params(directory: str, params: dict, config: DecoderConfig,
                extra: Optional[dict] = None, overwrite: bool = False) -> str:
    """Write DIR/params (Orbax) and DIR/model_config.json atomically; returns DIR."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise InputError(f"{directory}: already exists (pass overwrite / --overwrite to replace it)")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.partial")
    old = os.path.join(parent, f".{name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        meta = dict(extra or {})
        meta["decoder"] = config.to_dict()
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.exists(directory):
            os.rename(directory, old)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_model_config(directory: str) -> tuple:
    """(DecoderConfig, extra facts dict) from DIR/model_config.json."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.exists(path):
        raise InputError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("decoder"), dict):
        raise InputError(f"{where(path, field='decoder')}: missing (the DecoderConfig fields)")
    try:
        config = DecoderConfig.from_dict(meta["decoder"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{where(path, field='decoder')}: {e}") from None
    return config, {k: v for k, v in meta.items() if k != "decoder"}


def load_params(directory: str, target: Optional[Any] = None) -> tuple:
    """(DecoderConfig, params) from a directory written by `save_params`.

    `target`: optional tree of `jax.ShapeDtypeStruct` (with shardings) to restore straight
    onto devices; by default arrays come back as host numpy arrays.
    """
    import orbax.checkpoint as ocp

    directory = os.fspath(directory)
    config, _ = read_model_config(directory)
    ckpt = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    if not os.path.isdir(ckpt):
        raise InputError(f"{ckpt}: missing (not a params checkpoint)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        if target is None:
            # numpy targets: restore on the host whatever devices the checkpoint was saved from
            saved = checkpointer.metadata(ckpt).item_metadata.tree
            target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved)
        params = checkpointer.restore(ckpt, target)
    finally:
        checkpointer.close()
    return config, params
