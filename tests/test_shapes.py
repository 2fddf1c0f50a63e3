"""The built-in `shapes` set against its contract (specs/shapes.md), and its tfds round trip."""

from __future__ import annotations

import os
import pickle
import re
import tempfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import shapes
from unclip_jax.data.images import resize

R = 64  # geometry checks run at 64 px: a small object is >= 14 px across there


def _alpha(image: np.ndarray, names: dict[str, str]) -> np.ndarray:
    """Per-pixel object coverage in [0, 1]: the position of each pixel on the segment from
    background to object colour (edge pixels are exact linear blends, box-filtered)."""
    bg = np.array(shapes.BACKGROUNDS[names["background"]], np.float64)
    fg = np.array(shapes.COLOURS[names["colour"]], np.float64)
    d = fg - bg
    return ((image.astype(np.float64) - bg) @ d) / (d @ d)


def _measured_box(image: np.ndarray, names: dict[str, str]) -> np.ndarray:
    """(left, top, right, bottom) in pixels of the pixels at least half covered."""
    ys, xs = np.nonzero(_alpha(image, names) > 0.5)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


# Measured edges vs the true box, in pixels. Thresholding coverage at 1/2 puts a straight edge
# within 0.5 px, and the 4x canvas rounds each edge to 1/4 px (another 1/8): 0.625 for squares
# and circles (0.62 seen over 3000 examples). A triangle's side edges are slanted, so the
# half-covered pixels at the base corners sit up to ~1.1 px inside, and the apex is a point:
# rows only pass 1/2 coverage ~1.4 px below it.
_EDGE_TOL = {
    "square": (0.7, 0.7, 0.7, 0.7),
    "circle": (0.7, 0.7, 0.7, 0.7),
    "triangle": (1.25, 1.5, 1.25, 0.7),
}


@pytest.mark.parametrize("index", range(0, 540, 7))
def test_image_matches_spec(index):
    example = shapes.render_example(split="test", index=index, resolution=R)
    image, labels = example["image"], example["labels"]
    assert image.shape == (R, R, 3) and image.dtype == np.uint8
    names = {a: shapes.LABEL_NAMES[a][labels[a]] for a in shapes.ATTRIBUTES}
    bg, fg = shapes.BACKGROUNDS[names["background"]], shapes.COLOURS[names["colour"]]

    # Corners: the largest box (0.495) never spans two corners, so at least three corners are
    # untouched background, exactly (flat colour, and the box filter keeps flat regions exact).
    corners = [image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]
    assert sum(tuple(c) == bg for c in corners) >= 3

    # Box from the pixels at least half covered, edges clipped to the image (a large box at a
    # corner may reach 0.0075 of the side past the border).
    left, top, right, bottom = _measured_box(image, names)
    tol = max(_EDGE_TOL[names["shape"]])
    base_side = shapes.SIZES[names["size"]]
    lo, hi = (base_side * f * R for f in shapes.SIZE_JITTER)
    side = max(right - left, bottom - top)
    assert lo - 2 * tol <= side <= hi + 2 * tol, (side, lo, hi)

    # Centre within the position jitter: use the measured edges that are not clipped by the
    # border; the other coordinate comes from the opposite edge and the measured side.
    x, y = shapes.POSITIONS[names["position"]]
    j = shapes.POSITION_JITTER
    cx = (left + right) / 2 if left > 0 and right < R else None
    cy = (top + bottom) / 2 if top > 0 and bottom < R else None
    if cx is not None:
        assert (x - j) * R - tol <= cx <= (x + j) * R + tol, (cx, x)
    if cy is not None:
        assert (y - j) * R - tol <= cy <= (y + j) * R + tol, (cy, y)

    # The object's own colour, exactly, at the centre of its box (inside every shape: the
    # triangle is half the box wide there).
    layout = shapes.example_layout(split="test", index=index)
    px, py = (int(v * R) for v in layout.center)
    assert tuple(image[py, px]) == fg


