"""Pure-functional Qwen2 / Llama decoder.

Parameters are a plain pytree of float32 arrays; the transformer layers are stacked on a
leading `layers` axis and run with `lax.scan`, so a 28-layer model compiles like a
one-layer one. Every weight has logical axis names (`param_axes`) that the sharding layer
maps onto a device mesh. The KV cache is an explicit input and output.

`apply` runs the model. Its pieces are public for code that runs the layers another way
(beam search's shared-prompt decode step): `decoder_layer` is one layer with the attention
step passed in, built from `dense`, `attention`, `write_kv` and `mlp`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax.model.config import DecoderConfig
from latentr3_jax.model import mixed

Params = dict
Cache = dict

NEG_INF = -1e30  # masked attention score: finite, so fully-masked (padding) rows stay NaN-free


# --------------------------------------------------------------------------- params


def param_shapes(config: DecoderConfig) -> dict:
    """Shape of every weight, in the same tree layout as the params."""
    c = config
    L, d, f, hd = c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim
    H, K = c.num_heads, c.num_kv_heads
    attn = {
        "q": {"kernel": (L, d, H, hd)},
        "k": {"kernel": (L, d, K, hd)},
        "v": {"kernel": (L, d, K, hd)},
        "o": {"kernel": (L, H, hd, d)},
    }
    if c.attention_bias:
        attn["q"]["bias"] = (L, H, hd)
        attn["k"]["bias"] = (L, K, hd)
        attn["v"]["bias"] = (L, K, hd)
    shapes = {
        "embed": {"embedding": (c.vocab_size, d)},
        "layers": {
            "input_norm": {"scale": (L, d)},
            "attn": attn,
            "post_attn_norm": {"scale": (L, d)},
            "mlp": {"gate": {"kernel": (L, d, f)}, "up": {"kernel": (L, d, f)},
                    "down": {"kernel": (L, f, d)}},
        },
        "final_norm": {"scale": (d,)},
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (d, c.vocab_size)}
    return shapes


def param_axes(config: DecoderConfig) -> dict:
    """Logical axis names of every weight (same tree as the params)."""
    c = config
    attn = {
        "q": {"kernel": ("layers", "embed", "heads", "head_dim")},
        "k": {"kernel": ("layers", "embed", "kv_heads", "head_dim")},
        "v": {"kernel": ("layers", "embed", "kv_heads", "head_dim")},
        "o": {"kernel": ("layers", "heads", "head_dim", "embed")},
    }
    if c.attention_bias:
        attn["q"]["bias"] = ("layers", "heads", "head_dim")
        attn["k"]["bias"] = ("layers", "kv_heads", "head_dim")
        attn["v"]["bias"] = ("layers", "kv_heads", "head_dim")
    axes = {
        "embed": {"embedding": ("vocab", "embed")},
        "layers": {
            "input_norm": {"scale": ("layers", "norm")},
            "attn": attn,
            "post_attn_norm": {"scale": ("layers", "norm")},
            "mlp": {"gate": {"kernel": ("layers", "embed", "mlp")},
                    "up": {"kernel": ("layers", "embed", "mlp")},
                    "down": {"kernel": ("layers", "mlp", "embed")}},
        },
        "final_norm": {"scale": ("norm",)},
    }
    if not c.tie_word_embeddings:
        axes["lm_head"] = {"kernel": ("embed", "vocab")}
    return axes


def init_params(config: DecoderConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random float32 params: normal(std) weights, zero biases, unit norm scales."""
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    leaves = []
    for (path, shape), key in zip(flat, keys):
        name = path[-1].key
        if name == "scale":
            leaves.append(jnp.ones(shape, jnp.float32))
        elif name == "bias":
            leaves.append(jnp.zeros(shape, jnp.float32))
        else:
            leaves.append(std * jax.random.normal(key, shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back, as HF does."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(dim: int, theta: float, scaling: Optional[dict] = None) -> np.ndarray:
    """Inverse frequencies for rotary embeddings (default, linear and llama3 scaling)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if not scaling:
        return inv.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_mid, mid, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple:
    """cos/sin tables [..., dim] for integer positions, rotate-half layout."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return x * cos + rotate_half(x) * sin


def rope_tables(config: DecoderConfig, positions: jax.Array, dtype) -> tuple:
    """The decoder's cos/sin tables [batch, seq, 1, head_dim] for position ids [batch, seq]."""
    inv = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_dict)
    cos, sin = rope_cos_sin(positions, inv, dtype)
    return cos[:, :, None, :], sin[:, :, None, :]


# --------------------------------------------------------------------------- layer


def dense(p: dict, x: jax.Array, n_in: int = 1) -> jax.Array:
    """Projection x [..., *in] @ p["kernel"] [*in, *out] (+ p["bias"] [*out], if present),
    the kernel contracting x's last `n_in` dims.

    Written as ONE 2-D [tokens, in] x [in, out] matmul: same result as the batched einsum,
    but XLA's CPU backend turns the einsum form's gradient (weight grads contracting over
    batch and sequence) into far slower code. Low-precision compute accumulates in float32
    (see `mixed`).
    """
    kernel, bias = p["kernel"], p.get("bias")
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[:x.ndim - n_in]
    k_in = int(np.prod(in_shape))
    y = mixed.matmul(x.reshape(-1, k_in), kernel.reshape(k_in, -1),
                     bias=None if bias is None else bias.reshape(-1))
    return y.reshape(lead + out_shape)


def matmul_weights(params: dict, dtype) -> dict:
    """`params` with every matmul weight ("kernel", "embedding" leaves) cast to `dtype` when
    that is a low-precision compute dtype; biases, norm scales and everything else as is.

    Each matmul casts its weight to the activations' dtype (`mixed.einsum`), so a function
    of these params computes exactly what it computes on the originals. It is for loops
    that apply the same frozen weights many times, such as beam search's decode steps: cast
    once before the loop, instead of all 135M (say) weights being read in float32 and
    rounded at every step, which on a CPU cost more than the bf16 arithmetic saved."""
    dtype = jnp.dtype(dtype)
    if dtype not in mixed.LOW_PRECISION:
        return params

    def cast(path, x):
        name = getattr(path[-1], "key", None) if path else None
        if name in ("kernel", "embedding") and x.dtype == jnp.float32:
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)


