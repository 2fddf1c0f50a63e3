"""Model config blocks (`configs/decoder.py`, `configs/upsampler.py`, `configs/prior.py`) ->
Flax modules.

One place turns a config's `model` block into a module and dummy inputs of its sizes, so the
training stages, the samplers, the parameter counts and the tests build the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.config import ABSENT_MEANS, CHOICES
from unclip_jax.models.clip import TextConfig, TextTransformer
from unclip_jax.models.prior import AutoregressivePrior, DiffusionPrior
from unclip_jax.models.unet import Decoder, DecoderConditioning, LastStepUNets, UNet

Array = jax.Array

TEXT_ENCODERS = CHOICES["model.text_encoder"]


def _unet_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        channels=model["channels"],
        channel_mult=tuple(model["channel_mult"]),
        num_res_blocks=model["num_res_blocks"],
        dropout=model["dropout"],
        num_groups=model.get("num_groups", 32),
        scale_shift=model.get("scale_shift", True),
        patch_size=int(model.get("patch_size", ABSENT_MEANS["model.patch_size"])),
        pixel_head=int(model.get("pixel_head", ABSENT_MEANS["model.pixel_head"])),
    )


def caption_transformer_config(model: Mapping[str, Any], eos_token_id: int | None) -> TextConfig:
    """GLIDE's caption transformer, in CLIP's text-tower architecture (MLP width 4x)."""
    return TextConfig(
        hidden_size=model["text_width"],
        intermediate_size=4 * model["text_width"],
        num_hidden_layers=model["text_layers"],
        num_attention_heads=model["text_heads"],
        vocab_size=model["vocab_size"],
        max_position_embeddings=model["text_tokens"],
        eos_token_id=model["vocab_size"] - 1 if eos_token_id is None else eos_token_id,
    )


def decoder_from_config(
    model: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    eos_token_id: int | None = None,
    remat: bool = False,
) -> Decoder:
    """The decoder of a `configs/decoder.py` model block.

    Out channels are 6 (mean and the learned-range variance interpolation). With
    text_encoder "transformer" the decoder owns a caption transformer that pools at
    `eos_token_id` (the tokenizer's end-of-text id; default vocab_size - 1); with "clip" it
    reads a CLIP text tower's outputs. `remat` (training's `train.remat`) rematerialises the
    U-Net's blocks and the caption transformer's layers; the params are the same either way.
    """
    if model["text_encoder"] not in TEXT_ENCODERS:
        raise ValueError(
            f"model.text_encoder {model['text_encoder']!r}: valid: {', '.join(TEXT_ENCODERS)}"
        )
    time_embed_dim = 4 * model["channels"]
    caption_encoder = None
    if model["text_encoder"] == "transformer":
        caption_encoder = TextTransformer(
            caption_transformer_config(model, eos_token_id), dtype, remat
        )
    return Decoder(
        unet=UNet(
            in_channels=decoder_input_channels(model),
            out_channels=6,
            attention_resolutions=tuple(model["attention_resolutions"]),
            head_channels=model["head_channels"],
            resolution=model["resolution"],
            # A key newer than some saved configs: absent means the U-Net without it.
            coord_channels=bool(model.get("coord_channels", ABSENT_MEANS["model.coord_channels"])),
            dtype=dtype,
            remat=remat,
            **_unet_fields(model),
        ),
        text_proj=DecoderConditioning(
            clip_dim=model["clip_dim"],
            time_embed_dim=time_embed_dim,
            cross_dim=model["context_dim"],
            num_extra_tokens=model["num_context_tokens"],
            dtype=dtype,
        ),
        caption_encoder=caption_encoder,
    )


def decoder_input_channels(model: Mapping[str, Any]) -> int:
    """The decoder U-Net's input channels: x_t's 3, and with `model.self_condition` the
    previous x0 estimate's 3 (`Decoder.self_conditioned`)."""
    return 6 if model.get("self_condition", ABSENT_MEANS["model.self_condition"]) else 3


