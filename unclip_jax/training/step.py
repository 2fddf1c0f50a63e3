"""The one train step every stage shares: `(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unclip_jax.training.state import Params, TrainState

# A stage's loss: (params in the compute dtype, global batch, rng, frozen) -> (scalar loss,
# metrics); `frozen` is the stage's untrained inputs (e.g. the conditioning CLIP's params) or None.
LossFn = Callable[[Params, Any, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Metrics the step itself reports; a stage's loss_fn may not use these names.
RESERVED_METRICS = ("loss", "grad_norm", "lr")
# The metrics whose non-finite value stops a run (a stage's own metrics may be NaN, e.g. the
# mean loss of a timestep bucket no example fell in).
GUARDED_METRICS = ("loss", "grad_norm")


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Floating-point leaves of `tree` cast to `dtype`; other leaves unchanged."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    compute_dtype: str = "float32",
    lr_schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step function (jit it with shardings and donation; see `compile_train_step`).

    The step's rng is fold_in(state.rng, state.step), so a resumed run draws what an
    uninterrupted one does. The params are cast to the compute dtype before the loss (so FSDP
    gathers move half the bytes in bfloat16); stages build their modules with
    `dtype=compute dtype` so activations run in it too, and gradients reach the float32 params
    through the cast. Metrics are scalars or 1-D arrays (logged per element). If the loss or
    the gradient norm is not finite the state is returned unchanged, step included, so a NaN
    never reaches the params, the EMA or a checkpoint; the loop then stops the run.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"unknown compute dtype {compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}"
        )
    dtype = COMPUTE_DTYPES[compute_dtype]

    def step(
        state: TrainState, batch: Any, frozen: Any = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # Frozen inputs get no gradient; they come in the dtype the stage chose for them.
        frozen = jax.lax.stop_gradient(frozen)

        def objective(params: Params) -> tuple[jax.Array, dict[str, jax.Array]]:
            loss, metrics = loss_fn(cast_floats(params, dtype), batch, rng, frozen)
            return loss.astype(jnp.float32), metrics

        (loss, stage_metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        clash = sorted(set(stage_metrics) & set(RESERVED_METRICS))
        if clash:
            raise ValueError(f"a stage metric may not be called {clash[0]!r} (the step sets it)")
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, ema_decay),
            opt_state=opt_state,
        )
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        for name, value in stage_metrics.items():
            value = jnp.asarray(value, jnp.float32)
            if value.ndim > 1:
                raise ValueError(f"metric {name!r} has shape {value.shape}: use scalars or 1-D")
            metrics[name] = value
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, metrics

    return step


def compile_train_step(
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    state_shardings: TrainState,
    batch_sharding: Any,
    frozen_sharding: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`jax.jit` of `step(state, batch, frozen)` with the state's shardings in and out and the
    state donated; `frozen_sharding` (a sharding or a tree of them) lays out the frozen inputs
    (None: the step is called without them)."""
    if frozen_sharding is None:
        return jax.jit(
            lambda state, batch: step(state, batch),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, frozen_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
