"""The Gaussian forward process, its posterior, and what a denoising model's output means.

Conventions: `t` is a (B,) int array of schedule steps (0..N-1; see `Schedule.timesteps` for
the original timestep the model sees); arrays are batch-first with channels last, of any rank
(images (B, H, W, C), CLIP embeddings (B, D)). A model output is `prediction` ('eps', 'x0' or
'v') and, for variance 'learned_range', as many more channels for the variance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.schedules import Schedule

Array = jax.Array

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    """Raises ValueError naming `name` and the valid values when `value` is not one of them."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}")


def broadcast_batch(values: Array, like: Array) -> Array:
    """A (B,) array shaped (B, 1, ..., 1) to broadcast against `like`."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def extract(values: Array, t: Array, like: Array) -> Array:
    """values[t], shaped (B, 1, ..., 1) to broadcast against `like`."""
    return broadcast_batch(values[t], like)


def _abar(sched: Schedule, t: Array, like: Array) -> tuple[Array, Array]:
    """(abar_t, 1 - abar_t), shaped to broadcast against `like`."""
    return extract(sched.alphas_cumprod, t, like), extract(sched.one_minus_alphas_cumprod, t, like)


def q_sample(*, x0: Array, t: Array, noise: Array, sched: Schedule) -> Array:
    """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), given the noise."""
    abar, one_minus = _abar(sched, t, x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(one_minus) * noise


def q_posterior(*, x0: Array, x_t: Array, t: Array, sched: Schedule) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

    mu~ = coef1_t x0 + coef2_t x_t, beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
    """
    mean = (
        extract(sched.posterior_mean_coef1, t, x_t) * x0
        + extract(sched.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = jnp.broadcast_to(extract(sched.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(
        extract(sched.posterior_log_variance_clipped, t, x_t), x_t.shape
    )
    return mean, variance, log_variance


# ---- conversions between what a model may predict -------------------------------------------
# With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x0
# (Salimans & Ho), any one of (eps, x0, v) and x_t determines the other two.


def eps_to_x0(*, x_t: Array, eps: Array, t: Array, sched: Schedule) -> Array:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar, one_minus = _abar(sched, t, x_t)
    return (x_t - jnp.sqrt(one_minus) * eps) / jnp.sqrt(abar)


def x0_to_eps(*, x_t: Array, x0: Array, t: Array, sched: Schedule) -> Array:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    abar, one_minus = _abar(sched, t, x_t)
    return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(one_minus)


def v_to_x0(*, x_t: Array, v: Array, t: Array, sched: Schedule) -> Array:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    abar, one_minus = _abar(sched, t, x_t)
    return jnp.sqrt(abar) * x_t - jnp.sqrt(one_minus) * v


def v_to_eps(*, x_t: Array, v: Array, t: Array, sched: Schedule) -> Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    abar, one_minus = _abar(sched, t, x_t)
    return jnp.sqrt(one_minus) * x_t + jnp.sqrt(abar) * v


def v_target(*, x0: Array, eps: Array, t: Array, sched: Schedule) -> Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    abar, one_minus = _abar(sched, t, x0)
    return jnp.sqrt(abar) * eps - jnp.sqrt(one_minus) * x0


def training_target(*, prediction: str, x0: Array, eps: Array, t: Array, sched: Schedule) -> Array:
    """What a model of the given `prediction` is trained to output for (x0, eps, t)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_target(x0=x0, eps=eps, t=t, sched=sched)


def predict_x0(*, prediction: str, pred: Array, x_t: Array, t: Array, sched: Schedule) -> Array:
    """The model's estimate of x0 from its prediction (the mean channels of its output)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return eps_to_x0(x_t=x_t, eps=pred, t=t, sched=sched)
    if prediction == "x0":
        return pred
    return v_to_x0(x_t=x_t, v=pred, t=t, sched=sched)


def predict_eps(*, prediction: str, pred: Array, x_t: Array, t: Array, sched: Schedule) -> Array:
    """The model's estimate of eps from its prediction (the mean channels of its output)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return x0_to_eps(x_t=x_t, x0=pred, t=t, sched=sched)
    return v_to_eps(x_t=x_t, v=pred, t=t, sched=sched)


# ---- x0 clipping ------------------------------------------------------------------------------


def clip_x0(
    x0: Array, *, clip: float | None = None, dynamic_threshold: float | None = None
) -> Array:
    """Static clipping to [-clip, clip] and/or Imagen's dynamic thresholding.

    Dynamic thresholding: s = max(quantile_p(|x0|) per sample, 1); x0 <- clip(x0, -s, s) / s.
    None or 0 turns either off.
    """
    if dynamic_threshold:
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        x0 = jnp.clip(x0, -s, s) / s
    if clip:
        x0 = jnp.clip(x0, -clip, clip)
    return x0


# ---- the reverse process p(x_{t-1} | x_t) -----------------------------------------------------


def split_output(output: Array, *, variance: str) -> tuple[Array, Array | None]:
    """(prediction, variance channels or None): learned_range outputs carry 2C channels."""
    check_choice("variance", variance, VARIANCES)
    if variance != "learned_range":
        return output, None
    pred, var_values = jnp.split(output, 2, axis=-1)
    return pred, var_values


def model_log_variance(
    *, variance: str, var_values: Array | None, x_t: Array, t: Array, sched: Schedule
) -> Array:
    """log of the reverse-process variance Sigma_t, shaped like x_t.

    fixed_small: log beta~_t (clipped at t = 0); fixed_large: log beta_t (beta~_1 at t = 0);
    learned_range: v in [-1, 1] interpolates, log Sigma = f log beta_t + (1 - f) log beta~_t,
    f = (v + 1) / 2 (improved DDPM, eq. 15).
    """
    check_choice("variance", variance, VARIANCES)
    min_log = extract(sched.posterior_log_variance_clipped, t, x_t)
    if variance == "fixed_small":
        log_var = min_log
    elif variance == "fixed_large":
        large = jnp.where(t == 0, sched.posterior_variance[1], sched.betas[t])
        log_var = broadcast_batch(jnp.log(large), x_t)
    else:
        if var_values is None:
            raise ValueError("variance 'learned_range' needs the model's variance channels")
        max_log = extract(jnp.log(sched.betas), t, x_t)
        frac = (var_values + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    return jnp.broadcast_to(log_var, x_t.shape)


def p_mean_variance(
    *,
    output: Array,
    x_t: Array,
    t: Array,
    sched: Schedule,
    prediction: str,
    variance: str,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
) -> dict[str, Array]:
    """Mean and log-variance of p(x_{t-1} | x_t), with the x0 and eps they imply.

    The mean is the posterior mean q(x_{t-1} | x_t, x0_hat) at the (clipped) x0 estimate; eps
    is recomputed from the clipped x0 so that DDIM stays consistent with it.
    """
    pred, var_values = split_output(output, variance=variance)
    x0 = predict_x0(prediction=prediction, pred=pred, x_t=x_t, t=t, sched=sched)
    x0 = clip_x0(x0, clip=clip, dynamic_threshold=dynamic_threshold)
    mean, _, _ = q_posterior(x0=x0, x_t=x_t, t=t, sched=sched)
    log_var = model_log_variance(
        variance=variance, var_values=var_values, x_t=x_t, t=t, sched=sched
    )
    if clip or dynamic_threshold:
        eps = x0_to_eps(x_t=x_t, x0=x0, t=t, sched=sched)  # consistent with the clipped x0
    else:
        eps = predict_eps(prediction=prediction, pred=pred, x_t=x_t, t=t, sched=sched)
    return {"mean": mean, "log_variance": log_var, "x0": x0, "eps": eps}
