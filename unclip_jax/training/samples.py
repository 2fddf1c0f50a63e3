"""Sample grids written during training: a PNG per step in WORKDIR/samples and TensorBoard."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from unclip_jax.data.images import to_uint8
from unclip_jax.data.show import caption_grid
from unclip_jax.training.stages import HookContext

log = logging.getLogger("unclip_jax.train")


def gather_to_host(images: np.ndarray | jax.Array) -> np.ndarray:
    """The whole array as numpy on every process (every process must call it: a global array
    whose shards live on several processes is all-gathered)."""
    if isinstance(images, jax.Array) and not images.is_fully_addressable:
        images = multihost_utils.process_allgather(images, tiled=True)
    return np.asarray(images)


def write_sample_grid(
    ctx: HookContext,
    name: str,
    images: np.ndarray | jax.Array,
    captions: Sequence[str],
    *,
    columns: int | None = None,
) -> str:
    """Writes float images in [-1, 1] (B, H, W, 3) as WORKDIR/samples/NAME_STEP.png (captioned)
    and as a TensorBoard image batch `samples/NAME`. Every process calls it (a global array
    is gathered); process 0 writes. Returns the PNG's path."""
    path = epath.Path(ctx.workdir, "samples", f"{name}_{ctx.step:08d}.png")
    images = gather_to_host(images)
    if jax.process_index() != 0:
        return str(path)
    pixels = to_uint8(np.asarray(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // pixels.shape[1])
    png = io.BytesIO()  # through bytes: the workdir may be a URI (gs://...)
    caption_grid(list(pixels), list(captions), columns=columns, scale=scale).save(png, "PNG")
    path.write_bytes(png.getvalue())
    ctx.writer.write_images(ctx.step, f"samples/{name}", pixels)
    log.info("wrote %d samples to %s", len(pixels), path)
    return str(path)
