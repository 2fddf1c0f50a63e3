"""Noise schedules: beta schedules, respacing, and the frozen `Schedule` pytree.

Everything is computed in float64 NumPy (as improved-diffusion does: 1 - abar_t / abar_s
loses digits in float32) and stored as float32 JAX arrays. A respaced schedule keeps, for
each of its steps, the original timestep index (`timesteps`), which is what the model sees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCHEDULES = ("cosine", "linear")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) discrete diffusion schedule of N steps, indexed 0..N-1.

    Step i of the schedule is original timestep `timesteps[i]`; every other field is indexed
    by the step i. For the unrespaced schedule timesteps[i] == i.
    """

    timesteps: Array  # (N,) int32: the original timestep of each step, fed to the model
    betas: Array  # beta_i = 1 - abar_i / abar_{i-1}
    alphas_cumprod: Array  # abar_i
    alphas_cumprod_prev: Array  # abar_{i-1}, with abar_{-1} = 1
    # 1 - abar_i and 1 - abar_{i-1}, from float64: 1 - abar in float32 keeps ~2 digits at t = 0.
    one_minus_alphas_cumprod: Array
    one_minus_alphas_cumprod_prev: Array
    posterior_variance: Array  # beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
    # log beta~_i with beta~_0 (= 0) replaced by beta~_1, as improved-diffusion does.
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array  # coefficient of x0 in mu~_i(x_i, x0)
    posterior_mean_coef2: Array  # coefficient of x_i in mu~_i(x_i, x0)

    @property
    def num_steps(self) -> int:
        """N, the number of steps of this schedule (static)."""
        return self.betas.shape[0]


