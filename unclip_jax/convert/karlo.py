"""`unclip-jax convert karlo`: Karlo (kakaobrain/karlo-v1-alpha) in diffusers' layout -> our
stage directories, a CLIP text tower and a pipeline file that `unclip-jax sample` takes.

    unclip-jax convert karlo --src karlo-v1-alpha/ --out karlo-jax/
    unclip-jax sample --pipeline karlo-jax/pipeline.json --prompt "a cat" --out out/

SRC is a local `UnCLIPPipeline` directory (`save_pretrained`'s layout, or the Hub repository's
files): the folders `prior`, `text_proj`, `decoder`, `super_res_first`, `super_res_last`
(config.json + diffusion_pytorch_model.safetensors or .bin, sharded or not), `text_encoder`
(a transformers `CLIPTextModelWithProjection`), `tokenizer`, and `prior_scheduler`,
`decoder_scheduler`, `super_res_scheduler` (`UnCLIPScheduler` configs). OUT gets:

    clip/           the text tower in Hugging Face's layout (`clip.load_pretrained` reads it;
                    no vision tower, so image inputs need a whole CLIP, e.g. ViT-L/14's)
    prior/          stage directory: the `PriorTransformer` as our `DiffusionPrior`, and its
                    clip_mean / clip_std as the embedding statistics (prior_embedding.safetensors)
    decoder/        stage directory: `text_proj` + `decoder` as our `Decoder`
    upsampler/      stage directory: `super_res_first` and `super_res_last` (`LastStepUNets`)
    pipeline.json   names the four

Every config is derived from the diffusers config.json files, on top of our `karlo` variants
(`configs/*.py:karlo`): sizes from the model configs, the diffusion and x0 clipping from the
scheduler configs, and the sampling settings of `UnCLIPPipeline.__call__`'s defaults (25 prior
steps at guidance 4, 25 decoder steps at guidance 8, 7 super-res steps; one prior sample per
caption; method "karlo", UnCLIPScheduler's steps; the empty caption as guidance's
unconditional input). A config value our modules cannot express is a ConfigError naming the
file and key (a key diffusers 0.42 does not know included); a tensor missing, unused or of the
wrong shape is a CheckpointKeyError naming it. Parity with diffusers is proven by
`tests/test_karlo_convert.py` (modules to 1e-4, the whole pipeline to 1e-3).

The converter reads files with numpy, safetensors and `convert.torch_bin` (no torch). It needs
the repository's `configs/` (as the demo does). Importing this module loads no JAX (the
command line registers it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from safetensors.numpy import load_file

from unclip_jax.config import ConfigError, load_config
from unclip_jax.convert.diffusers_prior import prior_to_params
from unclip_jax.convert.diffusers_unet import CheckpointKeyError, decoder_to_params, unet_to_params
from unclip_jax.convert.hf_clip import hf_to_params
from unclip_jax.convert.torch_bin import read_torch_bin

__all__ = [
    "DECODER_DEFAULTS",
    "PRIOR_DEFAULTS",
    "SAMPLING",
    "SCHEDULER_DEFAULTS",
    "SUPER_RES_DEFAULTS",
    "TEXT_PROJ_DEFAULTS",
    "add_args",
    "convert_karlo",
    "decoder_config",
    "prior_config",
    "read_weights",
    "run",
    "upsampler_config",
]

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")

# UnCLIPPipeline.__call__'s defaults (diffusers 0.42): steps and guidance of each stage.
SAMPLING = {
    "prior": {"steps": "25", "guidance_scale": 4.0},
    "decoder": {"steps": "25", "guidance_scale": 8.0},
    "upsampler": {"steps": "7"},
}

# Every key of each diffusers class's config.json with its default (diffusers 0.42's signature;
# a key absent from a file takes it). A key not listed is refused: its meaning is unknown.
PRIOR_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}
TEXT_PROJ_DEFAULTS: dict[str, Any] = {
    "clip_extra_context_tokens": 4,
    "clip_embeddings_dim": 768,
    "time_embed_dim": None,  # required
    "cross_attention_dim": None,  # required
}
DECODER_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": None,  # diffusers' default is Stable Diffusion's, never Karlo's
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": None,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
SUPER_RES_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": None,
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": None,
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-05,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small_log",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "beta_schedule": "squaredcos_cap_v2",
}
# The values our modules express, for keys that are checked rather than read (any value of a
# key not named here or read below is accepted: dropout, the fp16-only upcast_attention, and
# the options of blocks Karlo's U-Nets do not have). A tuple lists the accepted values.
_DECODER_FIXED: dict[str, tuple[Any, ...]] = {
    "in_channels": (3,),
    "out_channels": (6,),
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DSimpleCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu",),
    "norm_eps": (1e-05,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": ("identity",),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("scale_shift",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
_SUPER_RES_FIXED: dict[str, tuple[Any, ...]] = {
    "in_channels": (6,),
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "freq_shift": (0,),
    "flip_sin_to_cos": (True,),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_padding": (1,),
    "act_fn": ("silu",),
    "norm_eps": (1e-05,),
    "add_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
_PRIOR_FIXED: dict[str, tuple[Any, ...]] = {
    "additional_embeddings": (4,),
    "time_embed_act_fn": ("silu",),
    "norm_in_type": (None,),
    "embedding_proj_norm_type": (None,),
    "encoder_hid_proj_type": ("linear",),
    "added_emb_type": ("prd",),
}
_VARIANCES = {"fixed_small_log": "fixed_small", "learned_range": "learned_range"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0"}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


# ---- reading the source -----------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def _read_one(path: str) -> dict[str, np.ndarray]:
    return load_file(path) if path.endswith(".safetensors") else read_torch_bin(path)


def read_weights(folder: str, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """{name: numpy array} of the model in `folder`: diffusers' diffusion_pytorch_model or
    transformers' model / pytorch_model, `.safetensors` preferred over `.bin`, single files or
    sharded ones (`*.index.json`); `variant` picks e.g. `*.fp16.safetensors`."""
    infix = f".{variant}" if variant else ""
    for ext in ("safetensors", "bin"):
        for stem in _WEIGHT_STEMS:
            single = os.path.join(folder, f"{stem}{infix}.{ext}")
            if os.path.isfile(single):
                return _read_one(single)
            # diffusers names a sharded variant's index `<stem>.<ext>.index.<variant>.json`.
            index = os.path.join(folder, f"{stem}.{ext}.index{infix}.json")
            if os.path.isfile(index):
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointKeyError(f"{index}: its weight_map names no file")
                tensors: dict[str, np.ndarray] = {}
                for name in shards:
                    tensors.update(_read_one(os.path.join(folder, name)))
                return tensors
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"no weights in {folder!r} (looked for diffusion_pytorch_model / model / pytorch_model"
        f"{infix} .safetensors or .bin, or their .index.json); it holds "
        f"{', '.join(present) or 'nothing'}"
    )


def _model_config(
    src: str, folder: str, defaults: Mapping[str, Any], class_names: tuple[str, ...]
) -> dict[str, Any]:
    """`folder`'s config.json (scheduler_config.json for a scheduler) over `defaults`: a
    ConfigError names a class other than `class_names` or a key diffusers does not know."""
    name = "scheduler_config.json" if folder.endswith("scheduler") else "config.json"
    path = os.path.join(src, folder, name)
    raw = _read_json(path)
    kind = raw.get("_class_name")
    if kind is not None and kind not in class_names:
        raise ConfigError(f"{path}: a {kind}; {folder} must be a {' or '.join(class_names)}")
    config = dict(defaults)
    for key, value in raw.items():
        if key.startswith("_"):
            continue  # diffusers' metadata: _class_name, _diffusers_version, _name_or_path
        if key not in defaults:
            raise ConfigError(
                f"{path}: config key {key!r} is not one diffusers' {kind or class_names[0]} "
                "knows (diffusers 0.42)"
            )
        config[key] = value
    config["_path"] = path
    return config


def _fail(config: Mapping[str, Any], key: str, why: str) -> ConfigError:
    """A ConfigError naming the config file, the key and its value, and why."""
    return ConfigError(f"{config['_path']}: config key {key!r} is {config[key]!r}: {why}")


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, tuple[Any, ...]]) -> None:
    """A ConfigError for the first key of `fixed` whose value is not one it accepts."""
    for key, accepted in fixed.items():
        value = config[key]
        if isinstance(value, list) and key in (
            "only_cross_attention",
            "transformer_layers_per_block",
        ):
            value = value[0] if len(set(map(repr, value))) == 1 else value
        if value not in accepted:
            shown = " or ".join(repr(a) for a in accepted)
            raise _fail(config, key, f"our modules express {shown} only")


def _one_value(config: Mapping[str, Any], key: str) -> Any:
    """A per-block value given as one value or a list of equal ones."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise _fail(config, key, "our U-Nets take one value for every block")
        return value[0]
    return value


