"""The `upsampler` stage: the attention-free diffusion upsamplers (64->256, 256->1024).

Each example is a random crop of `train_crop` pixels of the high-res image (1/4 of the target
size in the paper) and its degraded low-res view (`degradation.kind`: Gaussian blur for the
first stage, BSR for the second). The U-Net sees [x_t ; upsample(low)] and, being fully
convolutional, samples whole images at `model.resolution`: the EMA model's samples on test
images (downsampled without degradation, as the cascade feeds them) go to WORKDIR/samples and
TensorBoard as [bicubic | sample | original] rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from unclip_jax import diffusion as D
from unclip_jax.config import ConfigError
from unclip_jax.data.degradations import make_low_res
from unclip_jax.data.images import to_float
from unclip_jax.data.pipeline import dataset_spec, open_dataset, upsampler_views
from unclip_jax.models.builders import init_module, upsampler_example_inputs, upsampler_from_config
from unclip_jax.models.unet import upsampler_input
from unclip_jax.parallel import replicate
from unclip_jax.sampling.stages import upsampler_sampler
from unclip_jax.training.denoising import denoising_loss
from unclip_jax.training.samples import gather_to_host, write_sample_grid
from unclip_jax.training.stages import (
    Hook,
    HookContext,
    Stage,
    StepSpec,
    register_stage,
    register_step_spec,
    stage_pipeline,
)
from unclip_jax.training.step import COMPUTE_DTYPES

Array = jax.Array


def upsampler_scale(config: ml_collections.ConfigDict) -> int:
    """resolution / low_resolution, after checking the config's sizes agree: a ConfigError
    names a resolution that is not a multiple of the low one, a train_crop the scale and the
    U-Net's down-sampling do not divide, or a data.resolution other than model.resolution."""
    model = config.model
    scale, rest = divmod(model.resolution, model.low_resolution)
    if rest or scale < 2:
        raise ConfigError(
            f"config keys 'model.resolution' ({model.resolution}) and 'model.low_resolution' "
            f"({model.low_resolution}): the resolution must be an integer multiple (>= 2) of "
            "the low resolution"
        )
    levels = len(model.channel_mult)
    down = model.get("patch_size", 1) * 2 ** (levels - 1)
    multiple = math.lcm(scale, down)
    if config.train_crop % multiple or config.train_crop > model.resolution:
        raise ConfigError(
            f"config key 'train_crop' is {config.train_crop}: it must be at most "
            f"model.resolution ({model.resolution}) and a multiple of {multiple} (of the scale "
            f"{scale}, and of the U-Net's down-sampling patch_size 2**{levels - 1} = {down})"
        )
    if config.data.get("resolution", model.resolution) != model.resolution:
        raise ConfigError(
            f"config key 'data.resolution' is {config.data.resolution}, but the upsampler "
            f"trains towards model.resolution {model.resolution}: set them equal"
        )
    return scale


def _sample_hook(config: ml_collections.ConfigDict, unet: Any, scale: int) -> Hook:
    spec, kwargs = dataset_spec(config.data)
    sampler = upsampler_sampler(unet, config.diffusion, config.sampling, scale=scale)
    cache: dict[str, Any] = {}

    def run(ctx: HookContext) -> None:
        if not cache:
            test = open_dataset(spec, "test", **kwargs)
            high = [test[i]["image"] for i in range(min(len(test), config.samples.num))]
            low = [make_low_res(h, scale=scale, kind="none") for h in high]
            cache["low"] = np.stack([to_float(x) for x in low])
            cache["high"] = np.stack([to_float(x) for x in high])
            cache["low_on_mesh"] = replicate(cache["low"], ctx.mesh)
        key = jax.random.key(config.train.seed)
        images = gather_to_host(sampler(ctx.state.ema_params, cache["low_on_mesh"], key))
        low = cache["low"]
        bicubic = np.asarray(jax.image.resize(low, images.shape, method="bicubic"), np.float32)
        rows = np.stack([bicubic, images, cache["high"]], axis=1).reshape(-1, *images.shape[1:])
        labels = ["bicubic", "sample", "original"] * len(images)
        write_sample_grid(ctx, "upsampler", rows, labels, columns=3)
        return None

    return Hook("samples", config.samples.every, run)


def _upsampler_step(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The upsampler U-Net, its init and loss: what training and planning share."""
    model_config = config.model.to_dict()
    if model_config.get("last_step_unet", False):
        raise ConfigError(
            "config key 'model.last_step_unet' is True: a second U-Net for the last sampling "
            "step is for imported Karlo weights; training trains one U-Net (set it False)"
        )
    dtype = COMPUTE_DTYPES[config.train.compute_dtype]
    learned = config.diffusion.variance == "learned_range"
    unet = upsampler_from_config(
        model_config, learned_variance=learned, dtype=dtype, remat=config.train.get("remat", False)
    )
    sched = D.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)

    def loss_fn(params: Any, batch: Any, rng: Array, frozen: None) -> tuple:
        del frozen
        dropout_key, diffusion_key = jax.random.split(rng)
        low = batch["low"]

        def apply(x_t: Array, t: Array) -> Array:
            # Resized in float32 as at sampling, then cast to the compute dtype.
            return unet.apply(
                {"params": params},
                upsampler_input(x_t, low).astype(dtype),
                t,
                deterministic=False,
                rngs={"dropout": dropout_key},
            )

        return denoising_loss(
            apply, batch["high"], diffusion_key, sched=sched, diffusion=config.diffusion
        )

    init_params = functools.partial(init_module, unet, upsampler_example_inputs(model_config))
    return dict(unet=unet, init_params=init_params, loss_fn=loss_fn)


@register_step_spec("upsampler")
def upsampler_step_spec(config: ml_collections.ConfigDict, clip_config: None = None) -> StepSpec:
    """The upsampler's train step on `train_crop` crops (`upsampler_views`' rows)."""
    del clip_config
    scale = upsampler_scale(config)
    crop = config.train_crop
    return StepSpec(
        init_params=(step := _upsampler_step(config))["init_params"],
        loss_fn=step["loss_fn"],
        batch_row={
            "high": jax.ShapeDtypeStruct((crop, crop, 3), np.float32),
            "low": jax.ShapeDtypeStruct((crop // scale, crop // scale, 3), np.float32),
        },
    )


@register_stage("upsampler")
def build_upsampler_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> Stage:
    """An upsampler trained on degraded random crops, sampling whole images."""
    del workdir
    scale = upsampler_scale(config)
    model_config = config.model.to_dict()
    step = _upsampler_step(config)
    spec, kwargs = dataset_spec(config.data)
    train_source = open_dataset(spec, "train", **kwargs)
    size = train_source[0]["image"].shape[:2]
    if min(size) < model_config["resolution"]:
        raise ConfigError(
            f"the images of {spec} are {size[0]}x{size[1]}, smaller than model.resolution "
            f"{model_config['resolution']}: build the dataset at that resolution"
        )
    transform = upsampler_views(
        scale=scale,
        crop_fraction=config.train_crop / model_config["resolution"],
        kind=config.degradation.kind,
        blur_kernel_size=config.degradation.blur_kernel,
        blur_sigma=config.degradation.blur_sigma,
    )
    hooks = []
    if config.samples.every > 0:
        hooks.append(_sample_hook(config, step["unet"], scale))
    return Stage(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        make_data=functools.partial(stage_pipeline, config, train_source, transform),
        hooks=tuple(hooks),
    )