@pytest.mark.parametrize("index", range(0, 540, 5))
def test_drawn_box_is_the_layout_box(index):
    layout = shapes.example_layout(split="test", index=index)
    names = layout.names()
    # The layout itself within the spec's jitter ranges, exactly.
    base = shapes.SIZES[names["size"]]
    assert base * 0.9 <= layout.side <= base * 1.1
    x, y = shapes.POSITIONS[names["position"]]
    assert abs(layout.center[0] - x) <= 0.03 and abs(layout.center[1] - y) <= 0.03
    # The drawing within _EDGE_TOL of it, edge by edge.
    image = shapes.render_layout(layout, R)
    measured = _measured_box(image, names)
    expected = np.clip(np.array(layout.box()) * R, 0, R)
    assert np.all(np.abs(measured - expected) <= _EDGE_TOL[names["shape"]]), (measured, expected)


def test_shapes_are_drawn_as_named():
    # Coverage fraction of the box: square 1, circle pi/4, triangle 1/2 (sum of coverage is
    # the drawn area; +-0.04 for edge rounding on a >= 14 px box).
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for index in range(0, 540, 11):
        layout = shapes.example_layout(split="test", index=index)
        names = layout.names()
        left, top, right, bottom = np.clip(np.array(layout.box()), 0, 1)
        if min(left, top) <= 0 or max(right, bottom) >= 1:
            continue  # clipped at the border: the area is not the whole shape
        alpha = _alpha(shapes.render_layout(layout, R), names)
        fill = alpha.sum() / (layout.side * R) ** 2
        assert abs(fill - expected[names["shape"]]) < 0.04, (names["shape"], fill)
        if names["shape"] == "triangle":  # apex at the top: the top half holds 1/4 of it
            rows = alpha.sum(axis=1)
            mid = round(layout.center[1] * R)
            assert rows[:mid].sum() < rows[mid:].sum() / 2


def test_held_out_pairs_absent_from_train_and_present_in_test():
    held_out = set(shapes.HELD_OUT_PAIRS)

    def pair(labels):
        return shapes.LABEL_NAMES["colour"][labels["colour"]], shapes.SHAPES[labels["shape"]]

    train = [shapes.example_layout(split="train", index=i).labels for i in range(2000)]
    assert not {pair(labels) for labels in train} & held_out
    test = [shapes.example_layout(split="test", index=i).labels for i in range(540)]
    assert {pair(labels) for labels in test} >= held_out


def test_every_block_covers_each_combination_once():
    # Indices come in blocks of n (450 train, 540 test), each a permutation of the combinations.
    for split, n in (("train", 450), ("test", 540)):
        assert len(shapes.split_combinations(split)) == n
        for block in (0, 3):
            seen = [
                tuple(shapes.example_layout(split=split, index=block * n + i).labels.values())
                for i in range(n)
            ]
            assert sorted(seen) == sorted(shapes.split_combinations(split))
    assert shapes.NUM_COMBINATIONS == 540


def test_captions_name_all_five_attributes_with_spec_words():
    templates = set()
    for index in range(300):
        example = shapes.render_example(split="test", index=index, resolution=32)
        caption, labels = example["caption"], example["labels"]
        skeleton = caption
        for attr in shapes.ATTRIBUTES:
            found = [
                name
                for name in shapes.LABEL_NAMES[attr]
                if re.search(rf"\b{re.escape(name)}\b", caption)
            ]
            # Exactly one word of each attribute, and it is the labelled one.
            assert found == [shapes.LABEL_NAMES[attr][labels[attr]]], (caption, attr)
            skeleton = re.sub(rf"\b{re.escape(found[0])}\b", "{" + attr + "}", skeleton)
        templates.add(skeleton)
    assert len(templates) >= 4, templates
    assert shapes.make_caption(
        {"background": 2, "shape": 0, "colour": 0, "size": 0, "position": 1}
    ) == ("a small red circle in the top left on a gray background")


