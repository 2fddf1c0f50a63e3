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


def _write_samples(folder, examples):
    """A folder laid out as `unclip-jax sample` writes it, holding the given pictures."""
    import json
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.jsonl"), "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            name = f"P{i:06d}_00.png"
            Image.fromarray(e["image"]).save(os.path.join(folder, name))
            f.write(json.dumps({"file": name, "prompt": e["caption"], "seed": 0}) + "\n")


def test_eval_scores_real_pictures_as_perfect_samples(tmp_path):
    from clip_fixture import write_random_clip

    from unclip_jax.cli import main
    from unclip_jax.clip import load_pretrained
    from unclip_jax.data.shapes import is_held_out
    from unclip_jax.evaluation.runner import evaluate_samples, format_scores

    examples = [render_example(split="test", index=i, resolution=64) for i in range(540)]
    _write_samples(str(tmp_path / "s"), examples)
    clip_dir = write_random_clip(str(tmp_path / "clip"))
    clip = load_pretrained(clip_dir)
    probe = [render_example(split="train", index=i, resolution=64) for i in range(300)]
    scores = evaluate_samples(
        str(tmp_path / "s"), clip, [e["image"] for e in examples], shapes=True, probe_examples=probe
    )
    assert scores["frechet_clip"] == pytest.approx(0.0, abs=1e-3)  # the same pictures
    assert scores["precision"] == scores["recall"] == 1.0
    assert -1.0 <= scores["clip_score"] <= 1.0
    held_out = sum(is_held_out(e["labels"]) for e in examples)
    # 3 pairs x 3 backgrounds x 2 sizes x 5 positions
    assert scores["shapes"]["held_out"]["count"] == held_out == 90
    assert scores["shapes"]["seen"]["count"] == 450
    assert scores["shapes"]["seen"]["all_attributes"] == 1.0
    # The CLIP probe: even a random CLIP's features hold the background colour.
    by_probe = scores["shapes_probe"]
    assert by_probe["seen"]["count"] == 450 and by_probe["real_count"] == 60
    assert by_probe["real_accuracy"]["background"] > 0.95
    assert by_probe["seen"]["background"] > 0.95
    assert "by the CLIP probe" in format_scores(scores)
    # Another picture than the prompt asks for is read as wrong.
    swapped = [dict(e, caption=examples[(i + 1) % 540]["caption"]) for i, e in enumerate(examples)]
    _write_samples(str(tmp_path / "w"), swapped)
    wrong = evaluate_samples(str(tmp_path / "w"), clip, [e["image"] for e in examples], shapes=True)
    assert wrong["shapes"]["seen"]["all_attributes"] < 0.05
    out = tmp_path / "scores.json"
    args = [
        "eval",
        "--samples",
        str(tmp_path / "s"),
        "--clip",
        clip_dir,
        "--real",
        "shapes:64",
        "--num-real",
        "540",
        "--shapes-test-size",
        "540",
        "--shapes-train-size",
        "64",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    assert main(args) == 0 and out.exists()
    assert (
        main(
            ["eval", "--samples", str(tmp_path / "none"), "--clip", clip_dir, "--real", "shapes:64"]
        )
        == 2
    )


def _labelled_features(rng, n, projection, noise=0.1):
    """Features that hold each attribute's one-hot label linearly, plus Gaussian noise."""
    from unclip_jax.data.shapes import ATTRIBUTES, LABEL_NAMES

    labels = {a: rng.integers(0, len(LABEL_NAMES[a]), n) for a in ATTRIBUTES}
    onehots = [np.eye(len(LABEL_NAMES[a]))[labels[a]] for a in ATTRIBUTES]
    features = np.concatenate(onehots, axis=1) @ projection  # 3+3+6+2+5 = 19 classes
    return features + noise * rng.normal(size=features.shape), labels


def test_the_attribute_probe_reads_what_features_hold_and_nothing_else():
    from unclip_jax.evaluation.attribute_probe import fit_attribute_probe, probe_accuracy

    rng = np.random.default_rng(0)
    projection = rng.normal(size=(19, 32))
    features, labels = _labelled_features(rng, 600, projection)
    probe = fit_attribute_probe(features, labels)
    fresh, fresh_labels = _labelled_features(rng, 600, projection)
    assert probe_accuracy(probe, fresh, fresh_labels)["all_attributes"] == 1.0
    # Features unrelated to the labels: chance on unseen rows (1/3 .. 1/6 per attribute).
    noise = rng.normal(size=(600, 32))
    blind = fit_attribute_probe(noise[:400], {a: y[:400] for a, y in labels.items()})
    accuracy = probe_accuracy(blind, noise[400:], {a: y[400:] for a, y in labels.items()})
    assert accuracy["background"] < 0.5 and accuracy["all_attributes"] < 0.05
    with pytest.raises(ValueError, match="'shape' have shape"):
        fit_attribute_probe(features, dict(labels, shape=labels["shape"][:10]))
