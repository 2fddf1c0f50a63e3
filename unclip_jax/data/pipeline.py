"""The per-process input pipeline: grain over a random-access source (tfds.data_source or
embedding shards), without TensorFlow.

Each process reads a disjoint 1/N of the examples (a stride of the source), shuffles them with
a seeded per-epoch permutation, applies a seeded per-example transform, and batches its share
of every global batch. The iterator's state is a small JSON-able dict: restoring it yields the
same next batch (the training loop checkpoints it with the train state).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np

from unclip_jax.data.degradations import PAPER_BLUR_KERNEL_SIZE, PAPER_BLUR_SIGMA, make_low_res
from unclip_jax.data.images import to_float

Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


class DecodedSource:
    """A tfds data source with its Text features as str instead of bytes."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self._source[index])
        for name, value in example.items():
            if isinstance(value, bytes):
                example[name] = value.decode("utf-8")
        return example


class SourceSlice:
    """Rows [start, stop) of a random-access source, as a source."""

    def __init__(self, source: Any, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.source[self.start + index]


class MemoizedSource:
    """A random-access source that keeps each example after its first read, so the epochs
    after the first read memory instead of decoding again (`data.cache`; for a dataset that
    fits in RAM: the `shapes` train split at 32 px is about 150 MB of pixels).

    Its arrays are read-only: a transform that changed an example in place would change every
    later epoch's copy of it, so it fails at once instead."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._examples: list[dict[str, Any] | None] = [None] * len(source)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._examples[index]
        if example is None:  # two read threads may both decode it once: the same example
            example = dict(self._source[index])
            for value in example.values():
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            self._examples[index] = example
        return example


def open_dataset(
    spec: str, split: str = "train", *, data_dir: str | None = None, **shapes_sizes: int
) -> Any:
    """A random-access source of {"image": uint8 HWC, "caption": str, ...} examples.

    `spec` is `shapes:R` for the built-in set at R pixels (built into `data_dir` on first use),
    or the path of a dataset written by `unclip-jax data build` (the output folder or the tfds
    version folder inside it). `shapes_sizes` (train_size, test_size, seed) pick a `shapes`
    build other than the default 50,000 / 5,400.
    """
    if spec.startswith("shapes:") or spec == "shapes":
        from unclip_jax.data.shapes import load_shapes

        resolution = spec.partition(":")[2] or "64"
        try:
            resolution_px = int(resolution)
        except ValueError:
            raise ValueError(f"bad dataset spec {spec!r}: expected shapes:<resolution>") from None
        return load_shapes(resolution_px, split, data_dir=data_dir, **shapes_sizes)
    if shapes_sizes:
        raise ValueError(f"sizes {sorted(shapes_sizes)} only apply to the built-in shapes set")
    import tensorflow_datasets as tfds

    from unclip_jax.data.image_text import find_dataset_dir

    builder = tfds.builder_from_directory(find_dataset_dir(spec))
    if split not in builder.info.splits:
        raise ValueError(
            f"dataset {spec!r} has no split {split!r}; splits: {', '.join(builder.info.splits)}"
        )
    return DecodedSource(builder.as_data_source(split=split))


def dataset_spec(data: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(`open_dataset` spec, keyword arguments) of a stage config's `data` block.

    `dataset` "shapes" renders at `resolution` (train_size / test_size pick a build, 0 the
    default); any other dataset is the one built with `unclip-jax data build` at `data_dir`.
    """
    if data["dataset"] == "shapes":
        sizes = {k: data[k] for k in ("train_size", "test_size") if data.get(k)}
        return f"shapes:{data['resolution']}", {"data_dir": data.get("data_dir") or None, **sizes}
    if not data.get("data_dir"):
        raise ValueError("data.data_dir must name a dataset built with `unclip-jax data build`")
    return data["data_dir"], {}


class PipelineIterator:
    """A batch iterator whose state is a JSON-able dict, restorable to the same next batch.

    The state records the worker count: grain's state format differs with and without worker
    processes, so restoring across a change of `worker_count` is a clear error.
    """

    def __init__(self, iterator: grain.DatasetIterator, worker_count: int) -> None:
        self._iterator = iterator
        self._worker_count = worker_count

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> Any:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position, as a JSON-able dict."""
        return {"worker_count": self._worker_count, "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a position `get_state` returned."""
        if state.get("worker_count") != self._worker_count:
            raise ValueError(
                f"the data position was saved with {state.get('worker_count')} worker processes "
                f"and this pipeline has {self._worker_count}: use the same data.workers to resume"
            )
        self._iterator.set_state(state["grain"])


def make_pipeline(
    source: Any,
    *,
    global_batch_size: int,
    seed: int = 0,
    transform: Transform | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    drop_remainder: bool = True,
    read_threads: int = 8,
) -> PipelineIterator:
    """This process's iterator of batches of `global_batch_size / process_count` examples.

    One global stream is defined for every process count: the examples in a seeded permutation
    that is fresh each epoch (`shuffle`), each transformed by `transform(example, rng)` with
    `rng` seeded by (seed, position in the stream). Process p takes positions p, p + N, ...
    of it, so the processes' shares are disjoint, together cover the stream, draw different
    augmentations, and every global batch is one contiguous window of the stream, whatever N
    is. With a finite `num_epochs` the stream is cut to a multiple of N, so every process gets
    as many batches. num_epochs None repeats forever. worker_count > 0 decodes in that many
    worker processes; read_threads read ahead (about two batches) in this one.
    drop_remainder False keeps a last, smaller batch (for jobs that see every example once).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch {global_batch_size} does not split over {process_count} processes"
        )
    local_batch = global_batch_size // process_count
    if drop_remainder and len(source) < global_batch_size:
        raise ValueError(
            f"the dataset ({len(source)} examples) is smaller than one global batch "
            f"({global_batch_size})"
        )
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()  # a new permutation every epoch once repeated
    ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.random_map(transform)  # seeded by the position in the global stream
    if num_epochs is not None:
        ds = ds[: len(ds) // process_count * process_count]
    ds = ds[process_index::process_count]
    # Read ahead a couple of batches of examples, not hundreds of batches (grain's default
    # buffer of 500 elements would hold 500 whole batches if batching came first).
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * local_batch)
    iter_ds = ds.to_iter_dataset(read).batch(local_batch, drop_remainder=drop_remainder)
    if worker_count > 0:
        # grain's worker processes read absl flags; a program that never parsed them (anything
        # but an absl app) makes every worker fail with UnparsedFlagAccessError.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return PipelineIterator(iter(iter_ds), worker_count)


def image_caption(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The decoder's view of an example: float32 image in [-1, 1] and its caption."""
    del rng
    return {"image": to_float(example["image"]), "caption": example["caption"]}


def upsampler_views(
    *,
    scale: int,
    crop_fraction: float | None,
    kind: str,
    blur_kernel_size: int = PAPER_BLUR_KERNEL_SIZE,
    blur_sigma: float = PAPER_BLUR_SIGMA,
) -> Transform:
    """The upsamplers' view of an example: a random square crop of `crop_fraction` of the
    high-res side (None: the whole image; the paper trains on 1/4) and its low-res, degraded
    view (kind 'none', 'blur' (with `blur_kernel_size`, `blur_sigma`) or 'bsr'), both float32
    in [-1, 1].

    The crop side is rounded down to a multiple of `scale`. The crop is taken first and
    degraded after, as latent diffusion does for BSR: the same region either way, and degrading
    1/16 of the pixels is what keeps the 256->1024 stage fed.
    """
    if crop_fraction is not None and not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")

    def transform(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        high = example["image"]
        if crop_fraction is not None:
            h, w = high.shape[:2]
            crop = round(min(h, w) * crop_fraction) // scale * scale
            if crop < scale:
                raise ValueError(
                    f"a {crop_fraction} crop of a {h}x{w} image is below the scale {scale}"
                )
            top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            high = high[top : top + crop, left : left + crop]
        low = make_low_res(
            high,
            scale=scale,
            kind=kind,
            rng=rng,
            blur_kernel_size=blur_kernel_size,
            blur_sigma=blur_sigma,
        )
        return {"high": to_float(high), "low": to_float(low)}

    return transform