def to_bits(tree):
    """On a CPU backend, bf16 / fp16 leaves of `tree` as uint16 arrays holding the same
    bits, others as is; on other backends `tree` unchanged (their loops slice bf16 arrays
    natively, and a bitcast there could cost a relayout). See `scan_bits`."""
    if jax.default_backend() != "cpu":
        return tree

    def one(x):
        if hasattr(x, "dtype") and jnp.dtype(x.dtype) in mixed.LOW_PRECISION:
            return jax.lax.bitcast_convert_type(x, jnp.uint16)
        return x
    return jax.tree.map(one, tree)


def from_bits(tree, dtype):
    """The inverse of `to_bits` for a model computing in `dtype`: uint16 leaves are read
    as `dtype` (the model holds no genuine uint16 arrays)."""
    def one(x):
        if hasattr(x, "dtype") and x.dtype == jnp.uint16:
            return jax.lax.bitcast_convert_type(x, dtype)
        return x
    return jax.tree.map(one, tree)


def scan_bits(f, carry, xs, dtype):
    """`jax.lax.scan(f, carry, xs)` over xs that are not differentiated (frozen weights, KV
    caches) and may hold low-precision arrays as `to_bits` uint16: `f` sees them as `dtype`,
    and the low-precision arrays it stacks come back as bits (on a CPU; elsewhere this is
    `jax.lax.scan`).

    Why: XLA's CPU backend does not slice bf16 arrays natively in a loop. It converted every
    bf16 array a layer scan reads (the weights, the KV caches) to float32 before the loop
    and back inside it, at every call, which made a bf16 decode step slower than a float32
    one. Slices of uint16 arrays are plain copies. Callers that loop (beam search) keep
    their weights and caches as bits for the whole loop, so the bitcasts, which XLA also
    materialises, happen once."""
    def body(c, x):
        c, y = f(c, from_bits(x, dtype))
        return c, to_bits(y)
    return jax.lax.scan(body, carry, to_bits(xs))


