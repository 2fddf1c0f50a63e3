"""An exact denoiser for Gaussian data, for testing samplers without training a model.

For x0 ~ N(mu, s^2) (independently per dimension) and x_t = sqrt(abar) x0 + sqrt(1-abar) eps:
E[x0 | x_t] = mu + sqrt(abar) s^2 (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar),
and the exact eps prediction follows from it.
"""

import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion as D


def oracle_model(mu, s, *, name="cosine", num_steps=1000, prediction="eps"):
    """model_fn(x_t, timesteps) giving the exact prediction for N(mu, s^2) data."""
    abar_all = jnp.asarray(np.cumprod(1 - D.named_betas(name, num_steps)), jnp.float32)
    mu, var = jnp.asarray(mu, jnp.float32), jnp.square(jnp.asarray(s, jnp.float32))

    def model_fn(x, timesteps):
        abar = abar_all[timesteps].reshape((-1,) + (1,) * (x.ndim - 1))
        x0 = mu + jnp.sqrt(abar) * var * (x - jnp.sqrt(abar) * mu) / (abar * var + 1 - abar)
        eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0

    return model_fn
