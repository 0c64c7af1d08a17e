"""A params pytree as an Orbax checkpoint directory, with its model config beside it.

Layout of DIR:
  model_config.json   DecoderConfig fields plus any extra facts (e.g. where it came from)
  params/             Orbax StandardCheckpointer checkpoint of the params tree

The directory is built under a temporary name next to DIR and renamed into place, so a
reader sees either the whole checkpoint or none of it. Single-process use (conversion,
export); training runs keep their checkpoints with an Orbax CheckpointManager.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np

from latentr3_jax.errors import InputError
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
        meta.update(config.to_dict())
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
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    try:
        config = DecoderConfig.from_dict({k: v for k, v in meta.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
    return config, {k: v for k, v in meta.items() if k not in fields}


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
        params = checkpointer.restore(ckpt, target) if target is not None else checkpointer.restore(ckpt)
    finally:
        checkpointer.close()
    if target is None:
        params = jax.tree.map(np.asarray, params)
    return config, params
