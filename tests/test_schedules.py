"""Beta schedules and respacing."""

import math

import numpy as np
import pytest

from unclip_jax import diffusion as D


@pytest.mark.parametrize("name", D.SCHEDULES)
def test_alphas_cumprod_decrease_strictly_inside_unit_interval(name):
    abar = np.asarray(D.make_schedule(name, 1000).alphas_cumprod, dtype=np.float64)
    assert np.all(abar > 0) and np.all(abar < 1)
    assert np.all(np.diff(abar) < 0)


def test_cosine_endpoints_follow_the_closed_form():
    # abar_i = f((i + 1)/N) / f(0), f(u) = cos^2(pi/2 (u + s)/(1 + s)), until max_beta clips.
    n, s = 1000, 0.008
    abar = np.asarray(D.make_schedule("cosine", n).alphas_cumprod, dtype=np.float64)

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    for i in (0, 1, 10, 500, 990):
        assert abar[i] == pytest.approx(f((i + 1) / n) / f(0), rel=1e-5)
    assert 1 - abar[0] == pytest.approx(1 - f(1 / n) / f(0), rel=1e-3)  # nearly no noise at t=0
    assert abar[-1] < 1e-7  # the last step is (almost) pure noise
    assert np.asarray(D.make_schedule("cosine", n).betas).max() <= 0.999 + 1e-7


def test_linear_schedule_matches_ho_et_al_at_1000_steps():
    betas = np.asarray(D.make_schedule("linear", 1000).betas, dtype=np.float64)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # Scaled for other lengths so that the total noise is comparable.
    assert D.linear_betas(250)[0] == pytest.approx(4e-4)


@pytest.mark.parametrize("spacing", ["25", "ddim50", "10,10,5", "250", [0, 10, 500, 999]])
@pytest.mark.parametrize("name", D.SCHEDULES)
def test_respaced_schedule_keeps_alphas_cumprod_at_kept_steps(name, spacing):
    full = D.make_schedule(name, 1000)
    sub = D.make_schedule(name, 1000, spacing)
    kept = np.asarray(sub.timesteps)
    np.testing.assert_allclose(
        np.asarray(sub.alphas_cumprod), np.asarray(full.alphas_cumprod)[kept], rtol=1e-5
    )
    # The respaced betas (float64, before the float32 store) are the betas of that chain:
    # prod_{j<=k}(1 - beta'_j) = abar at the k-th kept step.
    betas = D.named_betas(name, 1000)
    respaced = D.respace_betas(betas, kept)
    np.testing.assert_allclose(
        np.cumprod(1 - respaced),
        np.cumprod(1 - betas)[kept],
        rtol=1e-8,  # float64 round-off on the 1e-9 tail
    )


def test_space_timesteps_spells_respacings_as_improved_diffusion():
    assert D.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = D.space_timesteps(1000, "25")
    assert len(steps) == 25 and steps[0] == 0 and steps[-1] == 999
    sections = D.space_timesteps(1000, "10,10,5")
    assert len(sections) == 25
    assert sum(s < 334 for s in sections) == 10 and sum(s >= 667 for s in sections) == 5
    assert D.space_timesteps(1000, "1000") == list(range(1000))


@pytest.mark.parametrize(
    "spacing,message",
    [
        ("ddimx", "bad respacing 'ddimx'"),
        ("abc", "bad respacing 'abc'"),
        ("2000", "cannot take 2000 steps"),
        ("ddim999", "cannot create exactly 999 steps"),
        ([0, 1000], r"must lie in \[0, 1000\)"),
    ],
)
def test_bad_respacing_is_an_error_naming_it(spacing, message):
    with pytest.raises(ValueError, match=message):
        D.space_timesteps(1000, spacing)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="cosine, linear"):
        D.make_schedule("sigmoid")


def test_posterior_variance_at_respaced_steps_uses_the_respaced_chain():
    sub = D.make_schedule("cosine", 1000, "10")
    abar = np.cumprod(1 - D.cosine_betas(1000))[np.asarray(sub.timesteps)]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1 - abar / abar_prev
    np.testing.assert_allclose(
        np.asarray(sub.posterior_variance), betas * (1 - abar_prev) / (1 - abar), rtol=1e-6
    )
