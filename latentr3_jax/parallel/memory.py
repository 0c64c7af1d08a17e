"""Per-device memory estimate of a training step, before anything is compiled.

The estimate walks the same logical axis names the model gives its weights
(`decoder.param_axes`, `latent.latent_param_axes`) and places them on the mesh with the
same table and the same divisibility rule as the real sharding (`parallel.mesh`), so a
weight that the mesh cannot split evenly counts as replicated here too.

Four parts, all in bytes per device:
  params       every weight, `param_dtype` (float32: compute casts, storage does not);
  opt_state    AdamW's two moments for the trainable weights (float32, sharded alike);
  grads        one float32 gradient per trainable weight;
  activations  what the backward pass keeps: per layer and token the residual stream,
               the attention projections, the MLP intermediates and the attention
               scores, plus the float32 vocabulary logits of the target tokens. With
               remat only the per-layer input survives and one layer is recomputed.

`tests/test_memory.py` checks the first two against the argument bytes of a compiled
step (exact) and grads + activations against its temporary bytes (within 2x; 0.8-1.2
observed, up to the Qwen2.5-1.5B shape), on one device and on a 2x2x2 mesh. Run
`latentr3 memory --config FILE` for a config's table.

The activations assume the residual stream is split over the batch axes. Under FSDP XLA
may instead follow the embedding table (split over `embed`) and keep every row on every
device unless the step pins the embedded inputs to the batch sharding
(`jax.lax.with_sharding_constraint`); on a 1x8x1 CPU mesh that costs ~5.5x the estimate.
"""

from __future__ import annotations

import math
import os
import types
from typing import Optional, Sequence

import jax
import numpy as np

from latentr3_jax.errors import InputError
from latentr3_jax.gguf_convert import read_gguf_config
from latentr3_jax.hf import config_from_hf, read_hf_config
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import DecoderConfig
from latentr3_jax.parallel.mesh import LOGICAL_RULES, MESH_AXES, is_axes, logical_spec
from latentr3_jax.parallel.mesh import mesh_shape as config_mesh_shape  # (`mesh_shape`: an arg)

GIB = 1024 ** 3
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0}
TRAINABLE = ("all", "latent")


def _itemsize(dtype) -> int:
    return int(np.dtype(jax.numpy.dtype(dtype)).itemsize)


def _sizes_mesh(mesh_shape: Sequence[int]):
    """Just enough of a Mesh (`.shape`) for `logical_spec`, without devices."""
    if len(mesh_shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape must be {MESH_AXES}, got {tuple(mesh_shape)}")
    return types.SimpleNamespace(shape=dict(zip(MESH_AXES, (int(s) for s in mesh_shape))))


def sharded_shape(shape: Sequence[int], axes: Sequence[Optional[str]], mesh_shape: Sequence[int],
                  rules=LOGICAL_RULES) -> tuple:
    """The per-device block of an array with logical `axes` on a mesh of `mesh_shape`."""
    mesh = _sizes_mesh(mesh_shape)
    spec = logical_spec(tuple(axes), tuple(shape), mesh, rules)
    out = []
    for dim, target in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        out.append(math.ceil(dim / int(np.prod([mesh.shape[n] for n in names] or [1]))))
    return tuple(out)


def param_tree_shapes(config: DecoderConfig, with_latent: bool) -> tuple:
    """(shapes tree, logical axes tree) of the decoder and, optionally, LatentRATT."""
    shapes = decoder.param_shapes(config)
    if with_latent:
        shapes["latent"] = latent.latent_param_shapes(config)
    return shapes, latent.model_param_axes(config, with_latent)


def _tree_bytes(shapes, axes, mesh_shape, itemsize, rules, keep=lambda path: True) -> int:
    flat_axes, treedef = jax.tree.flatten(axes, is_leaf=is_axes)
    flat_shapes = treedef.flatten_up_to(shapes)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0]]
    total = 0
    for path, ax, shape in zip(paths, flat_axes, flat_shapes):
        if keep(path):
            total += int(np.prod(sharded_shape(shape, ax, mesh_shape, rules))) * itemsize
    return total


def _split(n: int, ways: int) -> int:
    """Per-device share of a dim split `ways` ways; undivisible dims stay whole (replicated)."""
    return n // ways if ways > 1 and n % ways == 0 else n


