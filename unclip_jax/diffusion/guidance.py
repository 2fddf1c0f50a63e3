"""Classifier-free guidance: the conditional and unconditional halves in one batched call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian import split_output

Array = jax.Array
CondModelFn = Callable[[Array, Array, Any], Array]


def guided_model_fn(
    model_fn: CondModelFn,
    *,
    cond: Any,
    uncond: Any,
    scale: float | Array,
    variance: str = "fixed_small",
    min_t: int = 0,
) -> Callable[[Array, Array], Array]:
    """A `model_fn(x, t)` for the samplers that applies classifier-free guidance.

    `model_fn(x, t, c)` is the conditional model; `cond` and `uncond` are pytrees of
    conditioning with batch-first leaves (e.g. the caption's embedding and the learned null
    embedding). The model runs once on [x; x] with [cond; uncond], and the prediction is
    s * cond_out + (1 - s) * uncond_out (= uncond + s (cond - uncond), but exact at s = 0 and
    s = 1). Learned variance channels are taken from the conditional half, as GLIDE does.
    With `min_t` > 0 guidance applies only at timesteps t >= min_t, and rows below it take
    the conditional prediction: a guidance interval (Kynkaanniemi et al. 2024), since at low
    noise guidance no longer decides what is drawn and only distorts its detail.
    """
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

    def fn(x: Array, t: Array) -> Array:
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out_c, out_u = jnp.split(out, 2, axis=0)
        pred_c, var_c = split_output(out_c, variance=variance)
        pred_u, _ = split_output(out_u, variance=variance)
        guided = scale * pred_c + (1.0 - scale) * pred_u
        if min_t > 0:
            on = (t >= min_t).reshape((-1,) + (1,) * (guided.ndim - 1))
            guided = jnp.where(on, guided, pred_c)
        return guided if var_c is None else jnp.concatenate([guided, var_c], axis=-1)

    return fn
