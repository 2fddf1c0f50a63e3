"""Parity with diffusers' DDPMScheduler / DDIMScheduler (needs the `peers` extra)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the peers extra: pip install -e '.[peers]'")
diffusers = pytest.importorskip(
    "diffusers", reason="needs the peers extra: pip install -e '.[peers]'"
)

import jax.numpy as jnp  # noqa: E402

from unclip_jax import diffusion as D  # noqa: E402

pytestmark = pytest.mark.peers

SHAPE_NCHW = (2, 3, 4, 4)
PEER_SCHEDULES = {
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
}


def _nhwc(x):
    return jnp.asarray(np.transpose(x.numpy(), (0, 2, 3, 1)))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@pytest.mark.parametrize("name", PEER_SCHEDULES)
def test_betas_and_alphas_cumprod_equal_diffusers(name):
    peer = diffusers.DDPMScheduler(num_train_timesteps=1000, **PEER_SCHEDULES[name])
    ours = D.make_schedule(name, 1000)
    np.testing.assert_allclose(np.asarray(ours.betas), peer.betas.numpy(), rtol=1e-6, atol=1e-9)
    # diffusers accumulates the product in float32, we in float64: 1e-5 relative over 1000 steps.
    np.testing.assert_allclose(
        np.asarray(ours.alphas_cumprod), peer.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-9
    )


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE_NCHW, generator=g), torch.randn(SHAPE_NCHW, generator=g)


@pytest.mark.parametrize("name", PEER_SCHEDULES)
@pytest.mark.parametrize("step_index", [0, 10, 49])
@pytest.mark.parametrize(
    "prediction,peer_prediction", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")]
)
def test_one_ddpm_step_equals_diffusers(name, step_index, prediction, peer_prediction):
    peer = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        clip_sample=True,
        prediction_type=peer_prediction,
        variance_type="fixed_small",
        **PEER_SCHEDULES[name],
    )
    peer.set_timesteps(50)  # "leading" spacing: 980, 960, ..., 0
    t_orig = int(peer.timesteps[step_index])
    sample, output = _inputs(step_index)
    peer_out = peer.step(output, t_orig, sample, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(SHAPE_NCHW, generator=torch.Generator().manual_seed(7))

    sched = D.make_schedule(name, 1000, list(range(0, 1000, 20)))
    t = jnp.full((2,), t_orig // 20, jnp.int32)
    assert int(sched.timesteps[t[0]]) == t_orig
    x_prev, x0 = D.ddpm_step(
        output=_nhwc(output),
        x_t=_nhwc(sample),
        t=t,
        noise=_nhwc(noise),
        sched=sched,
        prediction=prediction,
        variance="fixed_small",
        clip=1.0,
    )
    np.testing.assert_allclose(_nchw(x0), peer_out.pred_original_sample.numpy(), atol=2e-5)
    np.testing.assert_allclose(_nchw(x_prev), peer_out.prev_sample.numpy(), atol=2e-5)


@pytest.mark.parametrize("step_index", [0, 25, 49])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_one_ddim_step_equals_diffusers(step_index, eta):
    peer = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    peer.set_timesteps(50)
    t_orig = int(peer.timesteps[step_index])
    sample, output = _inputs(100 + step_index)
    noise = torch.randn(SHAPE_NCHW, generator=torch.Generator().manual_seed(3))
    peer_out = peer.step(output, t_orig, sample, eta=eta, variance_noise=noise)

    sched = D.make_schedule("cosine", 1000, "ddim50")
    t = jnp.full((2,), t_orig // 20, jnp.int32)
    x_prev, x0 = D.ddim_step(
        output=_nhwc(output),
        x_t=_nhwc(sample),
        t=t,
        noise=_nhwc(noise),
        sched=sched,
        prediction="eps",
        variance="fixed_small",
        eta=eta,
    )
    # x0 = (x - sqrt(1-abar) eps) / sqrt(abar) amplifies float32 rounding by 1/sqrt(abar) at
    # the noisiest step (abar_980 ~ 4e-4): hence the looser bound there.
    atol = 2e-4 if step_index == 0 else 2e-5
    np.testing.assert_allclose(_nchw(x0), peer_out.pred_original_sample.numpy(), atol=atol)
    np.testing.assert_allclose(_nchw(x_prev), peer_out.prev_sample.numpy(), atol=2e-5)


def test_learned_range_ddpm_step_equals_diffusers():
    peer = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        variance_type="learned_range",
    )
    sample, output = _inputs(5)
    var_values = torch.rand(SHAPE_NCHW, generator=torch.Generator().manual_seed(9)) * 2 - 1
    t_orig = 400
    peer_out = peer.step(
        torch.cat([output, var_values], dim=1),
        t_orig,
        sample,
        generator=torch.Generator().manual_seed(11),
    )
    noise = torch.randn(SHAPE_NCHW, generator=torch.Generator().manual_seed(11))
    sched = D.make_schedule("cosine", 1000)
    model_out = jnp.concatenate([_nhwc(output), _nhwc(var_values)], axis=-1)
    x_prev, _ = D.ddpm_step(
        output=model_out,
        x_t=_nhwc(sample),
        t=jnp.full((2,), t_orig),
        noise=_nhwc(noise),
        sched=sched,
        prediction="eps",
        variance="learned_range",
    )
    np.testing.assert_allclose(_nchw(x_prev), peer_out.prev_sample.numpy(), atol=2e-5)