def estimate_memory(config: DecoderConfig, *, batch_per_device: int, seq_len: int,
                    mesh_shape: Sequence[int] = (1, 1, 1), dtype="float32", remat: bool = False,
                    optimizer: str = "adamw", trainable: str = "all",
                    target_len: Optional[int] = None, with_latent: bool = True,
                    grad_accumulation: bool = False, param_dtype="float32",
                    rules=LOGICAL_RULES) -> dict:
    """Bytes per device of one training step.

    Args:
      batch_per_device: sequences each device runs (global batch / (data * fsdp), or the
        micro-batch when gradients are accumulated).
      seq_len: tokens per sequence: prompt + thought slot(s) + target.
      mesh_shape: (data, fsdp, tensor).
      dtype: compute (activation) dtype; params stay `param_dtype`.
      trainable: 'all' (SFT: the LLM and LatentRATT) or 'latent' (LR-GRPO: only
        LatentRATT; the prompt runs once without gradient and stays as a KV cache, and
        only the `target_len` suffix tokens keep activations for the backward pass).
      target_len: tokens whose vocabulary logits are computed (the thought slot and the
        target); default `seq_len` (a plain language-model step).
      grad_accumulation: micro-batches summed into a gradient buffer (one more float32
        copy of the trainable weights).
    Returns:
      dict of params_bytes, opt_state_bytes, grads_bytes, activations_bytes, total_bytes.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_MOMENTS)}, got {optimizer!r}")
    if trainable == "latent" and not with_latent:
        raise ValueError("trainable='latent' needs with_latent=True")
    rules = LOGICAL_RULES if rules is None else rules
    c = config
    target_len = seq_len if target_len is None else int(target_len)
    _, _, tensor = (int(s) for s in mesh_shape)
    p_item, a_item = _itemsize(param_dtype), _itemsize(dtype)

    shapes, axes = param_tree_shapes(c, with_latent)
    keep = ((lambda path: True) if trainable == "all"
            else (lambda path: getattr(path[0], "key", None) == "latent"))
    params = _tree_bytes(shapes, axes, mesh_shape, p_item, rules)
    train_f32 = _tree_bytes(shapes, axes, mesh_shape, 4, rules, keep)
    opt_state = OPTIMIZER_MOMENTS[optimizer] * train_f32
    grads = train_f32 * (2 if grad_accumulation else 1)

    # Per-device widths of the activations: the batch is split over (data, fsdp) by the
    # caller; heads, MLP and vocabulary over `tensor` when it divides them.
    d = c.hidden_size
    heads, kv_heads = _split(c.num_heads, tensor), _split(c.num_kv_heads, tensor)
    q, kv = heads * c.head_dim, kv_heads * c.head_dim
    f = _split(c.intermediate_size, tensor)
    vocab = _split(c.vocab_size, tensor)
    B, S, L = batch_per_device, seq_len, c.num_layers

    grad_tokens = B * (S if trainable == "all" else target_len)  # tokens the backward goes through
    # Saved per layer and token: x, normed x, mid x, normed mid x; q, k, v before and after
    # RoPE and the attention output; gate, up, silu(gate), their product; the float32 norm
    # inputs; the float32 scores and the probabilities over S keys.
    per_token = (a_item * (4 * d + 3 * q + 3 * kv + 4 * f) + 4 * 2 * d
                 + heads * S * (4 + a_item))
    one_layer = grad_tokens * per_token
    if remat:
        layers = L * grad_tokens * d * a_item + 2 * one_layer
    else:
        layers = (L + 1) * one_layer
    logits = B * target_len * vocab * 4 * 3   # logits, log-softmax, their cotangent (float32)
    embeds = 2 * B * S * d * a_item           # looked-up embeddings and their cotangent
    kv_cache = 0
    if trainable == "latent":  # the frozen prompt's cache, held through the step
        kv_cache = 2 * L * B * S * kv * a_item
    activations = layers + logits + embeds + kv_cache
    total = params + opt_state + grads + activations
    return {"params_bytes": int(params), "opt_state_bytes": int(opt_state),
            "grads_bytes": int(grads), "activations_bytes": int(activations),
            "total_bytes": int(total)}


# --------------------------------------------------------------------------- config tables


def qwen25_1_5b(vocab_size: int = 151665 + 1) -> DecoderConfig:
    """Qwen2.5-1.5B's shape (its config.json). The vocabulary is what a run keeps: the
    tokenizer's 151,665 ids plus `<|Thought|>` (the checkpoint pads its table to 151,936
    rows; the padding is dropped when the thought row is added)."""
    return DecoderConfig(vocab_size=vocab_size, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True,
                         tie_word_embeddings=True, model_type="qwen2",
                         max_position_embeddings=131072)


def decoder_config_from_cfg(cfg) -> DecoderConfig:
    """The decoder a config trains, without loading weights: the checkpoint's config.json
    (a GGUF file's metadata) when `model.hf_path` is set (its table plus one `<|Thought|>` row: an upper bound, as
    a run drops padding rows past the tokenizer), else the from-scratch shape of
    `cfg.model` with `tokenizer.vocab_size` ids (`<|Thought|>` included)."""
    path = str(cfg.model.hf_path or "")
    if path.lower().endswith(".gguf"):   # its metadata, without converting the file
        hf = config_from_hf(read_gguf_config(path), path)
        return hf.replace(vocab_size=hf.vocab_size + 1)
    if path:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise InputError(f"model.hf_path: no config.json in {path!r} (pass --model "
                             f"qwen2.5-1.5b to estimate with that shape instead)")
        hf = read_hf_config(path)
        return hf.replace(vocab_size=hf.vocab_size + 1)
    m = cfg.model
    return DecoderConfig(vocab_size=int(cfg.tokenizer.vocab_size), hidden_size=m.hidden_size,
                         intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                         num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                         rope_theta=m.rope_theta, attention_bias=m.model_type == "qwen2",
                         tie_word_embeddings=m.tie_word_embeddings, model_type=m.model_type)


def config_estimates(cfg, num_devices: Optional[int] = None,
                     decoder_config: Optional[DecoderConfig] = None) -> dict:
    """Estimates of the SFT and (with a latent) the LR-GRPO step of a full config.

    Worst case over the buckets: prompt = `data.cutoff`, plus the thought slots and
    `data.max_target_len`. SFT runs `sft.micro_batch_size` rows (or the whole global batch)
    over (data, fsdp); LR-GRPO `grpo.micro_batch_size` (or `prompts_per_batch`) prompts x
    `group_size`. Returns {'mesh', 'rows': {step: rows per device}, 'sft', 'grpo'}.
    """
    n = num_devices or _mesh_devices(cfg)
    mesh = config_mesh_shape(cfg.mesh, n)
    batch_ways = mesh[0] * mesh[1]
    config = decoder_config or decoder_config_from_cfg(cfg)
    thoughts = int(cfg.model.num_thoughts)
    slots = thoughts + (int(cfg.model.get("latent_factors", 1)) - 1 if thoughts else 0)
    prompt = max(int(cfg.data.cutoff), 1)
    target = int(cfg.data.max_target_len) + slots
    with_latent = thoughts > 0 and cfg.model.latent_mode == "ratt"
    common = dict(mesh_shape=mesh, dtype=cfg.model.dtype, remat=bool(cfg.model.remat),
                  with_latent=with_latent, seq_len=prompt + target, target_len=target)
    micro = int(cfg.sft.micro_batch_size)
    rows = {"sft": max(1, math.ceil((micro or int(cfg.sft.batch_size)) / batch_ways))}
    out = {"mesh": mesh, "rows": rows, "sft": estimate_memory(
        config, batch_per_device=rows["sft"], trainable="all", grad_accumulation=micro > 0,
        **common)}
    if thoughts > 0:
        micro = int(cfg.grpo.micro_batch_size)
        prompts = micro or int(cfg.grpo.prompts_per_batch)
        rows["grpo"] = max(1, math.ceil(prompts * int(cfg.grpo.group_size) / batch_ways))
        out["grpo"] = estimate_memory(
            config, batch_per_device=rows["grpo"], grad_accumulation=micro > 0,
            trainable="all" if cfg.grpo.train_llm else "latent", **dict(common, with_latent=True))
    return out


def _mesh_devices(cfg) -> int:
    sizes = [int(cfg.mesh[a]) for a in MESH_AXES]
    if -1 in sizes:
        return jax.device_count()
    return int(np.prod(sizes))


def format_table(estimates: dict) -> str:
    """Markdown table (GiB per device) of `config_estimates` output."""
    mesh = ",".join(str(s) for s in estimates["mesh"])
    lines = [f"mesh (data, fsdp, tensor) = {mesh}; GiB per device",
             "| step | rows/dev | params | opt state | grads | activations | total |",
             "|---|---|---|---|---|---|---|"]
    for step in ("sft", "grpo"):
        if step in estimates:
            e = estimates[step]
            vals = [e[k] / GIB for k in ("params_bytes", "opt_state_bytes", "grads_bytes",
                                          "activations_bytes", "total_bytes")]
            lines.append(f"| {step} | {estimates['rows'][step]} | "
                         + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


KNOWN_MODELS = {"qwen2.5-1.5b": qwen25_1_5b}
