"""A random-weight tiny cascade on disk: a CLIP, both priors, a decoder and an upsampler as
stage directories, and a pipeline file naming them, built from the `tiny` configs without
training (seconds)."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
from clip_fixture import ROOT, write_random_clip

from unclip_jax.clip import load_pretrained
from unclip_jax.config import load_config
from unclip_jax.models.builders import (
    decoder_example_inputs,
    decoder_from_config,
    init_module,
    prior_example_inputs,
    prior_from_config,
    upsampler_example_inputs,
    upsampler_from_config,
)
from unclip_jax.models.prior import unit_norm
from unclip_jax.models.prior_codec import codec_to_arrays, fit_codec
from unclip_jax.sampling.load import save_stage_dir


def _live(params, key, scale=0.05):
    """Params with noise added to every leaf: the U-Nets zero-initialise their output
    convolutions (ADM), which would make a fresh model's output blind to its inputs."""
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def write_random_cascade(root: str, seed: int = 0, decoder_noise: float = 0.01) -> str:
    """Writes ROOT/{clip, prior, prior_ar, decoder, upsampler} and ROOT/pipeline.json (the
    diffusion prior first, so it is the default); returns the pipeline file's path."""
    clip_dir = write_random_clip(os.path.join(root, "clip"), seed=seed)
    clip = load_pretrained(clip_dir)
    key = jax.random.key(seed)

    prior = load_config(f"{ROOT}/configs/prior.py:tiny", {"clip.dir": clip_dir})
    inputs = prior_example_inputs(prior, text_width=clip.config.text.hidden_size)
    module = prior_from_config(prior, vocab_size=clip.config.text.vocab_size)
    save_stage_dir(
        os.path.join(root, "prior"),
        prior,
        _live(init_module(module, inputs, jax.random.fold_in(key, 1)), key),
    )

    ar = load_config(
        f"{ROOT}/configs/prior.py:tiny", {"clip.dir": clip_dir, "kind": "autoregressive"}
    )
    module = prior_from_config(ar, vocab_size=clip.config.text.vocab_size)
    inputs = prior_example_inputs(ar, text_width=clip.config.text.hidden_size)
    rng = np.random.default_rng(seed)
    z_i, z_t = (np.asarray(unit_norm(rng.normal(size=(256, 16)))) for _ in range(2))
    codec = fit_codec(z_i, z_t, components=ar.ar.pca_components, num_buckets=ar.ar.num_buckets)
    save_stage_dir(
        os.path.join(root, "prior_ar"),
        ar,
        _live(init_module(module, inputs, jax.random.fold_in(key, 2)), key),
        files={"prior_codec.safetensors": codec_to_arrays(codec)},
    )

    decoder = load_config(f"{ROOT}/configs/decoder.py:tiny", {"clip.dir": clip_dir})
    model = decoder.model.to_dict()
    module = decoder_from_config(model, eos_token_id=clip.tokenizer.eos_id)
    params = init_module(module, decoder_example_inputs(model), jax.random.fold_in(key, 3))
    params = _live(params, jax.random.fold_in(key, 5), decoder_noise)
    save_stage_dir(os.path.join(root, "decoder"), decoder, params)

    upsampler = load_config(
        f"{ROOT}/configs/upsampler.py:tiny",
        {"model.low_resolution": 16, "model.resolution": 32, "sampling.steps": "3"},
    )
    model = upsampler.model.to_dict()
    learned = upsampler.diffusion.variance == "learned_range"
    module = upsampler_from_config(model, learned_variance=learned)
    params = init_module(module, upsampler_example_inputs(model), jax.random.fold_in(key, 4))
    params = _live(params, jax.random.fold_in(key, 6))
    save_stage_dir(os.path.join(root, "upsampler"), upsampler, params)

    pipeline = os.path.join(root, "pipeline.json")
    with open(pipeline, "w", encoding="utf-8") as f:
        json.dump(
            {
                "clip": "clip",
                "prior": {"diffusion": "prior", "ar": "prior_ar"},
                "decoder": "decoder",
                "upsamplers": ["upsampler"],
            },
            f,
        )
    return pipeline
