"""The forward process, its posterior and the eps/x0/v conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import diffusion as D

SCHED = D.make_schedule("cosine", 1000)


def _t(values, batch):
    return jnp.full((batch,), values, dtype=jnp.int32)


@pytest.mark.parametrize("step", [0, 100, 500, 999])
def test_q_sample_has_the_forward_process_moments(step):
    # x_t | x0 ~ N(sqrt(abar) x0, (1 - abar) I): check the moments over 200k draws.
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    noise = jax.random.normal(jax.random.key(0), (n, 1))
    xt = np.asarray(D.q_sample(x0=x0, t=_t(step, n), noise=noise, sched=SCHED), dtype=np.float64)
    abar = float(SCHED.alphas_cumprod[step])
    std_err = np.sqrt((1 - abar) / n)
    assert abs(xt.mean() - np.sqrt(abar) * 0.7) < 5 * std_err + 1e-6
    assert xt.var() == pytest.approx(1 - abar, rel=0.02, abs=1e-6)


@pytest.mark.parametrize("step", [1, 10, 400, 999])
def test_posterior_is_the_bayes_product_of_gaussians(step):
    # q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), computed independently here.
    abar = np.cumprod(1 - D.cosine_betas(1000))
    a_t, a_prev = abar[step], abar[step - 1]
    alpha = a_t / a_prev
    x0, xt = 0.3, -1.1
    # Precisions add; means weight by precision.
    prec_prior, mean_prior = 1 / (1 - a_prev), np.sqrt(a_prev) * x0
    prec_lik, mean_lik = alpha / (1 - alpha), xt / np.sqrt(alpha)
    var = 1 / (prec_prior + prec_lik)
    mean = var * (prec_prior * mean_prior + prec_lik * mean_lik)
    m, v, logv = D.q_posterior(
        x0=jnp.full((1, 1), x0), x_t=jnp.full((1, 1), xt), t=_t(step, 1), sched=SCHED
    )
    assert float(m[0, 0]) == pytest.approx(mean, rel=1e-4, abs=1e-6)
    assert float(v[0, 0]) == pytest.approx(var, rel=1e-4)
    assert float(logv[0, 0]) == pytest.approx(np.log(var), rel=1e-4, abs=1e-5)


def test_clipped_log_variance_replaces_the_zero_variance_at_t0():
    assert float(SCHED.posterior_variance[0]) == 0.0
    assert float(SCHED.posterior_log_variance_clipped[0]) == pytest.approx(
        np.log(float(SCHED.posterior_variance[1])), rel=1e-5
    )


@pytest.mark.parametrize("step", [0, 250, 750, 999])
def test_eps_x0_v_conversions_round_trip(step):
    key0, key1 = jax.random.split(jax.random.key(1))
    x0 = jax.random.uniform(key0, (4, 8, 8, 3), minval=-1, maxval=1)
    eps = jax.random.normal(key1, x0.shape)
    t = _t(step, 4)
    xt = D.q_sample(x0=x0, t=t, noise=eps, sched=SCHED)
    v = D.v_target(x0=x0, eps=eps, t=t, sched=SCHED)
    # Well-conditioned conversions are exact to float32 rounding of O(1) values.
    np.testing.assert_allclose(D.v_to_x0(x_t=xt, v=v, t=t, sched=SCHED), x0, atol=1e-5)
    np.testing.assert_allclose(D.v_to_eps(x_t=xt, v=v, t=t, sched=SCHED), eps, atol=1e-5)
    np.testing.assert_allclose(D.predict_x0(prediction="x0", pred=x0, x_t=xt, t=t, sched=SCHED), x0)
    np.testing.assert_allclose(
        D.predict_eps(prediction="v", pred=v, x_t=xt, t=t, sched=SCHED), eps, atol=1e-5
    )
    # eps -> x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies the rounding of x_t by
    # 1/sqrt(abar) (2e4 at t = 999); x0 -> eps divides by sqrt(1 - abar) (150 at t = 0).
    abar = float(SCHED.alphas_cumprod[step])
    tol_x0 = 1e-6 / np.sqrt(abar) + 1e-6
    tol_eps = 1e-6 / np.sqrt(1 - abar) + 1e-6
    np.testing.assert_allclose(D.eps_to_x0(x_t=xt, eps=eps, t=t, sched=SCHED), x0, atol=tol_x0)
    np.testing.assert_allclose(D.x0_to_eps(x_t=xt, x0=x0, t=t, sched=SCHED), eps, atol=tol_eps)
    for prediction, pred in (("eps", eps), ("v", v)):
        got = D.predict_x0(prediction=prediction, pred=pred, x_t=xt, t=t, sched=SCHED)
        np.testing.assert_allclose(got, x0, atol=tol_x0 if prediction == "eps" else 1e-5)


def test_learned_range_interpolates_between_the_fixed_variances():
    t = jnp.array([0, 1, 10, 999])
    xt = jnp.zeros((4, 2))
    lo = D.model_log_variance(variance="fixed_small", var_values=None, x_t=xt, t=t, sched=SCHED)
    hi = D.model_log_variance(variance="fixed_large", var_values=None, x_t=xt, t=t, sched=SCHED)
    at = lambda v: D.model_log_variance(  # noqa: E731
        variance="learned_range", var_values=jnp.full_like(xt, v), x_t=xt, t=t, sched=SCHED
    )
    np.testing.assert_allclose(at(-1.0), lo, rtol=1e-6)
    np.testing.assert_allclose(at(1.0)[1:], hi[1:], rtol=1e-6)
    np.testing.assert_allclose(at(0.0)[1:], (lo[1:] + hi[1:]) / 2, rtol=1e-6)
    # At t = 0 (as improved-diffusion): fixed_small is log beta~_1 (beta~_0 = 0 is clipped),
    # fixed_large is log beta~_1 too, but the learned range still reaches up to log beta_0.
    np.testing.assert_allclose(lo[0], np.log(float(SCHED.posterior_variance[1])), rtol=1e-6)
    np.testing.assert_allclose(hi[0], lo[0], rtol=1e-6)
    np.testing.assert_allclose(at(1.0)[0], np.log(float(SCHED.betas[0])), rtol=1e-6)


def test_dynamic_thresholding_rescales_by_the_percentile_not_a_fixed_clip():
    # |x| = [0.5, 2, 4, 4]: the 50th percentile is s = 3, so x -> clip(x, -3, 3) / 3.
    x = jnp.array([[0.5, -2.0, 4.0, -4.0]])
    np.testing.assert_allclose(
        D.clip_x0(x, dynamic_threshold=0.5), [[0.5 / 3, -2.0 / 3, 1.0, -1.0]], rtol=1e-6
    )
    inside = jnp.linspace(-0.5, 0.5, 100)[None]
    np.testing.assert_allclose(D.clip_x0(inside, dynamic_threshold=0.9), inside)  # s = max(q, 1)
    np.testing.assert_allclose(D.clip_x0(x, clip=1.0), [[0.5, -1.0, 1.0, -1.0]])


def test_unknown_prediction_or_variance_names_the_valid_ones():
    with pytest.raises(ValueError, match="eps, x0, v"):
        D.predict_x0(
            prediction="score",
            pred=jnp.zeros((1, 1)),
            x_t=jnp.zeros((1, 1)),
            t=_t(0, 1),
            sched=SCHED,
        )
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned_range"):
        D.split_output(jnp.zeros((1, 2)), variance="learned")