def _channels(config: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    """(channels, channel_mult) of block_out_channels, which must be multiples of the first."""
    out = [int(c) for c in config["block_out_channels"]]
    if any(c % out[0] for c in out):
        raise _fail(config, "block_out_channels", "each must be a multiple of the first")
    return out[0], tuple(c // out[0] for c in out)


def _scheduler(src: str, folder: str) -> dict[str, Any]:
    """{'diffusion': {...}, 'clip_x0': float} of an `UnCLIPScheduler` config."""
    c = _model_config(src, folder, SCHEDULER_DEFAULTS, ("UnCLIPScheduler",))
    if c["beta_schedule"] != "squaredcos_cap_v2":
        raise _fail(c, "beta_schedule", "UnCLIPScheduler's schedule is squaredcos_cap_v2")
    if c["variance_type"] not in _VARIANCES:
        raise _fail(c, "variance_type", f"valid: {', '.join(_VARIANCES)}")
    if c["prediction_type"] not in _PREDICTIONS:
        raise _fail(c, "prediction_type", f"valid: {', '.join(_PREDICTIONS)}")
    return {
        "diffusion": {
            "schedule": "cosine",
            "num_steps": int(c["num_train_timesteps"]),
            "prediction": _PREDICTIONS[c["prediction_type"]],
            "variance": _VARIANCES[c["variance_type"]],
        },
        "clip_x0": float(c["clip_sample_range"]) if c["clip_sample"] else 0.0,
        "_path": c["_path"],
    }


# ---- configs ----------------------------------------------------------------------------------


def _stage(name: str, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    path = os.path.join(CONFIGS, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the converter needs the repository's configs/ (no {path})")
    return load_config(f"{path}:karlo", dict(overrides))


def _diffusion_overrides(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    return {f"diffusion.{k}": v for k, v in scheduler["diffusion"].items()}


def prior_config(
    prior: Mapping[str, Any], scheduler: Mapping[str, Any], clip: Any, clip_dir: str
) -> ml_collections.ConfigDict:
    """Our prior config for a `PriorTransformer` config, its scheduler's, and the CLIP."""
    _check_fixed(prior, _PRIOR_FIXED)
    dim = int(prior["embedding_dim"])
    width = int(prior["num_attention_heads"]) * int(prior["attention_head_dim"])
    for key, same in (
        ("time_embed_dim", width),
        ("embedding_proj_dim", dim),
        ("clip_embed_dim", dim),
    ):
        if prior[key] not in (None, same):
            raise _fail(prior, key, f"our prior needs {same} (or null)")
    _check_clip(prior, "embedding_dim", dim, clip)
    if prior["num_embeddings"] != clip.context_length:
        raise _fail(
            prior, "num_embeddings", f"the text encoder has {clip.context_length} positions"
        )
    if scheduler["diffusion"]["variance"] != "fixed_small":
        raise ConfigError(
            f"{scheduler['_path']}: the prior's variance_type must be fixed_small_log"
        )
    return _stage(
        "prior",
        {
            "model.clip_dim": dim,
            "model.width": width,
            "model.layers": int(prior["num_layers"]),
            "model.heads": int(prior["num_attention_heads"]),
            "model.text_tokens": int(prior["num_embeddings"]),
            "model.dropout": float(prior["dropout"]),
            "clip.dir": clip_dir,
            **_diffusion_overrides(scheduler),
            "sampling.clip_x0": scheduler["clip_x0"],
            **{f"sampling.{k}": v for k, v in SAMPLING["prior"].items()},
        },
    )


def _check_clip(config: Mapping[str, Any], key: str, value: int, clip: Any) -> None:
    """diffusers' unCLIP reads the text tower's states and its projection through Linears of
    this input width: both must be the CLIP's."""
    if value != clip.text.hidden_size or value != clip.projection_dim:
        raise _fail(
            config,
            key,
            f"the text encoder's hidden_size is {clip.text.hidden_size} and its projection_dim "
            f"{clip.projection_dim}; unCLIP needs both equal to it",
        )


def decoder_config(
    unet: Mapping[str, Any],
    text_proj: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    clip: Any,
    clip_dir: str,
) -> ml_collections.ConfigDict:
    """Our decoder config for the `decoder` and `text_proj` configs, their scheduler's, and
    the CLIP."""
    _check_fixed(unet, _DECODER_FIXED)
    channels, mult = _channels(unet)
    down, up = list(unet["down_block_types"] or []), list(unet["up_block_types"] or [])
    attends = {"SimpleCrossAttnDownBlock2D": True, "ResnetDownsampleBlock2D": False}
    if len(down) != len(mult) or any(b not in attends for b in down):
        raise _fail(unet, "down_block_types", f"one per level, each one of {', '.join(attends)}")
    mirrored = [
        "SimpleCrossAttnUpBlock2D" if attends[b] else "ResnetUpsampleBlock2D" for b in down[::-1]
    ]
    if up != mirrored:
        raise _fail(unet, "up_block_types", f"our U-Net mirrors the down blocks: {mirrored}")
    res = unet["sample_size"]
    if not isinstance(res, int):
        raise _fail(unet, "sample_size", "one int (a square image)")
    if text_proj["time_embed_dim"] != 4 * channels:
        raise _fail(text_proj, "time_embed_dim", f"the U-Net's is 4 x {channels}")
    if text_proj["cross_attention_dim"] != unet["cross_attention_dim"]:
        raise _fail(text_proj, "cross_attention_dim", "the decoder's must be the same")
    if unet["time_embedding_dim"] not in (None, 4 * channels):
        raise _fail(unet, "time_embedding_dim", f"our U-Net's is 4 x {channels}")
    _check_clip(text_proj, "clip_embeddings_dim", int(text_proj["clip_embeddings_dim"]), clip)
    if scheduler["diffusion"]["variance"] != "learned_range":
        raise ConfigError(
            f"{scheduler['_path']}: the decoder's variance_type must be learned_range"
        )
    return _stage(
        "decoder",
        {
            "model.resolution": res,
            "model.channels": channels,
            "model.channel_mult": mult,
            "model.num_res_blocks": int(_one_value(unet, "layers_per_block")),
            "model.attention_resolutions": tuple(
                res // 2**i for i, b in enumerate(down) if attends[b]
            ),
            "model.head_channels": int(_one_value(unet, "attention_head_dim")),
            "model.dropout": float(unet["dropout"]),
            "model.num_groups": int(unet["norm_num_groups"]),
            "model.clip_dim": int(text_proj["clip_embeddings_dim"]),
            "model.num_context_tokens": int(text_proj["clip_extra_context_tokens"]),
            "model.context_dim": int(unet["cross_attention_dim"]),
            "model.text_width": clip.text.hidden_size,
            "model.text_layers": clip.text.num_hidden_layers,
            "model.text_heads": clip.text.num_attention_heads,
            "model.text_tokens": clip.context_length,
            "model.vocab_size": clip.text.vocab_size,
            "clip.dir": clip_dir,
            **_diffusion_overrides(scheduler),
            "sampling.clip_x0": scheduler["clip_x0"],
            **{f"sampling.{k}": v for k, v in SAMPLING["decoder"].items()},
        },
    )


def upsampler_config(
    first: Mapping[str, Any],
    last: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    low_resolution: int,
) -> ml_collections.ConfigDict:
    """Our upsampler config (two U-Nets, `model.last_step_unet`) for the `super_res_first` and
    `super_res_last` configs, which must agree, their scheduler's, and the decoder's size."""
    for key in SUPER_RES_DEFAULTS:
        if first[key] != last[key]:
            raise _fail(last, key, f"super_res_first has {first[key]!r}; the two must agree")
    _check_fixed(first, _SUPER_RES_FIXED)
    channels, mult = _channels(first)
    if list(first["down_block_types"] or []) != ["ResnetDownsampleBlock2D"] * len(mult):
        raise _fail(first, "down_block_types", "our upsampler has ResnetDownsampleBlock2D only")
    if list(first["up_block_types"] or []) != ["ResnetUpsampleBlock2D"] * len(mult):
        raise _fail(first, "up_block_types", "our upsampler has ResnetUpsampleBlock2D only")
    learned = scheduler["diffusion"]["variance"] == "learned_range"
    if first["out_channels"] != (6 if learned else 3):
        raise _fail(
            first, "out_channels", f"with the scheduler's {scheduler['diffusion']['variance']}"
        )
    shift = {"default": False, "scale_shift": True}
    if first["resnet_time_scale_shift"] not in shift:
        raise _fail(first, "resnet_time_scale_shift", "valid: default, scale_shift")
    res = first["sample_size"]
    if not isinstance(res, int) or res % low_resolution:
        raise _fail(first, "sample_size", f"a multiple of the decoder's {low_resolution} px")
    return _stage(
        "upsampler",
        {
            "model.low_resolution": low_resolution,
            "model.resolution": res,
            "model.channels": channels,
            "model.channel_mult": mult,
            "model.num_res_blocks": int(first["layers_per_block"]),
            "model.dropout": float(first["dropout"]),
            "model.num_groups": int(first["norm_num_groups"]),
            "model.scale_shift": shift[first["resnet_time_scale_shift"]],
            "model.last_step_unet": True,
            "train_crop": low_resolution,
            "data.resolution": res,
            **_diffusion_overrides(scheduler),
            "sampling.clip_x0": scheduler["clip_x0"],
            **{f"sampling.{k}": v for k, v in SAMPLING["upsampler"].items()},
        },
    )


# ---- conversion -------------------------------------------------------------------------------


def _abstract(module: Any, inputs: Mapping[str, Any]) -> Any:
    """The param tree `module` initialises to, as ShapeDtypeStructs (no memory)."""
    import flax.linen as nn
    import jax

    from unclip_jax.models.builders import init_module

    return nn.meta.unbox(
        jax.eval_shape(functools.partial(init_module, module, inputs), jax.random.key(0))
    )


def convert_karlo(
    src: str,
    out: str,
    *,
    variant: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, str]:
    """Converts the diffusers `UnCLIPPipeline` directory `src` into `out` (see the module
    docstring); returns the paths written: {"clip", "prior", "decoder", "upsampler",
    "pipeline"}. `variant` reads e.g. the `fp16` weight files; params are float32 either way.

    Every config is checked before any weights are read; a stage directory is written only
    once its params convert. Raises FileNotFoundError (a folder or file missing), ConfigError
    (a config our modules cannot express, naming the file and key) or CheckpointKeyError (a
    tensor missing, unused or misshaped, named).
    """
    from unclip_jax.clip import ClipConfig, abstract_params, save_pretrained
    from unclip_jax.models.builders import (
        decoder_example_inputs,
        decoder_from_config,
        prior_example_inputs,
        prior_from_config,
        upsampler_example_inputs,
        upsampler_from_config,
    )
    from unclip_jax.models.clip_tokenizer import ClipTokenizer
    from unclip_jax.sampling.load import save_stage_dir
    from unclip_jax.training.prior_stage import STATS_FILE

    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src!r} is not a directory")
    index = os.path.join(src, "model_index.json")
    if os.path.isfile(index):
        kind = _read_json(index).get("_class_name")
        if kind != "UnCLIPPipeline":
            raise ConfigError(f"{index}: a {kind}, not an UnCLIPPipeline (Karlo's text-to-image)")
    paths = {name: os.path.join(out, name) for name in ("clip", "prior", "decoder", "upsampler")}
    clip_dir = os.path.abspath(paths["clip"])

    # ---- configs, all checked before any weights are read ----
    text_encoder = _read_json(os.path.join(src, "text_encoder", "config.json"))
    if text_encoder.get("model_type") != "clip_text_model":
        raise ConfigError(
            f"{os.path.join(src, 'text_encoder', 'config.json')}: model_type is "
            f"{text_encoder.get('model_type')!r}; Karlo's text encoder is a clip_text_model "
            "(CLIPTextModelWithProjection)"
        )
    clip = ClipConfig.from_hf_dict(text_encoder)
    tokenizer = ClipTokenizer.from_dir(os.path.join(src, "tokenizer"))
    if tokenizer.model_max_length not in (None, clip.context_length):
        raise ConfigError(
            f"{os.path.join(src, 'tokenizer')}: model_max_length is "
            f"{tokenizer.model_max_length}, the text encoder has {clip.context_length} positions"
        )
    prior = prior_config(
        _model_config(src, "prior", PRIOR_DEFAULTS, ("PriorTransformer",)),
        _scheduler(src, "prior_scheduler"),
        clip,
        clip_dir,
    )
    decoder = decoder_config(
        _model_config(src, "decoder", DECODER_DEFAULTS, ("UNet2DConditionModel",)),
        _model_config(src, "text_proj", TEXT_PROJ_DEFAULTS, ("UnCLIPTextProjModel",)),
        _scheduler(src, "decoder_scheduler"),
        clip,
        clip_dir,
    )
    upsampler = upsampler_config(
        _model_config(src, "super_res_first", SUPER_RES_DEFAULTS, ("UNet2DModel",)),
        _model_config(src, "super_res_last", SUPER_RES_DEFAULTS, ("UNet2DModel",)),
        _scheduler(src, "super_res_scheduler"),
        decoder.model.resolution,
    )

    def weights(folder: str) -> dict[str, np.ndarray]:
        return read_weights(os.path.join(src, folder), variant=variant)

    # ---- the CLIP text tower ----
    log(f"text_encoder -> {paths['clip']}")
    clip_params = hf_to_params(
        weights("text_encoder"), abstract_params(clip), source=os.path.join(src, "text_encoder")
    )
    save_pretrained(paths["clip"], clip, clip_params, tokenizer)

    # ---- the prior and its embedding statistics ----
    log(f"prior -> {paths['prior']}")
    module = prior_from_config(prior, vocab_size=clip.text.vocab_size)
    abstract = _abstract(module, prior_example_inputs(prior, text_width=clip.text.hidden_size))
    params, stats = prior_to_params(weights("prior"), abstract, source=os.path.join(src, "prior"))
    save_stage_dir(paths["prior"], prior, params, {STATS_FILE: stats})
    del params

    # ---- the decoder: text_proj + U-Net ----
    log(f"text_proj + decoder -> {paths['decoder']}")
    model = decoder.model.to_dict()
    module = decoder_from_config(model, eos_token_id=tokenizer.eos_id)
    abstract = _abstract(module, decoder_example_inputs(model))
    params = decoder_to_params(weights("decoder"), weights("text_proj"), abstract, source=src)
    save_stage_dir(paths["decoder"], decoder, params)
    del params

    # ---- the upsampler: super_res_first + super_res_last ----
    log(f"super_res_first + super_res_last -> {paths['upsampler']}")
    model = upsampler.model.to_dict()
    learned = upsampler.diffusion.variance == "learned_range"
    module = upsampler_from_config(model, learned_variance=learned)
    abstract = _abstract(module, upsampler_example_inputs(model))
    params = {
        name: unet_to_params(weights(name), abstract[name], source=os.path.join(src, name))
        for name in ("super_res_first", "super_res_last")
    }
    save_stage_dir(paths["upsampler"], upsampler, params)
    del params

    pipeline = os.path.join(out, "pipeline.json")
    with open(pipeline, "w", encoding="utf-8") as f:
        json.dump(
            {"clip": "clip", "prior": "prior", "decoder": "decoder", "upsamplers": ["upsampler"]},
            f,
            indent=2,
        )
    log(f"pipeline -> {pipeline}")
    return {**paths, "pipeline": pipeline}


# ---- the command line -------------------------------------------------------------------------


def add_args(parser: argparse.ArgumentParser) -> None:
    """`unclip-jax convert karlo --src DIR --out DIR [--variant fp16]`."""
    parser.add_argument(
        "format",
        choices=("karlo",),
        help="karlo: a diffusers UnCLIPPipeline directory (kakaobrain/karlo-v1-alpha)",
    )
    parser.add_argument("--src", required=True, help="the diffusers pipeline directory (local)")
    parser.add_argument(
        "--out",
        required=True,
        help="where to write clip/, prior/, decoder/, upsampler/ and pipeline.json",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="read the weight files of this variant (e.g. fp16: *.fp16.safetensors)",
    )


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Runs `convert`; returns the exit status (2 for a source it cannot convert)."""
    if overrides:
        raise ConfigError(f"convert takes no --config overrides (got {', '.join(overrides)})")
    try:
        written = convert_karlo(
            args.src, args.out, variant=args.variant, log=lambda m: print(m, file=sys.stderr)
        )
    except (FileNotFoundError, ValueError) as err:  # ConfigError, CheckpointKeyError
        print(f"unclip-jax convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written['pipeline']}: unclip-jax sample --pipeline {written['pipeline']} ...")
    return 0
