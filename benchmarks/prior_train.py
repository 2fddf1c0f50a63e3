"""Diffusion-prior train steps per second at the "bench" size: ours vs diffusers' PriorTransformer.

    python benchmarks/prior_train.py [--batch 64] [--repeats 3] [--rounds 2]
        [--xla-cpu-ynn-off] [--skip-peer] [--flops] [--profile DIR]

The bench size (issue 7, section 6): 6 layers, width 512, 8 heads (head dim 64), 512-d
embeddings (z_i, z_t), 77 caption tokens whose states have width 512 (a CLIP text tower's),
batch 64. One train step is forward, loss, backward and an AdamW update, on both sides:

- ours: `unclip_jax.models.prior.DiffusionPrior`; z_i noised by `diffusion.q_sample` (cosine
  schedule, 1000 steps), the x0 MSE, `optax.adamw`, the whole step one `jax.jit` with the
  params and optimiser state donated;
- peer: diffusers' `PriorTransformer` in Karlo's layout (`additional_embeddings=4`, the prd
  query token, the causal mask with the caption's padding), the same noising and loss,
  `torch.optim.AdamW`, PyTorch eager with 2 threads (`torch.set_num_threads`). Its
  `clip_mean`/`clip_std` are embedding statistics, not trained weights: frozen and not counted.

Random weights and the same random inputs (a 20-token caption, the rest padding); the two are
timed in interleaved rounds in one process (medians of `repeats` steps per round, after a
warm-up step), so the ratio is fair on a shared machine. `--flops` prints XLA's cost analysis
of our step and PyTorch's `FlopCounterMode` count of the peer's; `--profile DIR` writes a
`jax.profiler` trace of 2 of our steps. The last line is JSON:
    {"task": "prior_train", "ours": steps_per_s, "peer": steps_per_s, "ratio": ours/peer}
Needs the `peers` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Any

# XLA's CPU flags are read when the backend starts, so this one is decided before jax loads.
if "--xla-cpu-ynn-off" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="
    ).strip()

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import median_seconds

from unclip_jax import diffusion as D
from unclip_jax.models.prior import DiffusionPrior
from unclip_jax.models.unet import count_params

SCHEDULE = D.make_schedule("cosine", 1000)  # both sides noise x0 with the same abar_t
BENCH = dict(clip_dim=512, width=512, layers=6, heads=8, text_tokens=77, text_width=512)


def random_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """x0 (the scaled z_i), noise, t, z_t and the caption states with their mask."""
    rng = np.random.default_rng(seed)
    d, length = BENCH["clip_dim"], BENCH["text_tokens"]
    mask = np.ones((batch, length), bool)
    mask[:, 20:] = False  # a 20-token caption, the rest padding
    return dict(
        x0=rng.standard_normal((batch, d)).astype(np.float32),
        noise=rng.standard_normal((batch, d)).astype(np.float32),
        t=rng.integers(0, 1000, (batch,)).astype(np.int32),
        z_t=rng.standard_normal((batch, d)).astype(np.float32),
        text_states=rng.standard_normal((batch, length, BENCH["text_width"])).astype(np.float32),
        text_mask=mask,
    )


def our_model() -> DiffusionPrior:
    return DiffusionPrior(
        clip_dim=BENCH["clip_dim"],
        width=BENCH["width"],
        layers=BENCH["layers"],
        heads=BENCH["heads"],
        text_tokens=BENCH["text_tokens"],
    )


def ours(inputs: dict[str, np.ndarray]) -> tuple[Any, int, Any]:
    """(a step function running one jitted train step, parameter count, the jitted step and
    its arguments, for cost analysis)."""
    prior = our_model()
    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    params = nn.meta.unbox(
        jax.jit(
            lambda k: prior.init(
                k, batch["x0"], batch["t"], batch["z_t"], batch["text_states"], batch["text_mask"]
            )["params"]
        )(jax.random.key(0))
    )
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def loss_fn(p, b):
        x_t = D.q_sample(x0=b["x0"], t=b["t"], noise=b["noise"], sched=SCHEDULE)
        pred = prior.apply({"params": p}, x_t, b["t"], b["z_t"], b["text_states"], b["text_mask"])
        return jnp.mean((pred - b["x0"]) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    state = {"p": params, "o": opt_state}

    def run() -> None:
        state["p"], state["o"], loss = step(state["p"], state["o"], batch)
        loss.block_until_ready()

    return run, count_params(params), (step, state, batch)


def peer(inputs: dict[str, np.ndarray]) -> tuple[Any, int]:
    """(a step function running one diffusers train step, parameter count)."""
    import torch
    from diffusers import PriorTransformer

    torch.manual_seed(0)
    model = PriorTransformer(
        num_attention_heads=BENCH["heads"],
        attention_head_dim=BENCH["width"] // BENCH["heads"],
        num_layers=BENCH["layers"],
        embedding_dim=BENCH["clip_dim"],
        num_embeddings=BENCH["text_tokens"],
        additional_embeddings=4,
    )
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    abar = torch.from_numpy(np.array(SCHEDULE.alphas_cumprod, np.float32))
    x0, noise = torch.from_numpy(inputs["x0"]), torch.from_numpy(inputs["noise"])
    t = torch.from_numpy(inputs["t"].astype(np.int64))
    z_t = torch.from_numpy(inputs["z_t"])
    text_states = torch.from_numpy(inputs["text_states"])
    mask = torch.from_numpy(inputs["text_mask"])

    def forward_loss() -> Any:
        a = abar[t][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(
            hidden_states=x_t,
            timestep=t,
            proj_embedding=z_t,
            encoder_hidden_states=text_states,
            attention_mask=mask,
        ).predicted_image_embedding
        return torch.mean((pred - x0) ** 2)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        forward_loss().backward()
        opt.step()

    run.forward_loss = forward_loss  # for --flops
    return run, sum(p.numel() for p in params)


def report_flops(our_jit: Any, peer_step: Any) -> None:
    """GFLOP of one train step: XLA's cost analysis (ours), FlopCounterMode (the peer's forward
    and backward; AdamW's elementwise update is not counted there)."""
    step, state, batch = our_jit
    cost = step.lower(state["p"], state["o"], batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"ours: XLA cost analysis {cost.get('flops', 0) / 1e9:.1f} GFLOP, "
        f"{cost.get('bytes accessed', 0) / 1e9:.2f} GB accessed per step"
    )
    if peer_step is not None:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            peer_step.forward_loss().backward()
        by_op = counter.get_flop_counts().get("Global", {})
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:6]
        print(
            f"peer: FlopCounterMode {counter.get_total_flops() / 1e9:.1f} GFLOP forward+backward ("
            + ", ".join(f"{op}: {n / 1e9:.1f}" for op, n in top)
            + ")"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--flops", action="store_true", help="print both steps' FLOP counts")
    parser.add_argument("--profile", metavar="DIR", help="jax.profiler trace of 2 of our steps")
    parser.add_argument(
        "--xla-cpu-ynn-off",
        action="store_true",
        help="XLA CPU: no YNNPACK fusions (--xla_cpu_experimental_ynn_fusion_type=)",
    )
    args = parser.parse_args()
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {os.getloadavg()[0]:.2f}")
    inputs = random_inputs(args.batch)
    ours_step, ours_params, our_jit = ours(inputs)
    start = time.perf_counter()
    ours_step()  # compile + first step
    print(
        f"ours: {ours_params / 1e6:.2f}M params ({ours_params}), "
        f"compile + first step {time.perf_counter() - start:.1f} s"
    )
    runs: dict[str, list[float]] = {"ours": []}
    peer_step = None
    if not args.skip_peer:
        import torch

        torch.set_num_threads(args.threads)
        peer_step, peer_params = peer(inputs)
        peer_step()  # warm-up
        print(f"peer: {peer_params / 1e6:.2f}M params ({peer_params})")
        runs["peer"] = []
    if args.flops:
        report_flops(our_jit, peer_step)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(2):
                ours_step()
        print(f"trace written under {args.profile}")
    for r in range(args.rounds):
        runs["ours"].append(median_seconds(ours_step, args.repeats))
        if peer_step is not None:
            runs["peer"].append(median_seconds(peer_step, args.repeats))
        print(
            f"round {r} (load {os.getloadavg()[0]:.2f}): "
            + ", ".join(f"{k} {v[-1]:.3f} s/step" for k, v in runs.items())
        )
    ours_sps = 1.0 / statistics.median(runs["ours"])
    result = {"task": "prior_train", "ours": round(ours_sps, 4)}
    if peer_step is not None:
        peer_sps = 1.0 / statistics.median(runs["peer"])
        result.update(peer=round(peer_sps, 4), ratio=round(ours_sps / peer_sps, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
