"""The `decoder` stage: the unCLIP decoder P(x | z_i, y) trained on images and captions.

z_i (and, for a Karlo-style decoder, the caption's states) come from a frozen CLIP read from
`clip.dir` (a pretrained Hugging Face CLIP or WORKDIR/clip of our own `clip` stage), computed
inside the train step from the batch's CLIP pixels and tokens, so any image-text dataset
trains the decoder without a separate embedding pass. Where that pass was made anyway (the
prior's shards, `unclip-jax embed`), `data.embeddings_dir` reads each example's z_i from it,
and `data.caption_states` encodes each distinct caption once at the start (for a dataset of
few distinct captions, like `shapes`): the step then runs no CLIP (on the `shapes` demo, 2
devices, the frozen CLIP was 6% of the step). Guidance training drops z_i (to the
learned null embedding) and the caption independently, at `guidance.*` rates. The EMA
model's guided samples on fixed test captions go to WORKDIR/samples and TensorBoard.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from unclip_jax import diffusion as D
from unclip_jax.clip import PretrainedClip, example_transform, load_pretrained
from unclip_jax.clip import abstract_params as abstract_clip_params
from unclip_jax.config import ABSENT_MEANS, ConfigError
from unclip_jax.data.embeddings import WithImageEmbeddings
from unclip_jax.data.images import resize, to_float
from unclip_jax.data.pipeline import dataset_spec, open_dataset
from unclip_jax.embed_job import check_shards_come_from, open_shards
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


def decoder_transform(
    clip: PretrainedClip,
    resolution: int,
    text_tokens: int,
    caption_states: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Any:
    """`transform(example, rng)`: an {"image", "caption"} example -> the decoder's batch row:
    "image" float32 [-1, 1] at `resolution`, "input_ids" and "text_mask" (the CLIP tokenizer,
    `text_tokens` long), and "clip_pixels" (the CLIP's preprocessing of the original image),
    or "z_i" where the example carries it (`data.embeddings.WithImageEmbeddings`); with
    `caption_states` (`caption_state_table`) also the caption's "text_embeds", "text_states"."""
    clip_inputs = example_transform(
        clip.tokenizer,
        clip.config,
        mean=clip.image_mean,
        std=clip.image_std,
        context_length=text_tokens,
    )

    def transform(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = {"image": to_float(resize(example["image"], (resolution, resolution)))}
        caption = str(example["caption"])
        if "z_i" in example:  # no CLIP pixels to make
            ids, mask = clip.tokenizer([caption], context_length=text_tokens)
            out.update(z_i=np.asarray(example["z_i"], np.float32), input_ids=ids[0])
            out["text_mask"] = mask[0].astype(bool)
        else:
            row = clip_inputs(example, rng)
            out.update(clip_pixels=row["pixels"], input_ids=row["input_ids"])
            out["text_mask"] = row["attention_mask"].astype(bool)
        if caption_states is not None:
            if caption not in caption_states:
                raise KeyError(f"caption {caption!r} is not in the table of caption states")
            out["text_embeds"], out["text_states"] = caption_states[caption]
        return out

    return transform


def caption_state_table(
    encode: Any,
    clip_params: Any,
    clip: PretrainedClip,
    captions: Sequence[str],
    text_tokens: int,
    batch_size: int = 256,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{caption: (text_embeds, text_states)} of each distinct caption, by the step's own
    `encode` (`decoder_conditioning`) with the frozen `clip_params`, tokenized as
    `decoder_transform` tokenizes: what the step would compute for it, computed once."""
    distinct = sorted(set(captions))
    run = jax.jit(encode)
    clip_params = jax.device_put(clip_params)  # once, not with every chunk
    table: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        ids, mask = clip.tokenizer(chunk, context_length=text_tokens)
        # z_i is not what is asked for; a placeholder keeps the image tower out of the pass.
        batch = {
            "input_ids": ids,
            "text_mask": mask.astype(bool),
            "z_i": np.ones((len(chunk), clip.config.projection_dim), np.float32),
        }
        cond = jax.device_get(run(clip_params, batch))
        for i, caption in enumerate(chunk):
            table[caption] = (cond["text_embeds"][i], cond["text_states"][i])
    return table


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
    """ShapeDtypeStructs of one row of the decoder's train batches (`decoder_transform`'s
    output for the config's `data.embeddings_dir` and `data.caption_states`)."""
    res, size, tokens = (
        config.model.resolution,
        clip_config.require_vision("the decoder (z_i of its training images)").image_size,
        config.model.text_tokens,
    )
    row = {
        "image": jax.ShapeDtypeStruct((res, res, 3), np.float32),
        "input_ids": jax.ShapeDtypeStruct((tokens,), np.int32),
        "text_mask": jax.ShapeDtypeStruct((tokens,), np.bool_),
    }
    if config.data.get("embeddings_dir", ABSENT_MEANS["data.embeddings_dir"]):
        row["z_i"] = jax.ShapeDtypeStruct((clip_config.projection_dim,), np.float32)
    else:
        row["clip_pixels"] = jax.ShapeDtypeStruct((size, size, 3), np.float32)
    if config.data.get("caption_states", ABSENT_MEANS["data.caption_states"]):
        dtype = COMPUTE_DTYPES[config.train.compute_dtype]
        width = clip_config.text.hidden_size
        row["text_embeds"] = jax.ShapeDtypeStruct((clip_config.projection_dim,), dtype)
        row["text_states"] = jax.ShapeDtypeStruct((tokens, width), dtype)
    return row


def check_precomputed(config: ml_collections.ConfigDict) -> None:
    """ConfigError when `data.caption_states` is asked for where it cannot be had: its
    captions are read from `data.embeddings_dir`, and only a decoder on CLIP's text reads
    caption states (one with its own caption transformer trains on the tokens)."""
    if not config.data.get("caption_states", ABSENT_MEANS["data.caption_states"]):
        return
    if not config.data.get("embeddings_dir", ABSENT_MEANS["data.embeddings_dir"]):
        raise ConfigError(
            "config key 'data.caption_states' is True but 'data.embeddings_dir' is empty: the "
            "distinct captions are read from the embedding shards' metadata"
        )
    if config.model.text_encoder != "clip":
        raise ConfigError(
            "config key 'data.caption_states' is True but 'model.text_encoder' is "
            f"{config.model.text_encoder!r}: only a decoder on CLIP's text reads caption states"
        )


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
    check_precomputed(config)
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
    check_precomputed(config)
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
    resolution, text_tokens = model_config["resolution"], model_config["text_tokens"]
    train_transform = transform = decoder_transform(clip, resolution, text_tokens)
    embeddings_dir = config.data.get("embeddings_dir", ABSENT_MEANS["data.embeddings_dir"])
    if embeddings_dir:
        shards = open_shards(embeddings_dir, "data.embeddings_dir", clip.config.projection_dim)
        check_shards_come_from(embeddings_dir, config.clip.dir)
        train_source = WithImageEmbeddings(train_source, shards)
        if config.data.get("caption_states", ABSENT_MEANS["data.caption_states"]):
            table = caption_state_table(
                step["encode"], clip_params, clip, shards.captions(), text_tokens
            )
            log.info("caption states of %d distinct captions computed once", len(table))
            train_transform = decoder_transform(clip, resolution, text_tokens, table)
    hooks = []
    if config.samples.every > 0:  # test captions: CLIP pixels, states computed as in sampling
        hooks.append(_sample_hook(config, step["decoder"], step["encode"], clip_params, transform))
    return Stage(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        make_data=functools.partial(stage_pipeline, config, train_source, train_transform),
        hooks=tuple(hooks),
        frozen={"clip": clip_params},
        frozen_layout={"clip": frozen_clip_layout(clip.config)},
    )
