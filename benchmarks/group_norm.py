"""The `shapes` decoder's train step with our GroupNorm against flax's `nn.GroupNorm`.

    python benchmarks/group_norm.py [--config shapes] [--batch 16] [--repeats 20] [--rounds 3]

The decoder of `configs/decoder.py:VARIANT` (the CPU demo's by default), random weights and
inputs, one jitted step of forward, the v-MSE on the first 3 output channels, backward and an
Adam update. The two steps differ only in the U-Net's GroupNorm layers (the `_group_norm`
factory of `models/unet.py`, swapped while each step is traced) and are timed in interleaved
rounds (medians of `repeats` steps per round) so the ratio is fair on a shared machine. The
last line is JSON:
    {"task": "group_norm", "ours_s": s_per_step, "flax_s": s_per_step, "speedup": flax/ours}
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from typing import Any
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import median_seconds

from unclip_jax import diffusion as D
from unclip_jax.config import load_config
from unclip_jax.models import unet
from unclip_jax.models.builders import decoder_example_inputs, decoder_from_config, init_module

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def flax_group_norm(num_groups: int, eps: float, *, name: str, dtype: Any) -> nn.GroupNorm:
    """flax's GroupNorm with the params ours has (the U-Net's factory until 2026-12-07)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def train_step(model: dict[str, Any], batch: int, group_norm: Any) -> Any:
    """A no-argument function running one train step of the decoder built with `group_norm`."""
    decoder = decoder_from_config(model)
    sched = D.make_schedule("cosine", 1000)
    rng = np.random.default_rng(0)
    inputs = {
        k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) if v.dtype != bool else v
        for k, v in decoder_example_inputs(model, batch).items()
    }
    x0 = jnp.asarray(rng.uniform(-1, 1, inputs["x"].shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    params = nn.meta.unbox(init_module(decoder, decoder_example_inputs(model), jax.random.key(0)))
    tx = optax.adam(1e-4)

    def loss_fn(p: Any) -> jax.Array:
        noise = inputs["x"]
        x_t = D.q_sample(x0=x0, t=t, noise=noise, sched=sched)
        out = decoder.apply({"params": p}, **{**inputs, "x": x_t, "t": t})
        v = D.v_target(x0=x0, eps=noise, t=t, sched=sched)
        return jnp.mean((out[..., :3] - v) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p: Any, o: Any) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state = {"p": params, "o": tx.init(params)}

    def run() -> None:
        state["p"], state["o"], loss = step(state["p"], state["o"])
        loss.block_until_ready()

    with mock.patch.object(unet, "_group_norm", group_norm):
        run()  # traced and compiled with this GroupNorm
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shapes", help="configs/decoder.py variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load_config(f"{CONFIGS}/decoder.py:{args.config}", {}).model.to_dict()
    steps = {
        "ours": train_step(model, args.batch, unet._group_norm),
        "flax": train_step(model, args.batch, flax_group_norm),
    }
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name, run in steps.items():
            seconds[name].append(median_seconds(run, args.repeats, warmup=True))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.4f} s/step" for k, v in seconds.items()))
    ours, theirs = (statistics.median(seconds[k]) for k in ("ours", "flax"))
    print(
        json.dumps(
            {
                "task": "group_norm",
                "config": args.config,
                "batch": args.batch,
                "ours_s": round(ours, 5),
                "flax_s": round(theirs, 5),
                "speedup": round(theirs / ours, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
