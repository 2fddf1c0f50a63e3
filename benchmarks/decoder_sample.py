"""Decoder sampling, seconds per 64x64 image at the "bench" size: ours vs diffusers.

    python benchmarks/decoder_sample.py [--batch 4] [--steps 25] [--repeats 1] [--rounds 3]
        [--xla-cpu-ynn-off] [--skip-peer] [--cost-analysis]

The bench size is `decoder_train.BENCH` (64x64, channels 64,128,192,256, 2 res blocks,
attention at 16 and 8 px, a 512-d z_i, 77 caption states of width 512), with 6 output
channels (eps and the learned-range variance, as Karlo's decoder). One sample of a batch of
`--batch` conditionings is `--steps` guided DDIM steps (eta 0, x0 clipped to [-1, 1],
guidance scale 8.0 as Karlo's decoder), each step one model call on the doubled batch
[cond; uncond], the unconditional half with z_i replaced by the learned null embedding and the
caption dropped. Both sides, from the conditioning to the final x0:

- ours: `sampling.stages.decoder_sampler` on the `Decoder` of `models.builders` (schedule
  cosine over 1000 steps respaced to "ddim25", the whole loop one jitted call, x_T drawn
  inside it);
- peer: diffusers' `UNet2DConditionModel` + `UnCLIPTextProjModel` as `decoder_train.peer`
  builds them, driven the way `UnCLIPPipeline`'s decoder loop drives them (text_proj once,
  with the learned guidance embedding for the unconditional half and a 2-token "empty
  caption"; the U-Net on the doubled batch; eps guided; the step taken by diffusers'
  `DDIMScheduler`, cosine, the same 25 timesteps 960, 920, ..., 0), in
  `torch.inference_mode()` with 2 threads.

Random weights; the two are timed in interleaved rounds in one process (medians of `repeats`
samples per round, after a warm-up / compile call). Each round prints the process's CPU seconds
per wall second: with 2 threads on the 2-core machine, well below 2 means a busy neighbour
(PyTorch's fixed threads suffer far more from one, so quote only rounds near 2 on both
sides). The last line is JSON:
    {"task": "decoder_sample", "ours": images_per_s, "peer": images_per_s, "ratio": ours/peer}
Needs the `peers` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
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
from decoder_train import BENCH, peer_modules, random_inputs
from timing import median_seconds

from unclip_jax.models.builders import decoder_example_inputs, decoder_from_config, init_module
from unclip_jax.models.unet import count_params
from unclip_jax.sampling.stages import decoder_sampler

DIFFUSION = {
    "schedule": "cosine",
    "num_steps": 1000,
    "prediction": "eps",
    "variance": "learned_range",
}
GUIDANCE_SCALE = 8.0  # Karlo's decoder


def sampling_config(steps: int) -> dict[str, Any]:
    """The `sampling` block of a guided DDIM run of `steps` steps (eta 0, x0 clipped)."""
    return {
        "steps": f"ddim{steps}",
        "method": "ddim",
        "eta": 0.0,
        "guidance_scale": GUIDANCE_SCALE,
        "clip_x0": 1.0,
        "dynamic_threshold": 0.0,
    }


def conditioning(batch: int) -> dict[str, np.ndarray]:
    """z_i, the pooled caption embedding, the caption states and mask (a 20-token caption)."""
    inputs = random_inputs(batch)
    return {k: inputs[k] for k in ("z_i", "text_embeds", "text_states", "text_mask")}


def ours(cond: dict[str, np.ndarray], steps: int) -> tuple[Any, int]:
    """(a function drawing one batch of samples with our jitted sampler, parameter count)."""
    decoder = decoder_from_config(BENCH)  # 6 output channels: eps + learned-range variance
    params = nn.meta.unbox(
        jax.jit(lambda k: init_module(decoder, decoder_example_inputs(BENCH), k))(jax.random.key(0))
    )
    sample = decoder_sampler(decoder, DIFFUSION, sampling_config(steps), resolution=64)
    cond_j = {k: jnp.asarray(v) for k, v in cond.items()}
    key = jax.random.key(1)

    def run() -> None:
        jax.block_until_ready(sample(params, cond_j, key))

    run.sample, run.params, run.cond = sample, params, cond_j  # for --cost-analysis
    return run, count_params(params)


def peer(cond: dict[str, np.ndarray], steps: int) -> tuple[Any, int]:
    """(a function drawing one batch of samples with diffusers, parameter count)."""
    import torch
    from diffusers import DDIMScheduler

    unet, text_proj = peer_modules()  # decoder_train's peer: one architecture, built once
    n_params = sum(p.numel() for p in list(unet.parameters()) + list(text_proj.parameters()))
    unet.eval()
    text_proj.eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=DIFFUSION["num_steps"],
        beta_schedule="squaredcos_cap_v2",  # the cosine schedule
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",  # 960, 920, ..., 0: ours "ddimN"
        prediction_type="epsilon",
    )
    batch = cond["z_i"].shape[0]
    z_i = torch.from_numpy(cond["z_i"])
    # UnCLIPPipeline's unconditional half: the empty caption "" through the text encoder
    # (here random states of the same shape; its mask keeps the start and end tokens).
    rng = np.random.default_rng(1)
    empty_states = rng.standard_normal(cond["text_states"].shape).astype(np.float32)
    empty_embeds = rng.standard_normal(cond["text_embeds"].shape).astype(np.float32)
    empty_mask = np.zeros_like(cond["text_mask"])
    empty_mask[:, :2] = True
    # [uncond; cond], the pipeline's order.
    text_embeds = torch.from_numpy(np.concatenate([empty_embeds, cond["text_embeds"]]))
    text_states = torch.from_numpy(np.concatenate([empty_states, cond["text_states"]]))
    text_mask = torch.from_numpy(np.concatenate([empty_mask, cond["text_mask"]]))
    generator = torch.Generator().manual_seed(1)

    @torch.inference_mode()
    def run() -> None:
        hidden, additive = text_proj(
            image_embeddings=z_i,
            prompt_embeds=text_embeds,
            text_encoder_hidden_states=text_states,
            do_classifier_free_guidance=True,
        )
        mask = torch.nn.functional.pad(
            text_mask, (text_proj.clip_extra_context_tokens, 0), value=True
        )
        scheduler.set_timesteps(steps)
        x = torch.randn((batch, 3, 64, 64), generator=generator)
        for t in scheduler.timesteps:
            out = unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=hidden,
                class_labels=additive,
                attention_mask=mask,
            ).sample
            eps_u, eps_c = out[:, :3].chunk(2)
            eps = eps_u + GUIDANCE_SCALE * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample

    return run, n_params


def timed(fn: Any, repeats: int) -> tuple[float, float]:
    """(median seconds of `fn()`, this process's CPU seconds per wall second meanwhile): on the
    2-core machine a busy neighbour shows as a cpu/wall well below 2."""
    cpu, wall = os.times(), time.perf_counter()
    seconds = median_seconds(fn, repeats)
    used = sum(os.times()[:2]) - sum(cpu[:2])
    return seconds, used / (time.perf_counter() - wall)


def cost_analysis(run: Any) -> None:
    """Prints XLA's FLOP and byte counts of our sample call (XLA counts the sampling loop's
    body once: one guided model call on the doubled batch)."""
    compiled = run.sample.lower(run.params, run.cond, jax.random.key(1)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"ours: XLA cost analysis (loop body once): {cost.get('flops', 0) / 1e9:.1f} GFLOP, "
        f"{cost.get('bytes accessed', 0) / 1e9:.1f} GB accessed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--xla-cpu-ynn-off",
        action="store_true",
        help="XLA CPU: no YNNPACK fusions (convolutions go to Eigen)",
    )
    parser.add_argument(
        "--cost-analysis", action="store_true", help="print XLA's FLOP count of our sample call"
    )
    args = parser.parse_args()
    cond = conditioning(args.batch)
    ours_run, ours_params = ours(cond, args.steps)
    if args.cost_analysis:
        cost_analysis(ours_run)
    start = time.perf_counter()
    ours_run()  # compile + first sample
    print(
        f"ours: {ours_params / 1e6:.1f}M params, compile + first sample "
        f"{time.perf_counter() - start:.1f} s"
    )
    runs: dict[str, list[float]] = {"ours": []}
    peer_run = None
    if not args.skip_peer:
        import torch

        torch.set_num_threads(args.threads)
        peer_run, peer_params = peer(cond, args.steps)
        peer_run()  # warm-up
        print(f"peer: {peer_params / 1e6:.1f}M params")
        runs["peer"] = []
    sides = {"ours": ours_run, "peer": peer_run}
    for r in range(args.rounds):
        report = []
        for name in runs:
            seconds, cpu = timed(sides[name], args.repeats)
            runs[name].append(seconds / args.batch)
            report.append(f"{name} {runs[name][-1]:.3f} s/image (cpu/wall {cpu:.2f})")
        print(f"round {r}: " + ", ".join(report) + f"; load {os.getloadavg()[0]:.2f}")
    summary = {k: statistics.median(v) for k, v in runs.items()}
    for k, s in summary.items():
        print(f"{k}: {s:.3f} s/image, {1.0 / s:.3f} images/s")
    result = {"task": "decoder_sample", "ours": round(1.0 / summary["ours"], 4)}
    if peer_run is not None:
        result.update(
            peer=round(1.0 / summary["peer"], 4),
            ratio=round(summary["peer"] / summary["ours"], 3),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
