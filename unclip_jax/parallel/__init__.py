"""Parallelism: the mesh, logical axis rules, multi-process start-up and global batches."""

from unclip_jax.parallel.batch import (
    batch_sharding,
    global_batch,
    place,
    replicate,
    replicated_sharding,
)
from unclip_jax.parallel.distributed import initialize_distributed
from unclip_jax.parallel.mesh import MESH_AXES, describe_mesh, make_mesh, resolve_mesh_shape
from unclip_jax.parallel.rules import (
    BATCH_SPEC,
    LOGICAL_AXIS_RULES,
    fit_spec,
    logical_partition_specs,
    logical_shardings,
)

__all__ = [
    "BATCH_SPEC",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "batch_sharding",
    "describe_mesh",
    "fit_spec",
    "global_batch",
    "initialize_distributed",
    "logical_partition_specs",
    "logical_shardings",
    "make_mesh",
    "place",
    "replicate",
    "replicated_sharding",
    "resolve_mesh_shape",
]
