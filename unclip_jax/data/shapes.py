"""The built-in `shapes` set: procedural captioned images, a tfds builder and a loader.

The contract (colours, geometry, splits, held-out pairs) is the project spec
specs/shapes.md; the constants below are that contract in code, for evaluation and tests to
import.

How an index becomes an example (deterministic in (split, seed, index), any resolution):
- The split's combinations (540 for `test`, 450 for `train`, which drops the held-out
  (colour, shape) pairs) are listed in label order. Indices come in blocks of that many:
  block `index // n` is one seeded permutation of all n combinations, and `index % n` picks
  within it. So every block of n consecutive indices holds each combination exactly once,
  in an order that varies from block to block (a prefix of a split is spread evenly, not
  sorted by background).
- The jitter (size factor, centre offset) and the caption template come from
  `np.random.default_rng([seed, split_id, 1, index])`; the block permutation from
  `np.random.default_rng([seed, split_id, 0, block])` (the 0/1 keeps the two streams apart).
- Geometry is in units of the image side and is drawn with PIL on a canvas at least 4 times
  larger (and at least 256 px), then box-filtered down, so edges are anti-aliased and the
  picture is the same at every resolution up to edge quantisation.

Sizes of a built dataset: the registered configs "32", "64", "128", "256" hold
DEFAULT_TRAIN_SIZE train and DEFAULT_TEST_SIZE test examples with seed 0. Any other sizes or
seed make a custom config named like "64_train1000_test540" (plus "_seed3" when the seed is
not 0), built into its own folder: `shapes_config(64, train_size=1000, test_size=540)` or
`load_shapes(64, "train", train_size=1000, test_size=540)`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from unclip_jax.data.images import to_rgb_array
from unclip_jax.data.local_info import LocalDatasetInfo

RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# The contract (specs/shapes.md). Dict order is label order; treat these as read-only.
# ---------------------------------------------------------------------------------------------
BACKGROUNDS: dict[str, RGB] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 190),
    "orange": (240, 135, 30),
}
# Box side as a fraction of the image side, before the size jitter.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.45}
# Box centre (x, y) as fractions of the image side, y downwards, before the position jitter.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
SIZE_JITTER: tuple[float, float] = (0.9, 1.1)  # the box side is multiplied by U[0.9, 1.1]
POSITION_JITTER: float = 0.03  # each centre coordinate gets + U[-0.03, 0.03]
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("purple", "square"),
    ("orange", "circle"),
)

ATTRIBUTES: tuple[str, ...] = ("background", "shape", "colour", "size", "position")
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
NUM_COMBINATIONS: int = int(np.prod([len(names) for names in LABEL_NAMES.values()]))  # 540

# Every template names all five attributes. No template word is an attribute word, and the
# article "a" only ever precedes a size or a background (never "a orange").
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "{size} {colour} {shape}, {position}, {background} background",
    "a {background} background with a {size} {colour} {shape} in the {position}",
    "{background} background, {size} {colour} {shape} in the {position}",
    "{colour} {shape}, {size}, in the {position} of a {background} image",
)

SPLITS: tuple[str, ...] = ("train", "test")
RESOLUTIONS: tuple[int, ...] = (32, 64, 128, 256)
DEFAULT_TRAIN_SIZE: int = 50_000
DEFAULT_TEST_SIZE: int = 10 * NUM_COMBINATIONS  # 5,400: each combination 10 times
DATA_DIR_ENV: str = "UNCLIP_JAX_DATA_DIR"
# The drawing canvas is at least 4x the image side (17 coverage levels per edge pixel) and at
# least 256 px, so 32 px draws at 8x on the same canvas as 64 px and a 64 px image box-filtered
# to 32 px equals the 32 px one to +-2 levels. 128 and 256 px draw finer than 64 px; a 256 px
# image box-filtered to 64 px differs from the 64 px one only in edge pixels (mean 0.13
# levels), from where 64 px rounds an edge to its 1/4 px canvas grid. A 512 px minimum
# canvas would halve that but costs 2.3x the time at 64 px (0.27 vs 0.12 ms).
MIN_SUPERSAMPLE: int = 4
MIN_CANVAS: int = 256

_SPLIT_IDS = {"train": 0, "test": 1}
_ORDER_STREAM, _JITTER_STREAM = 0, 1


# ---------------------------------------------------------------------------------------------
# Attributes, layout and captions
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything that fixes one example except its resolution.

    `labels` maps each attribute to its integer label; `center` is the jittered box centre
    (x, y) and `side` the jittered box side, both in units of the image side; `template`
    indexes CAPTION_TEMPLATES.
    """

    labels: dict[str, int]
    center: tuple[float, float]
    side: float
    template: int

    def names(self) -> dict[str, str]:
        """The attribute words, e.g. {"background": "gray", "shape": "circle", ...}."""
        return {attr: LABEL_NAMES[attr][label] for attr, label in self.labels.items()}

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the object's box in units of the image side."""
        (cx, cy), half = self.center, self.side / 2
        return cx - half, cy - half, cx + half, cy + half


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown shapes split {split!r}; valid splits: {list(SPLITS)}.")


