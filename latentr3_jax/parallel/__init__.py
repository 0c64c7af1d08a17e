"""Device mesh, logical-axis sharding rules and multi-host start-up."""

from latentr3_jax.parallel.mesh import (LOGICAL_RULES, MESH_AXES, batch_sharding, batch_size_multiple,
                                        logical_sharding, logical_spec, make_mesh, mesh_shape,
                                        replicated)

__all__ = ["LOGICAL_RULES", "MESH_AXES", "batch_sharding", "batch_size_multiple", "logical_sharding",
           "logical_spec", "make_mesh", "mesh_shape", "replicated"]
