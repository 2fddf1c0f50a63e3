"""Decoder train steps per second at the "bench" size: ours vs diffusers' Karlo-layout decoder.

    python benchmarks/decoder_train.py [--batch 8] [--repeats 5] [--rounds 2]
        [--remat] [--xla-cpu-ynn-off] [--skip-peer]

The bench size (issue 6): 64x64 images, batch 8, channels 64,128,192,256, 2 res blocks per
level, attention at the two lowest resolutions with head dim 64, a 512-d CLIP embedding and 77
caption tokens of width 512 (a CLIP text tower's states, Karlo's way). One train step is
forward, loss, backward and an AdamW update, on both sides:

- ours: the `Decoder` of `models.builders` (the text_proj conditioning + the U-Net), the
  eps MSE on the first 3 output channels, `optax.adamw`, the whole step one `jax.jit`;
- peer: diffusers' `UNet2DConditionModel` (ResnetDownsampleBlock2D / SimpleCrossAttn* blocks,
  scale-shift norm, class_embed_type identity) + `UnCLIPTextProjModel`, the same loss,
  `torch.optim.AdamW`, PyTorch eager with 2 threads (`torch.set_num_threads`).

Random weights and the same random inputs; the two are timed in interleaved rounds in one
process (medians of `repeats` steps per round, after a warm-up step), so the ratio is fair on a
shared machine. The last line is JSON:
    {"task": "decoder_train", "ours": steps_per_s, "peer": steps_per_s, "ratio": ours/peer}
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
from unclip_jax.models.builders import decoder_example_inputs, decoder_from_config, init_module
from unclip_jax.models.unet import count_params

SCHEDULE = D.make_schedule("cosine", 1000)  # both sides noise x0 with the same abar_t
BENCH = dict(
    resolution=64,
    channels=64,
    channel_mult=(1, 2, 3, 4),
    num_res_blocks=2,
    attention_resolutions=(16, 8),
    head_channels=64,
    dropout=0.0,
    num_groups=32,
    clip_dim=512,
    num_context_tokens=4,
    context_dim=512,
    text_encoder="clip",
    text_width=512,
    text_layers=0,
    text_heads=8,
    text_tokens=77,
    vocab_size=49408,
)


def random_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """x0, noise, t and the CLIP conditioning, float32 NHWC (the peer transposes)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, BENCH["text_tokens"]), bool)
    mask[:, 20:] = False  # a 20-token caption, the rest padding
    return dict(
        x0=rng.uniform(-1, 1, (batch, 64, 64, 3)).astype(np.float32),
        noise=rng.standard_normal((batch, 64, 64, 3)).astype(np.float32),
        t=rng.integers(0, 1000, (batch,)).astype(np.int32),
        z_i=rng.standard_normal((batch, 512)).astype(np.float32),
        text_embeds=rng.standard_normal((batch, 512)).astype(np.float32),
        text_states=rng.standard_normal((batch, 77, 512)).astype(np.float32),
        text_mask=mask,
    )


def ours(inputs: dict[str, np.ndarray], remat: bool) -> tuple[Any, int]:
    """(a step function running one jitted train step, parameter count)."""
    model = BENCH
    decoder = decoder_from_config(model)
    params = nn.meta.unbox(
        jax.jit(lambda k: init_module(decoder, decoder_example_inputs(model), k))(jax.random.key(0))
    )
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def loss_fn(p, b):
        x_t = D.q_sample(x0=b["x0"], t=b["t"], noise=b["noise"], sched=SCHEDULE)
        out = decoder.apply(
            {"params": p},
            x_t,
            b["t"],
            b["z_i"],
            b["text_embeds"],
            b["text_states"],
            b["text_mask"],
        )
        return jnp.mean((out[..., :3] - b["noise"]) ** 2)

    loss_and_grad = jax.value_and_grad(loss_fn)
    if remat:
        loss_and_grad = jax.value_and_grad(jax.checkpoint(loss_fn))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, b):
        loss, grads = loss_and_grad(p, b)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    state = {"p": params, "o": opt_state}

    def run() -> None:
        state["p"], state["o"], loss = step(state["p"], state["o"], batch)
        loss.block_until_ready()

    return run, count_params(params)


