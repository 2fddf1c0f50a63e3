"""Host-local batches -> global arrays sharded over the mesh's batch axes."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.parallel.rules import BATCH_SPEC


def batch_sharding(mesh: Mesh, spec: PartitionSpec = BATCH_SPEC) -> NamedSharding:
    """The sharding of a global batch: the leading axis split over ('data', 'fsdp')."""
    return NamedSharding(mesh, spec)


@functools.lru_cache(maxsize=64)
def process_batch_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The rows of a global batch that this process's devices hold, as one contiguous slice.

    Raises ValueError when the devices of one process hold rows that are not one block of
    global_rows / process_count (e.g. the batch axes do not span the processes, so processes
    would have to feed the same rows): that mesh cannot take per-process data.
    """
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    ranges = sorted(
        {
            (i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
            for i in index_map.values()
        }
    )
    start, stop = ranges[0][0], ranges[-1][1]
    contiguous = all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    expected = global_rows // jax.process_count()
    if not contiguous or stop - start != expected:
        mesh = sharding.mesh
        raise ValueError(
            f"this process's devices hold rows {ranges} of the global batch of {global_rows}, "
            f"not one block of {expected}: with {jax.process_count()} processes the batch axes "
            f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}) must be split "
            "across processes"
        )
    return slice(start, stop)


def global_batch(local_batch: Any, mesh: Mesh, spec: PartitionSpec = BATCH_SPEC) -> Any:
    """Builds global arrays from each process's share of the batch.

    Every process passes B / P rows (B the global batch, P the process count); they become the
    rows that process's devices hold (`process_batch_rows`), so the global batch is the
    processes' shares in process order.
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
        process_batch_rows(sharding, global_rows)  # raises for a mesh that cannot take it
        return jax.make_array_from_process_local_data(
            sharding, x, global_shape=(global_rows, *x.shape[1:])
        )

    return jax.tree.map(one, local_batch)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device of the mesh holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of `tree` as a global array held whole by every device of the mesh.

    Each process passes the same values (e.g. frozen weights every process read from the same
    checkpoint); works with one process or many.
    """
    return place(tree, replicated_sharding(mesh))


def place(tree: Any, shardings: Any) -> Any:
    """Every array leaf of `tree` as a global array laid out by `shardings` (one sharding for
    every leaf, or a tree of them); each process passes the same whole values and keeps the
    shards its devices hold."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)
