"""The decoder as a Flax Linen module, for code that composes `nn.Module`s.

The computation is `decoder.apply` (and `latent.latent_forward`); this module only
declares the same parameter tree through Flax, each weight wrapped in
`nn.LogicallyPartitioned` with its logical axis names, so `nn.get_partition_spec` and
`nn.logical_to_mesh_sharding` place it on a mesh the usual Flax way. Unboxed, its
`params` collection is exactly the pytree the pure functions take.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import DecoderConfig


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _get_in(tree: dict, keys):
    """tree[keys[0]][keys[1]]..."""
    for k in keys:
        tree = tree[k]
    return tree


def _set_in(tree: dict, keys, value) -> None:
    """tree[keys[0]][keys[1]]... = value, creating the inner dicts."""
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


class LatentR3LM(nn.Module):
    """Qwen2 / Llama decoder (+ LatentRATT when `with_latent`; `latent_factors` K > 1 heads
    for factorised latents) as a Linen module."""

    config: DecoderConfig
    with_latent: bool = True
    dtype: Any = jnp.float32
    latent_factors: int = 1

    def _declare(self, shapes: dict, axes: dict, init_tree_fn, prefix: str = "") -> dict:
        values = None

        def leaf_init(path):
            def init(rng):
                nonlocal values
                if values is None:
                    values = init_tree_fn(rng)
                return _get_in(values, path)
            return init

        flat_shapes = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]
        out: dict = {}
        for path, _ in flat_shapes:
            keys = tuple(p.key for p in path)
            init = nn.with_logical_partitioning(leaf_init(keys), tuple(_get_in(axes, keys)))
            _set_in(out, keys, self.param(prefix + "/".join(keys), init))
        return out

    def setup(self):
        self.tree = self._params_tree()

    def _params_tree(self) -> dict:
        c = self.config
        params = self._declare(decoder.param_shapes(c), decoder.param_axes(c),
                               lambda rng: decoder.init_params(c, rng))
        if self.with_latent:
            params["latent"] = self._declare(
                latent.latent_param_shapes(c, self.latent_factors),
                latent.latent_param_axes(self.latent_factors),
                lambda rng: latent.init_latent_params(c, rng, factors=self.latent_factors),
                prefix="latent/")
        return params

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        """Same contract as `decoder.apply`: (logits f32, final hidden, new cache)."""
        return decoder.apply(self.config, self.tree, input_ids,
                             attention_mask=attention_mask, positions=positions, cache=cache,
                             dtype=self.dtype)

    def latent_forward(self, prompt_ids, prompt_mask, target_ids, target_mask,
                       num_thoughts: int = 1, latent_mode: str = "ratt"):
        """Prefix-cached LatentR³ forward: (target logits, latents)."""
        return latent.latent_forward(self.config, self.tree, prompt_ids, prompt_mask,
                                     target_ids, target_mask, num_thoughts=num_thoughts,
                                     latent_mode=latent_mode, dtype=self.dtype)


def unflatten_params(variables: dict) -> dict:
    """Flax `params` collection ('a/b/c' names, boxed) -> the nested pytree of decoder.apply."""
    flat = nn.meta.unbox(variables["params"])
    out: dict = {}
    for name, value in flat.items():
        _set_in(out, name.split("/"), value)
    return out
