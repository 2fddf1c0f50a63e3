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
    param_paths,
    read_checkpoint_config,
    restore_subtrees,
    saved_state_metadata,
)
from unclip_jax.training.export import flatten_params, unflatten_params

STAGE_CONFIG = "config.json"
STAGE_PARAMS = "params.safetensors"
STAGES = ("prior", "decoder", "upsampler")


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


def read_stage(path: str, *, ema: bool = True, step: int | None = None) -> StageWeights:
    """The stage at `path` (a training workdir or a stage directory), params on the host.

    From a workdir, the EMA params (`ema=False`: the raw params) of `step` (default: the
    latest checkpoint). A path that is neither layout is a FileNotFoundError saying what it
    lacks.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"stage path {path!r} is not a directory")
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isdir(checkpoints):
        field = "ema_params" if ema else "params"
        with checkpoint_manager(checkpoints, read_only=True) as manager:
            shapes, step = saved_state_metadata(manager, step)
            config = read_checkpoint_config(manager, step)
        restored, step = restore_subtrees(checkpoints, {field: shapes[field]}, step)
        params = jax.tree.map(np.asarray, restored[field])
        return StageWeights(path, ml_collections.ConfigDict(config), params, step)
    config_file, params_file = os.path.join(path, STAGE_CONFIG), os.path.join(path, STAGE_PARAMS)
    if os.path.isfile(config_file) and os.path.isfile(params_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        return StageWeights(
            path, ml_collections.ConfigDict(config), unflatten_params(load_file(params_file)), None
        )
    raise FileNotFoundError(
        f"{path!r} holds no trained stage: expected a training workdir (checkpoints/) or a "
        f"stage directory ({STAGE_CONFIG} + {STAGE_PARAMS})"
    )


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
    have = {k: np.shape(v) for k, v in param_paths(weights.params).items()}
    want = {k: tuple(v.shape) for k, v in param_paths(abstract).items()}
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise ConfigError(
                f"the {weights.stage} params in {weights.path} do not fit its config: param "
                f"{name!r} is {have.get(name, 'absent')} there and "
                f"{want.get(name, 'absent')} in the model the config builds"
            )
