"""What a `shapes` CLIP's image embedding z_i carries: the ceiling it puts on the cascade.

The prior predicts z_i and the decoder draws from it, so an attribute z_i does not encode
cannot come out of the cascade right, however good the prior and decoder. Two reads of the
five attributes from the z_i of test images, given the z_i of labelled train images:
- `nearest`: the label of the nearest train z_i by cosine (1-NN): what a decoder that maps
  z_i to an image it has seen could at best draw;
- `linear`: a softmax probe fit on the train z_i (`evaluation.attribute_probe`), the same
  reader the evaluation's `shapes_probe` uses.
Both per attribute and all five at once, with position also by the shape's size (small shapes
are where a weak CLIP loses it). Prints one JSON line.

    python benchmarks/clip_zi_probe.py --clip DEMO/clip/clip --data-dir DEMO/data \
        [--train 10000] [--test 2700]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from unclip_jax.clip import load_pretrained
from unclip_jax.data.pipeline import open_dataset
from unclip_jax.data.shapes import SIZES
from unclip_jax.evaluation.attribute_probe import (
    fit_attribute_probe,
    label_accuracy,
    stack_labels,
)
from unclip_jax.evaluation.runner import clip_features


def nearest_labels(
    queries: np.ndarray, keys: np.ndarray, labels: dict[str, np.ndarray], chunk: int = 512
) -> dict[str, np.ndarray]:
    """Each query's labels copied from its nearest key by cosine similarity."""
    keys = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    nearest = np.concatenate(
        [np.argmax(queries[i : i + chunk] @ keys.T, axis=-1) for i in range(0, len(queries), chunk)]
    )
    return {a: y[nearest] for a, y in labels.items()}


def accuracies(read: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """`label_accuracy`, and position by the true size, rounded to 3 places."""
    out = label_accuracy(read, labels)
    position = read["position"] == labels["position"]
    for index, size in enumerate(SIZES):
        rows = labels["size"] == index
        if rows.any():
            out[f"position_{size}"] = float(position[rows].mean())
    return {name: round(value, 3) for name, value in out.items()}


def main() -> None:
    """Parses the flags, embeds, prints the accuracies."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", required=True, help="a CLIP directory (the demo's: DEMO/clip/clip)")
    p.add_argument("--data-dir", required=True, help="where the shapes build lies")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--train", type=int, default=10_000, help="train images embedded (keys)")
    p.add_argument("--test", type=int, default=2_700, help="test images read")
    args = p.parse_args()

    start = time.perf_counter()
    clip = load_pretrained(args.clip)
    spec = f"shapes:{args.resolution}"
    train = open_dataset(spec, "train", data_dir=args.data_dir)
    test = open_dataset(spec, "test", data_dir=args.data_dir)
    if args.train > len(train) or args.test > len(test):
        raise SystemExit(
            f"asked for {args.train} train / {args.test} test images; the build at "
            f"{args.data_dir!r} holds {len(train)} / {len(test)}"
        )
    train_rows = [train[i] for i in range(args.train)]
    test_rows = [test[i] for i in range(args.test)]
    train_z, _ = clip_features(clip, [r["image"] for r in train_rows])
    test_z, _ = clip_features(clip, [r["image"] for r in test_rows])
    train_y = stack_labels([r["labels"] for r in train_rows])
    test_y = stack_labels([r["labels"] for r in test_rows])

    probe = fit_attribute_probe(train_z, train_y)
    result = {
        "clip": args.clip,
        "train": args.train,
        "test": args.test,
        "nearest": accuracies(nearest_labels(test_z, train_z, train_y), test_y),
        "linear": accuracies(probe.predict(test_z), test_y),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
