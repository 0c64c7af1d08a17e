"""The run directory: what a training run writes besides its checkpoints.

  config.json         the full ConfigDict the run started with
  model_config.json   {"decoder": DecoderConfig, "num_thoughts", "latent_mode", "thought_id",
                       "fingerprint"}
  tokenizer/          the tokenizer (loadable with data.load_tokenizer)
  metrics.jsonl       one JSON object per line, appended and flushed line by line
  checkpoints/        Orbax checkpoints (see checkpoint.py)
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

from latentr3_jax.errors import InputError
from latentr3_jax.utils.atomic import atomic_write_text

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_json(run_dir: str, name: str, obj: Any) -> str:
    path = os.path.join(run_dir, name)
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
    return path


def read_json(run_dir: str, name: str) -> dict:
    path = os.path.join(run_dir, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: not found (is {run_dir} a run directory?)") from None
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def model_facts(model_config, *, num_thoughts: int, latent_mode: str, thought_id: int,
                fingerprint: dict) -> dict:
    return {"decoder": model_config.to_dict(), "num_thoughts": int(num_thoughts),
            "latent_mode": str(latent_mode), "thought_id": int(thought_id),
            "fingerprint": fingerprint}


def prepare_run_dir(run_dir: str, cfg, model_config, tokenizer, *, num_thoughts: int,
                    latent_mode: str, fingerprint: dict, is_primary: bool = True) -> None:
    """Write config, model config and tokenizer. A run directory that already holds a
    different model is refused (resuming needs the same one)."""
    os.makedirs(run_dir, exist_ok=True)
    facts = model_facts(model_config, num_thoughts=num_thoughts, latent_mode=latent_mode,
                        thought_id=tokenizer.thought_id, fingerprint=fingerprint)
    existing = os.path.join(run_dir, MODEL_CONFIG)
    if os.path.exists(existing):
        from latentr3_jax.train.checkpoint import check_fingerprint
        old = read_json(run_dir, MODEL_CONFIG)
        check_fingerprint(old.get("fingerprint", {}), fingerprint, existing)
    if not is_primary:
        return
    write_json(run_dir, CONFIG, cfg.to_dict())
    write_json(run_dir, MODEL_CONFIG, facts)
    tok_dir = os.path.join(run_dir, TOKENIZER)
    if not os.path.isdir(tok_dir):
        tmp = tok_dir + ".tmp"
        if os.path.isdir(tmp):
            import shutil
            shutil.rmtree(tmp)
        tokenizer.save(tmp)
        os.replace(tmp, tok_dir)


def load_run_tokenizer(run_dir: str):
    from latentr3_jax.data import load_tokenizer
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
        rec = {"time": round(time.time(), 3), **_jsonable(record)}
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


class Progress:
    """tqdm bar showing loss and target tokens/s; silent when disabled."""

    def __init__(self, total: int, initial: int = 0, desc: str = "sft", enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            mininterval=1.0)
        self._last_t = time.perf_counter()
        self._last_step = initial

    def update(self, step: int, loss: Optional[float] = None, tokens: Optional[float] = None) -> dict:
        now = time.perf_counter()
        dt = max(now - self._last_t, 1e-9)
        n = step - self._last_step
        rate = {} if tokens is None else {"tok/s": tokens / dt}
        if self.bar is not None:
            post = {}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            if rate:
                post["tok/s"] = f"{rate['tok/s']:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(n)
        self._last_t, self._last_step = now, step
        return {"tokens_per_s": rate.get("tok/s"), "steps_per_s": n / dt}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
