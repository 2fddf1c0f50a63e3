"""A small stand-in stage for testing the training machinery until the real stages exist.

A denoiser for 16-d vectors, trained with the diffusion core's loss: a Dense stack (embed/mlp
axes), a LayerNorm and a 3x3 convolution over a 4x4 "image" view (channel axes), so every
sharding rule is exercised. Data is a deterministic function of (seed, batch position), and
each process reads its own rows of every global batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import diffusion as D
from unclip_jax.config import mesh_block, optim_block, train_block
from unclip_jax.training import Stage, register_stage

DIM = 16


def _dense(features, axes, name, dtype):
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        name=name,
    )


class Denoiser(nn.Module):
    width: int = 32
    hidden: int = 64
    dtype: jnp.dtype = jnp.float32  # the compute dtype of activations; params stay float32

    @nn.compact
    def __call__(self, x, t):
        temb = jnp.sin(t[:, None] / 100.0 * jnp.arange(1, self.width + 1))
        h = _dense(self.width, (None, "embed"), "proj_in", self.dtype)(x) + temb.astype(x.dtype)
        h = nn.LayerNorm(
            dtype=self.dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="norm",
        )(h)
        h = h + _dense(self.width, ("mlp", "embed"), "fc2", self.dtype)(
            nn.gelu(_dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype)(h))
        )
        img = h.reshape(h.shape[0], 4, 4, self.width // 16)
        img = nn.with_logical_constraint(
            img, ("batch", "activation_height", "activation_width", "activation_channels")
        )
        img = nn.Conv(
            8,
            (3, 3),
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(),
                ("conv_height", "conv_width", "channels_in", "channels"),
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
            name="conv",
        )(img)
        h = jnp.concatenate([h, img.reshape(h.shape[0], -1)], axis=-1)
        return _dense(DIM, ("embed", None), "proj_out", self.dtype)(h)


def standin_config(**train_overrides) -> ml_collections.ConfigDict:
    """A complete stage config for the stand-in (the shared blocks plus its model)."""
    c = ml_collections.ConfigDict()
    c.stage = "standin"
    c.variant = "test"
    c.model = dict(width=32, hidden=64)
    c.diffusion = dict(schedule="cosine", num_steps=100)
    c.train = train_block(steps=10, batch_size=16, checkpoint_every=5, log_every=1)
    c.train.update(train_overrides)
    c.optim = optim_block(lr=1e-2, warmup_steps=2, schedule="cosine", ema_decay=0.9)
    c.mesh = mesh_block(data=4, fsdp=2)
    c.data = dict(nan_at_step=0)  # > 0: the batch of that step (1-based) holds a NaN
    return c


class VectorData:
    """Global batch i = f(seed, i); this process yields its rows of it."""

    def __init__(self, *, seed, batch_size, process_index, process_count, nan_at_step=0):
        self.seed, self.batch_size = seed, batch_size
        self.rows = slice(
            process_index * batch_size // process_count,
            (process_index + 1) * batch_size // process_count,
        )
        self.nan_at_step = nan_at_step
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        centers = rng.choice([-0.5, 0.5], size=(self.batch_size, DIM))
        x = (centers + 0.1 * rng.standard_normal((self.batch_size, DIM))).astype(np.float32)
        self.position += 1
        if self.position == self.nan_at_step:
            x[0, 0] = np.nan
        return {"x": x[self.rows]}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


@register_stage("standin")
def build_standin(config, workdir=None) -> Stage:
    """The stand-in Stage: init, a diffusion loss, and the vector data."""
    dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
    model = Denoiser(width=config.model.width, hidden=config.model.hidden, dtype=dtype)
    sched = D.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, DIM)), jnp.zeros((1,)))["params"]

    def loss_fn(params, batch, rng, frozen=None):
        del frozen
        x0 = batch["x"]
        t_key, n_key = jax.random.split(rng)
        t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_steps)
        noise = jax.random.normal(n_key, x0.shape)
        x_t = D.q_sample(x0=x0, t=t, noise=noise, sched=sched)
        output = model.apply({"params": params}, x_t.astype(jnp.float32), t.astype(jnp.float32))
        losses = D.diffusion_loss(
            output=output.astype(jnp.float32),
            x0=x0,
            x_t=x_t,
            noise=noise,
            t=t,
            sched=sched,
            prediction="eps",
            variance="fixed_small",
        )
        by_t = D.timestep_bucket_means(losses["loss"], t, num_steps=sched.num_steps)
        return jnp.mean(losses["loss"]), {"mse": jnp.mean(losses["mse"]), "loss_by_t": by_t}

    def make_data(process_index, process_count):
        return VectorData(
            seed=config.train.seed,
            batch_size=config.train.batch_size,
            process_index=process_index,
            process_count=process_count,
            nan_at_step=config.data.nan_at_step,
        )

    return Stage(init_params=init_params, loss_fn=loss_fn, make_data=make_data)