def decoder_example_inputs(model: Mapping[str, Any], batch: int = 1) -> dict[str, Array]:
    """Zero inputs of the decoder's sizes (for `init` and shape checks), as keyword args."""
    res, length = model["resolution"], model["text_tokens"]
    inputs = dict(
        x=jnp.zeros((batch, res, res, decoder_input_channels(model))),
        t=jnp.zeros((batch,)),
        z_i=jnp.zeros((batch, model["clip_dim"])),
        text_mask=jnp.ones((batch, length), bool),
    )
    if model["text_encoder"] == "transformer":
        inputs["input_ids"] = jnp.zeros((batch, length), jnp.int32)
    else:
        inputs["text_embeds"] = jnp.zeros((batch, model["clip_dim"]))
        inputs["text_states"] = jnp.zeros((batch, length, model["text_width"]))
    return inputs


def upsampler_from_config(
    model: Mapping[str, Any],
    *,
    learned_variance: bool = False,
    dtype: Any = jnp.float32,
    remat: bool = False,
) -> UNet | LastStepUNets:
    """The attention-free upsampler U-Net of a `configs/upsampler.py` model block.

    Input: the noisy high-res image and the resized low-res one (6 channels,
    `unet.upsampler_input`); output 3 channels, or 6 with a learned-range variance. `remat`
    rematerialises its blocks in training (the same params). With `last_step_unet` (Karlo's
    super-res, imported), two such U-Nets: `LastStepUNets`, the second for the last step.
    """

    def unet() -> UNet:
        return UNet(
            in_channels=6,
            out_channels=6 if learned_variance else 3,
            attention_resolutions=(),
            mid_attention=False,
            resolution=model["resolution"],
            dtype=dtype,
            remat=remat,
            **_unet_fields(model),
        )

    if model.get("last_step_unet", False):
        return LastStepUNets(super_res_first=unet(), super_res_last=unet())
    return unet()


def upsampler_example_inputs(model: Mapping[str, Any], batch: int = 1) -> dict[str, Array]:
    """Zero inputs of the upsampler's full training size, as keyword args."""
    res = model["resolution"]
    return dict(x=jnp.zeros((batch, res, res, 6)), t=jnp.zeros((batch,)))


def prior_from_config(
    config: Mapping[str, Any], *, vocab_size: int, dtype: Any = jnp.float32, remat: bool = False
) -> DiffusionPrior | AutoregressivePrior:
    """The prior of a `configs/prior.py` config (its `kind`, `model` and `ar` blocks);
    `vocab_size` is the CLIP tokenizer's (the AR prior embeds the caption's ids itself);
    `remat` rematerialises its transformer blocks in training (the same params)."""
    model = config["model"]
    common = dict(
        width=model["width"],
        layers=model["layers"],
        heads=model["heads"],
        text_tokens=model["text_tokens"],
        dropout=model["dropout"],
        dtype=dtype,
        remat=remat,
    )
    if config["kind"] == "diffusion":
        return DiffusionPrior(clip_dim=model["clip_dim"], **common)
    if config["kind"] == "autoregressive":
        ar = config["ar"]
        return AutoregressivePrior(
            vocab_size=vocab_size,
            num_buckets=ar["num_buckets"],
            num_tokens=ar["pca_components"],
            **common,
        )
    raise ValueError(f"prior kind {config['kind']!r}: valid: diffusion, autoregressive")


def prior_example_inputs(
    config: Mapping[str, Any], *, text_width: int, batch: int = 1
) -> dict[str, Array]:
    """Zero inputs of the prior's sizes as keyword args; `text_width` is the CLIP text
    tower's (the diffusion prior reads its token states)."""
    model = config["model"]
    b, d, length = batch, model["clip_dim"], model["text_tokens"]
    if config["kind"] == "diffusion":
        return dict(
            x_t=jnp.zeros((b, d)),
            t=jnp.zeros((b,)),
            z_t=jnp.zeros((b, d)),
            text_states=jnp.zeros((b, length, text_width)),
            text_mask=jnp.ones((b, length), bool),
        )
    return dict(
        input_ids=jnp.zeros((b, length), jnp.int32),
        text_mask=jnp.ones((b, length), bool),
        z_t=jnp.zeros((b, d)),
        dot=jnp.zeros((b,), jnp.int32),
        tokens=jnp.zeros((b, config["ar"]["pca_components"]), jnp.int32),
    )


def init_module(module: Any, inputs: Mapping[str, Array], rng: Array) -> Any:
    """A module's boxed params (logical axis names kept) from keyword example inputs."""
    return module.init(rng, **inputs)["params"]
