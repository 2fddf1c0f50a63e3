"""diffusers' `PriorTransformer` (Karlo's diffusion prior) <-> our `DiffusionPrior` params.

Renaming only (numpy, no torch), as `diffusers_unet` does for the decoder: a numeric segment
joins its parent (`transformer_blocks.3.attn1.to_out.0` <-> `transformer_blocks_3/attn1/to_out_0`);
a Linear `weight` (out, in) <-> Dense `kernel` (in, out); a LayerNorm (`norm1`, `norm3`,
`norm_out`) `weight` <-> `scale`; `bias`, `positional_embedding` (1, L + 4, W) and
`prd_embedding` (1, 1, W) keep their names and layout. Two names differ beyond that: the GELU
projection of the feed-forward, `ff.net.0.proj` there, is `ff/net_0_proj` here (`ff.net.2` is
`ff/net_2`).

`clip_mean` and `clip_std` (each (1, D)) are not weights of the network: Karlo's pipeline
standardises z_i with them ((z - mean) / std into the prior's diffusion space, and back with
`post_process_latents`). `prior_to_params` returns them apart, as {"clip_mean": (D,),
"clip_std": (D,)} float32, the format of `unclip_jax.models.prior.fit_embedding_stats`, so a
caller stores them as the run's embedding statistics (normalization "standardize").

Karlo's prior (kakaobrain/karlo-v1-alpha, `prior`): `PriorTransformer(num_attention_heads=32,
attention_head_dim=64, num_layers=20, embedding_dim=768, num_embeddings=77,
additional_embeddings=4)`, i.e. our `DiffusionPrior(clip_dim=768, width=2048, layers=20,
heads=32, text_tokens=77)` fed caption states of width 768 (diffusers' `encoder_hidden_states_proj`
takes `embedding_dim` inputs). diffusers' other options (`norm_in_type`, `embedding_proj_norm_type`,
`time_embed_dim` != width, `added_emb_type=None`, as Kandinsky's and Shap-E's priors use) have
no counterpart here: their tensors are refused by name or by shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# The U-Net converter's generic pieces (private there, shared here on purpose): the rename of a
# Linear/bias key, its inverse, the (un)flattening of param trees and the kernel transposes.
from unclip_jax.convert.diffusers_unet import (
    _convert,
    _to_diffusers,
    diffusers_to_path,
    flatten_paths,
    path_to_diffusers,
)
from unclip_jax.convert.hf_clip import CheckpointKeyError

__all__ = [
    "STATS_KEYS",
    "CheckpointKeyError",
    "params_to_prior",
    "prior_key_to_path",
    "prior_path_to_key",
    "prior_to_params",
]

# The tensors of the state dict that are the embedding statistics, not params.
STATS_KEYS = ("clip_mean", "clip_std")
# LayerNorms, whose `weight` is our `scale` (diffusers' optional `norm_in` and
# `embedding_proj_norm` included, so that such a checkpoint is refused as "not used").
_NORMS = frozenset({"norm1", "norm3", "norm_out", "norm_in", "embedding_proj_norm"})
# Top-level parameters stored under their own name, kept as they are.
_PLAIN = frozenset({"positional_embedding", "prd_embedding"})
_BLOCK = re.compile(r"^transformer_blocks_(\d+)$")
_FF = re.compile(r"^net_(\d+)$")


def prior_key_to_path(key: str, ndim: int) -> tuple[tuple[str, ...], str]:
    """(our param path, transform: 'kernel' or 'none') for a `PriorTransformer` key.

    Raises CheckpointKeyError for a key that no rule covers (the statistics `clip_mean` and
    `clip_std` included: they are split off before this).
    """
    if key in _PLAIN:
        return (key,), "none"
    *parents, leaf = key.split(".")
    if leaf == "weight" and parents and parents[-1] in _NORMS:
        # The module path as diffusers_to_path renames it (through the norm's bias key).
        path, _ = diffusers_to_path(".".join([*parents, "bias"]), 1)
        return (*path[:-1], "scale"), "none"
    path, transform = diffusers_to_path(key, ndim)
    # diffusers' GELU module holds the feed-forward's first Linear: `net.0.proj` -> `net_0_proj`.
    merged: list[str] = []
    for seg in path:
        if seg == "proj" and merged and _FF.match(merged[-1]):
            merged[-1] = f"{merged[-1]}_proj"
        else:
            merged.append(seg)
    return tuple(merged), transform


def prior_path_to_key(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(diffusers key, transform) for one of our `DiffusionPrior` param paths: the inverse of
    `prior_key_to_path`."""
    if len(path) == 1 and path[0] in _PLAIN:
        return path[0], "none"
    segments = []
    for seg in path:
        block = _BLOCK.match(seg)
        if block:
            seg = f"transformer_blocks.{block.group(1)}"
        elif seg.startswith("net_"):
            seg = seg.replace("_", ".")  # net_0_proj -> net.0.proj, net_2 -> net.2
        segments.append(seg)
    return path_to_diffusers(tuple(segments), ndim)


def _stats(state_dict: Mapping[str, Any], clip_dim: int, source: str) -> dict[str, np.ndarray]:
    out = {}
    for key in STATS_KEYS:
        if key not in state_dict:
            raise CheckpointKeyError(f"{source}: tensor {key!r} is missing")
        value = np.asarray(state_dict[key], np.float32)
        if value.shape != (1, clip_dim):
            raise CheckpointKeyError(
                f"{source}: tensor {key!r} has shape {value.shape}, the prior needs {(1, clip_dim)}"
            )
        out[key] = np.ascontiguousarray(value[0])
    if not np.all(out["clip_std"] > 0):
        raise CheckpointKeyError(
            f"{source}: tensor 'clip_std' has {int(np.sum(out['clip_std'] <= 0))} entries <= 0 "
            "(an untrained PriorTransformer's zeros?): not usable as embedding statistics"
        )
    return out


def prior_to_params(
    state_dict: Mapping[str, Any], abstract: Mapping[str, Any], *, source: str = ""
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(our `DiffusionPrior` params, embedding stats) from a diffusers `PriorTransformer` state
    dict.

    `abstract` is the target param tree: arrays or ShapeDtypeStructs, boxed or not (e.g.
    `jax.eval_shape(prior.init, ...)["params"]`); it gives the expected paths, shapes and
    dtypes (tensors are cast to its leaves' dtypes). The stats are {"clip_mean": (D,),
    "clip_std": (D,)} float32, as `fit_embedding_stats` returns them. Raises
    CheckpointKeyError naming the first tensor that the prior does not use, the first whose
    shape differs (in diffusers' layout), or the first the checkpoint lacks; also when
    `clip_std` has an entry <= 0.
    """
    source = source or "diffusers prior"
    tensors = {k: v for k, v in state_dict.items() if k not in STATS_KEYS}
    params = _convert(tensors, abstract, source, "prior", prior_key_to_path, prior_path_to_key)
    wanted = flatten_paths(abstract)
    clip_dim = wanted[("proj_to_clip_embeddings", "bias")].shape[0]
    return params, _stats(state_dict, clip_dim, source)


def params_to_prior(
    params: Mapping[str, Any], stats: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """diffusers `PriorTransformer` tensors (contiguous float32 numpy) from our params.

    The inverse of `prior_to_params`: with `stats` ({"clip_mean", "clip_std"}, each (D,)) the
    result loads into the matching `PriorTransformer` with `load_state_dict(...,
    strict=True)` after `torch.from_numpy`. Without them `clip_mean` is zeros and `clip_std`
    ones, so that `post_process_latents` is the identity (a prior trained with the "constant"
    or "sqrt_dim" scaling has no per-dimension statistics to give).
    """
    out = {}
    for path, value in flatten_paths(params).items():
        value = np.asarray(value, np.float32)
        key, transform = prior_path_to_key(path, value.ndim)
        out[key] = np.ascontiguousarray(_to_diffusers(value, transform))
    clip_dim = out["proj_to_clip_embeddings.bias"].shape[0]
    if stats is None:
        stats = {
            "clip_mean": np.zeros(clip_dim, np.float32),
            "clip_std": np.ones(clip_dim, np.float32),
        }
    for key in STATS_KEYS:
        value = np.asarray(stats[key], np.float32).reshape(-1)
        if value.shape != (clip_dim,):
            raise ValueError(
                f"stats {key!r} has shape {value.shape}, the prior needs {(clip_dim,)}"
            )
        out[key] = np.ascontiguousarray(value[None])
    return out
