"""The denoising objective every diffusion stage trains with, from its `diffusion` config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax import diffusion as D
from unclip_jax.config import ABSENT_MEANS

Array = jax.Array


def timesteps_for_training(
    rng: Array, batch: int, num_steps: int, power: float = 1.0, uniform_share: float = 0.0
) -> Array:
    """(batch,) int32 training timesteps t = floor(N u^power), u ~ U[0, 1), each drawn
    uniformly (u^1) instead with probability `uniform_share`.

    power 1 is uniform on {0, ..., N-1} (the paper); power < 1 draws more of them near N (high
    noise), where a conditional model decides its sample's layout and shape, and fewer near 0
    (power 0.5: density 2t/N, so t < 50 in 0.25% of draws), where it learns to draw fine
    detail; `uniform_share` keeps a floor under that density (share + (1 - share) 2t/N). With
    power != 1 the hybrid loss's N L_t no longer estimates the VLB without bias (it only trains
    the variance, at weight 1e-3).
    """
    if power <= 0:
        raise ValueError(f"diffusion.timestep_power must be > 0, got {power}")
    if not 0.0 <= uniform_share <= 1.0:
        raise ValueError(f"diffusion.timestep_uniform_share must be in [0, 1], got {uniform_share}")
    if power == 1.0 or uniform_share == 1.0:
        return jax.random.randint(rng, (batch,), 0, num_steps)
    u = jax.random.uniform(rng, (batch,))
    warped = u**power
    if uniform_share > 0.0:  # its own key: u (and so a share-0 run's t) is as before
        coin = jax.random.uniform(jax.random.fold_in(rng, 1), (batch,))
        warped = jnp.where(coin < uniform_share, u, warped)
    return jnp.minimum(jnp.floor(num_steps * warped), num_steps - 1).astype(jnp.int32)


def denoising_loss(
    apply: Callable[[Array, Array], Array],
    x0: Array,
    rng: Array,
    *,
    sched: D.Schedule,
    diffusion: Mapping[str, Any],
    self_condition: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """(mean loss, metrics) of the model `apply(x_t, t) -> output` on clean data x0.

    t = floor(N u^p), u ~ U[0, 1) (p = `diffusion.timestep_power`; 1 is t ~ U{0, ..., N-1}; a
    `diffusion.timestep_uniform_share` of them uniform) and
    eps ~ N(0, I) per example, x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps,
    and the loss is `diffusion.loss` ('mse' or 'hybrid' = L_simple + vlb_weight N L_t) of the
    output against `diffusion.prediction`'s target, each pixel's squared error weighted by
    1 + lambda e with `diffusion.edge_weight` lambda > 0 (`D.edge_weights`). Metrics: the
    mean MSE, the VLB term in bits/dim (hybrid), and the loss in 4 timestep quartiles
    (`loss_by_t/0..3`).

    With `self_condition` the model reads [x_t ; s] on channels (Chen et al. 2022, "Analog
    Bits"): s = 0 for half the examples, and for the other half the model's own estimate of
    x0 from [x_t ; 0], clipped to [-1, 1] as the sampler clips it and with no gradient
    through it, which is what `D.sample(self_condition=True)` feeds back at each step.
    """
    t_key, noise_key = jax.random.split(rng)
    b = x0.shape[0]
    x0 = x0.astype(jnp.float32)
    power = diffusion.get("timestep_power", ABSENT_MEANS["diffusion.timestep_power"])
    share = diffusion.get(
        "timestep_uniform_share", ABSENT_MEANS["diffusion.timestep_uniform_share"]
    )
    edge_weight = diffusion.get("edge_weight", ABSENT_MEANS["diffusion.edge_weight"])
    t = timesteps_for_training(t_key, b, sched.num_steps, power, share)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = D.q_sample(x0=x0, t=t, noise=noise, sched=sched)
    model_input = x_t
    if self_condition:
        model_input = D.self_conditioning_input(
            x_t, _self_condition(apply, x_t, t, rng, sched, diffusion)
        )
    output = apply(model_input, t).astype(jnp.float32)
    losses = D.diffusion_loss(
        output=output,
        x0=x0,
        x_t=x_t,
        noise=noise,
        t=t,
        sched=sched,
        prediction=diffusion["prediction"],
        variance=diffusion["variance"],
        loss=diffusion["loss"],
        vlb_weight=diffusion["vlb_weight"],
        pixel_weights=D.edge_weights(x0, edge_weight) if edge_weight else None,
    )
    metrics = {k: jnp.mean(v) for k, v in losses.items() if k != "loss"}
    metrics["loss_by_t"] = D.timestep_bucket_means(losses["loss"], t, num_steps=sched.num_steps)
    return jnp.mean(losses["loss"]), metrics


def _self_condition(
    apply: Callable[[Array, Array], Array],
    x_t: Array,
    t: Array,
    rng: Array,
    sched: D.Schedule,
    diffusion: Mapping[str, Any],
) -> Array:
    """The self-conditioning input of one training batch: per example, with probability 1/2
    the model's x0 estimate from [x_t ; 0] (clipped to [-1, 1], no gradient), else 0."""
    first = jax.lax.stop_gradient(apply(D.self_conditioning_input(x_t), t)).astype(x_t.dtype)
    pred, _ = D.split_output(first, variance=diffusion["variance"])
    x0_hat = D.predict_x0(prediction=diffusion["prediction"], pred=pred, x_t=x_t, t=t, sched=sched)
    # Its own key (fold_in 2): a run without self-conditioning draws t and eps as before.
    use = jax.random.bernoulli(jax.random.fold_in(rng, 2), 0.5, (x_t.shape[0],))
    rows = use.reshape((-1,) + (1,) * (x_t.ndim - 1))
    return jnp.where(rows, D.clip_x0(x0_hat, clip=1.0), 0.0)
