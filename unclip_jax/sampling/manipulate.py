"""Section 3 of the paper on a `Cascade`: variations, DDIM inversion and reconstruction,
interpolation between two images, and text diffs.

An image is the pair (z_i, x_T): its CLIP image embedding and the DDIM inversion of the image
through the decoder conditioned on that z_i (the caption dropped: these manipulations work on
images alone). Decoding (z_i, x_T) with DDIM eta 0 gives the image back; changing z_i moves
its content while x_T keeps its layout. Frames come out at the cascade's final resolution
(the decoder's images through the upsamplers, the same upsampler noise for every frame of a
strip), as uint8 (N, H, W, 3).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from unclip_jax.data.images import to_rgb_array, to_uint8
from unclip_jax.sampling.cascade import Cascade, image_keys

Array = jax.Array


def slerp(a: Array, b: Array, theta: Array | float) -> Array:
    """Spherical interpolation of the directions of a and b (.., D) at theta in [0, 1], with
    the norm interpolated linearly: theta 0 gives a, theta 1 gives b.

    slerp = sin((1 - theta) omega) / sin(omega) a^ + sin(theta omega) / sin(omega) b^, omega
    the angle between them (linear interpolation where they are nearly parallel).
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    theta = jnp.asarray(theta, jnp.float32)[..., None]
    na, nb = jnp.linalg.norm(a, axis=-1, keepdims=True), jnp.linalg.norm(b, axis=-1, keepdims=True)
    ua, ub = a / na.clip(1e-12), b / nb.clip(1e-12)
    omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, axis=-1, keepdims=True), -1.0, 1.0))
    sin = jnp.sin(omega)
    parallel = sin < 1e-6
    safe = jnp.where(parallel, 1.0, sin)
    wa = jnp.where(parallel, 1.0 - theta, jnp.sin((1.0 - theta) * omega) / safe)
    wb = jnp.where(parallel, theta, jnp.sin(theta * omega) / safe)
    direction = wa * ua + wb * ub
    return direction * ((1.0 - theta) * na + theta * nb)


