"""Logical axis names -> mesh axes: the one table that decides how every param is sharded.

Model code names the logical axes of its params (`nn.with_logical_partitioning`); this table
maps them onto the mesh. FSDP shards the large "embed"/"channels" dimension of each weight
over `fsdp`; tensor parallelism splits "mlp"/"heads"/"vocab" over `tensor`; the batch spans
`data` and `fsdp`. A dimension that a mesh axis does not divide is left replicated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),  # model width of transformer weights
    ("mlp", "tensor"),  # hidden width of MLPs
    ("heads", "tensor"),  # attention heads
    ("kv", None),  # per-head width
    ("vocab", "tensor"),
    ("channels", "fsdp"),  # output channels of convolutions and their norms
    ("channels_in", None),  # input channels of convolutions
    ("conv_height", None),
    ("conv_width", None),
    ("length", None),  # sequence positions
    ("norm", None),
    # Activations (for nn.with_logical_constraint): the batch is sharded, nothing else. Models
    # pin activations at block boundaries so that XLA's propagation never shards a spatial
    # dimension: jax 0.10.2's SPMD partitioner miscompiles a convolution whose input is
    # sharded along H on the mesh axis that also shards the kernel's output channels
    # (tests/test_parallel.py keeps a reproducer).
    ("activation_length", None),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_embed", None),
    ("activation_channels", None),
)

BATCH_SPEC = PartitionSpec(("data", "fsdp"))
# Arrays of at least this many elements are worth a warning when they cannot be sharded as the
# rules ask (a replicated 1M-element array costs 4 MB on every device).
LARGE_PARAM = 1 << 20
log = logging.getLogger("unclip_jax.parallel")


def _shards(spec: PartitionSpec, mesh: Mesh) -> int:
    names = [n for axes in spec for n in ((axes,) if isinstance(axes, str) else (axes or ()))]
    return math.prod(mesh.shape[n] for n in names if n in mesh.shape)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` without the mesh axes that do not divide their dimension or have size 1."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept: list[str] = []
        size = 1
        for name in names:
            if mesh.shape[name] == 1:
                continue  # a size-1 axis shards nothing: leave it out of the spec
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return PartitionSpec(*fitted)


def logical_partition_specs(
    abstract_tree: Any, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES
) -> Any:
    """Mesh PartitionSpecs for a tree of (possibly `nn.LogicallyPartitioned`) leaves.

    Leaves without logical names (step counters, RNG keys, optimizer counts) are replicated;
    a logical name the rules do not know is an error (a typo would silently replicate).
    """
    logical = nn.get_partition_spec(abstract_tree)
    known = {name for name, _ in rules}
    for spec in jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for name in spec:
            if name is not None and name not in known:
                raise ValueError(
                    f"logical axis name {name!r} has no rule; known names: "
                    f"{', '.join(sorted(known))} (add it to LOGICAL_AXIS_RULES)"
                )
    mesh_specs = nn.logical_to_mesh(logical, rules)
    unboxed = nn.meta.unbox(abstract_tree)

    def fit(spec: PartitionSpec | None, leaf: Any) -> PartitionSpec:
        shape = getattr(leaf, "shape", ())
        spec = spec if spec is not None else PartitionSpec()
        fitted = fit_spec(spec, shape, mesh)
        size = math.prod(shape)
        if size >= LARGE_PARAM and _shards(fitted, mesh) < _shards(spec, mesh):
            log.warning(
                "a %s array stays less sharded than its rules ask (%s instead of %s): the mesh "
                "axes do not divide its dimensions",
                shape,
                fitted,
                spec,
            )
        return fitted

    return jax.tree.map(
        fit, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


def logical_shardings(
    abstract_tree: Any, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings for an abstract tree (e.g. `jax.eval_shape(init)`), per the rules."""
    specs = logical_partition_specs(abstract_tree, mesh, rules)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
