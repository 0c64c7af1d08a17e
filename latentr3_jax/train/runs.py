"""The run directory: what a training run writes besides its checkpoints, and `load_run`,
which gives a finished (or running) run to the next stage.

  config.json         the full ConfigDict the run started with
  model_config.json   {"decoder": DecoderConfig, "num_thoughts", "latent_mode",
                       "latent_factors", "thought_id", "fingerprint"}
  tokenizer/          the tokenizer (loadable with data.load_tokenizer)
  metrics.jsonl       one JSON object per line, appended and flushed line by line
  tensorboard/        the same records' numbers as TensorBoard event files (one file per
                      start of the run; view with `tensorboard --logdir <runs root>`)
  checkpoints/        Orbax checkpoints (see checkpoint.py)

`export_hf` writes a run as a Hugging Face folder that keeps everything LatentR³ adds to
the model, and `load_run` reads such a folder back as a run:

  config.json, generation_config.json, model.safetensors   the decoder (transformers loads it)
  latent.safetensors  LatentRATT's Q, K, V (when the run has them; with K latent factors,
                      each stacked on a leading axis of size K)
  tokenizer.json ...  the run's tokenizer, <|Thought|> included
  latentr3.json       num_thoughts, latent_mode, latent_factors, thought_id, fingerprint,
                      step, and the
                      run's full config (data settings: template, cutoff, buckets)
  catalog.json        the item catalog (id -> title) and the prompt's category word, so the
                      folder recommends without the dataset
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections

from latentr3_jax import hf
from latentr3_jax.data.d3 import Catalog
from latentr3_jax.data.tokenizer import load_tokenizer
from latentr3_jax.errors import InputError
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.model.config import DecoderConfig
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train.fingerprint import check_fingerprint
from latentr3_jax.utils.atomic import atomic_dir
from latentr3_jax.utils.jsonio import jsonable, read_json, write_json
from latentr3_jax.utils.tensorboard import EventWriter, flatten_scalars

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
EXPORT = "latentr3.json"
EXPORT_CATALOG = "catalog.json"
EXPORT_FORMAT = 1


def read_run_json(run_dir: str, name: str) -> dict:
    return read_json(os.path.join(run_dir, name), f"is {run_dir} a run directory?")


def prepare_run_dir(run_dir: str, cfg, model_config, tokenizer, *, num_thoughts: int,
                    latent_mode: str, fingerprint: dict, is_primary: bool = True,
                    latent_factors: int = 1) -> None:
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
                          "latent_mode": str(latent_mode), "latent_factors": int(latent_factors),
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
    """Appends one JSON line per record; each line is written whole and flushed.

    A record with an integer "step" also goes to the event file in `tensorboard/`: its
    numbers (nested dicts joined with '/') as scalars at that step, tagged under the
    record's "split" ("train/loss", "valid/loss"). Marker records (those with an "event"
    field, such as a stop) stay in metrics.jsonl only."""

    _NOT_SCALARS = ("step", "time", "split", "batch")

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
        self._tb = None
        if enabled:
            try:
                self._tb = EventWriter(os.path.join(run_dir, TENSORBOARD))
            except BaseException:
                self.close()
                raise

    def write(self, record: dict) -> None:
        if not self._f:
            return
        now = time.time()
        rec = {"time": round(now, 3), **jsonable(record)}
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        step = record.get("step")
        if hasattr(step, "item") and getattr(step, "shape", None) == ():
            step = step.item()
        if self._tb is not None and "event" not in record and isinstance(step, int) \
                and not isinstance(step, bool):
            split = record.get("split")
            prefix = split if isinstance(split, str) and split else ""
            self._tb.scalars(flatten_scalars(record, prefix, skip=self._NOT_SCALARS), step,
                             wall_time=now)

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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


def is_export(path: str) -> bool:
    """A folder written by `export_hf` (and not a run directory)."""
    return (os.path.isfile(os.path.join(path, EXPORT))
            and not os.path.isdir(os.path.join(path, CHECKPOINTS)))


def load_run(run_dir: str, which: str = ckpt_lib.BEST) -> RunArtifacts:
    """Load a run directory written by `latentr3 sft` (or grpo): config, model config,
    tokenizer and params from its best (default; falls back to latest) or latest checkpoint.
    A Hugging Face folder written by `export_hf` loads the same way (`which` is then
    'export': the folder holds one set of weights)."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run directory not found")
    if is_export(run_dir):
        return load_export(run_dir)
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