def attention_bias(mask: jax.Array) -> jax.Array:
    """bool [B,T,S] -> additive float32 bias (0 / NEG_INF)."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def attention(config: DecoderConfig, q, k, v, bias):
    """Grouped-query attention. q [B,T,H,D]; k, v [B,S,K,D]; bias [B,T,S] float32, 0 where
    a query may attend and NEG_INF elsewhere (from `attention_bias`, built once per forward;
    adding it costs the backward pass nothing, unlike a select). Returns [B,T,H,D].

    q, k and v are moved head-major ([B, K, G, T, D], [B, K, S, D]) before the two
    products, so that each is a plain batched matmul over (b, k). Left to itself, XLA's CPU
    backend picked layouts for the token-major einsums that made attention's forward and
    backward about 1.3x slower at the SmolLM2-135M shape (B 8, T 224, 9/3 heads), in fp32
    and bf16; on other backends the transposes are layout choices XLA is free to fold."""
    if config.attention_impl != "einsum":
        return fused_attention(config, q, k, v, bias)
    B, T, H, D = q.shape
    K = config.num_kv_heads
    q = (q * (1.0 / math.sqrt(D))).astype(q.dtype).reshape(B, T, K, H // K, D)
    q = q.transpose(0, 2, 3, 1, 4)                                    # [B, K, G, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # [B, K, S, D]
    scores = mixed.einsum("bkgtd,bksd->bkgts", q, k, jnp.float32) + bias[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = mixed.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def fused_attention(config: DecoderConfig, q, k, v, bias):
    """`attention` through `jax.nn.dot_product_attention` (`config.attention_impl`: xla, or
    cudnn for cuDNN's fused kernel on an NVIDIA GPU), same shapes and the same bias. The
    cudnn kernel takes its bias in the compute dtype, so NEG_INF is clamped to that
    dtype's most negative finite value (-65504 in fp16), still far below any score. Only
    the xla path is tested here (against `attention` in float32, and bf16 against its
    float32 self); cudnn is untested without a GPU."""
    b = bias[:, None]                                                  # [B, 1, T, S]
    if config.attention_impl == "cudnn":
        b = jnp.maximum(b, jnp.finfo(q.dtype).min).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias=b,
                                        implementation=config.attention_impl)


def write_kv(cache_kv: tuple, k: jax.Array, v: jax.Array, index) -> tuple:
    """One layer's (k, v) cache [B, S, K, D] with the new k, v [B, T, K, D] at slot `index`."""
    ck, cv = cache_kv
    return (jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1),
            jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1))


