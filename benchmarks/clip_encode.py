"""Images per second through CLIP's image tower at the ViT-B/32 shape: ours vs transformers.

    python benchmarks/clip_encode.py [--batch 32] [--repeats 5] [--dtype float32]
        [--vit b32|l14] [--torch-device cpu|cuda]

Random weights (the shape is what matters for speed); the same pixels go through our jitted
image tower (`encode_pixels`; `encode_image`, which adds the host preprocessing, is timed too)
and through transformers' PyTorch `CLIPModel` (vision tower + projection) in the
same run, so the ratio is fair on a shared machine. Needs the `peers` extra for the comparison.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from unclip_jax import clip
from unclip_jax.models.clip import OPENAI_VIT_B32, OPENAI_VIT_L14

SHAPES = {"b32": OPENAI_VIT_B32, "l14": OPENAI_VIT_L14}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--vit", default="b32", choices=sorted(SHAPES))
    parser.add_argument("--torch-device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    import torch
    import transformers

    config = SHAPES[args.vit]
    hf = config.to_hf_dict()
    hf_config = transformers.CLIPConfig(
        text_config=hf["text_config"],
        vision_config=hf["vision_config"],
        projection_dim=config.projection_dim,
    )
    torch.manual_seed(0)
    peer = transformers.CLIPModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        from unclip_jax.models.clip_tokenizer import ClipTokenizer

        ClipTokenizer.train(["a photo of a cat", "a dog"] * 10, vocab_size=600).save(tmp)
        ours = clip.load_pretrained(tmp, dtype=getattr(jnp, args.dtype))
    size = config.vision.image_size
    pixels = (
        np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)
    )
    device_pixels = jax.device_put(pixels)

    ours_s = median_seconds(
        lambda: ours.encode_pixels(device_pixels).block_until_ready(), args.repeats, warmup=True
    )
    # encode_image: uint8 photos of another size, with CLIP's preprocessing on the host.
    photos = np.random.default_rng(1).integers(0, 256, (args.batch, 256, 320, 3), np.uint8)
    image_s = median_seconds(
        lambda: ours.encode_image(photos).block_until_ready(), args.repeats, warmup=True
    )
    torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    peer = peer.to(args.torch_device, dtype=torch_dtype)
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(
        args.torch_device, torch_dtype
    )

    def run_peer() -> None:
        with torch.no_grad():
            peer.visual_projection(peer.vision_model(pixel_values=torch_pixels).pooler_output)
        if args.torch_device == "cuda":
            torch.cuda.synchronize()

    peer_s = median_seconds(run_peer, args.repeats, warmup=True)
    print(
        f"ViT-{args.vit.upper()} image tower, batch {args.batch}, {args.dtype}, jax on "
        f"{jax.devices()[0].device_kind}, torch on {args.torch_device} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"  unclip_jax:   {args.batch / ours_s:8.1f} images/s ({ours_s * 1e3:.1f} ms/batch)")
    print(
        f"  unclip_jax encode_image (256x320 uint8, host preprocessing): {args.batch / image_s:.1f} images/s"
    )
    print(f"  transformers: {args.batch / peer_s:8.1f} images/s ({peer_s * 1e3:.1f} ms/batch)")
    print(f"  ours / transformers: {peer_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