def test_hard_negative_captions_swap_exactly_one_named_attribute():
    rng = np.random.default_rng(0)
    for index in range(40):
        example = shapes.render_example(split="train", index=index, resolution=32)
        caption, labels = example["caption"], example["labels"]
        negatives = shapes.hard_negative_captions(
            caption, rng, num=4, attributes=("position", "size")
        )
        assert len(set(negatives)) == 4, negatives  # distinct
        for negative in negatives:
            swapped = shapes.parse_caption(negative)
            changed = [a for a in shapes.ATTRIBUTES if swapped[a] != labels[a]]
            assert len(changed) == 1 and changed[0] in ("position", "size"), (caption, negative)
            # The wording is the caption's: only the attribute word differs.
            attr = changed[0]
            assert negative.replace(shapes.LABEL_NAMES[attr][swapped[attr]], "X") == (
                caption.replace(shapes.LABEL_NAMES[attr][labels[attr]], "X")
            )


def test_hard_negative_captions_reject_what_they_cannot_swap():
    rng = np.random.default_rng(0)
    caption = "a small red circle in the center on a gray background"
    with pytest.raises(ValueError, match="naming every attribute"):
        shapes.hard_negative_captions("a photo of a dog", rng, num=1, attributes=("size",))
    with pytest.raises(ValueError, match="must be one of"):
        shapes.hard_negative_captions(caption, rng, num=1, attributes=("texture",))
    with pytest.raises(ValueError, match="gives only 1"):  # size has one other value
        shapes.hard_negative_captions(caption, rng, num=2, attributes=("size",))


def test_deterministic_by_seed_and_index():
    for index in (0, 17, 999):
        a = shapes.render_example(split="train", index=index, resolution=32, seed=3)
        b = shapes.render_example(split="train", index=index, resolution=32, seed=3)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"] and a["labels"] == b["labels"]
    seed0 = [shapes.render_example(split="train", index=i, resolution=32) for i in range(20)]
    seed1 = [
        shapes.render_example(split="train", index=i, resolution=32, seed=1) for i in range(20)
    ]
    # Independent draws: nearly all of 20 examples differ (same picture by chance ~1/450 each).
    differ = sum(
        not np.array_equal(a["image"], b["image"]) for a, b in zip(seed0, seed1, strict=True)
    )
    assert differ >= 18


