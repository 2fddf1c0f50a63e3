"""Layers shared by the diffusion models: PyTorch-default initialisation, a Dense and a
LayerNorm with logical axis names on every param."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

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
