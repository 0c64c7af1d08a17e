"""A params pytree as an Orbax checkpoint directory, with its model config beside it.

Layout of DIR:
  model_config.json   {"decoder": DecoderConfig fields, ...extra facts (e.g. the source)},
                      the same shape as a run directory's model_config.json
  params/             Orbax StandardCheckpointer checkpoint of the params tree

The directory is built under a temporary name next to DIR and renamed into place
(`utils.atomic.atomic_dir`), so a reader sees either the whole checkpoint or none of it.
Single-process use (conversion, export); training runs keep their checkpoints with an
Orbax CheckpointManager.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from latentr3_jax.errors import InputError, where
from latentr3_jax.model.config import DecoderConfig
from latentr3_jax.utils.atomic import atomic_dir
from latentr3_jax.utils.jsonio import read_json

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"


def save_params(directory: str, params: dict, config: DecoderConfig,
                extra: Optional[dict] = None, overwrite: bool = False) -> str:
    """Write DIR/params (Orbax) and DIR/model_config.json atomically; returns DIR."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise InputError(f"{directory}: already exists (pass overwrite / --overwrite to replace it)")
    with atomic_dir(directory) as tmp:
        os.makedirs(tmp)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        # the folder is replaced whole, so the file inside needs no atomic write of its own
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({**(extra or {}), "decoder": config.to_dict()}, f, indent=2, sort_keys=True)
            f.write("\n")
    return directory


def read_model_config(directory: str) -> tuple:
    """(DecoderConfig, extra facts dict) from DIR/model_config.json."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    meta = read_json(path, "a params checkpoint's model config")
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
