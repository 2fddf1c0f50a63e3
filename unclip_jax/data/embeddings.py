"""CLIP embedding shards in clip-retrieval's layout, read and written through one small API.

    DIR/img_emb/img_emb_0000.npy     (N, D) image embeddings
    DIR/text_emb/text_emb_0000.npy   (N, D) text embeddings
    DIR/metadata/metadata_0000.parquet or .jsonl   N rows with at least "key" and "caption"

This is what LAION publishes and what `clip-retrieval inference` writes, and what our own
embedding job writes, so the priors train on either. Rows of the three files of a shard are
the same examples in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_SHARD = re.compile(r"img_emb_(\d+)\.npy$")


class EmbeddingShardError(ValueError):
    """Shards whose files are missing or disagree, with the file named."""


def shard_paths(directory: str, index: int) -> dict[str, str]:
    """The paths of shard `index`'s files (metadata as .jsonl; .parquet is read too)."""
    return {
        "img_emb": os.path.join(directory, "img_emb", f"img_emb_{index:04d}.npy"),
        "text_emb": os.path.join(directory, "text_emb", f"text_emb_{index:04d}.npy"),
        "metadata": os.path.join(directory, "metadata", f"metadata_{index:04d}.jsonl"),
    }


def write_embedding_shard(
    directory: str,
    index: int,
    *,
    img_emb: np.ndarray,
    text_emb: np.ndarray,
    keys: Sequence[str],
    captions: Sequence[str],
    extra: dict[str, Sequence[Any]] | None = None,
) -> dict[str, str]:
    """Writes shard `index` (float16 embeddings are kept as given); returns its paths.

    Files are written under temporary names and renamed, so a crash never leaves a shard
    whose files disagree.
    """
    img_emb, text_emb = np.asarray(img_emb), np.asarray(text_emb)
    n = img_emb.shape[0]
    if img_emb.ndim != 2 or text_emb.ndim != 2:
        raise EmbeddingShardError("embeddings must be (rows, dim) arrays")
    lengths = {
        "img_emb": n,
        "text_emb": text_emb.shape[0],
        "keys": len(keys),
        "captions": len(captions),
    }
    for name, values in (extra or {}).items():
        lengths[name] = len(values)
    if len(set(lengths.values())) != 1:
        raise EmbeddingShardError(f"shard {index}: row counts disagree: {lengths}")
    paths = shard_paths(directory, index)
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = {k: f"{p}.tmp-{os.getpid()}" for k, p in paths.items()}
    with open(tmp["img_emb"], "wb") as f:
        np.save(f, img_emb)
    with open(tmp["text_emb"], "wb") as f:
        np.save(f, text_emb)
    with open(tmp["metadata"], "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"key": str(keys[i]), "caption": str(captions[i])}
            for name, values in (extra or {}).items():
                row[name] = values[i]
            f.write(json.dumps(row) + "\n")
    for name, path in paths.items():
        os.replace(tmp[name], path)
    return paths


def _read_metadata(directory: str, index: int) -> tuple[str, list[dict[str, Any]]]:
    base = os.path.join(directory, "metadata", f"metadata_{index:04d}")
    if os.path.exists(base + ".jsonl"):
        with open(base + ".jsonl", encoding="utf-8") as f:
            return base + ".jsonl", [json.loads(line) for line in f if line.strip()]
    if os.path.exists(base + ".parquet"):
        import pyarrow.parquet as pq  # a dependency of tensorflow-datasets

        return base + ".parquet", pq.read_table(base + ".parquet").to_pylist()
    raise EmbeddingShardError(f"shard {index}: no metadata file {base}.jsonl or {base}.parquet")


@dataclasses.dataclass(frozen=True)
class _Shard:
    img_emb: np.ndarray
    text_emb: np.ndarray
    keys: list[str]
    captions: list[str]


class EmbeddingShards:
    """All shards of a directory as one random-access source of examples.

    `source[i]` is {"img_emb": (D,), "text_emb": (D,), "key": str, "caption": str}; embeddings
    are memory-mapped, so opening a large set reads only the metadata. Every shard is checked
    on open: row counts of the three files and the embedding dimension must agree (with
    `expected_dim` when given), else EmbeddingShardError names the file.
    """

    def __init__(self, directory: str, *, expected_dim: int | None = None) -> None:
        img_dir = os.path.join(directory, "img_emb")
        if not os.path.isdir(img_dir):
            raise EmbeddingShardError(f"no embedding shards: {img_dir!r} does not exist")
        indices = sorted(
            int(m.group(1)) for name in os.listdir(img_dir) if (m := _SHARD.search(name))
        )
        if not indices:
            raise EmbeddingShardError(f"no img_emb_NNNN.npy files in {img_dir!r}")
        self.directory = directory
        self._shards: list[_Shard] = []
        dim = expected_dim
        for index in indices:
            paths = shard_paths(directory, index)
            if not os.path.exists(paths["text_emb"]):
                raise EmbeddingShardError(f"shard {index}: {paths['text_emb']} is missing")
            img = np.load(paths["img_emb"], mmap_mode="r")
            text = np.load(paths["text_emb"], mmap_mode="r")
            meta_path, rows = _read_metadata(directory, index)
            for path, array in ((paths["img_emb"], img), (paths["text_emb"], text)):
                if array.ndim != 2:
                    raise EmbeddingShardError(
                        f"{path}: expected (rows, dim), got shape {array.shape}"
                    )
                if dim is None:
                    dim = array.shape[1]
                if array.shape[1] != dim:
                    raise EmbeddingShardError(
                        f"{path}: embedding dimension {array.shape[1]}, expected {dim}"
                    )
            counts = {
                paths["img_emb"]: img.shape[0],
                paths["text_emb"]: text.shape[0],
                meta_path: len(rows),
            }
            if len(set(counts.values())) != 1:
                raise EmbeddingShardError(
                    "row counts disagree: " + ", ".join(f"{p}: {n}" for p, n in counts.items())
                )
            keys = [str(r.get("key", r.get("image_path", ""))) for r in rows]
            captions = [str(r.get("caption", "")) for r in rows]
            self._shards.append(_Shard(img, text, keys, captions))
        self.dim = int(dim)
        self._offsets = np.cumsum([0] + [s.img_emb.shape[0] for s in self._shards])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} embeddings")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        row = index - int(self._offsets[shard])
        s = self._shards[shard]
        return {
            "img_emb": np.asarray(s.img_emb[row], dtype=np.float32),
            "text_emb": np.asarray(s.text_emb[row], dtype=np.float32),
            "key": s.keys[row],
            "caption": s.captions[row],
        }

    def all_img_emb(self) -> np.ndarray:
        """Every image embedding, (N, D) float32 (for PCA and normalisation statistics)."""
        return np.concatenate([np.asarray(s.img_emb, np.float32) for s in self._shards])
