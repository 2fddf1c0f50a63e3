"""The embedding job: CLIP over a dataset, written as clip-retrieval shards, resumable.

The dataset is cut into shards of `shard_size` consecutive examples; process p of P embeds the
shards k with k % P == p, each on all of its local devices (the batch split over them, the
params replicated). A shard's files are renamed into place when complete, metadata last, so a
rerun skips finished shards and never writes a row twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from unclip_jax.clip import load_pretrained
from unclip_jax.config import ConfigError
from unclip_jax.data.embeddings import EmbeddingShards, shard_paths, write_embedding_shard
from unclip_jax.data.pipeline import SourceSlice, make_pipeline, open_dataset

log = logging.getLogger("unclip_jax.embed")

DTYPES = {"float16": np.float16, "float32": np.float32}
MANIFEST = "embed_manifest.json"


@dataclasses.dataclass(frozen=True)
class EmbedReport:
    """What a run of the job did: shards written now, shards found complete, rows written."""

    written: list[int]
    skipped: list[int]
    rows: int


def shard_complete(out: str, index: int) -> bool:
    """Whether shard `index` was fully written (its metadata, renamed last, exists)."""
    return all(os.path.exists(p) for p in shard_paths(out, index).values())


def clip_digest(clip_dir: str) -> str:
    """A fingerprint of a CLIP directory: its config and the names and sizes of its weights."""
    digest = hashlib.sha1()
    with open(os.path.join(clip_dir, "config.json"), "rb") as f:
        digest.update(f.read())
    for name in sorted(os.listdir(clip_dir)):
        if name.endswith(".safetensors"):
            digest.update(f"{name}:{os.path.getsize(os.path.join(clip_dir, name))}".encode())
    return digest.hexdigest()


def read_manifest(out: str) -> dict[str, Any] | None:
    """The manifest of an embedding folder written by this job, or None (e.g. clip-retrieval's)."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _manifest(clip_dir: str, settings: dict[str, Any], num_rows: int, dim: int) -> dict[str, Any]:
    """What fixes the job's output: the CLIP (its config and weight files), the data, the cut."""
    return {**settings, "clip": clip_digest(clip_dir), "num_rows": num_rows, "dim": dim}


def _check_manifest(out: str, manifest: dict[str, Any]) -> None:
    """Writes the manifest of a new output folder; refuses to add to one made differently."""
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        changed = [
            f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in manifest.items() if saved.get(k) != v
        ]
        if changed:
            raise ValueError(
                f"{out} holds embeddings made with other settings ({'; '.join(changed)}): "
                "use another --out, or delete it to start over"
            )
        return
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, path)


def open_shards(directory: str, key: str, dim: int) -> EmbeddingShards:
    """The embedding shards of config key `key`, whose embeddings must be `dim` wide."""
    if not directory:
        raise ConfigError(
            f"config key {key!r} is empty: set it to a folder of embedding shards "
            "(`unclip-jax embed --clip CLIP --data DATA --out DIR`, or clip-retrieval's output)"
        )
    return EmbeddingShards(directory, expected_dim=dim)


def check_shards_come_from(directory: str, clip_dir: str) -> None:
    """ConfigError when shards written by `unclip-jax embed` name another CLIP than `clip.dir`
    (the prior pairs the shards' z_i with that CLIP's text encoding, the decoder with its
    caption states); shards without our manifest (clip-retrieval's, LAION's) cannot be checked and are trusted."""
    manifest = read_manifest(directory)
    if manifest and manifest.get("clip") != clip_digest(clip_dir):
        raise ConfigError(
            f"the shards in {directory} were embedded with another CLIP than clip.dir "
            f"{clip_dir} (manifest digest {manifest.get('clip')}): embed them with it, or point "
            "clip.dir at the CLIP that made them"
        )


def embed_dataset(
    clip_dir: str,
    data_spec: str,
    out: str,
    *,
    split: str = "train",
    batch_size: int = 256,
    dtype: str = "float16",
    shard_size: int | None = None,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    **shapes_sizes: int,
) -> EmbedReport:
    """Embeds every example of `split` of `data_spec` with the CLIP at `clip_dir` into `out`.

    Writes img_emb, text_emb (in `dtype`) and metadata (key, caption, index: the example's row
    in the dataset) per shard; finished shards are skipped, so an interrupted job resumes. The
    output folder's manifest records the CLIP, data, split, shard size and dtype: resuming
    with other settings is an error rather than a folder of mixed rows. shard_size None picks
    min(10,000, rows / processes), so every process has work.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown embedding dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    model = load_pretrained(clip_dir)
    source = open_dataset(data_spec, split, data_dir=data_dir, **shapes_sizes)
    if shard_size is None:
        shard_size = max(1, min(10_000, math.ceil(len(source) / process_count)))
    settings = {
        "data": data_spec,
        "split": split,
        "shard_size": shard_size,
        "dtype": dtype,
        **{k: shapes_sizes[k] for k in sorted(shapes_sizes)},
    }
    _check_manifest(out, _manifest(clip_dir, settings, len(source), model.config.projection_dim))
    num_shards = math.ceil(len(source) / shard_size)
    mine = [k for k in range(num_shards) if k % process_count == process_index]
    todo = [k for k in mine if not shard_complete(out, k)]
    skipped = [k for k in mine if k not in todo]
    if skipped:
        log.info("shards already complete, skipped: %s", skipped)

    # This process's devices share each batch; the params are replicated on them.
    devices = jax.local_devices()
    by_row = NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))
    model.params = jax.device_put(model.params, NamedSharding(by_row.mesh, PartitionSpec()))
    batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    transform = model.example_transform(with_caption=True)

    rows = 0
    bar = tqdm(
        total=sum(min(shard_size, len(source) - k * shard_size) for k in todo),
        disable=process_index != 0,
        desc="embed",
        unit="ex",
    )
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, len(source))
        batches = make_pipeline(
            SourceSlice(source, start, stop),
            global_batch_size=batch_size,
            transform=transform,
            shuffle=False,
            num_epochs=1,
            process_index=0,
            process_count=1,
            drop_remainder=False,
        )
        img, text, captions, keys = [], [], [], []
        for batch in batches:
            n = len(batch["caption"])
            pad = batch_size - n  # the last batch is padded to split over the devices
            ids, mask, pixels = (
                jax.device_put(pad_rows(batch[key], pad), by_row)
                for key in ("input_ids", "attention_mask", "pixels")
            )
            text.append(np.asarray(model.encode_tokens(ids, mask))[:n].astype(DTYPES[dtype]))
            img.append(np.asarray(model.encode_pixels(pixels))[:n].astype(DTYPES[dtype]))
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


def pad_rows(x: np.ndarray, pad: int) -> np.ndarray:
    """`x` with its last row repeated `pad` more times."""
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
