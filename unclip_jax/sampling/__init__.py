"""Sampling: each stage's reverse process from a config (and, later, the whole cascade)."""

from unclip_jax.sampling.stages import (
    best_of_candidates,
    decoder_sampler,
    prior_sampler,
    sampling_schedule,
    upsampler_sampler,
)

__all__ = [
    "best_of_candidates",
    "decoder_sampler",
    "prior_sampler",
    "sampling_schedule",
    "upsampler_sampler",
]
