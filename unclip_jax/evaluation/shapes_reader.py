"""Reads the five attributes of a `shapes` picture by plain image analysis (no model).

The spec (specs/shapes.md, constants in `data.shapes`) fixes every colour and the geometry, so
a picture can be read back directly, which is what an independent checker does and what a
generated sample is judged by:

- background: the median colour of the border pixels, nearest of the three backgrounds;
- object pixels: those nearer to one of the six object colours than to the background (each
  pixel to its nearest palette entry, so an anti-aliased edge counts where it is half covered);
- colour: the object colour most pixels are nearest to; the object is then that colour's
  pixels (a stray pixel of another colour does not move the box);
- size and position: the object's bounding box, side max(width, height) in units of the
  image side against the small (0.25) and large (0.45) boxes, centre nearest of the five;
- shape: how much of its box the object fills, circle pi/4, square 1, triangle 1/2.

A picture with no object pixels reads as -1 for shape, colour, size and position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unclip_jax.data.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

_BACKGROUNDS = np.array(list(BACKGROUNDS.values()), np.float32)
_COLOURS = np.array(list(COLOURS.values()), np.float32)
_POSITIONS = np.array(list(POSITIONS.values()), np.float32)
# Fill of the box: circle pi/4 = 0.785, square 1, triangle 0.5; the thresholds sit between.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_SMALL_LARGE_SPLIT = (SIZES["small"] * 1.1 + SIZES["large"] * 0.9) / 2  # 0.34


def read_shapes_image(image: np.ndarray) -> dict[str, int]:
    """The integer labels (spec order) of one uint8 (H, W, 3) `shapes` picture."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {image.shape}")
    h, w = image.shape[:2]
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_colour = np.median(border, axis=0)
    background = int(np.argmin(np.linalg.norm(_BACKGROUNDS - bg_colour, axis=1)))
    palette = np.concatenate([_BACKGROUNDS[background : background + 1], _COLOURS])
    nearest = np.argmin(
        np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1), axis=-1
    )
    labels = {"background": background, "shape": -1, "colour": -1, "size": -1, "position": -1}
    counts = np.bincount(nearest.ravel(), minlength=len(palette))[1:]
    if counts.max() == 0:
        return labels
    colour = int(np.argmax(counts))
    ys, xs = np.nonzero(nearest == colour + 1)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(bottom - top, right - left) / max(h, w)
    centre = np.array([(left + right) / 2 / w, (top + bottom) / 2 / h], np.float32)
    # Coverage of each pixel of the object's box, alpha = (p - bg).(c - bg) / |c - bg|^2 (the
    # anti-aliased edges are blends), so the fill is measured to a fraction of a pixel: the
    # area over the extents, each extent the summed coverage of the fullest row or column.
    box = pixels[max(top - 1, 0) : bottom + 1, max(left - 1, 0) : right + 1]
    direction = _COLOURS[colour] - palette[0]
    alpha = np.clip((box - palette[0]) @ direction / (direction @ direction), 0.0, 1.0)
    alpha = np.where(alpha > 0.05, alpha, 0.0)
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    fill = alpha.sum() / max(width * height, 1e-6)
    shape = min(SHAPES, key=lambda s: abs(_FILL[s] - fill))
    labels.update(
        colour=colour,
        shape=SHAPES.index(shape),
        size=int(side > _SMALL_LARGE_SPLIT),
        position=int(np.argmin(np.linalg.norm(_POSITIONS - centre, axis=1))),
    )
    return labels


def attribute_accuracy(
    images: Sequence[np.ndarray], labels: Sequence[dict[str, int]]
) -> dict[str, float]:
    """For each attribute the fraction of images read as their intended label, and
    `all_attributes`: the fraction with all five right."""
    read = [read_shapes_image(image) for image in images]
    hits = np.array([[r[a] == t[a] for a in ATTRIBUTES] for r, t in zip(read, labels, strict=True)])
    scores = {a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
    scores["all_attributes"] = float(hits.all(axis=1).mean())
    return scores
