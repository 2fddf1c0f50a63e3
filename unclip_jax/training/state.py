"""The train state pytree and its creation, already sharded, from the abstract state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.parallel import LOGICAL_AXIS_RULES, logical_partition_specs
from unclip_jax.parallel.rules import LogicalRules

Params = Any


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: a plain pytree (the optimizer itself is not in it).

    step counts the updates applied; rng is raw uint32 key data (folded in by step); params
    are float32 whatever the compute dtype; ema_params is the EMA of params.
    """

    step: jax.Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState
    rng: jax.Array


InitParams = Callable[[jax.Array], Params]


def _new_state(init_params: InitParams, tx: optax.GradientTransformation, seed: int) -> TrainState:
    init_key, run_key = jax.random.split(jax.random.key(seed))
    params = nn.meta.unbox(init_params(init_key))
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_key),
    )


def state_partition_specs(
    init_params: InitParams,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: LogicalRules = LOGICAL_AXIS_RULES,
) -> TrainState:
    """PartitionSpecs of every leaf of the train state, from the params' logical axis names.

    The optimizer state's moments take the specs of the params they track; its counters and
    the step and rng are replicated.
    """
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    unnamed = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )[0]
        if not isinstance(leaf, nn.LogicallyPartitioned)
    ]
    if unnamed:
        raise ValueError(
            f"param {unnamed[0]} has no logical axis names (wrap its initializer in "
            "nn.with_logical_partitioning): every param must say how it shards"
        )
    param_specs = logical_partition_specs(boxed, mesh, rules)
    abstract = jax.eval_shape(lambda: _new_state(init_params, tx, 0))
    opt_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        abstract.opt_state,
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return TrainState(
        step=PartitionSpec(),
        params=param_specs,
        ema_params=param_specs,
        opt_state=opt_specs,
        rng=PartitionSpec(),
    )


def state_shardings(specs: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings from a tree of PartitionSpecs."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def abstract_state(
    init_params: InitParams, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """ShapeDtypeStructs of the state, each with its sharding: the target of a restore."""
    abstract = jax.eval_shape(lambda: _new_state(init_params, tx, 0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def create_state(
    init_params: InitParams, tx: optax.GradientTransformation, shardings: TrainState, seed: int
) -> TrainState:
    """A fresh state, each array created directly in its shards (never whole on one device)."""
    return jax.jit(lambda: _new_state(init_params, tx, seed), out_shardings=shardings)()
