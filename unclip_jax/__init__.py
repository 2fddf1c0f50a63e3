"""unclip_jax: unCLIP (DALL-E 2's hierarchical text-to-image cascade) in JAX/Flax."""

__version__ = "0.1.0"
