"""Training state: one pytree holding everything a resumed run needs on device."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from latentr3_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any
    rng: jax.Array           # uint32 [2] raw PRNG key; step i uses fold_in(rng, i)
    bad_steps: jax.Array     # int32 scalar: consecutive non-finite steps (0 after a good one)
    total_bad_steps: jax.Array  # int32 scalar: all skipped steps


def new_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jnp.asarray(rng, jnp.uint32), bad_steps=jnp.zeros((), jnp.int32),
                      total_bad_steps=jnp.zeros((), jnp.int32))


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def _match_param_shardings(tree, params, param_shardings, default):
    """Sharding for each leaf of an optimizer state: a leaf whose path ends with a param's
    path and has its shape (Adam moments) is sharded like that param."""
    table = {}
    for (path, p), (_, sh) in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves_with_path(param_shardings)):
        table[_dict_keys(path)] = (tuple(p.shape), sh)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = table.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return default
    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(abstract: TrainState, params_axes, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf: params by their logical axes, optimizer moments like
    the params they track, scalars and the RNG replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    p_sh = mesh_lib.logical_sharding(params_axes, mesh, abstract.params)

    o_sh = _match_param_shardings(abstract.opt_state, abstract.params, p_sh, rep)
    return TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep, bad_steps=rep,
                      total_bad_steps=rep)


def create_sharded_state(init_params: Callable[[jax.Array], Any], params_axes,
                         tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                         params: Optional[Any] = None):
    """Build the state directly in its sharded layout (never materialized on one device).

    `init_params(rng)` makes the params; or pass `params` (e.g. loaded from Hugging Face),
    which are placed onto their shardings first. Returns (state, shardings).
    """
    init_rng, state_rng = jax.random.split(jnp.asarray(rng, jnp.uint32))
    if params is None:
        make = lambda r: new_state(init_params(r), tx, state_rng)
        abstract = jax.eval_shape(make, init_rng)
        shardings = state_shardings(abstract, params_axes, tx, mesh)
        state = jax.jit(make, out_shardings=shardings)(init_rng)
    else:
        make = lambda p: new_state(p, tx, state_rng)
        abstract = jax.eval_shape(make, params)
        shardings = state_shardings(abstract, params_axes, tx, mesh)
        params = jax.device_put(params, shardings.params)
        state = jax.jit(make, in_shardings=(shardings.params,), out_shardings=shardings)(params)
    return state, shardings
