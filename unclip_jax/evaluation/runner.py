"""`unclip-jax eval`: score a folder of samples (`unclip-jax sample`'s output) against real
images with a CLIP, and, for `shapes`, read every sample's attributes.

Features are CLIP image and text embeddings, computed in batches split over this process's
devices (params replicated). The scores:
- `frechet_clip`: the Frechet distance between the real and the generated images' CLIP
  image features (FID's formula in CLIP's feature space);
- `frechet_inception` (given local Inception-v3 weights, pytorch-fid's file): FID proper;
- `clip_score`: the mean cosine of each sample's image embedding with its prompt's;
- `precision` / `recall`: of the samples against the real images' feature manifold;
- for `shapes` prompts: the attributes read back by `shapes_reader` against those the prompt
  names, for the (colour, shape) pairs seen in training and for the held-out ones apart;
  and, given labelled real images, the same read by a linear probe on CLIP image features
  (`attribute_probe`), with the probe's own accuracy on real images it did not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from unclip_jax.clip import PretrainedClip, preprocess_images
from unclip_jax.data.shapes import ATTRIBUTES, is_held_out, parse_caption
from unclip_jax.embed_job import pad_rows
from unclip_jax.evaluation.attribute_probe import (
    fit_attribute_probe,
    probe_accuracy,
    stack_labels,
)
from unclip_jax.evaluation.inception import InceptionFeatures, inception_features
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
    size = clip.config.require_vision("scoring images").image_size
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


def score_reads(reads: Sequence[Mapping[str, int]], prompts: Sequence[str]) -> dict[str, Any]:
    """Attribute accuracy of samples' read attributes against those their prompts name, split
    into prompts whose (colour, shape) pair the train split shows ("seen") and the held-out
    pairs; prompts that do not name every attribute are counted in `unparsed` and left out."""
    groups: dict[str, list[np.ndarray]] = {"seen": [], "held_out": []}
    unparsed = 0
    for read, prompt in zip(reads, prompts, strict=True):
        labels = parse_caption(prompt)
        if labels is None:
            unparsed += 1
            continue
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


def shapes_scores(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, Any]:
    """`score_reads` of the samples' attributes read by plain image analysis."""
    return score_reads([read_shapes_image(image) for image in images], prompts)


def probe_scores(
    clip: PretrainedClip,
    examples: Sequence[Mapping[str, Any]],
    sample_features: np.ndarray,
    prompts: Sequence[str],
) -> dict[str, Any]:
    """`score_reads` of the samples' attributes read by a linear probe on CLIP image features,
    fit on the first 80% of `examples` (real `shapes` examples with "image" and "labels");
    `real_accuracy` is the probe's own accuracy on the other 20%."""
    if len(examples) < 10:
        raise ValueError(
            f"the CLIP attribute probe needs at least 10 examples, got {len(examples)}"
        )
    features, _ = clip_features(clip, [e["image"] for e in examples])
    labels = stack_labels([e["labels"] for e in examples])
    fit = int(0.8 * len(examples))
    probe = fit_attribute_probe(features[:fit], {a: y[:fit] for a, y in labels.items()})
    read = probe.predict(sample_features)
    reads = [{a: int(read[a][i]) for a in ATTRIBUTES} for i in range(len(prompts))]
    out = score_reads(reads, prompts)
    out["real_accuracy"] = probe_accuracy(
        probe, features[fit:], {a: y[fit:] for a, y in labels.items()}
    )
    out["real_count"] = len(examples) - fit
    return out


def evaluate_samples(
    folder: str,
    clip: PretrainedClip,
    real_images: Sequence[np.ndarray],
    *,
    shapes: bool = False,
    probe_examples: Sequence[Mapping[str, Any]] | None = None,
    inception: InceptionFeatures | None = None,
) -> dict[str, Any]:
    """Every score of the module docstring for the samples in `folder` against `real_images`;
    with `probe_examples` (labelled real `shapes` examples) also the CLIP-feature probe's, and
    with `inception` (`inception.load_inception` of local weights) FID in Inception-v3's pool3
    features (`frechet_inception`)."""
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
    if inception is not None:
        scores["frechet_inception"] = frechet_distance(
            inception_features(inception, real_images), inception_features(inception, images)
        )
    if shapes:
        scores["shapes"] = shapes_scores(images, prompts)
    if probe_examples is not None:
        scores["shapes_probe"] = probe_scores(clip, probe_examples, fake_features, prompts)
    return scores


def format_scores(scores: dict[str, Any]) -> str:
    """The scores as a plain-text table."""
    lines = [f"{'metric':<28} value"]
    keys = ("samples", "real", "frechet_clip", "frechet_inception", "clip_score")
    for key in (*keys, "precision", "recall"):
        if key not in scores:
            continue
        value = scores[key]
        lines.append(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    pixels, probe = scores.get("shapes", {}), scores.get("shapes_probe", {})
    for group in ("seen", "held_out"):
        block = pixels.get(group) or probe.get(group)
        if not block:
            continue
        lines.append(
            f"shapes, {group} pairs ({block['count']} prompts): read from pixels"
            + (" | by the CLIP probe" if probe.get(group) else "")
        )
        for a in (*ATTRIBUTES, "all_attributes"):
            row = f"  {a:<26}"
            row += f" {pixels[group][a]:.3f}" if pixels.get(group) else "   -  "
            row += f" | {probe[group][a]:.3f}" if probe.get(group) else ""
            lines.append(row)
    if probe:
        real = probe["real_accuracy"]
        lines.append(
            f"the CLIP probe on {probe['real_count']} real images: "
            + ", ".join(f"{a} {real[a]:.3f}" for a in (*ATTRIBUTES, "all_attributes"))
        )
    return "\n".join(lines)
