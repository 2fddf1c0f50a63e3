"""The embedding job: CLIP over a dataset, written as clip-retrieval shards, resumable.

The dataset is cut into shards of `shard_size` consecutive examples; process p of P embeds the
shards k with k % P == p, each on all of its local devices (the batch split over them, the
params replicated). A shard's files are renamed into place when complete, metadata last, so a
rerun skips finished shards and never writes a row twice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from unclip_jax.clip import load_pretrained, preprocess_images
from unclip_jax.data.embeddings import shard_paths, write_embedding_shard
from unclip_jax.data.pipeline import make_pipeline, open_dataset

log = logging.getLogger("unclip_jax.embed")

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclasses.dataclass(frozen=True)
class EmbedReport:
    """What a run of the job did: shards written now, shards found complete, rows written."""

    written: list[int]
    skipped: list[int]
    rows: int


def shard_complete(out: str, index: int) -> bool:
    """Whether shard `index` was fully written (its metadata, renamed last, exists)."""
    return all(os.path.exists(p) for p in shard_paths(out, index).values())


def embed_dataset(
    clip_dir: str,
    data_spec: str,
    out: str,
    *,
    split: str = "train",
    batch_size: int = 256,
    dtype: str = "float16",
    shard_size: int = 10_000,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    **shapes_sizes: int,
) -> EmbedReport:
    """Embeds every example of `split` of `data_spec` with the CLIP at `clip_dir` into `out`.

    Writes img_emb, text_emb (in `dtype`) and metadata (key, caption, index: the example's row
    in the dataset) per shard; finished shards are skipped, so an interrupted job resumes.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown embedding dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    model = load_pretrained(clip_dir)
    source = open_dataset(data_spec, split, data_dir=data_dir, **shapes_sizes)
    num_shards = math.ceil(len(source) / shard_size)
    mine = [k for k in range(num_shards) if k % process_count == process_index]
    todo = [k for k in mine if not shard_complete(out, k)]
    skipped = [k for k in mine if k not in todo]
    if skipped:
        log.info("shards already complete, skipped: %s", skipped)

    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    by_row = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(model.params, replicated)
    apply = model.model.apply

    @jax.jit
    def embed(params: Any, ids: jax.Array, mask: jax.Array, pixels: jax.Array) -> tuple:
        z_t = apply({"params": params}, ids, mask, method="encode_text")
        z_i = apply({"params": params}, pixels, method="encode_image")
        return z_t, z_i

    size, length = model.config.vision.image_size, model.config.context_length
    per_device = math.ceil(batch_size / len(devices))
    batch_size = per_device * len(devices)

    def prepare(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        del rng
        ids, mask = model.tokenizer([str(example["caption"])], context_length=length)
        return {
            "ids": ids[0],
            "mask": mask[0],
            "pixels": preprocess_images(
                [example["image"]], size, mean=model.image_mean, std=model.image_std
            )[0],
            "caption": str(example["caption"]),
            "key": str(example.get("key", "")),
        }

    rows = 0
    bar = tqdm(
        total=sum(min(shard_size, len(source) - k * shard_size) for k in todo),
        disable=process_index != 0,
        desc="embed",
        unit="ex",
    )
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, len(source))
        shard_source = _Slice(source, start, stop)
        batches = make_pipeline(
            shard_source,
            global_batch_size=batch_size,
            transform=prepare,
            shuffle=False,
            num_epochs=1,
            process_index=0,
            process_count=1,
            drop_remainder=False,
        )
        img, text, keys, captions = [], [], [], []
        for batch in batches:
            n = len(batch["caption"])
            pad = batch_size - n  # the last batch is padded to split over the devices

            ids, mask, pixels = (_pad_rows(batch[k], pad) for k in ("ids", "mask", "pixels"))
            z_t, z_i = embed(params, *(jax.device_put(x, by_row) for x in (ids, mask, pixels)))
            text.append(np.asarray(z_t)[:n].astype(DTYPES[dtype]))
            img.append(np.asarray(z_i)[:n].astype(DTYPES[dtype]))
            captions.extend(str(c) for c in batch["caption"])
            keys.extend(str(c) for c in batch["key"])
            bar.update(n)
        indices = list(range(start, stop))
        keys = [key or f"{split}/{i}" for key, i in zip(keys, indices, strict=True)]
        write_embedding_shard(
            out,
            k,
            img_emb=np.concatenate(img),
            text_emb=np.concatenate(text),
            keys=keys,
            captions=captions,
            extra={"index": indices},
        )
        rows += stop - start
    bar.close()
    return EmbedReport(written=todo, skipped=skipped, rows=rows)


def _pad_rows(x: np.ndarray, pad: int) -> np.ndarray:
    """`x` with its last row repeated `pad` more times."""
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x


class _Slice:
    """Rows [start, stop) of a random-access source."""

    def __init__(self, source: Any, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.source[self.start + index]
