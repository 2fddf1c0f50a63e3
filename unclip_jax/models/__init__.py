"""Flax linen modules: CLIP, the priors, the decoder and upsampler U-Nets, shared layers."""
