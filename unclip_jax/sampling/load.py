"""Trained stages from disk: a training workdir or an exported stage directory.

A stage is found at a path in one of two layouts:
- a training workdir (`unclip-jax train`): `checkpoints/` (orbax, with the config saved beside
  each step) and what the stage fitted at its start (the prior's `prior_embedding.safetensors`
  or `prior_codec.safetensors`);
- a stage directory (what weight converters write, `save_stage_dir`): `config.json` (the
  stage config), `params.safetensors` (the params, paths joined by '/') and the same fitted
  files.

Sampling reads what training wrote: this module imports `training.checkpoint` (and
`cascade` the stages' own checks of a CLIP against a config), the one place where `sampling`
looks up to `training`. The alternative, moving checkpoint reading below both, would split the
orbax layout over two rooms.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from unclip_jax.config import ConfigError
from unclip_jax.training.checkpoint import (
    checkpoint_manager,
    first_shape_mismatch,
    read_checkpoint_config,
    restore_subtrees,
    saved_state_metadata,
)
from unclip_jax.training.export import flatten_params, unflatten_params
from unclip_jax.training.prior_stage import CODEC_FILE, STATS_FILE

STAGE_CONFIG = "config.json"
STAGE_PARAMS = "params.safetensors"


@dataclasses.dataclass(frozen=True)
class StageWeights:
    """One trained stage: its config, its params (host arrays) and where they came from."""

    path: str
    config: ml_collections.ConfigDict
    params: Any
    step: int | None  # the checkpoint's step (None for a stage directory)

    @property
    def stage(self) -> str:
        """'prior', 'decoder' or 'upsampler' (the config's `stage`)."""
        return self.config.stage

    def file(self, name: str) -> str:
        """The path of a file the stage keeps beside its weights (e.g. the prior's codec)."""
        return os.path.join(self.path, name)


def _layout(path: str) -> str:
    """'workdir' or 'stage_dir', or a FileNotFoundError saying what `path` lacks."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"stage path {path!r} is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if all(os.path.isfile(os.path.join(path, f)) for f in (STAGE_CONFIG, STAGE_PARAMS)):
        return "stage_dir"
    raise FileNotFoundError(
        f"{path!r} holds no trained stage: expected a training workdir (checkpoints/) or a "
        f"stage directory ({STAGE_CONFIG} + {STAGE_PARAMS})"
    )


def read_stage_config(path: str) -> dict[str, Any]:
    """The config a stage was trained with, without reading its params (a workdir's latest
    checkpoint's, or a stage directory's config.json)."""
    if _layout(path) == "workdir":
        with checkpoint_manager(os.path.join(path, "checkpoints"), read_only=True) as manager:
            return read_checkpoint_config(manager)
    with open(os.path.join(path, STAGE_CONFIG), encoding="utf-8") as f:
        return json.load(f)


def read_stage(path: str, *, ema: bool = True, step: int | None = None) -> StageWeights:
    """The stage at `path` (a training workdir or a stage directory), params on the host.

    From a workdir, the EMA params (`ema=False`: the raw params) of `step` (default: the
    latest checkpoint). A path that is neither layout is a FileNotFoundError saying what it
    lacks.
    """
    if _layout(path) == "workdir":
        checkpoints = os.path.join(path, "checkpoints")
        field = "ema_params" if ema else "params"
        with checkpoint_manager(checkpoints, read_only=True) as manager:
            shapes, step = saved_state_metadata(manager, step)
            config = read_checkpoint_config(manager, step)
        restored, step = restore_subtrees(checkpoints, {field: shapes[field]}, step)
        params = jax.tree.map(np.asarray, restored[field])
        return StageWeights(path, ml_collections.ConfigDict(config), params, step)
    params = unflatten_params(load_file(os.path.join(path, STAGE_PARAMS)))
    config = ml_collections.ConfigDict(read_stage_config(path))
    return StageWeights(path, config, params, None)


# What a stage keeps beside its weights (the priors' fitted statistics and codec).
FITTED_FILES = (STATS_FILE, CODEC_FILE)


def export_stage_dir(
    workdir: str, out: str, *, ema: bool = True, step: int | None = None
) -> StageWeights:
    """Writes the stage of a training workdir as a stage directory (its config, its EMA or raw
    params of `step`, and the files it fitted), e.g. to ship it without the optimizer state."""
    weights = read_stage(workdir, ema=ema, step=step)
    files = {
        name: load_file(weights.file(name))
        for name in FITTED_FILES
        if os.path.isfile(weights.file(name))
    }
    save_stage_dir(out, weights.config, weights.params, files)
    return weights


def save_stage_dir(
    out: str,
    config: ml_collections.ConfigDict | dict[str, Any],
    params: Any,
    files: dict[str, dict[str, np.ndarray]] | None = None,
) -> None:
    """Writes a stage directory: the config, the params and fitted files ({name: arrays}),
    each to a temporary name first and then renamed, so nothing is ever half-written."""
    import flax.linen as nn

    os.makedirs(out, exist_ok=True)
    as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    writes = {STAGE_PARAMS: flatten_params(nn.meta.unbox(params)), **(files or {})}
    for name, arrays in writes.items():
        tmp = os.path.join(out, f".{name}.tmp-{os.getpid()}")
        save_file(arrays, tmp)
        os.replace(tmp, os.path.join(out, name))
    tmp = os.path.join(out, f".{STAGE_CONFIG}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(as_dict, f, indent=2, default=list)
    os.replace(tmp, os.path.join(out, STAGE_CONFIG))


def check_stage(weights: StageWeights, wanted: str, slot: str) -> None:
    """ConfigError when the stage at a pipeline slot is not the kind the slot needs."""
    if weights.stage != wanted:
        raise ConfigError(
            f"pipeline {slot} is {weights.path!r}, a {weights.stage} stage; {slot} needs a {wanted}"
        )


def check_params_fit(weights: StageWeights, abstract: Any) -> None:
    """ConfigError naming the first param whose presence or shape differs from what the
    stage's config builds (weights from another config, or a corrupt stage directory)."""
    mismatch = first_shape_mismatch(weights.params, abstract)
    if mismatch:
        name, there, built = mismatch
        raise ConfigError(
            f"the {weights.stage} params in {weights.path} do not fit its config: param "
            f"{name!r} is {there} there and {built} in the model the config builds"
        )
