"""Fingerprints: what a checkpoint must agree on (model shape, tokenizer, latent setup) to be
loaded into a run. Both the checkpoints and the run directory check them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from latentr3_jax.errors import InputError


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


def differences(a: Any, b: Any, prefix: str = "") -> list:
    """'key: checkpoint X vs run Y' for every leaf where the two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r} vs run {b!r}"]


def check_fingerprint(saved: dict, expected: dict, where: str) -> None:
    diffs = differences(saved, expected)
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise InputError(f"{where}: checkpoint belongs to a different model or tokenizer: "
                         f"{'; '.join(diffs[:3])}{more}")
