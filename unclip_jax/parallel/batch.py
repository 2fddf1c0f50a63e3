"""Host-local batches -> global arrays sharded over the mesh's batch axes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.parallel.rules import BATCH_SPEC


def batch_sharding(mesh: Mesh, spec: PartitionSpec = BATCH_SPEC) -> NamedSharding:
    """The sharding of a global batch: the leading axis split over ('data', 'fsdp')."""
    return NamedSharding(mesh, spec)


def global_batch(local_batch: Any, mesh: Mesh, spec: PartitionSpec = BATCH_SPEC) -> Any:
    """Builds global arrays from each process's slice of the batch.

    Every process passes its own rows (process i holds rows i*B/P ... (i+1)*B/P of the global
    batch of B); the result has the global batch on the leading axis.
    """
    sharding = batch_sharding(mesh, spec)
    num_shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def one(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % num_shards:
            raise ValueError(
                f"global batch of {global_rows} rows does not split over the {num_shards} "
                "data x fsdp shards of the mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local_batch)
