"""Device mesh and the one table that places logical axes on it.

The model names every weight axis logically (`decoder.param_axes`); `LOGICAL_RULES` maps
those names to mesh axes. Changing the parallelism layout means editing this table or the
`mesh` section of the config, never the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from latentr3_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("latent", None),
    ("cache_seq", None),
    ("seq", None),
)


def mesh_shape(mesh_cfg, num_devices: Optional[int] = None) -> tuple:
    """(data, fsdp, tensor) sizes; one entry may be -1 = all remaining devices."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise InputError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise InputError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if n % fixed:
            raise InputError(f"mesh: {n} devices are not divisible by the fixed axes product {fixed}")
        sizes[free[0]] = n // fixed
    if int(np.prod(sizes)) != n:
        raise InputError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {n}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'tensor') sized from `cfg.mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies the helper does not know
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _rules_dict(rules) -> dict:
    return {name: target for name, target in rules}


def _axis_size(mesh: Mesh, target) -> int:
    names = (target,) if isinstance(target, str) else tuple(target)
    return int(np.prod([mesh.shape[n] for n in names]))


def logical_spec(axes: Sequence[Optional[str]], shape: Optional[Sequence[int]], mesh: Mesh,
                 rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for one array. A dim that the mesh axis does not divide is replicated,
    and a mesh axis is used at most once per array."""
    table = _rules_dict(rules)
    used: set = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        if shape is not None:
            # drop trailing mesh axes until the product divides the dim
            while names and shape[i] % _axis_size(mesh, names):
                names = names[:-1]
        if not names:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def is_axes(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_sharding(axes_tree, mesh: Mesh, shapes_tree=None, rules=LOGICAL_RULES):
    """NamedShardings for a tree of logical-axis tuples.

    `shapes_tree` (same tree: arrays, ShapeDtypeStructs or shape tuples) lets dims that a
    mesh axis does not divide fall back to replication; without it every rule applies.
    """
    if shapes_tree is None:
        return jax.tree.map(lambda ax: NamedSharding(mesh, logical_spec(ax, None, mesh, rules)),
                            axes_tree, is_leaf=is_axes)
    shape_of = lambda s: tuple(s) if isinstance(s, tuple) else tuple(s.shape)
    flat_axes, treedef = jax.tree.flatten(axes_tree, is_leaf=is_axes)
    flat_shapes = treedef.flatten_up_to(shapes_tree)
    return treedef.unflatten([
        NamedSharding(mesh, logical_spec(ax, shape_of(s), mesh, rules))
        for ax, s in zip(flat_axes, flat_shapes)])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_size_multiple(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the batch axes' device count)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
