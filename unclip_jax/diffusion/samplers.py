"""Samplers: ancestral DDPM, DDIM (eta), DDIM inversion, each one `lax.fori_loop`.

A sampler runs over the steps of a (usually respaced) `Schedule`, from step N-1 down to 0.
The model is a function `model_fn(x, timesteps) -> output`, called with the ORIGINAL timestep
of each step (`sched.timesteps`), so a model trained on 1000 steps samples on any respacing.
Wrap a conditional model with `guidance.guided_model_fn` for classifier-free guidance.

The loops compile once: the step index is a loop variable, never a Python int.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian import (
    broadcast_batch,
    check_choice,
    extract,
    p_mean_variance,
    predict_eps,
    split_output,
)
from unclip_jax.diffusion.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

METHODS = ("ddpm", "ddim")


def _step_index(i: Array, batch: int) -> Array:
    return jnp.full((batch,), i, dtype=jnp.int32)


def is_key_batch(key: Array) -> bool:
    """Whether `key` is a batch of PRNG keys (one per row) rather than one key."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2  # raw uint32 keys: (2,) is one key, (B, 2) a batch


def fold_in(key: Array, data: int | Array) -> Array:
    """`jax.random.fold_in` of one key or of each key of a batch (see `row_normal`)."""
    if is_key_batch(key):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
    return jax.random.fold_in(key, data)


def row_normal(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
    """Standard normal noise of `shape`. With a batch of keys (one per row of `shape`), row r
    is drawn from key r alone: a sample then does not depend on which batch, device or
    process it was drawn in, only on its own key."""
    if not is_key_batch(key):
        return jax.random.normal(key, shape, dtype)
    if key.shape[0] != shape[0]:
        raise ValueError(f"{key.shape[0]} keys for a batch of {shape[0]} rows")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)


def self_conditioning_input(x_t: Array, estimate: Array | None = None) -> Array:
    """[x_t ; estimate] on channels, the input of a self-conditioned model (Chen et al. 2022,
    "Analog Bits"); no estimate (a first step) is zeros."""
    if estimate is None:
        estimate = jnp.zeros_like(x_t)
    return jnp.concatenate([x_t, estimate.astype(x_t.dtype)], axis=-1)


def ddpm_step(
    *,
    output: Array,
    x_t: Array,
    t: Array,
    noise: Array,
    sched: Schedule,
    prediction: str,
    variance: str,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
) -> tuple[Array, Array]:
    """One ancestral step: x_{t-1} = mu(x_t, x0_hat) + [t > 0] exp(log Sigma_t / 2) noise.

    Returns (x_{t-1}, x0_hat).
    """
    out = p_mean_variance(
        output=output,
        x_t=x_t,
        t=t,
        sched=sched,
        prediction=prediction,
        variance=variance,
        clip=clip,
        dynamic_threshold=dynamic_threshold,
    )
    nonzero = broadcast_batch((t > 0).astype(x_t.dtype), x_t)  # no noise at the last step
    x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["x0"]


def ddim_step(
    *,
    output: Array,
    x_t: Array,
    t: Array,
    noise: Array | None,
    sched: Schedule,
    prediction: str,
    variance: str,
    eta: float = 0.0,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
) -> tuple[Array, Array]:
    """One DDIM step (Song et al., eq. 12) to the previous step of the schedule.

    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma noise
    (no noise at the last step). Returns (x_prev, x0_hat).
    """
    out = p_mean_variance(
        output=output,
        x_t=x_t,
        t=t,
        sched=sched,
        prediction=prediction,
        variance=variance,
        clip=clip,
        dynamic_threshold=dynamic_threshold,
    )
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0.0):
        raise ValueError("a DDIM step with eta != 0 adds noise: pass `noise`")
    abar_prev = extract(sched.alphas_cumprod_prev, t, x_t)
    one_minus = extract(sched.one_minus_alphas_cumprod, t, x_t)
    one_minus_prev = extract(sched.one_minus_alphas_cumprod_prev, t, x_t)
    beta = extract(sched.betas, t, x_t)  # 1 - abar / abar_prev of the (respaced) chain
    sigma = eta * jnp.sqrt(one_minus_prev / one_minus) * jnp.sqrt(beta)
    # 1 - abar_prev - sigma^2 = (1 - abar_prev)(1 - eta^2 beta / (1 - abar)) >= 0; at eta = 1
    # rounding can take it just below zero, so it is clamped.
    direction = jnp.sqrt(jnp.maximum(one_minus_prev - sigma**2, 0.0))
    x_prev = jnp.sqrt(abar_prev) * out["x0"] + direction * out["eps"]
    if noise is not None:
        nonzero = broadcast_batch((t > 0).astype(x_t.dtype), x_t)
        x_prev = x_prev + nonzero * sigma * noise
    return x_prev, out["x0"]


