"""Text -> image retrieval with CLIP embeddings: how well a CLIP tells captions apart."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def text_to_image_top1(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    labels: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Top-1 text -> image retrieval among the images of the same set, row i the true pair.

    Returns `exact` (the retrieved image is the caption's own) and, with per-example integer
    `labels` (e.g. the `shapes` attributes), for each attribute the fraction of captions whose
    retrieved image has the caption's value, and `all_attributes` (every attribute right: the
    fair overall score when several images share a caption's attributes).
    """
    if text_emb.shape[0] != image_emb.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} captions but {image_emb.shape[0]} images")
    top = np.argmax(_normalise(text_emb) @ _normalise(image_emb).T, axis=1)
    scores = {"exact": float(np.mean(top == np.arange(len(top))))}
    if labels:
        hits = []
        for name, values in labels.items():
            values = np.asarray(values)
            hit = values[top] == values
            scores[name] = float(np.mean(hit))
            hits.append(hit)
        scores["all_attributes"] = float(np.mean(np.all(hits, axis=0)))
    return scores
