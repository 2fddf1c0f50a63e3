"""A linear probe that reads `shapes` attributes from CLIP image features.

The second, learned reader of the evaluation (the first is `shapes_reader`, plain image
analysis): one softmax-regression head per attribute on standardised CLIP image features of
real, labelled `shapes` images. How far to trust it is measured on real images it did not
fit, and reported with its scores: a weak CLIP (the demo's reads position poorly) makes a weak
probe, which is why the pixel reader is the demo's headline number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.data.shapes import ATTRIBUTES, LABEL_NAMES


@dataclasses.dataclass(frozen=True)
class AttributeProbe:
    """Per-attribute linear classifiers over standardised features (plain arrays)."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    weights: dict[str, np.ndarray]  # attribute -> (D, classes)
    biases: dict[str, np.ndarray]  # attribute -> (classes,)

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """attribute -> integer labels (N,) for features (N, D)."""
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return {a: np.argmax(x @ self.weights[a] + self.biases[a], axis=-1) for a in ATTRIBUTES}


def fit_attribute_probe(
    features: np.ndarray,
    labels: Mapping[str, np.ndarray],
    *,
    steps: int = 500,
    learning_rate: float = 0.05,
    weight_decay: float = 1e-4,
) -> AttributeProbe:
    """Fits every attribute's head by full-batch Adam on the mean cross-entropy (a convex
    problem: 500 steps reach its optimum to well under 1% accuracy on `shapes`).

    `features` (N, D) are CLIP image features; `labels[attribute]` (N,) integer labels."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"the probe needs features of shape (N >= 2, D), got {features.shape}")
    for attr in ATTRIBUTES:
        if np.shape(labels[attr]) != (len(features),):
            raise ValueError(
                f"probe labels for {attr!r} have shape {np.shape(labels[attr])}, "
                f"expected ({len(features)},)"
            )
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = jnp.asarray((features - mean) / std)
    y = {a: jnp.asarray(labels[a], jnp.int32) for a in ATTRIBUTES}
    dim = features.shape[1]
    params = {
        a: {"w": jnp.zeros((dim, len(LABEL_NAMES[a]))), "b": jnp.zeros(len(LABEL_NAMES[a]))}
        for a in ATTRIBUTES
    }
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss_fn(p):
        return sum(
            optax.softmax_cross_entropy_with_integer_labels(x @ p[a]["w"] + p[a]["b"], y[a]).mean()
            for a in ATTRIBUTES
        )

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, state = carry
            grads = jax.grad(loss_fn)(p)
            updates, state = optimizer.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)
        return p

    params = jax.device_get(fit(params))
    return AttributeProbe(
        mean=mean,
        std=std,
        weights={a: np.asarray(params[a]["w"]) for a in ATTRIBUTES},
        biases={a: np.asarray(params[a]["b"]) for a in ATTRIBUTES},
    )


def probe_accuracy(
    probe: AttributeProbe, features: np.ndarray, labels: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Accuracy per attribute and of all five at once on labelled features."""
    return label_accuracy(probe.predict(features), labels)


def label_accuracy(
    read: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Accuracy per attribute and of all five at once of read labels against true ones
    (attribute -> (N,) integer labels, both)."""
    hits = np.stack([np.asarray(read[a]) == np.asarray(labels[a]) for a in ATTRIBUTES], axis=1)
    out = {a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
    out["all_attributes"] = float(hits.all(axis=1).mean())
    return out


def stack_labels(rows: Sequence[Mapping[str, int]]) -> dict[str, np.ndarray]:
    """[{attribute: label}, ...] -> {attribute: (N,) labels}."""
    return {a: np.asarray([row[a] for row in rows], np.int32) for a in ATTRIBUTES}
