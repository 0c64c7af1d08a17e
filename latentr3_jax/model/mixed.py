"""Contractions for low-precision compute with float32 accumulation, forward and backward.

`einsum(spec, a, b)` is `jnp.einsum` for float32 operands. For bfloat16 / float16 operands
every contraction, including the two in its gradient, is a low-precision x low-precision
dot accumulated in float32 (`preferred_element_type=float32`) and rounded once to the
output dtype, which is what mixed-precision autocast does on GPUs and CPUs.

Why not plain `jnp.einsum` on bf16 arrays: XLA's CPU backend has no bf16 -> bf16 dot; it
converts both operands to float32 and runs a float32 dot, so bf16 compute ran *slower* than
float32 (the conversions come on top). A bf16 x bf16 -> f32 dot, on the other hand, runs
natively (AVX512-BF16 / AMX), several times faster than float32. Asking for float32
accumulation alone is not enough for training: JAX transposes the forward's output cast,
so the gradient dots receive float32 cotangents and fall back to the slow path. The
custom VJP below rounds the cotangent to the operand dtype first, so the backward dots
take the fast path too. On TPU and GPU the result is the usual bf16-with-f32-accumulate.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _parse(spec: str):
    ins, out = spec.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    for side, other in ((sa, sb), (sb, sa)):
        lonely = set(side) - set(other) - set(out)
        if lonely:  # summed over one operand only: its gradient is a broadcast, not an einsum
            raise ValueError(f"einsum {spec!r}: index {sorted(lonely)} appears in one operand only")
    return sa, sb, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _lowp_einsum(spec: str, a, b, bias, out_dtype):
    y = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def _lowp_fwd(spec, a, b, bias, out_dtype):
    return _lowp_einsum(spec, a, b, bias, out_dtype), (a, b, bias)


def _lowp_bwd(spec, out_dtype, res, g):
    a, b, bias = res
    sa, sb, out = _parse(spec)
    db_ = None
    if bias is not None:  # summed in float32 (a bf16 sum over many tokens loses bits)
        gf = g.astype(jnp.float32)
        db_ = gf.sum(axis=tuple(range(g.ndim - bias.ndim))).astype(bias.dtype)
    g = g.astype(a.dtype)
    da = _grad_einsum(f"{out},{sb}->{sa}", g, b)
    db = _grad_einsum(f"{sa},{out}->{sb}", a, g)
    return da.astype(a.dtype), db.astype(b.dtype), db_


def _grad_einsum(spec: str, x, y):
    """A gradient contraction, low precision in, float32 out.

    The weight gradient of a token matmul contracts the token axis, which leads both
    operands ('nk,nm->km'). XLA's CPU backend sends that form to a generic kernel without
    bf16 support, so it would upcast both operands to float32; with a size-1 axis put in
    front of both, the dot is canonicalised with one operand transposed (the one giving
    the output's first axis) and runs natively. When that operand is the large one (the
    lm head's [tokens, vocab] gradient), the transposed product is computed instead and
    only the small result is transposed back.
    """
    ins, out = spec.split("->")
    sx, sy = ins.split(",")
    if not (sx[0] == sy[0] and sx[0] not in out):
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
    z = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in spec)
    first, other = (x, y) if out[0] in sx else (y, x)
    out_size = int(np.prod([dict(zip(sx + sy, x.shape + y.shape))[c] for c in out]))
    if len(out) == 2 and first.size > other.size + 2 * out_size:
        swapped = jnp.einsum(f"{z}{sx},{z}{sy}->{out[::-1]}", x[None], y[None],
                             preferred_element_type=jnp.float32)
        # the barrier keeps XLA from folding the transpose back into the dot
        return jax.lax.optimization_barrier(swapped).T
    return jnp.einsum(f"{z}{sx},{z}{sy}->{out}", x[None], y[None],
                      preferred_element_type=jnp.float32)


_lowp_einsum.defvjp(_lowp_fwd, _lowp_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype: Optional[jnp.dtype] = None,
           bias: Optional[jax.Array] = None) -> jax.Array:
    """Two-operand einsum, plus an optional `bias` broadcast over the output's trailing
    dims. `b` is cast to `a`'s dtype; the result has `out_dtype` (default: `a`'s dtype).
    Low-precision operands accumulate in float32 (bias included) both ways."""
    b = b.astype(a.dtype)
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if a.dtype in LOW_PRECISION:
        _parse(spec)
        return _lowp_einsum(spec, a, b, bias, out_dtype)
    y = jnp.einsum(spec, a, b, preferred_element_type=out_dtype).astype(out_dtype)
    return y if bias is None else y + bias.astype(out_dtype)


def matmul(a: jax.Array, b: jax.Array, out_dtype: Optional[jnp.dtype] = None,
           bias: Optional[jax.Array] = None) -> jax.Array:
    """[n, k] @ [k, m] (+ bias [m]) with the same precision rules as `einsum`."""
    return einsum("nk,km->nm", a, b, out_dtype, bias)
