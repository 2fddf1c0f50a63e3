"""Forward and forward+backward time of a conv3x3 stack: XLA autodiff vs our custom VJP.

    python benchmarks/conv_grad.py [--batch 8] [--size 64] [--channels 128] [--layers 4]
        [--repeats 3] [--rounds 3] [--dtype float32]

PERF.md's setting by default: 4 conv3x3 layers (SiLU between), 128 channels, 64x64, batch 8,
loss mean(y^2). Times `unclip_jax.models.conv.conv2d` with impl="xla" (autodiff of
lax.conv_general_dilated) and impl="custom" (hand-written backward) in the same run, jitted
and compiled first, the two interleaved over `--rounds` rounds (median of the rounds' medians
of `--repeats` calls), and prints the xla/custom ratio. Also prints the
largest gradient difference between the two, relative to the gradient's largest entry.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
from timing import median_seconds

from unclip_jax.models.conv import conv2d


def main() -> None:
    """Parse flags, time both impls, print a small table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()

    dtype = jnp.dtype(a.dtype)
    key = jax.random.PRNGKey(0)
    c = a.channels
    kernels = [
        (jax.random.normal(jax.random.fold_in(key, i), (3, 3, c, c)) * 0.05).astype(dtype)
        for i in range(a.layers)
    ]
    x = jax.random.normal(key, (a.batch, a.size, a.size, c)).astype(dtype)
    # Multiply-adds of one forward pass, x2 for flops; the backward is two such passes.
    flops_fwd = 2 * a.batch * a.size * a.size * c * c * 9 * a.layers

    print(f"backend={jax.default_backend()} devices={jax.device_count()} dtype={dtype.name}")
    print(
        f"{a.layers} conv3x3 layers, {c} channels, {a.size}x{a.size}, batch {a.batch}, "
        f"median of {a.rounds} interleaved rounds of median-of-{a.repeats}"
    )
    fns = {}
    for impl in ("xla", "custom"):

        def loss(kernels, x, impl=impl):
            for k in kernels:
                x = jax.nn.silu(conv2d(x, k, impl=impl))
            return jnp.mean(jnp.square(x.astype(jnp.float32)))

        fwd = jax.jit(loss)
        fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        jax.block_until_ready((fwd(kernels, x), fwd_bwd(kernels, x)))  # compile outside timing
        fns[impl] = (fwd, fwd_bwd)
    # Interleave the impls round by round so load from other users of a shared machine falls
    # on both alike; each round times every function `repeats` times and keeps the median.
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for impl, (fwd, fwd_bwd) in fns.items():
            for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                t = median_seconds(
                    lambda fn=fn: jax.block_until_ready(fn(kernels, x)), a.repeats, warmup=True
                )
                times.setdefault((impl, name), []).append(t)
    results = {}
    for impl, (_, fwd_bwd) in fns.items():
        t_fwd = statistics.median(times[(impl, "fwd")])
        t_all = statistics.median(times[(impl, "fwd_bwd")])
        results[impl] = (t_fwd, t_all, fwd_bwd(kernels, x)[1])
        print(
            f"  impl={impl:<6}  forward {t_fwd * 1e3:7.0f} ms ({flops_fwd / t_fwd / 1e9:5.1f} "
            f"GFLOP/s)   forward+backward {t_all * 1e3:7.0f} ms "
            f"({3 * flops_fwd / t_all / 1e9:5.1f} GFLOP/s)"
        )
    (xf, xa, xg), (cf, ca, cg) = results["xla"], results["custom"]
    print(f"  ratio xla/custom: forward {xf / cf:.2f}x, forward+backward {xa / ca:.2f}x")
    rel = max(
        float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
        / float(jnp.max(jnp.abs(r.astype(jnp.float32))))
        for g, r in zip(jax.tree.leaves(cg), jax.tree.leaves(xg), strict=True)
    )
    print(f"  max |grad_custom - grad_xla| / max |grad_xla| = {rel:.1e}")


if __name__ == "__main__":
    main()
