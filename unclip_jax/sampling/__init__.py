"""Sampling: each stage's reverse process from a config (and, later, the whole cascade)."""

from unclip_jax.sampling.stages import (
    ar_prior_sampler,
    best_of_candidates,
    decoder_sampler,
    prior_sampler,
    sampling_schedule,
    top_p_logits,
    upsampler_sampler,
)

__all__ = [
    "ar_prior_sampler",
    "best_of_candidates",
    "decoder_sampler",
    "prior_sampler",
    "sampling_schedule",
    "top_p_logits",
    "upsampler_sampler",
]