def peer_modules() -> tuple[Any, Any]:
    """(diffusers' `UNet2DConditionModel` in Karlo's block layout, `UnCLIPTextProjModel`) at
    the bench size, with seeded random weights: the peer of the decoder benchmarks."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=3,
        out_channels=6,
        down_block_types=(
            "ResnetDownsampleBlock2D",
            "ResnetDownsampleBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
        ),
        up_block_types=(
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "ResnetUpsampleBlock2D",
            "ResnetUpsampleBlock2D",
        ),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(64, 128, 192, 256),
        layers_per_block=2,
        attention_head_dim=64,
        cross_attention_dim=512,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
    )
    text_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=4,
        clip_embeddings_dim=512,
        time_embed_dim=256,
        cross_attention_dim=512,
    )
    return unet, text_proj


def peer(inputs: dict[str, np.ndarray]) -> tuple[Any, int]:
    """(a step function running one diffusers train step, parameter count)."""
    import torch

    unet, text_proj = peer_modules()
    params = list(unet.parameters()) + list(text_proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    abar = torch.from_numpy(np.asarray(SCHEDULE.alphas_cumprod))

    def nchw(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    x0, noise = nchw(inputs["x0"]), nchw(inputs["noise"])
    t = torch.from_numpy(inputs["t"].astype(np.int64))
    z_i = torch.from_numpy(inputs["z_i"])
    text_embeds = torch.from_numpy(inputs["text_embeds"])
    text_states = torch.from_numpy(inputs["text_states"])
    mask = torch.from_numpy(inputs["text_mask"])

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        a = abar[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden, additive = text_proj(
            image_embeddings=z_i,
            prompt_embeds=text_embeds,
            text_encoder_hidden_states=text_states,
            do_classifier_free_guidance=False,
        )
        full_mask = torch.nn.functional.pad(mask, (4, 0), value=True)
        out = unet(
            x_t,
            t,
            encoder_hidden_states=hidden,
            class_labels=additive,
            attention_mask=full_mask,
        ).sample
        loss = torch.mean((out[:, :3] - noise) ** 2)
        loss.backward()
        opt.step()

    return run, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--remat", action="store_true", help="rematerialise our forward")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--xla-cpu-ynn-off",
        action="store_true",
        help="XLA CPU: no YNNPACK fusions (convolutions go to Eigen; measured faster here)",
    )
    args = parser.parse_args()
    inputs = random_inputs(args.batch)
    ours_step, ours_params = ours(inputs, args.remat)
    start = time.perf_counter()
    ours_step()  # compile + first step
    print(
        f"ours: {ours_params / 1e6:.1f}M params, compile + first step {time.perf_counter() - start:.1f} s"
    )
    runs: dict[str, list[float]] = {"ours": []}
    peer_step = None
    if not args.skip_peer:
        import torch

        torch.set_num_threads(args.threads)
        peer_step, peer_params = peer(inputs)
        peer_step()  # warm-up
        print(f"peer: {peer_params / 1e6:.1f}M params")
        runs["peer"] = []
    for r in range(args.rounds):
        runs["ours"].append(median_seconds(ours_step, args.repeats))
        if peer_step is not None:
            runs["peer"].append(median_seconds(peer_step, args.repeats))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s/step" for k, v in runs.items()))
    ours_sps = 1.0 / statistics.median(runs["ours"])
    result = {"task": "decoder_train", "ours": round(ours_sps, 4)}
    if peer_step is not None:
        peer_sps = 1.0 / statistics.median(runs["peer"])
        result.update(peer=round(peer_sps, 4), ratio=round(ours_sps / peer_sps, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
