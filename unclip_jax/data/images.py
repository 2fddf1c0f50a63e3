"""Image helpers shared by the dataset builders and the input pipeline (NumPy and PIL, host side).

Images are uint8 HWC RGB arrays until the pipeline maps them to float32 in [-1, 1].
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as a uint8 (H, W, 3) RGB array, upright.

    EXIF orientation is applied; alpha is composited on white; 16-bit and 32-bit integer or
    float grey images are scaled to 8 bits (PIL's own conversion would clip them to white).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            top = 1.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize(
    image: np.ndarray, size: tuple[int, int], *, resample: int = Image.BICUBIC
) -> np.ndarray:
    """Resizes a uint8 (H, W, 3) image to (height, width) = `size`.

    PIL's resize filters scale with the downsampling factor, so shrinking is anti-aliased.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def resize_shorter_side_and_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scales the shorter side to `resolution` (anti-aliased), then crops the centre square."""
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    new_h, new_w = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    image = resize(image, (new_h, new_w), resample=Image.LANCZOS)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return image[top : top + resolution, left : left + resolution]


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
