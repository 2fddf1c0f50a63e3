"""Hugging Face CLIP checkpoints <-> our CLIP params, by renaming (safetensors only, no torch).

transformers' names map onto ours mechanically: `layers.3` <-> `layers_3`; a Linear or
projection `weight` (out, in) <-> Dense `kernel` (in, out); the patch Conv `weight` (O, I, H, W)
<-> `kernel` (H, W, I, O); LayerNorm `weight` <-> `scale`; Embedding `weight` <-> `embedding`;
`class_embedding` and `logit_scale` keep their names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# Buffers transformers may store that are not parameters.
IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_NORMS = ("layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm")


class CheckpointKeyError(ValueError):
    """A tensor missing from, unused by or mis-shaped for the model, named in the message."""


def hf_to_path(key: str, ndim: int) -> tuple[tuple[str, ...], str]:
    """(our param path, how to transform the tensor: 'kernel', 'conv', 'none') for an HF key."""
    key = _LAYER.sub(lambda m: f".layers_{m.group(1)}.", key)
    *parents, leaf = key.split(".")
    if leaf in ("class_embedding", "logit_scale"):
        return (*parents, leaf), "none"
    owner = parents[-1] if parents else ""
    if leaf == "bias":
        return (*parents, "bias"), "none"
    if leaf != "weight":
        raise CheckpointKeyError(f"unexpected tensor {key!r}")
    if owner in _NORMS:
        return (*parents, "scale"), "none"
    if owner in ("token_embedding", "position_embedding"):
        return (*parents, "embedding"), "none"
    if ndim == 4:
        return (*parents, "kernel"), "conv"
    return (*parents, "kernel"), "kernel"


def path_to_hf(path: tuple[str, ...]) -> tuple[str, str]:
    """(HF key, transform) for one of our param paths: the inverse of `hf_to_path`."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path]
    *parents, leaf = parts
    owner = parents[-1] if parents else ""
    if leaf in ("class_embedding", "logit_scale", "bias"):
        return ".".join(parts), "none"
    if leaf in ("scale", "embedding"):
        return ".".join([*parents, "weight"]), "none"
    return ".".join([*parents, "weight"]), "conv" if owner == "patch_embedding" else "kernel"


def _to_ours(value: np.ndarray, transform: str) -> np.ndarray:
    if transform == "kernel":
        return value.T
    if transform == "conv":
        return value.transpose(2, 3, 1, 0)
    return value


def _to_hf(value: np.ndarray, transform: str) -> np.ndarray:
    if transform == "kernel":
        return value.T
    if transform == "conv":
        return value.transpose(3, 2, 0, 1)
    return value


def flatten_paths(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], Any]:
    """{path tuple: leaf}; flax's LogicallyPartitioned boxes are opened (their value)."""
    out: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_paths(value, (*prefix, name)))
        else:
            out[(*prefix, name)] = value.unbox() if hasattr(value, "unbox") else value
    return out


def unflatten_paths(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """The nested tree of {path tuple: leaf} (the inverse of `flatten_paths`)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def hf_to_params(
    tensors: Mapping[str, np.ndarray], expected: Mapping[str, Any], *, source: str = "checkpoint"
) -> dict[str, Any]:
    """Our params from HF tensors, checked against `expected` (a tree of shapes/structs).

    Raises CheckpointKeyError naming a tensor that the model lacks, one the checkpoint lacks,
    or one whose shape differs.
    """
    wanted = flatten_paths(expected)
    found: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in tensors.items():
        if IGNORED_KEYS.search(key):
            continue
        value = np.asarray(value)
        path, transform = hf_to_path(key, value.ndim)
        if path not in wanted:
            raise CheckpointKeyError(f"{source}: tensor {key!r} is not used by this CLIP config")
        value = _to_ours(value, transform)
        shape = tuple(wanted[path].shape)
        if value.shape != shape:
            raise CheckpointKeyError(
                f"{source}: tensor {key!r} has shape {_to_hf(value, transform).shape}, the config "
                f"needs {_to_hf(np.zeros(shape), transform).shape}"
            )
        found[path] = value
    missing = [path_to_hf(p)[0] for p in wanted if p not in found]
    if missing:
        raise CheckpointKeyError(
            f"{source}: tensor {missing[0]!r} is missing ({len(missing)} in all)"
        )
    return unflatten_paths(found)


def params_to_hf(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """HF-named tensors (contiguous float32 numpy) from our params, for model.safetensors."""
    out = {}
    for path, value in flatten_paths(params).items():
        key, transform = path_to_hf(path)
        out[key] = np.array(
            _to_hf(np.asarray(value, np.float32), transform), order="C"
        )  # 0-d stays 0-d
    return out
