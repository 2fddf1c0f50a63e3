"""Export a run's params (or EMA params) as one flat safetensors file."""

from __future__ import annotations

import os

import jax
import numpy as np
from safetensors.numpy import save_file

from unclip_jax.convert.hf_clip import unflatten_paths
from unclip_jax.training.checkpoint import (
    checkpoint_manager,
    param_paths,
    restore_subtrees,
    saved_state_metadata,
)


def flatten_params(params: dict) -> dict[str, np.ndarray]:
    """{'a/b/kernel': array}: param paths joined by '/', every param once, on the host."""
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in param_paths(params).items()}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """The params tree of a `flatten_params` dict (paths split at '/')."""
    return unflatten_paths({tuple(name.split("/")): value for name, value in flat.items()})


def export_params(workdir: str, out: str, *, step: int | None = None, ema: bool = False) -> int:
    """Writes the params (ema: the EMA params) of `step` (default: latest) to `out`; returns step.

    The file is written to a temporary name and renamed, so an existing `out` is never left
    half-written.
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints directory in workdir {workdir!r}")
    field = "ema_params" if ema else "params"
    with checkpoint_manager(directory, read_only=True) as manager:
        shapes, step = saved_state_metadata(manager, step)
    restored, step = restore_subtrees(directory, {field: shapes[field]}, step)
    flat = flatten_params(restored[field])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    save_file(flat, tmp, metadata={"step": str(step), "params": field})
    os.replace(tmp, out)
    return step