def mlp(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
    return dense(p["down"], jax.nn.silu(dense(p["gate"], x)) * dense(p["up"], x))


def decoder_layer(config: DecoderConfig, p: dict, x: jax.Array, cos, sin, attend):
    """One pre-norm decoder layer with the weights `p` of one layer (`params["layers"]`
    indexed at a layer); returns (new hidden, what `attend` returned beside its output).

    `attend(q, k, v)` -> (attention output [B,T,H,D], extra): q [B,T,H,D] and k, v
    [B,T,K,D] are the new tokens' projections (RoPE applied to q and k); `attend` decides
    what they attend to (`apply`: themselves and the KV cache; beam search: a shared prompt
    cache and per-beam caches) and returns e.g. the updated cache as `extra`.
    """
    h = rms_norm(x, p["input_norm"]["scale"], config.rms_norm_eps)
    a = p["attn"]
    q = apply_rope(dense(a["q"], h), cos, sin)
    k = apply_rope(dense(a["k"], h), cos, sin)
    v = dense(a["v"], h)
    out, extra = attend(q, k, v)
    x = x + dense(a["o"], out, 2)
    x = x + mlp(p["mlp"], rms_norm(x, p["post_attn_norm"]["scale"], config.rms_norm_eps))
    return x, extra


def _split(a: jax.Array) -> tuple:
    return tuple(a[i] for i in range(a.shape[0]))


_unstack = jax.custom_vjp(_split)


def _unstack_fwd(a):
    return _split(a), None


def _unstack_bwd(_, grads):
    return (jnp.stack(grads),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


def unstack_layers(layers: Params, num_layers: int) -> list:
    """The stacked per-layer weights (leading axis = layer) as a list of per-layer trees.

    Same values as indexing `a[i]`, but the gradient is ONE stack of the per-layer
    cotangents. Plain indexing transposes to a zero-padded full-size tensor per layer,
    summed over the layers: on a CPU, XLA fuses that sum into a select per layer for every
    element of every stacked weight (30x the work at SmolLM2's depth).
    """
    leaves, treedef = jax.tree.flatten(layers)
    split = [_unstack(a) for a in leaves]
    return [jax.tree.unflatten(treedef, [s[i] for s in split]) for i in range(num_layers)]


# --------------------------------------------------------------------------- cache


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """Empty KV cache with room for `max_len` tokens per row.

    `mask[b, s]` says whether slot s of row b holds a real token; `index` is the next slot to
    write (shared by the batch: rows are left-padded); `next_pos[b]` the next position id.
    """
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
        "next_pos": jnp.zeros((batch,), jnp.int32),
    }


def cache_axes() -> dict:
    """Logical axes of the cache arrays (batch is sharded like the data)."""
    return {"k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
            "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
            "mask": ("batch", "cache_seq"), "index": (), "next_pos": ("batch",)}


def repeat_cache(cache: Cache, times: int) -> Cache:
    """Repeat each row `times` times (row b -> rows b*times .. b*times+times-1)."""
    rep = lambda x, ax: jnp.repeat(x, times, axis=ax)
    return {"k": rep(cache["k"], 1), "v": rep(cache["v"], 1), "mask": rep(cache["mask"], 0),
            "index": cache["index"], "next_pos": rep(cache["next_pos"], 0)}


# --------------------------------------------------------------------------- apply


def constrain_batch(x: jax.Array) -> jax.Array:
    """Shard activations [batch, ...] over the mesh's batch axes when a mesh is set.

    Without it XLA follows the embedding table's layout (hidden dim over `fsdp`) and keeps
    every batch row on every device, multiplying activation memory by the fsdp size.
    A no-op outside `jax.set_mesh` or when the batch does not divide.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def embed_tokens(config: DecoderConfig, params: Params, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.take(params["embed"]["embedding"], ids, axis=0).astype(dtype)


def lm_head(config: DecoderConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits from final normed hidden states."""
    h2 = hidden.reshape(-1, hidden.shape[-1])  # one 2-D matmul (see dense)
    if config.tie_word_embeddings:
        w = params["embed"]["embedding"]
        out = mixed.einsum("nd,vd->nv", h2, w, jnp.float32)
    else:
        w = params["lm_head"]["kernel"]
        out = mixed.einsum("nd,dv->nv", h2, w, jnp.float32)
    return out.reshape(hidden.shape[:-1] + out.shape[-1:])


def apply(config: DecoderConfig, params: Params, input_ids: Optional[jax.Array] = None, *,
          inputs_embeds: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
          positions: Optional[jax.Array] = None, cache: Optional[Cache] = None,
          dtype: Any = jnp.float32, return_logits: bool = True):
    """Run the decoder.

    Args:
      input_ids: [batch, seq] token ids, or `inputs_embeds` [batch, seq, hidden].
      attention_mask: [batch, seq], 1 for real tokens (left or right padding).
      positions: [batch, seq] position ids; by default counted over real tokens, continuing
        from the cache.
      cache: from `init_cache`; the new tokens are written at `cache["index"]`.
      dtype: compute dtype (params stay float32 and are cast).
    Returns:
      (logits float32 [batch, seq, vocab] or None, final normed hidden [batch, seq, hidden],
       updated cache or None).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = embed_tokens(config, params, input_ids, dtype) if inputs_embeds is None else inputs_embeds.astype(dtype)
    x = constrain_batch(x)
    B, T = x.shape[:2]
    mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        start = cache["next_pos"][:, None] if cache is not None else 0
        positions = start + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cos, sin = rope_tables(config, positions, dtype)

    if cache is None:
        causal = jnp.tril(jnp.ones((T, T), bool))
        attn_mask = causal[None] & mask[:, None, :]
        index = None
    else:
        index = cache["index"]
        S = cache["mask"].shape[1]
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, index, axis=1)
        slot = jnp.arange(S)[None, :]
        query_slot = index + jnp.arange(T)[:, None]
        attn_mask = (slot <= query_slot)[None] & key_mask[:, None, :]

    attn_bias = attention_bias(attn_mask)

    def body(carry, xs):
        lp, kv = xs

        def attend(q, k, v):   # the new tokens and, with a cache, the cache they are written to
            if kv is None:
                return attention(config, q, k, v, attn_bias), None
            ck, cv = write_kv(kv, k, v, index)
            return attention(config, q, ck.astype(q.dtype), cv.astype(q.dtype), attn_bias), (ck, cv)
        return decoder_layer(config, lp, carry, cos, sin, attend)

    if config.remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    kv_in = (cache["k"], cache["v"]) if cache is not None else None
    if config.scan_layers:
        x, kv_out = jax.lax.scan(body, x, (params["layers"], kv_in))
    else:
        kv_layers = []
        per_layer = unstack_layers(params["layers"], config.num_layers)
        for i in range(config.num_layers):
            kv_i = None if kv_in is None else jax.tree.map(lambda a: a[i], kv_in)
            x, kv = body(x, (per_layer[i], kv_i))
            kv_layers.append(kv)
        kv_out = None if kv_in is None else jax.tree.map(lambda *a: jnp.stack(a), *kv_layers)
    hidden = rms_norm(x, params["final_norm"]["scale"], config.rms_norm_eps)

    new_cache = None
    if cache is not None:
        new_cache = {"k": kv_out[0], "v": kv_out[1], "mask": key_mask, "index": index + T,
                     "next_pos": cache["next_pos"] + mask.sum(axis=1).astype(jnp.int32)}
    logits = lm_head(config, params, hidden) if return_logits else None
    return logits, hidden, new_cache


def logits(config: DecoderConfig, params: Params, input_ids, attention_mask=None, dtype=jnp.float32) -> jax.Array:
    """float32 logits [batch, seq, vocab] for a (padded) batch of token ids."""
    out, _, _ = _logits_jit(config, params, jnp.asarray(input_ids),
                            None if attention_mask is None else jnp.asarray(attention_mask), dtype)
    return out


def _logits_impl(config, params, input_ids, attention_mask, dtype):
    return apply(config, params, input_ids, attention_mask=attention_mask, dtype=dtype)


_logits_jit = jax.jit(_logits_impl, static_argnums=(0, 4))
