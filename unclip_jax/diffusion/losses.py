"""Training losses: MSE on the chosen target, and improved DDPM's hybrid L_simple + lambda L_vlb.

All losses are per example (shape (B,)), averaged over every non-batch dimension, so that a
training step can weight, mask or bucket them by timestep before taking the mean.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian import (
    VARIANCES,
    check_choice,
    model_log_variance,
    predict_x0,
    q_posterior,
    split_output,
    training_target,
)
from unclip_jax.diffusion.schedules import Schedule

Array = jax.Array

LOSSES = ("mse", "hybrid")


def mean_over_example(x: Array) -> Array:
    """Mean over every axis but the first (batch) one."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# The local range (3 x 3, largest over channels) at which a pixel counts as wholly an edge: on
# the [-1, 1] scale the weakest contrast of `shapes` (purple on gray, 68 / 127.5) is about 0.53.
EDGE_RANGE = 0.5


def edge_map(x0: Array) -> Array:
    """(B, H, W, 1) edge indicator of clean images (B, H, W, C) in [-1, 1]: the 3 x 3 local
    range (max minus min), largest over channels, over `EDGE_RANGE`, capped at 1. Flat regions
    read 0, both sides of an outline 1 (an outline of less contrast than `EDGE_RANGE`, or an
    anti-aliased one, a fraction)."""
    if x0.ndim != 4:
        raise ValueError(f"edge weights need images (B, H, W, C), got shape {x0.shape}")
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    hi = jax.lax.reduce_window(x0, -jnp.inf, jax.lax.max, window, strides, "SAME")
    lo = jax.lax.reduce_window(x0, jnp.inf, jax.lax.min, window, strides, "SAME")
    spread = jnp.max(hi - lo, axis=-1, keepdims=True)
    return jnp.minimum(spread / EDGE_RANGE, 1.0)


def edge_weights(x0: Array, edge_weight: float | Array) -> Array:
    """Per-pixel loss weights 1 + lambda edge_map(x0), (B, H, W, 1): flat regions keep weight
    1 and outlines get 1 + lambda. `edge_weight` lambda is a number or one per example (B,).

    Not renormalised per example: weights of mean 1 per image took weight from the flat
    background, whose grain then left stray pixels of the object's colour that moved its
    box (position read right 0.93 against 0.99; benchmarks/README.md)."""
    lam = jnp.reshape(jnp.asarray(edge_weight, jnp.float32), (-1, 1, 1, 1))
    return jax.lax.stop_gradient(1.0 + lam * edge_map(x0))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats.

    KL = 1/2 [logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1].
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Array) -> Array:
    """Phi(x) ~= 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (as in improved DDPM)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
    """log P(x) for data in [-1, 1] quantised to 256 bins, under N(means, e^(2 log_scales)).

    P(x) = Phi((x + 1/255 - mu) / sigma) - Phi((x - 1/255 - mu) / sigma), with the edge bins
    extended to -inf (x = -1) and +inf (x = 1). Elementwise, in nats.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )


def vlb_term(
    *,
    pred: Array,
    log_variance: Array,
    x0: Array,
    x_t: Array,
    t: Array,
    sched: Schedule,
    prediction: str,
) -> Array:
    """L_t of the variational bound, per example, in bits per dimension.

    t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: -log p(x0 | x_1) under the
    discretised Gaussian. The model mean comes from `pred` (no x0 clipping).
    """
    true_mean, _, true_log_var = q_posterior(x0=x0, x_t=x_t, t=t, sched=sched)
    x0_hat = predict_x0(prediction=prediction, pred=pred, x_t=x_t, t=t, sched=sched)
    model_mean, _, _ = q_posterior(x0=x0_hat, x_t=x_t, t=t, sched=sched)
    kl = mean_over_example(normal_kl(true_mean, true_log_var, model_mean, log_variance))
    nll = -mean_over_example(
        discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * log_variance)
    )
    return jnp.where(t == 0, nll, kl) / math.log(2.0)


def diffusion_loss(
    *,
    output: Array,
    x0: Array,
    x_t: Array,
    noise: Array,
    t: Array,
    sched: Schedule,
    prediction: str,
    variance: str,
    loss: str = "mse",
    vlb_weight: float = 0.001,
    pixel_weights: Array | None = None,
) -> dict[str, Array]:
    """Per-example losses of a model output at (x_t, t), x_t = q_sample(x0, t, noise).

    'mse': || target - pred ||^2 averaged over the example, target eps, x0 or v.
    'hybrid' (learned_range only): L_simple + lambda L_vlb, with L_vlb = N * L_t for t
    uniform over the N steps (so lambda = 0.001 and N = 1000 give mse + L_t, improved DDPM's
    weighting); the mean channels are under stop-gradient in the VLB term so that it only
    trains the variance. `pixel_weights` (broadcasting against x0, e.g. `edge_weights`) weigh
    the squared error of the target (not the VLB term).

    Returns {'loss', 'mse'} and, for 'hybrid', 'vlb' (L_t in bits/dim), each of shape (B,);
    with `pixel_weights`, 'mse' is the weighted squared error (runs of other weights log MSEs
    that do not compare).
    """
    check_choice("loss", loss, LOSSES)
    check_choice("variance", variance, VARIANCES)
    if (loss == "hybrid") != (variance == "learned_range"):
        raise ValueError(
            f"loss {loss!r} with variance {variance!r}: the hybrid loss is what trains a "
            "learned_range variance, so use them together"
        )
    pred, var_values = split_output(output, variance=variance)
    target = training_target(prediction=prediction, x0=x0, eps=noise, t=t, sched=sched)
    squared = jnp.square(target - pred)
    if pixel_weights is not None:
        squared = squared * pixel_weights
    mse = mean_over_example(squared)
    if loss == "mse":
        return {"loss": mse, "mse": mse}
    log_variance = model_log_variance(
        variance=variance, var_values=var_values, x_t=x_t, t=t, sched=sched
    )
    vlb = vlb_term(
        pred=jax.lax.stop_gradient(pred),
        log_variance=log_variance,
        x0=x0,
        x_t=x_t,
        t=t,
        sched=sched,
        prediction=prediction,
    )
    total = mse + vlb_weight * sched.num_steps * vlb
    return {"loss": total, "mse": mse, "vlb": vlb}


def timestep_bucket_means(
    values: Array, t: Array, *, num_steps: int, num_buckets: int = 4
) -> Array:
    """Means of per-example `values` over `num_buckets` equal ranges of t (NaN where empty).

    Bucket k holds t in [k N / K, (k + 1) N / K): improved-diffusion's loss quartiles.
    """
    bucket = jnp.clip((t * num_buckets) // num_steps, 0, num_buckets - 1)
    one_hot = jax.nn.one_hot(bucket, num_buckets, dtype=values.dtype)
    sums = one_hot.T @ values
    counts = one_hot.sum(axis=0)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.nan)
