"""Sample-quality metrics on feature vectors (CLIP image features, or Inception's): the
Frechet distance, the CLIP score, and precision/recall of the generated against the real
feature manifold. Plain NumPy on the host: features are gathered first (they are small)."""

from __future__ import annotations

import numpy as np


def _check_features(name: str, x: np.ndarray, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected (N >= {min_rows}, D) features, got {x.shape}")
    return x


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (N, D) (FID when the
    features are Inception's pool3):

        |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r^1/2 S_f S_r^1/2)^1/2),

    the last trace from the eigenvalues of the symmetric PSD S_r^1/2 S_f S_r^1/2, which equals
    tr((S_r S_f)^1/2) without a non-symmetric matrix square root.
    """
    real, fake = _check_features("real", real), _check_features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: real {real.shape[1]}, fake {fake.shape[1]}")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    values, vectors = np.linalg.eigh(s_r)
    root_r = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_r @ s_f @ root_r)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(np.sum((mu_r - mu_f) ** 2) + np.trace(s_r) + np.trace(s_f) - 2 * cross)


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """Mean cosine between each image's embedding and its prompt's (row i with row i): the
    CLIP score as Karlo reports it (0.319 on MS-COCO), not multiplied by 100."""
    a = _check_features("image features", image_features, 1)
    b = _check_features("text features", text_features, 1)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape} image features but {b.shape} text features")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def _kth_neighbour_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(points[:, None] - centres[None], axis=-1)
    return np.any(d <= radii[None], axis=1)


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019): the real manifold is the
    union of balls around each real feature reaching its k-th nearest real neighbour;
    precision is the fraction of generated features inside it (are the samples realistic?),
    recall the fraction of real features inside the generated manifold (is the variety
    covered?). Memory is O(N^2): meant for up to a few thousand features per side."""
    real, fake = _check_features("real", real, k + 1), _check_features("fake", fake, k + 1)
    return {
        "precision": float(np.mean(_inside(fake, real, _kth_neighbour_radius(real, k)))),
        "recall": float(np.mean(_inside(real, fake, _kth_neighbour_radius(fake, k)))),
    }