def sample(
    *,
    model_fn: ModelFn,
    sched: Schedule,
    x_T: Array,
    key: Array | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    prediction: str,
    variance: str,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
    self_condition: bool = False,
) -> Array:
    """Runs the reverse process from x_T (step N-1) to x0 with DDPM or DDIM.

    `key` drives the per-step noise (folded in by step): one key, or one per row (each row's
    noise from its own key, `row_normal`); it may be None only for the deterministic DDIM with
    eta = 0, which is the decode of `ddim_invert`. With `self_condition` the model reads
    [x_t ; x0_prev] on channels, x0_prev the previous step's estimate of x0 (zeros at the
    first step): self-conditioning (Chen et al. 2022, "Analog Bits"), as such a model trains.
    """
    check_choice("sampling method", method, METHODS)
    stochastic = method == "ddpm" or eta != 0.0
    if stochastic and key is None:
        raise ValueError(f"method {method!r} with eta={eta} draws noise: pass a PRNG key")
    num_steps = sched.num_steps
    batch = x_T.shape[0]

    def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        x, x0_prev = carry
        step = num_steps - 1 - i
        t = _step_index(step, batch)
        inputs = self_conditioning_input(x, x0_prev) if self_condition else x
        output = model_fn(inputs, sched.timesteps[t])
        noise = row_normal(fold_in(key, step), x.shape, x.dtype) if stochastic else None
        kwargs = dict(
            output=output,
            x_t=x,
            t=t,
            sched=sched,
            prediction=prediction,
            variance=variance,
            clip=clip,
            dynamic_threshold=dynamic_threshold,
        )
        if method == "ddpm":
            return ddpm_step(noise=noise, **kwargs)
        return ddim_step(noise=noise, eta=eta, **kwargs)

    x, _ = jax.lax.fori_loop(0, num_steps, body, (x_T, jnp.zeros_like(x_T)))
    return x


def ddim_invert_step(*, eps: Array, x: Array, t: Array, sched: Schedule) -> Array:
    """One step of DDIM inversion: from step t-1 (x0 itself at t = 0) up to step t.

    With abar_prev = abar_{t-1} (1 at t = 0):
    x0_hat = (x - sqrt(1 - abar_prev) eps) / sqrt(abar_prev),
    x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps,
    which the eta = 0 DDIM step maps exactly back to x when it sees the same eps at x_t.
    """
    abar = extract(sched.alphas_cumprod, t, x)
    abar_prev = extract(sched.alphas_cumprod_prev, t, x)
    one_minus = extract(sched.one_minus_alphas_cumprod, t, x)
    one_minus_prev = extract(sched.one_minus_alphas_cumprod_prev, t, x)
    x0 = (x - jnp.sqrt(one_minus_prev) * eps) / jnp.sqrt(abar_prev)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(one_minus) * eps


def ddim_invert(
    *,
    model_fn: ModelFn,
    sched: Schedule,
    x0: Array,
    prediction: str,
    variance: str,
    fixed_point_iters: int = 0,
) -> Array:
    """DDIM inversion x0 -> x_T, the inverse of `sample(method='ddim', eta=0, clip=None)`.

    Plain inversion evaluates the model at the lower end of each step, eps(x_{t-1}, t), where
    the decode will use eps(x_t, t); the mismatch is O(step size). With fixed_point_iters > 0,
    each step is refined by the fixed-point iteration x_t <- invert(x_{t-1}, eps(x_t, t)),
    which converges to the x_t that the decode step maps exactly back to x_{t-1}.
    """
    num_steps = sched.num_steps
    batch = x0.shape[0]

    def body(step: Array, x: Array) -> Array:
        t = _step_index(step, batch)

        def up(at: Array) -> Array:
            output = model_fn(at, sched.timesteps[t])
            pred, _ = split_output(output, variance=variance)
            eps = predict_eps(prediction=prediction, pred=pred, x_t=at, t=t, sched=sched)
            return ddim_invert_step(eps=eps, x=x, t=t, sched=sched)

        x_next = up(x)
        if fixed_point_iters:
            x_next = jax.lax.fori_loop(0, fixed_point_iters, lambda _, y: up(y), x_next)
        return x_next

    return jax.lax.fori_loop(0, num_steps, body, x0)
