"""The sample-quality metrics and the `shapes` attribute reader, against known answers."""

import numpy as np
import pytest

from unclip_jax.data.shapes import render_example
from unclip_jax.evaluation.metrics import clip_score, frechet_distance, precision_recall
from unclip_jax.evaluation.shapes_reader import attribute_accuracy, read_shapes_image


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    n, d = 200_000, 3
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) * 2.0 + 1.0  # mean 1, covariance 4 I
    # |mu|^2 + tr(I) + tr(4I) - 2 tr(2I) = 3 + 3 + 12 - 12 = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(a[:10], b[:10, :2])


def test_clip_score_is_the_mean_cosine_of_pairs():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([[2.0, 0.0], [1.0, 1.0]])
    assert clip_score(x, y) == pytest.approx((1.0 + np.sqrt(0.5)) / 2)


def test_precision_and_recall_see_missing_variety_and_unrealistic_samples():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 2))
    collapsed = rng.normal(size=(500, 2)) * 0.1  # realistic but covers only the centre
    off = rng.normal(size=(500, 2)) + 10.0  # nowhere near the real data
    good = precision_recall(real, rng.normal(size=(500, 2)))
    assert good["precision"] > 0.9 and good["recall"] > 0.9
    narrow = precision_recall(real, collapsed)
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.3
    assert precision_recall(real, off) == {"precision": 0.0, "recall": 0.0}


@pytest.mark.parametrize("resolution, floor", [(32, 0.99), (64, 1.0)])
def test_the_reader_reads_real_shapes_pictures(resolution, floor):
    examples = [render_example(split="test", index=i, resolution=resolution) for i in range(540)]
    scores = attribute_accuracy([e["image"] for e in examples], [e["labels"] for e in examples])
    assert scores["all_attributes"] >= floor, scores


def test_the_reader_says_when_there_is_no_object():
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert read_shapes_image(blank) == {
        "background": 2,
        "shape": -1,
        "colour": -1,
        "size": -1,
        "position": -1,
    }
