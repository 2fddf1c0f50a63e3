"""Images per second through CLIP's image tower at the ViT-B/32 shape: ours vs transformers.

    python benchmarks/clip_encode.py [--batch 32] [--repeats 5] [--dtype float32]

Random weights (the shape is what matters for speed); the same pixels go through our jitted
`encode_image` and through transformers' PyTorch `CLIPModel` (vision tower + projection) in the
same run, so the ratio is fair on a shared machine. Needs the `peers` extra for the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import clip
from unclip_jax.models.clip import ClipConfig, TextConfig, VisionConfig

VIT_B32 = ClipConfig(
    text=TextConfig(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8
    ),
    vision=VisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    ),
    projection_dim=512,
)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    import torch
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf_config = transformers.CLIPConfig(
        text_config=VIT_B32.to_hf_dict()["text_config"],
        vision_config=VIT_B32.to_hf_dict()["vision_config"],
        projection_dim=512,
    )
    torch.manual_seed(0)
    peer = transformers.CLIPModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        from unclip_jax.models.clip_tokenizer import ClipTokenizer

        ClipTokenizer.train(["a photo of a cat", "a dog"] * 10, vocab_size=600).save(tmp)
        ours = clip.load_pretrained(tmp, dtype=getattr(jnp, args.dtype))
    pixels = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    device_pixels = jax.device_put(pixels)

    ours_s = median_seconds(
        lambda: ours.encode_pixels(device_pixels).block_until_ready(), args.repeats
    )
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

    def run_peer() -> None:
        with torch.no_grad():
            peer.visual_projection(peer.vision_model(pixel_values=torch_pixels).pooler_output)

    peer_s = median_seconds(run_peer, args.repeats)
    print(
        f"ViT-B/32 image tower, batch {args.batch}, {jax.devices()[0].device_kind}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"unclip_jax ({args.dtype}): {args.batch / ours_s:7.1f} images/s ({ours_s * 1e3:.0f} ms/batch)"
    )
    print(
        f"transformers (float32): {args.batch / peer_s:7.1f} images/s ({peer_s * 1e3:.0f} ms/batch)"
    )
    print(f"ratio ours / transformers: {peer_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
