"""Training losses: the MSE targets, the VLB against numpy, the hybrid loss's gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from unclip_jax import diffusion as D
from unclip_jax.config import diffusion_block
from unclip_jax.training.denoising import denoising_loss, timesteps_for_training

SCHED = D.make_schedule("cosine", 1000)


def _case(step, batch=3, dim=5, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    # Data on the 256-level grid in [-1, 1], as images are.
    x0 = jnp.round(jax.random.uniform(keys[0], (batch, dim), minval=-1, maxval=1) * 127.5) / 127.5
    noise = jax.random.normal(keys[1], (batch, dim))
    t = jnp.full((batch,), step, jnp.int32)
    x_t = D.q_sample(x0=x0, t=t, noise=noise, sched=SCHED)
    pred = jax.random.normal(keys[2], (batch, dim))  # an (imperfect) eps prediction
    var_values = jax.random.uniform(keys[3], (batch, dim), minval=-1, maxval=1)
    return x0, noise, t, x_t, pred, var_values


def _numpy_vlb(step, x0, x_t, pred, var_values):
    """L_t in bits/dim, from scratch in float64."""
    x0, x_t, eps_hat, v = (np.asarray(a, np.float64) for a in (x0, x_t, pred, var_values))
    betas = D.cosine_betas(1000)
    abar = np.cumprod(1 - betas)
    a_t = abar[step]
    a_prev = abar[step - 1] if step > 0 else 1.0
    beta = betas[step]

    def post_mean(x_start):
        return (np.sqrt(a_prev) * beta * x_start + np.sqrt(1 - beta) * (1 - a_prev) * x_t) / (
            1 - a_t
        )

    post_var = beta * (1 - a_prev) / (1 - a_t)
    post_var_clipped = post_var if step > 0 else betas[1] * (1 - abar[0]) / (1 - abar[1])
    log_var = (v + 1) / 2 * np.log(beta) + (1 - (v + 1) / 2) * np.log(post_var_clipped)
    x0_hat = (x_t - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t)
    mean_p = post_mean(x0_hat)
    if step > 0:
        # KL of two Gaussians: log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2.
        var_p = np.exp(log_var)
        kl = (
            0.5 * np.log(var_p / post_var)
            + (post_var + (post_mean(x0) - mean_p) ** 2) / (2 * var_p)
            - 0.5
        )
        return kl.mean(axis=1) / math.log(2)
    sd = np.exp(0.5 * log_var)
    upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    prob = norm.cdf((upper - mean_p) / sd) - norm.cdf((lower - mean_p) / sd)
    return -np.log(prob).mean(axis=1) / math.log(2)


@pytest.mark.parametrize("step", [1, 7, 300, 999])
def test_vlb_kl_term_matches_numpy(step):
    x0, _, t, x_t, pred, var_values = _case(step)
    log_var = D.model_log_variance(
        variance="learned_range", var_values=var_values, x_t=x_t, t=t, sched=SCHED
    )
    got = D.vlb_term(
        pred=pred, log_variance=log_var, x0=x0, x_t=x_t, t=t, sched=SCHED, prediction="eps"
    )
    np.testing.assert_allclose(got, _numpy_vlb(step, x0, x_t, pred, var_values), rtol=2e-3)


def test_vlb_decoder_nll_at_t0_matches_numpy():
    x0, _, t, x_t, _, var_values = _case(0, batch=4, dim=64)
    pred = (x_t - jnp.sqrt(SCHED.alphas_cumprod[0]) * (x0 + 0.004)) / jnp.sqrt(
        1 - SCHED.alphas_cumprod[0]
    )
    log_var = D.model_log_variance(
        variance="learned_range", var_values=var_values, x_t=x_t, t=t, sched=SCHED
    )
    got = D.vlb_term(
        pred=pred, log_variance=log_var, x0=x0, x_t=x_t, t=t, sched=SCHED, prediction="eps"
    )
    # improved DDPM's tanh approximation of the normal CDF is good to ~1e-3 relative here.
    np.testing.assert_allclose(got, _numpy_vlb(0, x0, x_t, pred, var_values), rtol=1e-2)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_a_perfect_prediction_has_zero_mse(prediction):
    x0, noise, t, x_t, _, _ = _case(400)
    target = D.training_target(prediction=prediction, x0=x0, eps=noise, t=t, sched=SCHED)
    out = D.diffusion_loss(
        output=target,
        x0=x0,
        x_t=x_t,
        noise=noise,
        t=t,
        sched=SCHED,
        prediction=prediction,
        variance="fixed_small",
    )
    np.testing.assert_allclose(out["loss"], 0.0, atol=1e-10)
    off = D.diffusion_loss(
        output=target + 0.5,
        x0=x0,
        x_t=x_t,
        noise=noise,
        t=t,
        sched=SCHED,
        prediction=prediction,
        variance="fixed_small",
    )
    np.testing.assert_allclose(off["mse"], 0.25, rtol=1e-5)


def test_hybrid_loss_is_mse_plus_weighted_vlb_and_vlb_trains_only_the_variance():
    x0, noise, t, x_t, pred, var_values = _case(250)
    output = jnp.concatenate([pred, var_values], axis=-1)
    kw = dict(
        x0=x0,
        x_t=x_t,
        noise=noise,
        t=t,
        sched=SCHED,
        prediction="eps",
        variance="learned_range",
        loss="hybrid",
        vlb_weight=0.001,
    )
    out = D.diffusion_loss(output=output, **kw)
    # lambda N L_t with lambda = 0.001 and N = 1000 is L_t itself.
    np.testing.assert_allclose(out["loss"], out["mse"] + out["vlb"], rtol=1e-6)
    heavier = D.diffusion_loss(output=output, **{**kw, "vlb_weight": 0.01})
    np.testing.assert_allclose(heavier["loss"], out["mse"] + 10 * out["vlb"], rtol=1e-6)
    sched_4000 = D.make_schedule("cosine", 4000)
    x_t4 = D.q_sample(x0=x0, t=t, noise=noise, sched=sched_4000)
    longer = D.diffusion_loss(output=output, **{**kw, "sched": sched_4000, "x_t": x_t4})
    np.testing.assert_allclose(longer["loss"], longer["mse"] + 4 * longer["vlb"], rtol=1e-6)
    vlb_grad = jax.grad(lambda o: D.diffusion_loss(output=o, **kw)["vlb"].sum())(output)
    mean_grad, var_grad = jnp.split(vlb_grad, 2, axis=-1)
    np.testing.assert_array_equal(mean_grad, 0.0)  # the mean is under stop-gradient
    assert float(jnp.abs(var_grad).max()) > 0


def test_hybrid_loss_needs_a_learned_variance():
    x0, noise, t, x_t, pred, _ = _case(1)
    with pytest.raises(ValueError, match="learned_range"):
        D.diffusion_loss(
            output=pred,
            x0=x0,
            x_t=x_t,
            noise=noise,
            t=t,
            sched=SCHED,
            prediction="eps",
            variance="fixed_small",
            loss="hybrid",
        )


def test_timestep_bucket_means_average_per_quarter_and_mark_empty_ones():
    t = jnp.array([0, 100, 260, 600, 620])
    values = jnp.array([1.0, 3.0, 5.0, 7.0, 9.0])
    got = np.asarray(D.timestep_bucket_means(values, t, num_steps=1000, num_buckets=4))
    np.testing.assert_allclose(got[:3], [2.0, 5.0, 8.0])
    assert np.isnan(got[3])


def test_training_timesteps_are_uniform_at_power_1_and_lean_to_high_noise_below_it():
    """t = floor(N u^p): all of 0..N-1 reachable, E[t/N] ~ 1/(1+p) (1/2 uniform, 2/3 at p=1/2)."""
    n, b = 1000, 200_000
    for power, mean in ((1.0, 0.5), (0.5, 2 / 3)):
        t = np.asarray(timesteps_for_training(jax.random.key(0), b, n, power))
        assert t.dtype == np.int32 and t.min() >= 0 and t.max() == n - 1
        # The standard error of the mean of t/N is below 1e-3 at this b.
        assert abs(t.mean() / n - mean) < 5e-3, (power, t.mean() / n)
    high = np.asarray(timesteps_for_training(jax.random.key(1), b, n, 0.5)) >= 750
    assert abs(high.mean() - (1 - 0.75**2)) < 5e-3  # P(u^0.5 >= 0.75) = 1 - 0.75^2
    with pytest.raises(ValueError, match="timestep_power"):
        timesteps_for_training(jax.random.key(0), 4, n, 0.0)


def test_a_uniform_share_of_training_timesteps_keeps_a_floor_at_low_noise():
    """Drawn uniformly with probability s, else as floor(N u^p): P(t < 100) = s 0.1 + (1 - s)
    0.01 at p = 1/2, and with s = 0 the draws are exactly those without the share."""
    n, b = 1000, 200_000
    key = jax.random.key(2)
    plain = np.asarray(timesteps_for_training(key, b, n, 0.5))
    np.testing.assert_array_equal(np.asarray(timesteps_for_training(key, b, n, 0.5, 0.0)), plain)
    for share in (0.25, 1.0):
        t = np.asarray(timesteps_for_training(key, b, n, 0.5, share))
        low = share * 0.1 + (1 - share) * 0.1**2
        # One standard error of a rate near 0.03 at this b is 4e-4.
        assert abs((t < 100).mean() - low) < 2e-3, (share, (t < 100).mean())
    with pytest.raises(ValueError, match="timestep_uniform_share"):
        timesteps_for_training(key, 4, n, 0.5, 1.5)


def test_the_denoising_loss_draws_its_timesteps_with_the_configs_power():
    seen = []

    def apply(x_t, t):
        seen.append(np.asarray(t))
        return jnp.zeros_like(x_t)

    x0 = jnp.zeros((256, 2, 2, 3))
    denoising_loss(apply, x0, jax.random.key(0), sched=SCHED, diffusion=diffusion_block())
    denoising_loss(
        apply, x0, jax.random.key(0), sched=SCHED, diffusion=diffusion_block(timestep_power=0.01)
    )
    uniform, high = seen
    assert uniform.min() < 100 and uniform.max() > 900
    assert high.min() >= 900  # u^0.01 >= 0.9 unless u < 0.9^100 ~ 3e-5


def test_the_edge_map_marks_both_sides_of_an_outline_and_nothing_flat():
    x0 = -np.ones((2, 16, 16, 3), np.float32)
    x0[1, 4:10, 5:11] = [0.7, -0.4, -0.6]  # a 6 x 6 square, contrast >= 0.6 in a channel
    edges = np.asarray(D.edge_map(jnp.asarray(x0)))[..., 0]
    assert edges.shape == (2, 16, 16) and not edges[0].any()
    ring = np.zeros((16, 16), bool)
    ring[3:11, 4:12] = True
    ring[5:9, 6:10] = False  # the square's inner row of pixels and the outer row around it
    np.testing.assert_array_equal(edges[1], ring.astype(np.float32))
    with pytest.raises(ValueError, match=r"images \(B, H, W, C\)"):
        D.edge_map(jnp.zeros((2, 5)))


def test_edge_weights_keep_flat_pixels_at_one_and_give_outlines_one_plus_lambda():
    x0 = -np.ones((2, 16, 16, 3), np.float32)
    x0[1, 4:10, 5:11] = 1.0
    w = np.asarray(D.edge_weights(jnp.asarray(x0), jnp.array([8.0, 2.0])))
    np.testing.assert_allclose(w[0], 1.0)  # a flat image: every pixel alike
    edges = np.asarray(D.edge_map(jnp.asarray(x0)))[1]
    np.testing.assert_allclose(w[1], 1.0 + 2.0 * edges)  # each example its own lambda
    assert w[1].min() == 1.0 and w[1].max() == 3.0


def test_pixel_weights_weigh_the_squared_error_but_not_the_vlb():
    x0, noise, t, x_t, pred, var_values = _case(250, batch=2, dim=8)
    kw = dict(
        output=jnp.concatenate([pred, var_values], axis=-1),
        x0=x0,
        x_t=x_t,
        noise=noise,
        t=t,
        sched=SCHED,
        prediction="eps",
        variance="learned_range",
        loss="hybrid",
    )
    plain = D.diffusion_loss(**kw)
    weights = jnp.zeros((2, 8)).at[:, :4].set(2.0)  # mean 1: the first half counts twice
    weighted = D.diffusion_loss(**kw, pixel_weights=weights)
    np.testing.assert_allclose(weighted["vlb"], plain["vlb"])
    first = jnp.mean(jnp.square(noise - pred)[:, :4], axis=1)  # eps is the target
    np.testing.assert_allclose(weighted["mse"], first, rtol=1e-5)


def test_the_denoising_loss_weighs_outline_pixels_by_the_configs_edge_weight():
    x0 = -np.ones((2, 8, 8, 3), np.float32)
    x0[1, 2:5, 2:5] = 1.0
    edges = np.asarray(D.edge_map(jnp.asarray(x0)))

    def zero(x_t, t):  # predicts x0 = 0, so each pixel's error is x0^2 = 1 whatever t is
        return jnp.zeros_like(x_t)

    def loss(edge_weight):
        block = diffusion_block(prediction="x0", edge_weight=edge_weight)
        return denoising_loss(
            zero, jnp.asarray(x0), jax.random.key(0), sched=SCHED, diffusion=block
        )

    assert float(loss(0.0)[0]) == pytest.approx(1.0)
    # Mean over both examples of mean(1 + 4 e): the flat one 1, the other 1 + 4 mean(e).
    assert float(loss(4.0)[0]) == pytest.approx(1.0 + 2.0 * edges[1].mean(), rel=1e-6)


def test_self_conditioning_feeds_half_the_rows_the_models_own_clipped_estimate():
    seen = []

    def apply(x_t, t):
        seen.append(np.asarray(x_t))
        return 3.0 * x_t[..., :3] + x_t[..., 3:]  # an x0 estimate partly outside [-1, 1]

    x0 = jax.random.uniform(jax.random.key(1), (256, 2, 2, 3), minval=-1, maxval=1)
    diffusion = diffusion_block(prediction="x0", variance="fixed_small", loss="mse")
    denoising_loss(
        apply, x0, jax.random.key(0), sched=SCHED, diffusion=diffusion, self_condition=True
    )
    first, second = seen
    assert first.shape == second.shape == (256, 2, 2, 6)
    assert not first[..., 3:].any()  # the first pass sees no estimate
    np.testing.assert_array_equal(second[..., :3], first[..., :3])  # the same x_t
    estimate = np.clip(3.0 * first[..., :3], -1, 1)
    fed = second[..., 3:]
    zero = ~fed.reshape(256, -1).any(1)
    np.testing.assert_allclose(fed[~zero], estimate[~zero], atol=1e-6)
    assert 0.4 < zero.mean() < 0.6  # half of them, within 3 s.e. (0.03) of a coin's


def test_no_gradient_flows_through_the_self_conditioning_estimate():
    # The estimate fed to the second pass is w x_t (clipped): the loss's gradient in w must be
    # the one with that estimate held constant.
    x0 = jax.random.uniform(jax.random.key(1), (8, 2, 2, 3), minval=-1, maxval=1)
    diffusion = diffusion_block(prediction="x0", variance="fixed_small", loss="mse")

    def loss(w, hold):
        def apply(x_t, t):
            estimate = x_t[..., 3:]
            return w * x_t[..., :3] + (jax.lax.stop_gradient(estimate) if hold else estimate)

        key = jax.random.key(0)
        return denoising_loss(
            apply, x0, key, sched=SCHED, diffusion=diffusion, self_condition=True
        )[0]

    np.testing.assert_allclose(jax.grad(loss)(0.5, False), jax.grad(loss)(0.5, True), rtol=1e-6)