# --------------------------------------------------------------------------- HF export


def export_hf(run: RunArtifacts, out: str, *, catalog: Optional[Catalog] = None,
              category_word: Optional[str] = None) -> str:
    """Write `run` as a Hugging Face folder `out` (see the module docstring), replacing it
    whole: an interrupted export leaves `out` as it was. `catalog` (with the prompt's
    `category_word`) is stored when given."""
    out = os.path.abspath(out)
    with atomic_dir(out) as tmp:
        os.makedirs(tmp)
        hf.save_pretrained(run.model_config, run.params, tmp)
        run.tokenizer.save(tmp)
        write_json(os.path.join(tmp, EXPORT), {
            "format": EXPORT_FORMAT, "num_thoughts": int(run.num_thoughts),
            "latent_mode": str(run.latent_mode), "thought_id": int(run.thought_id),
            "latent_factors": latent_lib.num_factors(run.params),
            "fingerprint": run.meta.get("fingerprint"), "step": int(run.step),
            "source": run.run_dir, "config": run.config.to_dict()})
        if catalog is not None:
            write_json(os.path.join(tmp, EXPORT_CATALOG), {
                "category_word": category_word,
                "items": [[int(i), catalog.titles[i]] for i in catalog.ids]})
    return out


def load_export(path: str) -> RunArtifacts:
    """A folder written by `export_hf`, as the RunArtifacts `load_run` gives for a run."""
    path = os.path.abspath(path)
    facts = read_json(os.path.join(path, EXPORT), f"is {path} a latentr3 export?")
    where = os.path.join(path, EXPORT)
    if not isinstance(facts, dict) or facts.get("format") != EXPORT_FORMAT:
        raise InputError(f"{where}: field 'format' must be {EXPORT_FORMAT}, got "
                         f"{facts.get('format') if isinstance(facts, dict) else facts!r}")
    for key, kind in (("num_thoughts", int), ("latent_mode", str), ("thought_id", int),
                      ("config", dict)):
        if not isinstance(facts.get(key), kind) or isinstance(facts.get(key), bool):
            raise InputError(f"{where}: field {key!r} missing or not a{'n' if kind is int else ''} "
                             f"{kind.__name__}")
    model_config, params = hf.load_pretrained(path)
    if facts["num_thoughts"] and facts["latent_mode"] == "ratt" and "latent" not in params:
        raise InputError(f"{path}: {where} says num_thoughts={facts['num_thoughts']} in 'ratt' "
                         f"mode but {hf.LATENT_FILE} is missing")
    factors = facts.get("latent_factors", 1)
    if "latent" in params and latent_lib.num_factors(params) != factors:
        raise InputError(f"{where}: field 'latent_factors' is {factors!r} but "
                         f"{hf.LATENT_FILE} holds {latent_lib.num_factors(params)} LatentRATT "
                         f"head(s)")
    params = jax.tree.map(jax.numpy.asarray, params)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise InputError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the model "
                         f"{model_config.vocab_size}")
    return RunArtifacts(run_dir=path, config=ml_collections.ConfigDict(facts["config"]),
                        model_config=model_config, params=params, tokenizer=tokenizer,
                        num_thoughts=int(facts["num_thoughts"]),
                        latent_mode=str(facts["latent_mode"]),
                        thought_id=int(facts["thought_id"]), step=int(facts.get("step", -1)),
                        which="export", meta={"fingerprint": facts.get("fingerprint")})


def load_export_catalog(path: str) -> Optional[tuple]:
    """(Catalog, category word or None) stored in an export folder, or None."""
    file = os.path.join(path, EXPORT_CATALOG)
    if not os.path.isfile(file):
        return None
    d = read_json(file)
    items = d.get("items") if isinstance(d, dict) else None
    if not isinstance(items, list):
        raise InputError(f"{file}: field 'items' must be a list of [id, title]")
    titles = {}
    for n, it in enumerate(items):
        if (not isinstance(it, list) or len(it) != 2 or not isinstance(it[0], int)
                or not isinstance(it[1], str)):
            raise InputError(f"{file}: items[{n}] must be [item id, title], got {it!r}")
        titles[it[0]] = it[1]
    return Catalog(titles), d.get("category_word")
