"""Tiny random Qwen2 / Llama checkpoints built locally with transformers (no hub access).

`make_hf_model(tmp_path, arch='qwen2', tied=True, **shape)` returns the directory of a
`save_pretrained` checkpoint. Weights are re-drawn at a larger scale than transformers'
init (std 0.02 gives near-uniform attention and near-zero logits, which would hide rope or
bias mistakes); norm scales and biases are random too.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

SHAPE_DEFAULTS = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


def hf_config(arch: str = "qwen2", tied: bool = True, bias: Optional[bool] = None,
              rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None, **shape):
    """A transformers config object for a tiny model."""
    import transformers

    kw = dict(SHAPE_DEFAULTS)
    kw.update(shape)
    kw.update(tie_word_embeddings=tied, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope.update(rope_scaling)
    if arch == "qwen2":
        if bias is False:
            raise ValueError("Qwen2 always has q/k/v biases")
        return transformers.Qwen2Config(rope_parameters=rope, **kw)
    if arch == "llama":
        return transformers.LlamaConfig(rope_parameters=rope, attention_bias=bool(bias), **kw)
    raise ValueError(f"unknown arch {arch!r}")


def randomize_(model, seed: int = 0, scale: float = 0.15) -> None:
    """Redraw every weight in place: matrices N(0, scale), norms 1 + N(0, 0.1), biases N(0, 0.2).

    A Llama o_proj bias stays zero (our decoder has none)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("o_proj.bias"):
                p.zero_()
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def make_hf_model(tmp_path, arch: str = "qwen2", tied: bool = True, *, name: Optional[str] = None,
                  bias: Optional[bool] = None, rope_theta: float = 10000.0,
                  rope_scaling: Optional[dict] = None, seed: int = 0, dtype: str = "float32",
                  max_shard_size: Optional[str] = None, legacy_config: bool = False,
                  **shape) -> str:
    """Build, randomize and `save_pretrained` a tiny causal LM; returns its directory.

    dtype: 'float32' or 'bfloat16' (weights stored in that dtype).
    max_shard_size: e.g. '20KB' for a sharded checkpoint with model.safetensors.index.json.
    legacy_config: rewrite config.json the transformers 4 way (top-level rope_theta and
      rope_scaling, no rope_parameters).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(arch, tied, bias, rope_theta, rope_scaling, **shape)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    model.eval()
    path = os.path.join(os.fspath(tmp_path), name or f"{arch}_{'tied' if tied else 'untied'}_{seed}")
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if legacy_config:
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
    return path


def load_torch(path: str):
    """The checkpoint loaded back by transformers, float32, eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def left_padded_batch(vocab_size: int, lengths=(9, 5, 7), seed: int = 0, pad_id: int = 0):
    """(ids, mask) int64 numpy [batch, max(lengths)], real tokens at the right end of each row."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.full((len(lengths), T), pad_id, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(1, vocab_size, n)
        mask[b, T - n:] = 1
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 logits with position ids counted over real tokens, as `generate` does."""
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos))
    return out.logits.float().numpy()
