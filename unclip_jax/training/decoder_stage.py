"""The `decoder` stage: the unCLIP decoder P(x | z_i, y) trained on images and captions.

z_i (and, for a Karlo-style decoder, the caption's states) come from a frozen CLIP read from
`clip.dir` (a pretrained Hugging Face CLIP or WORKDIR/clip of our own `clip` stage), computed
inside the train step from the batch's CLIP pixels and tokens, so any image-text dataset
trains the decoder without a separate embedding pass. Guidance training drops z_i (to the
learned null embedding) and the caption independently, at `guidance.*` rates. The EMA
model's guided samples on fixed test captions go to WORKDIR/samples and TensorBoard.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from unclip_jax import diffusion as D
from unclip_jax.clip import PretrainedClip, example_transform, load_pretrained
from unclip_jax.clip import abstract_params as abstract_clip_params
from unclip_jax.config import ConfigError
from unclip_jax.data.images import resize, to_float
from unclip_jax.data.pipeline import dataset_spec, open_dataset
from unclip_jax.models.builders import decoder_example_inputs, decoder_from_config, init_module
from unclip_jax.models.clip import CLIP, ClipConfig
from unclip_jax.models.clip import init_params as init_clip_params
from unclip_jax.parallel import replicate
from unclip_jax.sampling.stages import decoder_conditioning, decoder_sampler
from unclip_jax.training.denoising import denoising_loss
from unclip_jax.training.samples import write_sample_grid
from unclip_jax.training.stages import (
    Hook,
    HookContext,
    Stage,
    StepSpec,
    register_stage,
    register_step_spec,
    stage_pipeline,
)
from unclip_jax.training.step import COMPUTE_DTYPES, cast_floats

Array = jax.Array
log = logging.getLogger("unclip_jax.train")


def load_frozen_clip(config: ml_collections.ConfigDict) -> PretrainedClip:
    """The frozen CLIP of a stage config's `clip.dir` (the decoder's and the prior's
    conditioning), or an error naming the key or the path."""
    path = config.clip.dir
    if not path:
        raise ConfigError(
            "config key 'clip.dir' is empty: set it to a CLIP checkpoint directory (a "
            "pretrained Hugging Face CLIP, or WORKDIR/clip of `unclip-jax train --config "
            "configs/clip.py:...`)"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"clip.dir {path!r} is not a directory")
    return load_pretrained(path)


def check_clip_fits(
    model: Mapping[str, Any], clip_config: ClipConfig, vocab_size: int, path: str
) -> None:
    """ConfigError naming the first model key that disagrees with the CLIP at `path` (of
    `clip_config`, whose tokenizer has `vocab_size` tokens)."""
    c = clip_config
    wanted = {"clip_dim": c.projection_dim}
    if model["text_encoder"] == "clip":
        wanted.update(text_width=c.text.hidden_size, text_tokens=c.context_length)
    elif vocab_size > model["vocab_size"]:
        raise ConfigError(
            f"config key 'model.vocab_size' is {model['vocab_size']}, but the tokenizer of "
            f"{path} has {vocab_size} tokens"
        )
    for key, value in wanted.items():
        if model[key] != value:
            raise ConfigError(
                f"config key 'model.{key}' is {model[key]!r}, but the CLIP at {path} needs "
                f"{value!r} (its {'embedding width' if key == 'clip_dim' else 'text tower'})"
            )


def check_image_size(source: Any, clip_size: int, spec: str) -> None:
    """Warns when the dataset's images are smaller than the CLIP's input: z_i would then be
    the embedding of an upscaled image, not what a prior trained on real images predicts."""
    h, w = source[0]["image"].shape[:2]
    if min(h, w) < clip_size:
        log.warning(
            "the images of %s are %dx%d, smaller than the CLIP's %d px input: z_i will embed "
            "upscaled images (build the dataset at >= %d px for real runs)",
            spec,
            h,
            w,
            clip_size,
            clip_size,
        )


def decoder_transform(clip: PretrainedClip, resolution: int, text_tokens: int) -> Any:
    """`transform(example, rng)`: an {"image", "caption"} example -> the decoder's batch row:
    "image" float32 [-1, 1] at `resolution`, "clip_pixels" (the CLIP's preprocessing of the
    original image), "input_ids" and "text_mask" (the CLIP tokenizer, `text_tokens` long)."""
    clip_inputs = example_transform(
        clip.tokenizer,
        clip.config,
        mean=clip.image_mean,
        std=clip.image_std,
        context_length=text_tokens,
    )

    def transform(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        row = clip_inputs(example, rng)
        return {
            "image": to_float(resize(example["image"], (resolution, resolution))),
            "clip_pixels": row["pixels"],
            "input_ids": row["input_ids"],
            "text_mask": row["attention_mask"].astype(bool),
        }

    return transform


def _sample_hook(
    config: ml_collections.ConfigDict,
    decoder: Any,
    encode: Any,
    clip_params: Any,
    transform: Any,
) -> Hook:
    spec, kwargs = dataset_spec(config.data)
    sampler = decoder_sampler(
        decoder, config.diffusion, config.sampling, resolution=config.model.resolution
    )
    cache: dict[str, Any] = {}

    def run(ctx: HookContext) -> None:
        if not cache:
            test = open_dataset(spec, "test", **kwargs)
            examples = [test[i] for i in range(min(len(test), config.samples.num))]
            rows = [transform(e, None) for e in examples]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            # Encoded as in the step (frozen params in the compute dtype), then replicated on
            # the mesh beside the sharded EMA params.
            cond = jax.jit(encode)(clip_params, batch)
            cache["cond"] = replicate(jax.device_get(cond), ctx.mesh)
            cache["captions"] = [str(e["caption"]) for e in examples]
        images = sampler(ctx.state.ema_params, cache["cond"], jax.random.key(config.train.seed))
        write_sample_grid(ctx, "decoder", images, cache["captions"])
        return None

    return Hook("samples", config.samples.every, run)


def _decoder_step(
    config: ml_collections.ConfigDict, clip_config: ClipConfig, eos_token_id: int
) -> dict[str, Any]:
    """The decoder, its conditioning, init and loss: what training and planning share."""
    dtype = COMPUTE_DTYPES[config.train.compute_dtype]
    model_config = config.model.to_dict()
    decoder = decoder_from_config(
        model_config,
        dtype=dtype,
        eos_token_id=eos_token_id,
        remat=config.train.get("remat", False),
    )
    encode = decoder_conditioning(
        CLIP(clip_config, dtype=dtype),
        text_encoder=model_config["text_encoder"],
        unit_z_i=model_config.get("unit_z_i", True),
        z_i_norm=model_config.get("z_i_norm", 1.0),
    )
    sched = D.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
    guidance = config.guidance

    def loss_fn(params: Any, batch: Any, rng: Array, frozen: Any) -> tuple:
        cond = encode(frozen["clip"], batch)
        image_key, text_key, dropout_key, diffusion_key = jax.random.split(rng, 4)
        b = batch["image"].shape[0]
        # Guidance training: z_i -> the learned null embedding, the caption dropped (Sec. 2.1).
        drop_image = jax.random.bernoulli(image_key, guidance.clip_drop_prob, (b,))
        drop_text = jax.random.bernoulli(text_key, guidance.text_drop_prob, (b,))

        def apply(x_t: Array, t: Array) -> Array:
            return decoder.apply(
                {"params": params},
                x_t.astype(dtype),
                t,
                drop_image=drop_image,
                drop_text=drop_text,
                deterministic=False,
                rngs={"dropout": dropout_key},
                **cond,
            )

        return denoising_loss(
            apply,
            batch["image"],
            diffusion_key,
            sched=sched,
            diffusion=config.diffusion,
            self_condition=decoder.self_conditioned,
        )

    init_params = functools.partial(init_module, decoder, decoder_example_inputs(model_config))
    return dict(decoder=decoder, encode=encode, loss_fn=loss_fn, init_params=init_params)


def decoder_batch_row(config: ml_collections.ConfigDict, clip_config: ClipConfig) -> dict:
    """ShapeDtypeStructs of one row of the decoder's batches (`decoder_transform`'s output)."""
    res, size, tokens = (
        config.model.resolution,
        clip_config.require_vision("the decoder (z_i of its training images)").image_size,
        config.model.text_tokens,
    )
    return {
        "image": jax.ShapeDtypeStruct((res, res, 3), np.float32),
        "clip_pixels": jax.ShapeDtypeStruct((size, size, 3), np.float32),
        "input_ids": jax.ShapeDtypeStruct((tokens,), np.int32),
        "text_mask": jax.ShapeDtypeStruct((tokens,), np.bool_),
    }


def frozen_clip_layout(clip_config: ClipConfig) -> Any:
    """A frozen CLIP's params as boxed abstract leaves: sharded by their logical names in the
    train step, like trained params (ViT-H's billion params need not sit on every chip)."""
    return jax.eval_shape(functools.partial(init_clip_params, CLIP(clip_config)), jax.random.key(0))


def frozen_clip_spec(clip_config: ClipConfig, dtype: Any) -> Any:
    """ShapeDtypeStructs of a frozen CLIP's params as a stage holds them (in `dtype`)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, dtype), abstract_clip_params(clip_config)
    )


@register_step_spec("decoder", clip_conditioned=True)
def decoder_step_spec(config: ml_collections.ConfigDict, clip_config: ClipConfig) -> StepSpec:
    """The decoder's train step for a CLIP of `clip_config`, with no CLIP or data on disk."""
    check_clip_fits(config.model, clip_config, clip_config.text.vocab_size, "the planned CLIP")
    step = _decoder_step(config, clip_config, clip_config.text.eos_token_id)
    dtype = COMPUTE_DTYPES[config.train.compute_dtype]
    return StepSpec(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        batch_row=decoder_batch_row(config, clip_config),
        frozen={"clip": frozen_clip_spec(clip_config, dtype)},
        frozen_layout={"clip": frozen_clip_layout(clip_config)},
    )


@register_stage("decoder")
def build_decoder_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> Stage:
    """The decoder with the hybrid loss, guidance dropout and CLIP conditioning."""
    del workdir
    clip = load_frozen_clip(config)
    check_clip_fits(config.model, clip.config, clip.tokenizer.vocab_size, config.clip.dir)
    dtype = COMPUTE_DTYPES[config.train.compute_dtype]
    # A host copy in the compute dtype: the loop replicates it on the mesh.
    clip_params = cast_floats(jax.device_get(clip.params), dtype)
    model_config = config.model.to_dict()
    step = _decoder_step(config, clip.config, clip.tokenizer.eos_id)
    spec, kwargs = dataset_spec(config.data)
    train_source = open_dataset(spec, "train", **kwargs)
    check_image_size(
        train_source,
        clip.config.require_vision("the decoder (z_i of its training images)").image_size,
        spec,
    )
    transform = decoder_transform(clip, model_config["resolution"], model_config["text_tokens"])
    hooks = []
    if config.samples.every > 0:
        hooks.append(_sample_hook(config, step["decoder"], step["encode"], clip_params, transform))
    return Stage(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        make_data=functools.partial(stage_pipeline, config, train_source, transform),
        hooks=tuple(hooks),
        frozen={"clip": clip_params},
        frozen_layout={"clip": frozen_clip_layout(clip.config)},
    )
