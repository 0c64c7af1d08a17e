"""The run directory: what a training run writes besides its checkpoints, and `load_run`,
which gives a finished (or running) run to the next stage.

  config.json         the full ConfigDict the run started with
  model_config.json   {"decoder": DecoderConfig, "num_thoughts", "latent_mode", "thought_id",
                       "fingerprint"}
  tokenizer/          the tokenizer (loadable with data.load_tokenizer)
  metrics.jsonl       one JSON object per line, appended and flushed line by line
  checkpoints/        Orbax checkpoints (see checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections

from latentr3_jax.data.tokenizer import load_tokenizer
from latentr3_jax.errors import InputError
from latentr3_jax.model.config import DecoderConfig
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train.fingerprint import check_fingerprint
from latentr3_jax.utils.atomic import atomic_dir
from latentr3_jax.utils.jsonio import jsonable, read_json, write_json

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def read_run_json(run_dir: str, name: str) -> dict:
    return read_json(os.path.join(run_dir, name), f"is {run_dir} a run directory?")


def prepare_run_dir(run_dir: str, cfg, model_config, tokenizer, *, num_thoughts: int,
                    latent_mode: str, fingerprint: dict, is_primary: bool = True) -> None:
    """Write config, model config and tokenizer. A run directory that already holds a
    different model is refused (resuming needs the same one)."""
    os.makedirs(run_dir, exist_ok=True)
    existing = os.path.join(run_dir, MODEL_CONFIG)
    if os.path.exists(existing):
        check_fingerprint(read_json(existing).get("fingerprint", {}), fingerprint, existing)
    if not is_primary:
        return
    write_json(os.path.join(run_dir, CONFIG), cfg.to_dict())
    write_json(existing, {"decoder": model_config.to_dict(), "num_thoughts": int(num_thoughts),
                          "latent_mode": str(latent_mode),
                          "thought_id": int(tokenizer.thought_id), "fingerprint": fingerprint})
    save_tokenizer(tokenizer, os.path.join(run_dir, TOKENIZER))


def save_tokenizer(tokenizer, path: str) -> None:
    """Save `tokenizer` as the folder `path` unless it exists (written whole or not at all)."""
    if not os.path.isdir(path):
        with atomic_dir(path) as tmp:
            tokenizer.save(tmp)


def load_run_tokenizer(run_dir: str):
    path = os.path.join(run_dir, TOKENIZER)
    if not os.path.isdir(path):
        raise InputError(f"{path}: tokenizer directory missing")
    return load_tokenizer(path)


class MetricsWriter:
    """Appends one JSON line per record; each line is written whole and flushed."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, METRICS)
        self.enabled = enabled
        self._f = open(self.path, "a", encoding="utf-8") if enabled else None
        if self._f and self._f.tell() > 0:
            with open(self.path, "rb") as f:   # a line cut by a crash must not swallow the next
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")
                    self._f.flush()

    def write(self, record: dict) -> None:
        if not self._f:
            return
        rec = {"time": round(time.time(), 3), **jsonable(record)}
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


def read_metrics(run_dir: str) -> list:
    """All complete lines of metrics.jsonl (a line cut by a crash is skipped)."""
    out = []
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


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


def load_run(run_dir: str, which: str = ckpt_lib.BEST) -> RunArtifacts:
    """Load a run directory written by `latentr3 sft` (or grpo): config, model config,
    tokenizer and params from its best (default; falls back to latest) or latest checkpoint."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run directory not found")
    facts = read_run_json(run_dir, MODEL_CONFIG)
    cfg_dict = read_run_json(run_dir, CONFIG)
    try:
        model_config = DecoderConfig.from_dict(facts["decoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{os.path.join(run_dir, MODEL_CONFIG)}: bad decoder config ({e})") from None
    tokenizer = load_run_tokenizer(run_dir)
    ckpt = os.path.join(run_dir, CHECKPOINTS)
    order = [which] if which == ckpt_lib.LATEST else [ckpt_lib.BEST, ckpt_lib.LATEST]
    last_err = None
    for w in order:
        try:
            params, meta = ckpt_lib.restore_params(ckpt, w)
            break
        except FileNotFoundError as e:
            last_err = e
    else:
        raise InputError(f"{run_dir}: no checkpoint found ({last_err})")
    params = jax.tree.map(jax.numpy.asarray, params)
    if facts.get("fingerprint") is not None:
        check_fingerprint(meta.get("fingerprint", {}), facts["fingerprint"], os.path.join(ckpt, w))
    return RunArtifacts(run_dir=run_dir, config=ml_collections.ConfigDict(cfg_dict),
                        model_config=model_config, params=params, tokenizer=tokenizer,
                        num_thoughts=int(facts.get("num_thoughts", 0)),
                        latent_mode=str(facts.get("latent_mode", "ratt")),
                        thought_id=int(facts.get("thought_id", model_config.vocab_size - 1)),
                        step=int(meta.get("step", -1)), which=w, meta=meta)