def _check_resolution(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(
            f"Unknown shapes resolution {resolution!r}; valid resolutions: {list(RESOLUTIONS)}."
        )


@functools.cache
def split_combinations(split: str) -> tuple[tuple[int, ...], ...]:
    """The split's attribute combinations as label tuples, in lexicographic label order.

    `test` has all 540; `train` the 450 whose (colour, shape) is not in HELD_OUT_PAIRS.
    """
    _check_split(split)
    held_out = {(LABEL_NAMES["colour"].index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS}
    sizes = [len(LABEL_NAMES[attr]) for attr in ATTRIBUTES]
    combos = [tuple(int(v) for v in c) for c in np.ndindex(*sizes)]
    if split == "train":
        combos = [c for c in combos if (c[2], c[1]) not in held_out]
    return tuple(combos)


@functools.lru_cache(maxsize=256)
def _block_order(seed: int, split: str, block: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], _ORDER_STREAM, block])
    return rng.permutation(len(split_combinations(split)))


def example_layout(*, split: str, index: int, seed: int = 0) -> Layout:
    """The attributes, jittered geometry and caption template of example `index` of `split`."""
    _check_split(split)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got {index=}, {seed=}.")
    combos = split_combinations(split)
    block, offset = divmod(int(index), len(combos))
    combo = combos[int(_block_order(int(seed), split, block)[offset])]
    labels = dict(zip(ATTRIBUTES, combo, strict=True))

    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], _JITTER_STREAM, int(index)])
    side = SIZES[LABEL_NAMES["size"][labels["size"]]] * rng.uniform(*SIZE_JITTER)
    x, y = POSITIONS[LABEL_NAMES["position"][labels["position"]]]
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    template = int(rng.integers(len(CAPTION_TEMPLATES)))
    return Layout(labels=labels, center=(x + dx, y + dy), side=float(side), template=template)


def make_caption(labels: Mapping[str, int], *, template: int = 0) -> str:
    """The caption of CAPTION_TEMPLATES[template] for integer `labels` (keyed by ATTRIBUTES)."""
    names = {attr: LABEL_NAMES[attr][labels[attr]] for attr in ATTRIBUTES}
    return CAPTION_TEMPLATES[template].format(**names)


def parse_caption(caption: str) -> dict[str, int] | None:
    """The integer labels a caption names (the inverse of `make_caption`, any template or
    free wording that uses the attribute words), or None when it does not name exactly one
    value of every attribute."""
    words = " " + " ".join(caption.lower().replace(",", " ").split()) + " "
    labels = {}
    for attr in ATTRIBUTES:
        found = [i for i, name in enumerate(LABEL_NAMES[attr]) if f" {name} " in words]
        if len(found) != 1:
            return None
        labels[attr] = found[0]
    return labels


def hard_negative_captions(
    caption: str, rng: np.random.Generator, *, num: int, attributes: Sequence[str]
) -> list[str]:
    """`num` distinct captions that each differ from `caption` in exactly one attribute word.

    The negatives are drawn without replacement from every (attribute of `attributes`, other
    value) pair, keeping the caption's wording (NegCLIP's swapped captions, Yuksekgonul et al.
    2023): a CLIP trained against them must tell e.g. "top left" from "top right", which
    random batches rarely ask of it. Raises ValueError for a caption that does not name one
    value of every attribute, an unknown attribute, or more negatives than there are pairs.
    """
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(
            f"hard-negative attributes {list(attributes)}: each must be one of {list(ATTRIBUTES)}"
        )
    labels = parse_caption(caption)
    if labels is None:
        raise ValueError(
            f"hard-negative captions need `shapes` captions naming every attribute once; "
            f"got {caption!r}"
        )
    swaps = [
        (attr, value)
        for attr in dict.fromkeys(attributes)
        for value in range(len(LABEL_NAMES[attr]))
        if value != labels[attr]
    ]
    if num > len(swaps):
        raise ValueError(
            f"{num} hard negatives asked, but swapping {list(attributes)} gives only {len(swaps)}"
        )
    negatives = []
    for k in rng.choice(len(swaps), size=num, replace=False):
        attr, value = swaps[int(k)]
        names = LABEL_NAMES[attr]
        pattern = re.compile(rf"\b{re.escape(names[labels[attr]])}\b", re.IGNORECASE)
        negatives.append(pattern.sub(names[value], caption, count=1))
    return negatives


def is_held_out(labels: Mapping[str, int]) -> bool:
    """Whether labels pair a colour and a shape that the train split never shows."""
    pair = (LABEL_NAMES["colour"][labels["colour"]], LABEL_NAMES["shape"][labels["shape"]])
    return pair in HELD_OUT_PAIRS


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def render_layout(layout: Layout, resolution: int) -> np.ndarray:
    """Draws `layout` as a uint8 (resolution, resolution, 3) RGB image (anti-aliased edges)."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    names = layout.names()
    supersample = max(MIN_SUPERSAMPLE, -(-MIN_CANVAS // resolution))
    scale = resolution * supersample
    canvas = Image.new("RGB", (scale, scale), BACKGROUNDS[names["background"]])
    draw = ImageDraw.Draw(canvas)
    fill = COLOURS[names["colour"]]
    left, top, right, bottom = (v * scale for v in layout.box())
    # PIL boxes are inclusive pixel indices; pixel i covers [i, i + 1), so the pixels whose
    # centres lie in [left, right) are round(left) .. round(right) - 1.
    x0, y0, x1, y1 = round(left), round(top), round(right) - 1, round(bottom) - 1
    if names["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif names["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # isosceles triangle: apex at the top centre of the box, base along its bottom
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    # A box filter over whole supersample blocks is exact area coverage: flat regions keep
    # their exact colour and edges blend the two colours, with no ringing (unlike Lanczos).
    # PIL's `reduce` is that box filter for an integer factor; it works on the canvas in place
    # of `images.resize(..., resample=Image.BOX)`, which would first copy the whole canvas to
    # NumPy and back (5-7x slower at 128 and 256 px; the same pixels up to +-1 rounding).
    return to_rgb_array(canvas.reduce(supersample))


def render_example(*, split: str, index: int, resolution: int, seed: int = 0) -> dict[str, Any]:
    """Example `index` of `split` at `resolution` px: the same picture at every resolution.

    Any resolution renders (the tfds configs use RESOLUTIONS); about 0.12 ms at 64 px.
    Returns {"image": uint8 (R, R, 3), "caption": str, "labels": {attribute: int}}, labels
    keyed and ordered as ATTRIBUTES (background, shape, colour, size, position).
    """
    layout = example_layout(split=split, index=index, seed=seed)
    return {
        "image": render_layout(layout, resolution),
        "caption": make_caption(layout.labels, template=layout.template),
        "labels": dict(layout.labels),
    }


# ---------------------------------------------------------------------------------------------
# The tfds builder (array_record, no TensorFlow)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """One resolution and split sizes; build with `shapes_config`, which names it."""

    resolution: int = 64
    train_size: int = DEFAULT_TRAIN_SIZE
    test_size: int = DEFAULT_TEST_SIZE
    seed: int = 0


_DESCRIPTION = (
    "Procedural captioned shapes: one flat-coloured circle, square or triangle of two sizes "
    "at five positions on a black, white or gray background (540 combinations); train leaves "
    "out the (colour, shape) pairs (green, triangle), (purple, square), (orange, circle)."
)


def shapes_config(
    resolution: int,
    *,
    train_size: int = DEFAULT_TRAIN_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
) -> ShapesConfig:
    """The config for `resolution` and these sizes: the registered one ("64") for the
    defaults, else a custom one named like "64_train1000_test540" (+ "_seed3" if seed != 0)."""
    _check_resolution(resolution)
    if train_size < 1 or test_size < 1 or seed < 0:
        raise ValueError(
            f"Sizes must be positive and the seed non-negative, got {train_size=}, "
            f"{test_size=}, {seed=}."
        )
    if (train_size, test_size, seed) == (DEFAULT_TRAIN_SIZE, DEFAULT_TEST_SIZE, 0):
        # tfds refuses a second config object under a registered config's name.
        return Shapes.builder_configs[str(resolution)]
    name = f"{resolution}_train{train_size}_test{test_size}" + (f"_seed{seed}" if seed else "")
    return ShapesConfig(
        name=name,
        description=f"{resolution} px, {train_size} train / {test_size} test, seed {seed}.",
        resolution=resolution,
        train_size=train_size,
        test_size=test_size,
        seed=seed,
    )


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for `shapes`: configs "32", "64", "128", "256" (see `shapes_config`).

    Not registered in tfds' global registry (so importing this module twice or a catalogue
    dataset of the same name can never clash); build it through `Shapes(config=...)` or
    `load_shapes`, not `tfds.load("shapes")`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: specs/shapes.md."}  # noqa: RUF012 - tfds API
    BUILDER_CONFIGS = [  # noqa: RUF012 - tfds API
        ShapesConfig(
            name=str(r),
            description=f"{r} px, {DEFAULT_TRAIN_SIZE} train / {DEFAULT_TEST_SIZE} test.",
            resolution=r,
        )
        for r in RESOLUTIONS
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` would read metadata files
        # (README, CITATIONS.bib) from this module's folder.
        r = self.builder_config.resolution
        labels = {
            attr: tfds.features.ClassLabel(names=list(LABEL_NAMES[attr])) for attr in ATTRIBUTES
        }
        return LocalDatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3)),
                    "caption": tfds.features.Text(),
                    "labels": tfds.features.FeaturesDict(labels),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=None,
            # Record i of a split is render_example(index=i): keep the generation order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples(split="train", num_examples=cfg.train_size),
            "test": self._generate_examples(split="test", num_examples=cfg.test_size),
        }

    def _generate_examples(self, *, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(num_examples):
            example = render_example(
                split=split, index=index, resolution=cfg.resolution, seed=cfg.seed
            )
            # Without TensorFlow the Image feature encodes PIL images (or bytes), not arrays.
            example["image"] = Image.fromarray(example["image"])
            example["index"] = index
            yield index, example


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class ShapesSource(Sequence):
    """Random access to one built split: `len(source)`, `source[i]` -> example dict.

    An example is {"image": uint8 (R, R, 3), "caption": str, "labels": {attribute: int},
    "index": int}; record i equals `render_example(index=i, ...)` plus its "index".
    """

    def __init__(self, source: Any, *, split: str, config: ShapesConfig) -> None:
        self._source = source
        self.split = split
        self.config = config

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self._source)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:  # also ends iteration through the sequence protocol
            raise IndexError(f"index {index} out of range for {n} examples")
        return _decode(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched read (grain uses it when present)."""
        return [_decode(record) for record in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"ShapesSource(config={self.config.name!r}, split={self.split!r}, len={len(self)})"


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    # tfds' Text feature decodes to bytes outside TensorFlow; images already come back as
    # uint8 arrays (decoded with PIL, tfds' fallback when OpenCV is absent).
    record = dict(record)
    if isinstance(record["caption"], bytes):
        record["caption"] = record["caption"].decode("utf-8")
    record["image"] = np.asarray(record["image"], dtype=np.uint8)
    record["labels"] = {attr: int(record["labels"][attr]) for attr in ATTRIBUTES}
    record["index"] = int(record["index"])
    return record


def default_data_dir() -> str:
    """$UNCLIP_JAX_DATA_DIR, else ~/.cache/unclip_jax/datasets."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/.cache/unclip_jax/datasets")


def load_shapes(
    resolution: int,
    split: str,
    *,
    data_dir: str | None = None,
    train_size: int = DEFAULT_TRAIN_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    seed: int = 0,
) -> ShapesSource:
    """A random-access source over `split` of `shapes` at `resolution`, built on first use.

    The build goes to DATA_DIR/shapes/CONFIG/1.0.0 (array_record), CONFIG being "64" for the
    default sizes and seed, else e.g. "64_train1000_test540" (see `shapes_config`).
    """
    _check_resolution(resolution)
    _check_split(split)
    config = shapes_config(resolution, train_size=train_size, test_size=test_size, seed=seed)
    builder = Shapes(
        # A registered config by name: the source pickles (for grain workers) by re-creating
        # the builder, and tfds refuses a copied config object under a registered name.
        config=config.name if config.name in Shapes.builder_configs else config,
        data_dir=os.path.expanduser(data_dir or default_data_dir()),
        file_format="array_record",
    )
    builder.download_and_prepare()  # no-op when already built
    return ShapesSource(builder.as_data_source(split=split), split=split, config=config)