def _near_edge(image: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is not all their own colour (on or beside an edge)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    flat = np.ones((h, w), bool)
    for dy in range(3):
        for dx in range(3):
            flat &= np.all(padded[dy : dy + h, dx : dx + w] == image, axis=-1)
    return ~flat


def test_same_picture_at_every_resolution():
    for index in range(0, 540, 27):
        images = {
            r: shapes.render_example(split="test", index=index, resolution=r)["image"]
            for r in shapes.RESOLUTIONS
        }
        names = shapes.example_layout(split="test", index=index).names()
        edge = _near_edge(images[32])
        contrast = np.abs(
            np.subtract(shapes.COLOURS[names["colour"]], shapes.BACKGROUNDS[names["background"]])
        ).max()
        for high in (64, 128, 256):
            low = resize(images[high], (32, 32), resample=Image.BOX).astype(np.int32)
            diff = np.abs(low - images[32].astype(np.int32))
            # Away from edges both are the flat colour: equal up to uint8 rounding.
            assert diff[~edge].max() <= 1, (index, high)
            if high == 64:  # 32 and 64 px share one 256 px canvas: the same drawing
                assert diff.max() <= 2, (index, high)
                continue
            # Finer renders differ only where the 32 px canvas rounds an edge by <= 1/16 px
            # and rasterises curves a little differently: under 1/4 coverage per edge pixel
            # (about 1/8 seen), a fraction of a level over the image.
            assert diff.max() <= 0.25 * contrast + 1, (index, high, diff.max(), contrast)
            assert diff.mean() < 0.6, (index, high, diff.mean())


def test_rejects_bad_split_and_resolution(tmp_path):
    with pytest.raises(ValueError, match=r"'valid'.*\['train', 'test'\]"):
        shapes.render_example(split="valid", index=0, resolution=32)
    with pytest.raises(ValueError, match=r"48.*\[32, 64, 128, 256\]"):
        shapes.load_shapes(48, "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        shapes.load_shapes(32, "validation", data_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())  # rejected before building anything


def test_config_names():
    assert shapes.shapes_config(64) is shapes.Shapes.builder_configs["64"]
    assert shapes.shapes_config(64).train_size == 50_000
    assert shapes.shapes_config(64).test_size == 5_400
    assert shapes.shapes_config(64, train_size=1000, test_size=540).name == "64_train1000_test540"
    assert shapes.shapes_config(32, seed=2).name == "32_train50000_test5400_seed2"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    kwargs = dict(data_dir=data_dir, train_size=60, test_size=54)
    return data_dir, {split: shapes.load_shapes(32, split, **kwargs) for split in shapes.SPLITS}


def test_tfds_build_round_trips(built):
    data_dir, sources = built
    for split, size in (("train", 60), ("test", 54)):
        source = sources[split]
        assert len(source) == size
        for index in range(size):
            record = source[index]
            expected = shapes.render_example(split=split, index=index, resolution=32)
            assert record["index"] == index
            assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(record["image"], expected["image"])  # PNG: lossless
            assert isinstance(record["caption"], str)
            assert record["caption"] == expected["caption"]
            assert record["labels"] == expected["labels"]
        assert source[-1]["index"] == size - 1
        with pytest.raises(IndexError):
            source[size]
        batch = source.__getitems__([3, 1])
        assert [r["index"] for r in batch] == [3, 1]
    built_dir = f"{data_dir}/shapes/32_train60_test54/1.0.0"
    assert any(p.endswith(".array_record-00000-of-00001") for p in os.listdir(built_dir))


def test_second_load_reuses_the_build(built):
    data_dir, sources = built
    before = {p: _mtime(f"{data_dir}/shapes/32_train60_test54/1.0.0/{p}") for p in _files(built)}
    again = shapes.load_shapes(32, "test", data_dir=data_dir, train_size=60, test_size=54)
    after = {p: _mtime(f"{data_dir}/shapes/32_train60_test54/1.0.0/{p}") for p in _files(built)}
    assert before == after
    assert again[5]["caption"] == sources["test"][5]["caption"]


def test_sources_pickle_for_grain_workers(built, tmp_path, monkeypatch):
    # Grain sends the source to worker processes by pickling; tfds re-creates the builder.
    _, sources = built
    copy = pickle.loads(pickle.dumps(sources["train"]))
    np.testing.assert_array_equal(copy[7]["image"], sources["train"][7]["image"])
    # The registered configs ("32") too, shrunk here so the default build stays small.
    config = shapes.Shapes.builder_configs["32"]
    monkeypatch.setattr(config, "train_size", 6)
    monkeypatch.setattr(config, "test_size", 5)
    monkeypatch.setattr(shapes, "DEFAULT_TRAIN_SIZE", 6)
    monkeypatch.setattr(shapes, "DEFAULT_TEST_SIZE", 5)
    source = shapes.load_shapes(32, "test", data_dir=str(tmp_path), train_size=6, test_size=5)
    assert source.config is config and len(source) == 5
    assert pickle.loads(pickle.dumps(source))[4]["caption"] == source[4]["caption"]


def _files(built) -> list[str]:
    return sorted(os.listdir(f"{built[0]}/shapes/32_train60_test54/1.0.0"))


def _mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def test_build_leaves_no_temp_folder(tmp_path, monkeypatch):
    # tfds' builder made an empty mkdtemp("tfds") folder per first build (looking for
    # metadata on GCS) and never removed it: a build must leave the temp folder as it was.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    shapes.load_shapes(32, "test", data_dir=str(tmp_path / "data"), train_size=6, test_size=5)
    assert sorted(p.name for p in temp.iterdir()) == []
