"""The check that a stage's StepSpec (what `unclip-jax plan` compiles) is the step it trains."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def assert_spec_is_the_stage(spec, stage) -> None:
    """The spec's batch row is the pipeline's (shapes and the dtypes the devices get), its
    frozen inputs are the stage's, and both init the same params."""
    batch = next(stage.make_data(0, 1))
    rows = jax.tree.map(lambda a: (tuple(a.shape[1:]), jnp.asarray(a).dtype), batch)
    assert rows == _shapes(spec.batch_row)
    assert _shapes(stage.frozen) == _shapes(spec.frozen)
    # ... laid out alike: the same arrays shard by the same logical names.
    assert nn.get_partition_spec(stage.frozen_layout) == nn.get_partition_spec(spec.frozen_layout)
    key = jax.random.key(0)
    assert _shapes(jax.eval_shape(stage.init_params, key)) == _shapes(
        jax.eval_shape(spec.init_params, key)
    )