def load_images(paths: Sequence[str]) -> list[np.ndarray]:
    """uint8 RGB arrays of image files; a missing or unreadable file is an error naming it."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path!r} does not exist")
        try:
            with Image.open(path) as image:
                images.append(to_rgb_array(image))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image {path!r} cannot be read: {err}") from None
    return images


@dataclasses.dataclass(frozen=True)
class Inverted:
    """Images as (z_i, x_T), with the decoder-resolution images they came from."""

    z_i: Array  # CLIP image embeddings (B, D), as CLIP gives them
    x_T: Array  # DDIM inversions (B, r, r, 3)
    x0: np.ndarray  # the images at the decoder's resolution, [-1, 1]


def _no_caption(cascade: Cascade, batch: int) -> tuple[dict, Array]:
    tokens = cascade.put(cascade.tokenize([""] * batch))
    return tokens, cascade.put(np.ones((batch,), bool))


def invert(cascade: Cascade, images: Sequence[np.ndarray]) -> Inverted:
    """(z_i, x_T) of uint8 images: CLIP's embedding, then DDIM inversion through the decoder
    conditioned on it (caption dropped, the decoder's guidance scale)."""
    inputs = cascade.put(cascade.image_inputs(images))
    z_i = cascade.image_embeddings(inputs["clip_pixels"])
    tokens, drop = _no_caption(cascade, len(images))
    x_T = cascade.invert(cascade.decoder_cond(z_i, tokens, drop), inputs["x0"])
    return Inverted(z_i=z_i, x_T=x_T, x0=np.asarray(inputs["x0"]))


def decode_frames(
    cascade: Cascade, z_i: Array, x_T: Array, *, seed: int = 0, upsample: bool = True
) -> np.ndarray:
    """Decodes (z_i, x_T) pairs with DDIM eta 0 (exact: the inverse of `invert`), then the
    upsamplers with one noise for every frame; uint8 frames."""
    n = z_i.shape[0]
    tokens, drop = _no_caption(cascade, n)
    keys = image_keys(seed, cascade.put(np.zeros((n, 2), np.int32)))
    images = cascade.decode(cascade.decoder_cond(z_i, tokens, drop), keys, x_T=x_T, exact=True)
    if upsample:
        images = cascade.upsample(images, keys)
    return to_uint8(np.asarray(images))


def reconstruct(cascade: Cascade, inverted: Inverted) -> np.ndarray:
    """The decoder-resolution images in [-1, 1] decoded back from their inversions (DDIM eta
    0 on the same settings: `inverted.x0` again, up to the inversion's convergence)."""
    n = inverted.z_i.shape[0]
    tokens, drop = _no_caption(cascade, n)
    keys = image_keys(0, cascade.put(np.zeros((n, 2), np.int32)))
    cond = cascade.decoder_cond(inverted.z_i, tokens, drop)
    return np.asarray(cascade.decode(cond, keys, x_T=inverted.x_T, exact=True))


def variations(
    cascade: Cascade,
    images: Sequence[np.ndarray],
    *,
    n: int = 4,
    seed: int = 0,
    eta: float = 1.0,
) -> np.ndarray:
    """`n` variations of each image (uint8 (len(images), n, H, W, 3)): its z_i decoded with
    DDIM at `eta` > 0 from fresh noise (the caption dropped), then upsampled."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    inputs = cascade.put(cascade.image_inputs(images))
    z_i = np.repeat(np.asarray(cascade.image_embeddings(inputs["clip_pixels"])), n, axis=0)
    ids = np.array([(i, j) for i in range(len(images)) for j in range(n)], np.int32)
    keys = image_keys(seed, cascade.put(ids))
    tokens, drop = _no_caption(cascade, len(ids))
    cond = cascade.decoder_cond(cascade.put(z_i), tokens, drop)
    out = cascade.upsample(cascade.decode(cond, keys, method="ddim", eta=float(eta)), keys)
    return to_uint8(np.asarray(out)).reshape(len(images), n, *out.shape[1:])


def interpolate(
    cascade: Cascade,
    a: np.ndarray,
    b: np.ndarray,
    *,
    steps: int = 8,
    noise: str = "slerp",
    seed: int = 0,
) -> np.ndarray:
    """`steps` frames from image a to image b: z = slerp(z_a, z_b, theta), theta from 0 to 1,
    with x_T slerped between the two inversions (`noise` "slerp": the ends reconstruct a and
    b) or one random x_T for every frame ("fixed")."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if noise not in ("slerp", "fixed"):
        raise ValueError(f"noise {noise!r}: valid: slerp, fixed")
    inv = invert(cascade, [a, b])
    thetas = jnp.linspace(0.0, 1.0, steps)
    z_a, z_b = (jnp.broadcast_to(inv.z_i[i], (steps, inv.z_i.shape[1])) for i in (0, 1))
    z = slerp(z_a, z_b, thetas)
    shape = inv.x_T.shape[1:]
    if noise == "slerp":
        size = int(np.prod(shape))
        flat_a, flat_b = (jnp.broadcast_to(inv.x_T[i].reshape(-1), (steps, size)) for i in (0, 1))
        x_T = slerp(flat_a, flat_b, thetas).reshape(steps, *shape)
    else:
        x_T = jnp.broadcast_to(jax.random.normal(jax.random.key(seed), shape), (steps, *shape))
    z, x_T = cascade.put(np.asarray(z)), cascade.put(np.asarray(x_T))
    return decode_frames(cascade, z, x_T, seed=seed)


def text_diff(
    cascade: Cascade,
    image: np.ndarray,
    *,
    source: str,
    target: str,
    steps: int = 6,
    max_theta: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """`steps` frames moving an image towards a caption change: z_d = normalise(z_t(target) -
    z_t(source)), z = slerp(z_i, z_d, theta) for theta from 0 to `max_theta`, each decoded
    from the image's inverted x_T (frame 0 reconstructs the image)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if not 0 < max_theta <= 1:
        raise ValueError(f"max_theta must be in (0, 1], got {max_theta}")
    inv = invert(cascade, [image])
    z_t = cascade.text_embeddings(cascade.put(cascade.tokenize([target, source])))
    z_t = z_t / jnp.linalg.norm(z_t, axis=-1, keepdims=True)
    diff = z_t[0] - z_t[1]
    z_i = inv.z_i[0]
    # The direction at z_i's own norm, so slerp moves the direction alone.
    z_d = diff / jnp.linalg.norm(diff).clip(1e-12) * jnp.linalg.norm(z_i)
    thetas = jnp.linspace(0.0, max_theta, steps)
    z = slerp(
        jnp.broadcast_to(z_i, (steps, z_i.shape[0])),
        jnp.broadcast_to(z_d, (steps, z_d.shape[0])),
        thetas,
    )
    x_T = jnp.broadcast_to(inv.x_T[0], (steps, *inv.x_T.shape[1:]))
    return decode_frames(
        cascade, cascade.put(np.asarray(z)), cascade.put(np.asarray(x_T)), seed=seed
    )


def write_strip(frames: np.ndarray, out: str, prefix: str) -> list[str]:
    """Writes OUT/PREFIX_strip.png (the frames side by side) and OUT/PREFIX_NN.png per
    frame; returns the paths, the strip first."""
    os.makedirs(out, exist_ok=True)
    strip = os.path.join(out, f"{prefix}_strip.png")
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(strip)
    paths = [strip]
    for k, frame in enumerate(frames):
        path = os.path.join(out, f"{prefix}_{k:02d}.png")
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths
