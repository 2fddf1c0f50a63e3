"""Sampling: each stage's reverse process from a config (and, later, the whole cascade)."""

from unclip_jax.sampling.stages import (
    decoder_sampler,
    sampling_schedule,
    upsampler_sampler,
)

__all__ = ["decoder_sampler", "sampling_schedule", "upsampler_sampler"]
