"""Samplers, inversion and guidance, checked against an exact denoiser for Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_oracle import oracle_model

from unclip_jax import diffusion as D

MU = np.array([0.5, -0.3])
STD = np.array([0.2, 0.6])
N = 20_000  # standard error of a mean: 0.6 / sqrt(N) = 0.004


def _draw(method, spacing, *, prediction="eps", variance="fixed_small", eta=0.0):
    sched = D.make_schedule("cosine", 1000, spacing)
    model_fn = oracle_model(MU, STD, prediction=prediction)
    x_T = jax.random.normal(jax.random.key(0), (N, 2))

    @jax.jit
    def run(x_T, key):
        return D.sample(
            model_fn=model_fn,
            sched=sched,
            x_T=x_T,
            key=key,
            method=method,
            eta=eta,
            prediction=prediction,
            variance=variance,
        )

    return np.asarray(run(x_T, jax.random.key(1)), dtype=np.float64)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize(
    "method,spacing,variance,eta",
    [
        ("ddpm", "1000", "fixed_small", 0.0),
        ("ddpm", "250", "fixed_large", 0.0),
        ("ddim", "ddim250", "fixed_small", 0.0),
    ],
)
def test_samples_match_the_data_mean_and_variance(method, spacing, variance, eta, prediction):
    x = _draw(method, spacing, prediction=prediction, variance=variance, eta=eta)
    np.testing.assert_allclose(x.mean(0), MU, atol=0.012)  # 3 standard errors
    # The sampling noise of a std over 20k draws is 0.5%; the rest is the discretisation
    # (fixed_small under- and fixed_large over-estimates the reverse variance by O(1/steps)).
    np.testing.assert_allclose(x.std(0), STD, rtol=0.03)


def test_ddim_with_eta_one_is_ancestral_sampling():
    # sigma(eta=1)^2 = beta~_t and sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps is the
    # posterior mean: DDIM(eta=1) is DDPM with fixed_small variance, draw for draw.
    ddim = _draw("ddim", "50", eta=1.0)
    ddpm = _draw("ddpm", "50", variance="fixed_small")
    np.testing.assert_allclose(ddim, ddpm, atol=2e-4)


def test_predictions_eps_x0_v_give_the_same_ddim_samples():
    samples = [_draw("ddim", "ddim50", prediction=p) for p in D.PREDICTIONS]
    for other in samples[1:]:
        np.testing.assert_allclose(other, samples[0], atol=1e-4)


def _invert_and_decode(spacing, fixed_point_iters, prediction="eps"):
    sched = D.make_schedule("cosine", 1000, spacing)
    model_fn = oracle_model(MU, STD, prediction=prediction)
    x0 = jnp.asarray(MU + STD * np.random.RandomState(0).randn(256, 2), jnp.float32)
    x_T = D.ddim_invert(
        model_fn=model_fn,
        sched=sched,
        x0=x0,
        prediction=prediction,
        variance="fixed_small",
        fixed_point_iters=fixed_point_iters,
    )
    recon = D.sample(
        model_fn=model_fn,
        sched=sched,
        x_T=x_T,
        method="ddim",
        prediction=prediction,
        variance="fixed_small",
    )
    return x0, x_T, recon


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_ddim_inversion_then_decode_reconstructs_x0(prediction):
    x0, x_T, recon = _invert_and_decode("ddim50", fixed_point_iters=10, prediction=prediction)
    np.testing.assert_allclose(recon, x0, atol=1e-3)
    # The inverted latent is noise-like: unit variance, not the data.
    assert float(jnp.std(x_T)) == pytest.approx(1.0, abs=0.1)


def test_plain_ddim_inversion_error_shrinks_with_more_steps():
    errors = [
        float(jnp.abs(r - x0).max())
        for x0, _, r in (_invert_and_decode(s, 0) for s in ("ddim25", "ddim100", "ddim500"))
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_ddim_with_eta_zero_is_deterministic_and_needs_no_key():
    sched = D.make_schedule("cosine", 1000, "ddim10")
    model_fn = oracle_model(MU, STD)
    x_T = jax.random.normal(jax.random.key(3), (8, 2))
    a = D.sample(
        model_fn=model_fn,
        sched=sched,
        x_T=x_T,
        method="ddim",
        prediction="eps",
        variance="fixed_small",
    )
    b = D.sample(
        model_fn=model_fn,
        sched=sched,
        x_T=x_T,
        method="ddim",
        prediction="eps",
        variance="fixed_small",
    )
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="PRNG key"):
        D.sample(
            model_fn=model_fn,
            sched=sched,
            x_T=x_T,
            method="ddpm",
            prediction="eps",
            variance="fixed_small",
        )


def test_a_ddim_step_with_eta_needs_noise():
    sched = D.make_schedule("cosine", 1000, "ddim10")
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="eta != 0 adds noise"):
        D.ddim_step(
            output=x,
            x_t=x,
            t=jnp.array([5, 5]),
            noise=None,
            sched=sched,
            prediction="eps",
            variance="fixed_small",
            eta=0.5,
        )


def test_the_model_sees_original_timesteps_on_a_respaced_schedule():
    sched = D.make_schedule("cosine", 1000, "ddim5")
    seen = []

    def model_fn(x, timesteps):
        jax.debug.callback(lambda t: seen.append(int(t[0])), timesteps)
        return jnp.zeros_like(x)

    D.sample(
        model_fn=model_fn,
        sched=sched,
        x_T=jnp.ones((2, 3)),
        method="ddim",
        prediction="eps",
        variance="fixed_small",
    )
    assert seen == [800, 600, 400, 200, 0]


def test_sampling_clips_x0_statically_or_dynamically():
    sched = D.make_schedule("cosine", 1000, "ddim10")
    far = lambda x, t: jnp.full_like(x, 5.0)  # noqa: E731 - a model that predicts x0 = 5
    x_T = jax.random.normal(jax.random.key(0), (4, 3))
    kw = dict(
        model_fn=far, sched=sched, x_T=x_T, method="ddim", prediction="x0", variance="fixed_small"
    )
    np.testing.assert_allclose(D.sample(clip=1.0, **kw), 1.0, atol=1e-5)
    np.testing.assert_allclose(D.sample(dynamic_threshold=0.9, **kw), 1.0, atol=1e-5)
    np.testing.assert_allclose(D.sample(**kw), 5.0, atol=1e-4)


def _cond_model(x, t, cond):
    """A toy conditional model whose output depends on x, t and the conditioning."""
    return jnp.tanh(x * cond["scale"][:, None] + 0.001 * t[:, None])


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(variance):
    key_x, key_c = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (4, 6))
    t = jnp.array([0, 10, 500, 999])
    cond = {"scale": jax.random.normal(key_c, (4,))}
    uncond = {"scale": jnp.zeros((4,))}
    for scale, reference in ((1.0, cond), (0.0, uncond)):
        guided = D.guided_model_fn(
            _cond_model, cond=cond, uncond=uncond, scale=scale, variance=variance
        )
        np.testing.assert_array_equal(
            guided(x, t),
            _cond_model(x, t, reference)
            if variance == "fixed_small"
            else _learned_range_reference(x, t, reference, cond),
        )


def _learned_range_reference(x, t, mean_cond, var_cond):
    mean, _ = jnp.split(_cond_model(x, t, mean_cond), 2, axis=-1)
    _, var = jnp.split(_cond_model(x, t, var_cond), 2, axis=-1)  # variance from the cond half
    return jnp.concatenate([mean, var], axis=-1)


def test_guidance_extrapolates_between_the_halves_in_one_model_call():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return _cond_model(x, t, cond)

    x, t = jnp.ones((3, 4)), jnp.zeros((3,), jnp.int32)
    cond, uncond = {"scale": jnp.full((3,), 2.0)}, {"scale": jnp.zeros((3,))}
    out = D.guided_model_fn(model, cond=cond, uncond=uncond, scale=3.0)(x, t)
    expected = _cond_model(x, t, uncond) + 3.0 * (
        _cond_model(x, t, cond) - _cond_model(x, t, uncond)
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert calls == [6]  # both halves in one batched call


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_a_self_conditioned_sampler_feeds_back_each_steps_x0_estimate(method):
    # The model predicts x0 = (the x0 it is fed) + 0.1, and sees zeros at the first step: after
    # N steps its last estimate, which the last step returns, is N * 0.1.
    sched = D.make_schedule("cosine", 1000, "ddim6")
    fed = []

    def model_fn(x, timesteps):
        assert x.shape[-1] == 4  # [x_t ; x0_prev], 2 channels each
        jax.debug.callback(lambda v: fed.append(float(v)), x[0, 2])
        return x[..., 2:] + 0.1

    out = D.sample(
        model_fn=model_fn,
        sched=sched,
        x_T=jnp.ones((3, 2)),
        key=jax.random.key(0),
        method=method,
        prediction="x0",
        variance="fixed_small",
        self_condition=True,
    )
    np.testing.assert_allclose(fed, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], atol=1e-6)
    np.testing.assert_allclose(out, 0.6, atol=1e-6)
