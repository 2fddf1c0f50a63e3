"""Layers shared by the diffusion models: PyTorch-default initialisation, a Dense, a LayerNorm
and a GroupNorm with logical axis names on every param."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Linear/Conv init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)),
# i.e. variance 1 / (3 fan_in). Matching it keeps a from-scratch run comparable to diffusers'.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    name: str,
    dtype: Any,
    zero_init: bool = False,
) -> nn.Dense:
    """A Dense (PyTorch init, or zeros) with logical names `axes` on its kernel, axes[1:] on
    its bias."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros if zero_init else torch_default_init, axes
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def layer_norm(name: str, dtype: Any, *, eps: float = 1e-5) -> nn.LayerNorm:
    """A LayerNorm (statistics in float32) with logical names on its scale and bias."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis, statistics in float32, params `scale` and
    `bias` of shape (C,) named ("norm",), as flax's `nn.GroupNorm` (same result, same params).

    With x reshaped to (B, N, C), N the positions, and g(c) the group of channel c (C / G
    channels each), n = N C / G:
        mean_g = sum_{p, c in g} x / n,   var_g = sum_{p, c in g} x^2 / n - mean_g^2
        y = (x - mean_g(c)) rsqrt(var_g(c) + eps) scale_c + bias_c
    Why not flax's: it reduces x viewed as (B, ..., G, C/G) over every axis but B and G, and
    on XLA's CPU backend those reductions (with their gradients) were the largest part of
    the `shapes` decoder's step. Summing over the positions first, one axis with the channels
    kept minor, then over each group's C / G channels (B x C numbers), makes that step about
    7% faster on 2 cores (benchmarks/group_norm.py).
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = None  # the output's; None: x's and the params' promoted

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm {self.name}: {channels} channels do not split into "
                f"{self.num_groups} groups"
            )
        per_group = channels // self.num_groups
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (channels,)
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (channels,)
        )
        batch = x.shape[0]
        flat = x.astype(jnp.float32).reshape(batch, -1, channels)
        count = flat.shape[1] * per_group

        def group_mean(values: jax.Array) -> jax.Array:  # (B, N, C) -> (B, C), per group
            sums = values.sum(axis=1).reshape(batch, self.num_groups, per_group).sum(-1)
            return jnp.repeat(sums / count, per_group, axis=-1)

        mean = group_mean(flat)
        var = jnp.maximum(group_mean(flat * flat) - mean * mean, 0.0)
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
        offset = bias - mean * multiplier
        y = flat * multiplier[:, None, :] + offset[:, None, :]
        dtype = self.dtype or jnp.result_type(x.dtype, scale.dtype)
        return y.reshape(x.shape).astype(dtype)
