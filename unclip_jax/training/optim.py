"""AdamW with the paper's knobs: warmup, constant or cosine decay, global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then constant or cosine decay to 0."""
    lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
    if optim["schedule"] == "constant":
        after = optax.constant_schedule(lr)
    elif optim["schedule"] == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
    else:
        raise ValueError(f"unknown lr schedule {optim['schedule']!r}; valid: constant, cosine")
    if warmup <= 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), after], boundaries=[warmup]
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and kernels only (ndim >= 2), not on biases, norms or scalars."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    optim: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip_by_global_norm -> AdamW, the lr schedule), from a config's `optim` block."""
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim["grad_clip"] and optim["grad_clip"] > 0:
        parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim["b1"]),
            b2=float(optim["b2"]),
            eps=float(optim["eps"]),
            weight_decay=float(optim["weight_decay"]),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
