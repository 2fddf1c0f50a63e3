"""Write examples of any dataset as PNGs, a captioned grid and a manifest, for people to look at."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def caption_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    columns: int | None = None,
    scale: int = 1,
) -> Image.Image:
    """A grid of uint8 HWC images, each with its caption written under it."""
    if not images:
        raise ValueError("no images to put in a grid")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = images[0].shape[:2]
    tile_w = max(w * scale, 128)
    font = ImageFont.load_default()
    chars = max(tile_w // 6, 8)
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions]
    text_h = 12 * max(len(lines) for lines in wrapped) + 4
    grid = Image.new("RGB", (columns * tile_w, rows * (h * scale + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % columns) * tile_w, (i // columns) * (h * scale + text_h)
        tile = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (x + (tile_w - w * scale) // 2, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + h * scale + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    return grid


def write_examples(
    images: Sequence[np.ndarray], captions: Sequence[str], out: str, *, prefix: str = "example"
) -> list[dict[str, str]]:
    """Writes `prefix_NNNN.png` per image, `grid.png` and `manifest.jsonl` into `out`.

    Returns the manifest rows ({"file": ..., "caption": ...}).
    """
    os.makedirs(out, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        name = f"{prefix}_{i:04d}.png"
        Image.fromarray(np.asarray(image, np.uint8)).save(os.path.join(out, name))
        rows.append({"file": name, "caption": caption})
    scale = max(1, 128 // images[0].shape[0])
    caption_grid(images, captions, scale=scale).save(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "manifest.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def show_dataset(
    spec: str, split: str, n: int, out: str, *, data_dir: str | None = None, **shapes_sizes: int
) -> list[dict[str, str]]:
    """The first `n` examples of `split` of dataset `spec`, written with `write_examples`.

    `shapes_sizes` (train_size, test_size, seed) pick a `shapes` build (see `open_dataset`).
    """
    from unclip_jax.data.pipeline import open_dataset

    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    source = open_dataset(spec, split, data_dir=data_dir, **shapes_sizes)
    n = min(n, len(source))
    examples = [source[i] for i in range(n)]
    return write_examples([e["image"] for e in examples], [e["caption"] for e in examples], out)
