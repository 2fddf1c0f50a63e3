"""Image-text datasets as tfds array_record, built from a folder or webdataset source.

`build_image_text(source, resolution, out)` decodes every image, resizes its shorter side to
`resolution` (anti-aliased) and centre-crops it, and writes `train` and `test` splits (a
stable hash of the key puts `test_fraction` of the examples in `test`). Images that fail to
decode, are smaller than `min_size` or lack a caption are skipped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import zlib

import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data.images import resize_shorter_side_and_center_crop, to_rgb_array
from unclip_jax.data.local_info import LocalDatasetInfo
from unclip_jax.data.sources import SourceError, detect_format, iter_source

log = logging.getLogger("unclip_jax.data")

SKIP_REASONS = ("undecodable", "too_small", "no_caption", "duplicate_key")


@dataclasses.dataclass
class ImageTextConfig(tfds.core.BuilderConfig):
    """One resolution of an image-text dataset."""

    resolution: int = 64
    min_size: int = 64
    test_fraction: float = 0.01


class ImageText(tfds.core.GeneratorBasedBuilder):
    """Captioned images from a local source (set `source` before `download_and_prepare`)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = ImageTextConfig

    def __init__(self, *, source: str | None = None, **kwargs) -> None:
        self.source = source
        self.counts: collections.Counter[str] = collections.Counter()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return LocalDatasetInfo(
            builder=self,
            description="Captioned images, shorter side resized and centre-cropped.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3)),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager
        if self.source is None:
            raise SourceError("ImageText needs a source folder or webdataset to build from")
        splits = ("train", "test") if self.builder_config.test_fraction > 0 else ("train",)
        return {split: self._generate_examples(split=split) for split in splits}

    def _in_test(self, key: str) -> bool:
        return zlib.crc32(key.encode()) % 10_000 < self.builder_config.test_fraction * 10_000

    def _generate_examples(self, split: str):
        config = self.builder_config
        seen: set[str] = set()
        for raw in iter_source(self.source):
            if self._in_test(raw.key) != (split == "test"):
                continue
            if raw.key in seen:  # e.g. a.jpg beside a.png: one caption file for two images
                self.counts["duplicate_key"] += 1
                continue
            seen.add(raw.key)
            if raw.caption is None:
                self.counts["no_caption"] += 1
                continue
            try:
                with Image.open(io.BytesIO(raw.image_bytes)) as image:
                    image.load()
                    array = to_rgb_array(image)
            except Exception:
                self.counts["undecodable"] += 1
                continue
            if min(array.shape[:2]) < config.min_size:
                self.counts["too_small"] += 1
                continue
            array = resize_shorter_side_and_center_crop(array, config.resolution)
            self.counts[f"written_{split}"] += 1
            yield raw.key, {"image": Image.fromarray(array), "caption": raw.caption, "key": raw.key}


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """Where a build wrote its dataset and what it wrote and skipped."""

    path: str
    written: dict[str, int]
    skipped: dict[str, int]


def build_image_text(
    source: str,
    resolution: int,
    out: str,
    *,
    min_size: int | None = None,
    test_fraction: float = 0.01,
) -> BuildReport:
    """Builds the tfds dataset for `source` at `resolution` under `out`; returns a report.

    min_size (default: `resolution`) is the smallest shorter side kept. Raises SourceError for
    a missing or empty source, or one in which no example survives.
    """
    detect_format(source)  # a missing or empty source fails here, before anything is written
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    config = ImageTextConfig(
        name=str(resolution),
        resolution=resolution,
        min_size=resolution if min_size is None else min_size,
        test_fraction=test_fraction,
    )
    builder = ImageText(source=source, config=config, data_dir=out)
    if builder.is_prepared():
        raise SourceError(
            f"a dataset at resolution {resolution} already exists in {builder.data_dir}"
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except AssertionError as err:  # tfds's writer refuses an empty split
        if config.test_fraction == 0:
            raise SourceError(f"no usable example in {source!r} ({dict(builder.counts)})") from err
        # Every example hashed into `test` was skipped (a small source): build train only.
        log.warning("no example of the test split survived; building the train split only")
        return build_image_text(
            source, resolution, out, min_size=config.min_size, test_fraction=0.0
        )
    written = {s: builder.counts[f"written_{s}"] for s in ("train", "test")}
    skipped = {reason: builder.counts[reason] for reason in SKIP_REASONS}
    return BuildReport(path=builder.data_dir, written=written, skipped=skipped)


def find_dataset_dir(path: str) -> str:
    """The tfds version directory (holding dataset_info.json) at or under `path`.

    Raises FileNotFoundError naming `path` when there is none, ValueError when there are
    several (name the one you mean).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path!r}")
    found = sorted(root for root, _, files in os.walk(path) if "dataset_info.json" in files)
    if not found:
        raise FileNotFoundError(f"no tfds dataset (dataset_info.json) under {path!r}")
    if len(found) > 1:
        raise ValueError(f"several datasets under {path!r}; pass one of: {', '.join(found)}")
    return found[0]
