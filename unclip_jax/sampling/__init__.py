"""Sampling: each stage's reverse process from a config (`stages`), the whole cascade
(`cascade`), sharded generation to disk (`generate`), and the paper's manipulations
(`manipulate`: variations, inversion, interpolation, text diffs)."""

from unclip_jax.sampling.stages import (
    ar_prior_sampler,
    best_of_candidates,
    decoder_conditioning,
    decoder_inverter,
    decoder_sampler,
    inversion_sampling,
    prior_sampler,
    prior_text_conditioning,
    sampling_schedule,
    top_p_logits,
    upsampler_sampler,
)

__all__ = [
    "ar_prior_sampler",
    "best_of_candidates",
    "decoder_conditioning",
    "decoder_inverter",
    "decoder_sampler",
    "inversion_sampling",
    "prior_sampler",
    "prior_text_conditioning",
    "sampling_schedule",
    "top_p_logits",
    "upsampler_sampler",
]
