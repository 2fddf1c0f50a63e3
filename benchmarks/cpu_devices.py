"""The `shapes` decoder's train step on 1, 2, ... XLA CPU devices (data parallel) in one process.

    python benchmarks/cpu_devices.py [--devices 1 2 4] [--ynn off on] [--batch 16] [--repeats 20]
        [--rounds 2]

JAX gives a CPU one device; `--xla_force_host_platform_device_count=N` gives N, and a batch
sharded over them runs each device's half (third, ...) on its own thread. The demo runs every
stage on one device per core (`demo.demo_cpu_devices`); this measures why. Each device count
runs in a child process of its own (the flag is read when JAX starts), in interleaved rounds,
each timing the decoder of `configs/decoder.py:VARIANT` (random weights and inputs, forward,
the v-MSE, backward and an Adam update, one `jax.jit` with the batch sharded over a `data`
mesh axis and the params replicated). `--ynn` times each count with XLA's YNNPACK fusions
off (`--xla_cpu_experimental_ynn_fusion_type=`, `cli.CPU_XLA_FLAGS`), on (jaxlib's default)
or both. The last line is JSON, keyed "DEVICES ynn-MODE", speedups against the first key:
    {"task": "cpu_devices", "s_per_step": {"1 ynn-off": ..., ...}, "speedup": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def child(devices: int, config: str, batch: int, repeats: int) -> float:
    """Seconds per train step on `devices` CPU devices (run in a fresh process)."""
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec
    from timing import median_seconds

    from unclip_jax import diffusion as D
    from unclip_jax.config import load_config
    from unclip_jax.models.builders import (
        decoder_example_inputs,
        decoder_from_config,
        init_module,
    )

    assert jax.device_count() == devices, jax.devices()
    model = load_config(f"{CONFIGS}/decoder.py:{config}", {}).model.to_dict()
    decoder = decoder_from_config(model)
    sched = D.make_schedule("cosine", 1000)
    rng = np.random.default_rng(0)
    inputs = {
        k: np.asarray(v) if v.dtype == bool else rng.standard_normal(v.shape).astype(v.dtype)
        for k, v in decoder_example_inputs(model, batch).items()
    }
    inputs["x0"] = rng.uniform(-1, 1, inputs["x"].shape).astype(np.float32)
    inputs["t"] = rng.integers(0, 1000, batch).astype(np.int32)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_arrays = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec("data")))
    params = nn.meta.unbox(init_module(decoder, decoder_example_inputs(model), jax.random.key(0)))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    tx = optax.adam(1e-4)

    def loss_fn(p, b):
        x_t = D.q_sample(x0=b["x0"], t=b["t"], noise=b["x"], sched=sched)
        cond = {k: v for k, v in b.items() if k not in ("x", "x0", "t")}
        out = decoder.apply({"params": p}, x_t, b["t"], **cond)
        v = D.v_target(x0=b["x0"], eps=b["x"], t=b["t"], sched=sched)
        return jnp.mean((out[..., :3] - v) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state = {"p": params, "o": tx.init(params)}

    def run() -> None:
        state["p"], state["o"], loss = step(state["p"], state["o"], batch_arrays)
        loss.block_until_ready()

    for _ in range(repeats):  # the first steps on a fresh process run slowly: not timed
        run()
    return median_seconds(run, repeats, warmup=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--ynn",
        nargs="+",
        choices=("off", "on"),
        default=["off"],
        help="XLA's YNNPACK fusions off (the U-Net stages' CPU_XLA_FLAGS), on (the default)",
    )
    parser.add_argument("--config", default="shapes", help="configs/decoder.py variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config, args.batch, args.repeats)))
        return
    arms = [(n, ynn) for n in args.devices for ynn in args.ynn]
    seconds: dict[str, list[float]] = {f"{n} ynn-{ynn}": [] for n, ynn in arms}
    for r in range(args.rounds):
        for n, ynn in arms:
            if args.batch % n:
                raise SystemExit(f"--batch {args.batch} does not split over {n} devices")
            env = dict(os.environ)
            # The device count, and YNNPACK's fusions off as cli.CPU_XLA_FLAGS turns them off.
            off = "--xla_cpu_experimental_ynn_fusion_type= " if ynn == "off" else ""
            env["XLA_FLAGS"] = f"{off}--xla_force_host_platform_device_count={n}"
            command = [sys.executable, __file__, "--child", str(n), "--config", args.config]
            out = subprocess.run(
                [*command, "--batch", str(args.batch), "--repeats", str(args.repeats)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            seconds[f"{n} ynn-{ynn}"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r}: " + ", ".join(f"{k}: {v[-1]:.4f} s/step" for k, v in seconds.items()))
    median = {n: statistics.median(v) for n, v in seconds.items()}
    base = median[next(iter(median))]
    print(
        json.dumps(
            {
                "task": "cpu_devices",
                "config": args.config,
                "batch": args.batch,
                "s_per_step": {k: round(s, 5) for k, s in median.items()},
                "speedup": {k: round(base / s, 3) for k, s in median.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
