"""`unclip-jax eval`: score a folder of samples (`unclip-jax sample`'s output) against real
images with a CLIP, and, for `shapes`, read every sample's attributes.

Features are CLIP image and text embeddings, computed in batches split over this process's
devices (params replicated). The scores:
- `frechet_clip`: the Frechet distance between the real and the generated images' CLIP
  image features (FID's formula in CLIP's feature space);
- `clip_score`: the mean cosine of each sample's image embedding with its prompt's;
- `precision` / `recall`: of the samples against the real images' feature manifold;
- for `shapes` prompts: the attributes read back by `shapes_reader` against those the prompt
  names, for the (colour, shape) pairs seen in training and for the held-out ones apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from unclip_jax.clip import PretrainedClip, preprocess_images
from unclip_jax.data.shapes import ATTRIBUTES, is_held_out, parse_caption
from unclip_jax.embed_job import pad_rows
from unclip_jax.evaluation.metrics import clip_score, frechet_distance, precision_recall
from unclip_jax.evaluation.shapes_reader import read_shapes_image

# Precision/recall is O(N^2) in memory: at most this many features per side.
PR_MAX = 5_000


def clip_features(
    clip: PretrainedClip,
    images: Sequence[np.ndarray],
    texts: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(image features (N, D), text features (N, D) or None), unnormalised, float32; each
    batch split over this process's devices."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rows, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    clip = dataclasses.replace(clip, params=jax.device_put(clip.params, whole))
    batch = math.ceil(batch_size / len(devices)) * len(devices)
    size = clip.config.vision.image_size
    image_out, text_out = [], []
    for start in range(0, len(images), batch):
        chunk = list(images[start : start + batch])
        n, pad = len(chunk), batch - len(chunk)
        pixels = preprocess_images(chunk, size, mean=clip.image_mean, std=clip.image_std)
        pixels = pad_rows(pixels, pad)
        image_out.append(np.asarray(clip.encode_pixels(jax.device_put(pixels, rows)))[:n])
        if texts is not None:
            ids, mask = clip.tokenize(list(texts[start : start + batch]))
            ids, mask = pad_rows(ids, pad), pad_rows(mask, pad)
            out = clip.encode_tokens(jax.device_put(ids, rows), jax.device_put(mask, rows))
            text_out.append(np.asarray(out)[:n])
    image_features = np.concatenate(image_out).astype(np.float32)
    text_features = None if texts is None else np.concatenate(text_out).astype(np.float32)
    return image_features, text_features


def read_samples(folder: str) -> tuple[list[np.ndarray], list[str]]:
    """The images and prompts listed in FOLDER/manifest.jsonl."""
    manifest = os.path.join(folder, "manifest.jsonl")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(
            f"no manifest.jsonl in {folder!r} (write it with unclip-jax sample)"
        )
    images, prompts = [], []
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            with Image.open(os.path.join(folder, row["file"])) as image:
                images.append(np.asarray(image.convert("RGB")))
            prompts.append(row["prompt"])
    if not images:
        raise ValueError(f"{manifest} lists no images")
    return images, prompts


def shapes_scores(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, Any]:
    """Attribute accuracy of samples read back by plain image analysis, split into prompts whose
    (colour, shape) pair the train split shows ("seen") and the held-out pairs; prompts that
    do not name every attribute are counted in `unparsed` and left out."""
    groups: dict[str, list[np.ndarray]] = {"seen": [], "held_out": []}
    unparsed = 0
    for image, prompt in zip(images, prompts, strict=True):
        labels = parse_caption(prompt)
        if labels is None:
            unparsed += 1
            continue
        read = read_shapes_image(image)
        hits = [read[a] == labels[a] for a in ATTRIBUTES]
        groups["held_out" if is_held_out(labels) else "seen"].append(np.array(hits))
    out: dict[str, Any] = {"unparsed": unparsed}
    for name, rows in groups.items():
        if not rows:
            continue
        hits = np.stack(rows)
        out[name] = {a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
        out[name]["all_attributes"] = float(hits.all(axis=1).mean())
        out[name]["count"] = len(rows)
    return out


def evaluate_samples(
    folder: str,
    clip: PretrainedClip,
    real_images: Sequence[np.ndarray],
    *,
    shapes: bool = False,
) -> dict[str, Any]:
    """Every score of the module docstring for the samples in `folder` against `real_images`."""
    images, prompts = read_samples(folder)
    fake_features, text_features = clip_features(clip, images, prompts)
    real_features, _ = clip_features(clip, real_images)
    rng = np.random.default_rng(0)
    pick = lambda x: x[rng.permutation(len(x))[:PR_MAX]]  # noqa: E731
    scores: dict[str, Any] = {
        "samples": len(images),
        "real": len(real_images),
        "frechet_clip": frechet_distance(real_features, fake_features),
        "clip_score": clip_score(fake_features, text_features),
        **precision_recall(pick(real_features), pick(fake_features)),
    }
    if shapes:
        scores["shapes"] = shapes_scores(images, prompts)
    return scores


def format_scores(scores: dict[str, Any]) -> str:
    """The scores as a plain-text table."""
    lines = [f"{'metric':<28} value"]
    for key in ("samples", "real", "frechet_clip", "clip_score", "precision", "recall"):
        value = scores[key]
        lines.append(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    for group in ("seen", "held_out"):
        block = scores.get("shapes", {}).get(group)
        if block:
            lines.append(f"shapes, {group} pairs ({block['count']} prompts)")
            for a in (*ATTRIBUTES, "all_attributes"):
                lines.append(f"  {a:<26} {block[a]:.3f}")
    return "\n".join(lines)
