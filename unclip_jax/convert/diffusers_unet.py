"""diffusers' unCLIP U-Nets and text projection <-> our params, by renaming (numpy only, no torch).

Covers Karlo (kakaobrain/karlo-v1-alpha) in diffusers layout:
- `decoder` (`UNet2DConditionModel`) -> `unclip_jax.models.unet.UNet` ("unet" of a `Decoder`);
- `text_proj` (`UnCLIPTextProjModel`) -> `DecoderConditioning` ("text_proj" of a `Decoder`);
- `super_res_first` / `super_res_last` (`UNet2DModel`) -> an upsampler `UNet` with
  `scale_shift=False`.

diffusers' names map onto ours mechanically: a numeric segment joins its parent
(`down_blocks.1.attentions.0.to_out.0` <-> `down_blocks_1/attentions_0/to_out_0`); a Linear
`weight` (out, in) <-> Dense `kernel` (in, out); a Conv2d `weight` (O, I, kh, kw) <-> Conv
`kernel` (kh, kw, I, O); a GroupNorm/LayerNorm `weight` <-> `scale`; `bias` and
`learned_classifier_free_guidance_embeddings` keep their names and layout. Tensors are cast to
the dtype of the abstract tree's leaves.

Karlo's configs, as diffusers' `scripts/convert_kakao_brain_unclip_to_diffusers.py` builds them
(checked against that script and Karlo's original YAML/code; the Hub `config.json` files were
not read):
- decoder: `UNet(in_channels=3, out_channels=6, channels=320, channel_mult=(1, 2, 3, 4),
  num_res_blocks=3, attention_resolutions=(32, 16, 8), resolution=64, head_channels=64)`
  with `DecoderConditioning(clip_dim=768, time_embed_dim=1280, cross_dim=1536,
  num_extra_tokens=4)`: a rename, proven numerically at a tiny size by
  `tests/test_karlo_parity.py`.
- super_res_first / super_res_last: `UNet2DModel(in_channels=6, out_channels=3,
  layers_per_block=3, block_out_channels=(320, 640, 960, 1280), ResnetDownsampleBlock2D x 4,
  ResnetUpsampleBlock2D x 4, add_attention=False)` with diffusers' DEFAULT
  `resnet_time_scale_shift="default"`: Karlo's `SuperResUNetModel` leaves ADM's
  `use_scale_shift_norm` at False, so each resnet ADDS `time_emb_proj(SiLU(emb))` (C outputs)
  to h before norm2 instead of scaling and shifting norm2's output (2C outputs): our
  `UNet(scale_shift=False)` (`configs/upsampler.py:karlo`). A scale-shift upsampler refuses
  those checkpoints, naming the first resnet's `time_emb_proj.weight` ((C, 4C) there, (2C, 4C)
  here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# The layouts are torch's on both sides (Linear (out, in), Conv2d (O, I, kh, kw)): the same
# transforms as Hugging Face CLIP's.
from unclip_jax.convert.hf_clip import (
    CheckpointKeyError,
    _to_ours,
    flatten_paths,
    unflatten_paths,
)
from unclip_jax.convert.hf_clip import _to_hf as _to_diffusers

__all__ = [
    "CheckpointKeyError",
    "decoder_to_params",
    "diffusers_to_path",
    "params_to_text_proj",
    "params_to_unet",
    "path_to_diffusers",
    "text_proj_to_params",
    "unet_to_params",
]

# Modules whose `weight` is a norm's scale.
_NORMS = frozenset(
    {"norm1", "norm2", "group_norm", "conv_norm_out", "text_encoder_hidden_states_norm"}
)
# Parameters stored under their own name (no `weight`/`bias` leaf), kept as they are.
_PLAIN = frozenset({"learned_classifier_free_guidance_embeddings"})
# diffusers' ModuleLists, whose items are `name.N` there and `name_N` here (`linear_1` is a name).
_INDEXED = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$"
)


def diffusers_to_path(key: str, ndim: int) -> tuple[tuple[str, ...], str]:
    """(our param path, transform: 'kernel', 'conv' or 'none') for a diffusers key.

    `ndim` is the tensor's rank, which tells a Conv2d weight (4) from a Linear one (2).
    Raises CheckpointKeyError for a key that no rule covers.
    """
    segments: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and segments:
            segments[-1] = f"{segments[-1]}_{seg}"
        else:
            segments.append(seg)
    *parents, leaf = segments
    owner = parents[-1] if parents else ""
    if leaf in _PLAIN or leaf == "bias":
        return (*parents, leaf), "none"
    if leaf != "weight":
        raise CheckpointKeyError(f"unexpected tensor {key!r}")
    if owner in _NORMS:
        return (*parents, "scale"), "none"
    if ndim == 4:
        return (*parents, "kernel"), "conv"
    if ndim == 2:
        return (*parents, "kernel"), "kernel"
    raise CheckpointKeyError(f"tensor {key!r} of rank {ndim} is neither a Linear nor a Conv2d")


def path_to_diffusers(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(diffusers key, transform) for one of our param paths: the inverse of `diffusers_to_path`.

    `ndim` is the rank of our array (4 for a Conv kernel, 2 for a Dense kernel).
    """
    parts = []
    for seg in path:
        m = _INDEXED.match(seg)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else seg)
    *parents, leaf = parts
    if leaf in _PLAIN or leaf == "bias":
        return ".".join(parts), "none"
    key = ".".join([*parents, "weight"])
    if leaf == "scale":
        return key, "none"
    return key, "conv" if ndim == 4 else "kernel"


def _convert(
    state_dict: Mapping[str, Any],
    abstract: Mapping[str, Any],
    source: str,
    what: str,
    to_path: Any = None,
    to_key: Any = None,
) -> dict[str, Any]:
    """Our param tree from a diffusers state dict, by `to_path(key, ndim)` (default: the
    U-Net's `diffusers_to_path`) and, to name missing tensors, `to_key(path, ndim)` (default
    `path_to_diffusers`); errors name the first unused, misshaped or missing tensor."""
    to_path = to_path or diffusers_to_path
    to_key = to_key or path_to_diffusers
    wanted = flatten_paths(abstract)
    found: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        try:
            path, transform = to_path(key, value.ndim)
        except CheckpointKeyError as err:
            raise CheckpointKeyError(f"{source}: {err}") from None
        if path not in wanted:
            raise CheckpointKeyError(f"{source}: tensor {key!r} is not used by this {what}")
        target = wanted[path]
        shape = tuple(target.shape)
        value = _to_ours(value, transform)
        if value.shape != shape:
            raise CheckpointKeyError(
                f"{source}: tensor {key!r} has shape {_to_diffusers(value, transform).shape}, "
                f"the {what} needs {_to_diffusers(np.zeros(shape), transform).shape}"
            )
        dtype = getattr(target, "dtype", None)
        found[path] = np.ascontiguousarray(
            value if dtype is None else value.astype(dtype, copy=False)
        )
    missing = [to_key(p, len(wanted[p].shape))[0] for p in wanted if p not in found]
    if missing:
        raise CheckpointKeyError(
            f"{source}: tensor {missing[0]!r} is missing ({len(missing)} in all)"
        )
    return unflatten_paths(found)


def unet_to_params(
    state_dict: Mapping[str, np.ndarray], abstract: Mapping[str, Any], *, source: str = ""
) -> dict[str, Any]:
    """Our `UNet` params from a diffusers `UNet2DConditionModel` / `UNet2DModel` state dict.

    `abstract` is the target param tree: arrays or ShapeDtypeStructs, boxed or not (e.g.
    `jax.eval_shape(module.init, ...)["params"]`); it gives the expected paths, shapes and
    dtypes. `source` names the checkpoint in error messages. Returns a nested dict of numpy
    arrays. Raises CheckpointKeyError naming the first tensor that the U-Net does not use, the
    first whose shape differs (in diffusers' layout), or the first the checkpoint lacks.
    """
    return _convert(state_dict, abstract, source or "diffusers U-Net", "U-Net")


def text_proj_to_params(
    state_dict: Mapping[str, np.ndarray], abstract: Mapping[str, Any], *, source: str = ""
) -> dict[str, Any]:
    """Our `DecoderConditioning` params from a diffusers `UnCLIPTextProjModel` state dict.

    Same contract as `unet_to_params`; `abstract` is the "text_proj" subtree of a `Decoder`.
    """
    return _convert(state_dict, abstract, source or "diffusers text_proj", "text projection")


def decoder_to_params(
    unet_state_dict: Mapping[str, np.ndarray],
    text_proj_state_dict: Mapping[str, np.ndarray],
    abstract: Mapping[str, Any],
    *,
    source: str = "",
) -> dict[str, Any]:
    """A whole `Decoder`'s params ({"text_proj", "unet"}) from diffusers' two state dicts.

    `abstract` is the Decoder's param tree; one with other submodules (a caption encoder) is
    refused, Karlo's decoder reading a frozen CLIP text tower instead.
    """
    extra = sorted(set(abstract) - {"text_proj", "unet"})
    if extra:
        raise CheckpointKeyError(
            f"{source or 'diffusers decoder'}: the decoder has params {extra[0]!r} that a "
            "diffusers unCLIP decoder does not provide"
        )
    prefix = f"{source}: " if source else ""
    return {
        "text_proj": text_proj_to_params(
            text_proj_state_dict, abstract["text_proj"], source=f"{prefix}text_proj"
        ),
        "unet": unet_to_params(unet_state_dict, abstract["unet"], source=f"{prefix}decoder"),
    }


def params_to_unet(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """diffusers-named tensors (contiguous float32 numpy) from our `UNet` params.

    The inverse of `unet_to_params`: the result loads into the matching diffusers model with
    `load_state_dict(..., strict=True)` after `torch.from_numpy`.
    """
    out = {}
    for path, value in flatten_paths(params).items():
        value = np.asarray(value, np.float32)
        key, transform = path_to_diffusers(path, value.ndim)
        out[key] = np.ascontiguousarray(_to_diffusers(value, transform))
    return out


def params_to_text_proj(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """diffusers `UnCLIPTextProjModel` tensors from our `DecoderConditioning` params."""
    return params_to_unet(params)