def cosine_betas(num_steps: int, *, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule.

    abar(u) = cos^2(pi/2 (u + s) / (1 + s)), u in [0, 1];
    beta_i = min(1 - abar((i + 1)/N) / abar(i/N), max_beta).
    """

    def abar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = np.arange(num_steps, dtype=np.float64) / num_steps
    betas = 1.0 - abar(u + 1.0 / num_steps) / abar(u)
    return np.minimum(betas, max_beta)


def linear_betas(
    num_steps: int, *, beta_start: float | None = None, beta_end: float | None = None
) -> np.ndarray:
    """Ho et al.'s linear schedule, by default scaled so that any N matches N = 1000.

    beta_start = 1e-4 * 1000 / N, beta_end = 0.02 * 1000 / N (improved-diffusion).
    """
    scale = 1000.0 / num_steps
    start = 1e-4 * scale if beta_start is None else beta_start
    end = 0.02 * scale if beta_end is None else beta_end
    return np.linspace(start, end, num_steps, dtype=np.float64)


def named_betas(name: str, num_steps: int) -> np.ndarray:
    """Betas of the schedule called `name` ('cosine' or 'linear')."""
    if name == "cosine":
        return cosine_betas(num_steps)
    if name == "linear":
        return linear_betas(num_steps)
    raise ValueError(f"unknown beta schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")


def space_timesteps(num_steps: int, spacing: str | Sequence[int]) -> list[int]:
    """The original timesteps kept by a respacing, as improved-diffusion spells it.

    - "25": 25 steps, evenly strided over [0, num_steps - 1] (both ends kept);
    - "ddim50": 50 steps with an integer stride, starting at 0 (DDIM's spacing);
    - "10,10,5": split [0, num_steps) into 3 equal sections, take 10, 10 and 5 strided
      steps from them;
    - a sequence of ints: those steps, sorted.
    """
    if not isinstance(spacing, str):
        steps = sorted(set(int(s) for s in spacing))
        if not steps or steps[0] < 0 or steps[-1] >= num_steps:
            raise ValueError(f"respaced steps must lie in [0, {num_steps}): got {spacing!r}")
        return steps
    spacing = spacing.strip()
    if spacing.startswith("ddim"):
        try:
            desired = int(spacing[len("ddim") :])
        except ValueError:
            raise ValueError(f"bad respacing {spacing!r}; expected e.g. 'ddim50'") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    try:
        section_counts = [int(x) for x in spacing.split(",")]
    except ValueError:
        raise ValueError(
            f"bad respacing {spacing!r}; expected '25', 'ddim50' or '10,10,5'"
        ) from None
    size_per = num_steps // len(section_counts)
    extra = num_steps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if section_count < 1 or size < section_count:
            raise ValueError(f"cannot take {section_count} steps from a section of {size}")
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur))
            cur += frac_stride
        start_idx += size
    return sorted(set(all_steps))


def respace_betas(betas: np.ndarray, timesteps: Sequence[int]) -> np.ndarray:
    """Betas of the chain that visits only `timesteps`, with the same abar at each of them.

    beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}} (abar_{t_{-1}} = 1), so that
    prod_{j<=k} (1 - beta'_j) = abar_{t_k}.
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    kept = alphas_cumprod[np.asarray(timesteps)]
    prev = np.concatenate([[1.0], kept[:-1]])
    return 1.0 - kept / prev


def schedule_from_betas(betas: np.ndarray, timesteps: Sequence[int] | None = None) -> Schedule:
    """The Schedule of a chain with these betas (float64 in, float32 out)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got betas of shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    n = betas.shape[0]
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
    if timesteps.shape != (n,):
        raise ValueError(f"{timesteps.shape[0]} timesteps for {n} betas")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # q(x_{i-1} | x_i, x0) = N(mu~, beta~ I):
    #   beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
    #   mu~_i = [beta_i sqrt(abar_{i-1}) / (1 - abar_i)] x0 + [(1 - abar_{i-1}) sqrt(alpha_i) / (1 - abar_i)] x_i
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_log_var = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)

    def f32(a: np.ndarray) -> Array:
        return jnp.asarray(a, dtype=jnp.float32)

    return Schedule(
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        one_minus_alphas_cumprod=f32(1.0 - abar),
        one_minus_alphas_cumprod_prev=f32(1.0 - abar_prev),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
    )


def karlo_timesteps(num_steps: int, steps: int) -> list[int]:
    """The original timesteps of diffusers' `UnCLIPScheduler` (Karlo's sampler), ascending.

    round(i (T - 1) / (N - 1)) for i = 0 .. N-1 (numpy's rounding, half to even): both ends
    kept, as the evenly strided spacing "N" of `space_timesteps`, whose accumulated float
    stride rounds differently for 278 of the N in [2, 1000] (not for 25 or 7).
    """
    if not 2 <= steps <= num_steps:
        raise ValueError(f"Karlo's spacing takes 2 to {num_steps} steps, got {steps}")
    ratio = (num_steps - 1) / (steps - 1)
    return [int(t) for t in (np.arange(steps) * ratio).round()]


def karlo_schedule(num_steps: int, steps: int) -> Schedule:
    """The cosine schedule respaced to `steps` exactly as diffusers' `UnCLIPScheduler` steps it.

    Same formulas as `schedule_from_betas` on `karlo_timesteps`, but in the scheduler's float32
    arithmetic, so that a sampler on it reproduces the scheduler to float32 rounding:
    - betas of the cosine schedule in float64 (per step, with `math.cos`), cast to float32;
      abar = the float64 running product of the float32 alphas, cast to float32 (torch's CPU
      cumprod accumulates in double);
    - for each kept step t with previous kept step s (-1 at the last, abar_{-1} = 1), in
      float32: beta = 1 - abar_t / abar_s (the float32 beta_t itself when s = t - 1, as the
      scheduler takes it), coef1 = sqrt(abar_s) beta / (1 - abar_t),
      coef2 = sqrt(1 - beta) (1 - abar_s) / (1 - abar_t), variance (1 - abar_s) / (1 - abar_t)
      beta. At the last step (t = 0) 1 - (1 - beta_0) in float32 is not beta_0, so coef1 is
      1 + O(1e-3) there, as in the scheduler.
    """

    def abar_fn(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    full_betas = np.array(
        [
            min(1 - abar_fn((i + 1) / num_steps) / abar_fn(i / num_steps), 0.999)
            for i in range(num_steps)
        ],
        np.float32,
    )
    full_alphas = np.float32(1.0) - full_betas
    full_abar = np.cumprod(full_alphas.astype(np.float64)).astype(np.float32)
    kept = karlo_timesteps(num_steps, steps)
    one = np.float32(1.0)
    fields: dict[str, list[np.float32]] = {
        k: [] for k in ("betas", "abar", "abar_prev", "om", "om_prev", "var", "coef1", "coef2")
    }
    for k, t in enumerate(kept):
        s = kept[k - 1] if k else -1
        abar_t = full_abar[t]
        abar_s = full_abar[s] if s >= 0 else one
        if s == t - 1:
            beta, alpha = full_betas[t], full_alphas[t]
        else:
            beta = one - abar_t / abar_s
            alpha = one - beta
        om_t, om_s = one - abar_t, one - abar_s
        fields["betas"].append(beta)
        fields["abar"].append(abar_t)
        fields["abar_prev"].append(abar_s)
        fields["om"].append(om_t)
        fields["om_prev"].append(om_s)
        fields["var"].append(om_s / om_t * beta)
        fields["coef1"].append(np.sqrt(abar_s) * beta / om_t)
        fields["coef2"].append(np.sqrt(alpha) * om_s / om_t)
    f = {k: np.array(v, np.float32) for k, v in fields.items()}
    # log of the variance, clamped at 1e-20 as the scheduler does; step 0 adds no noise and
    # its variance 0 takes step 1's, as `schedule_from_betas` does (a finite log).
    log_var = np.log(np.maximum(f["var"], np.float32(1e-20)))
    log_var[0] = log_var[1]

    def f32(a: np.ndarray) -> Array:
        return jnp.asarray(a, dtype=jnp.float32)

    return Schedule(
        timesteps=jnp.asarray(kept, dtype=jnp.int32),
        betas=f32(f["betas"]),
        alphas_cumprod=f32(f["abar"]),
        alphas_cumprod_prev=f32(f["abar_prev"]),
        one_minus_alphas_cumprod=f32(f["om"]),
        one_minus_alphas_cumprod_prev=f32(f["om_prev"]),
        posterior_variance=f32(f["var"]),
        posterior_log_variance_clipped=f32(log_var),
        posterior_mean_coef1=f32(f["coef1"]),
        posterior_mean_coef2=f32(f["coef2"]),
    )


def make_schedule(
    name: str = "cosine", num_steps: int = 1000, respacing: str | Sequence[int] | None = None
) -> Schedule:
    """The named schedule of `num_steps`, respaced if `respacing` is given ('250', 'ddim50')."""
    betas = named_betas(name, num_steps)
    if respacing is None:
        return schedule_from_betas(betas)
    kept = space_timesteps(num_steps, respacing)
    return schedule_from_betas(respace_betas(betas, kept), kept)
