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

_SHARD = re.compile(r"^(?:img_emb|text_emb)_(\d+)\.npy$")
# Metadata column names, ours first, then clip-retrieval's and LAION's.
KEY_COLUMNS = ("key", "image_path", "url", "URL")
CAPTION_COLUMNS = ("caption", "text", "TEXT")


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
    if img_emb.shape[1] != text_emb.shape[1]:
        raise EmbeddingShardError(
            f"shard {index}: image embeddings have dim {img_emb.shape[1]}, text {text_emb.shape[1]}"
        )
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
    try:
        with open(tmp["img_emb"], "wb") as f:
            np.save(f, img_emb)
        with open(tmp["text_emb"], "wb") as f:
            np.save(f, text_emb)
        with open(tmp["metadata"], "w", encoding="utf-8") as f:
            for i in range(n):
                row = {"key": str(keys[i]), "caption": str(captions[i])}
                for name, values in (extra or {}).items():
                    value = values[i]
                    row[name] = value.item() if isinstance(value, np.generic) else value
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for name, path in paths.items():  # metadata last: its presence marks a complete shard
            os.replace(tmp[name], path)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return paths


def _metadata_path(directory: str, suffix: str) -> str:
    base = os.path.join(directory, "metadata", f"metadata_{suffix}")
    for ext in (".jsonl", ".parquet"):
        if os.path.exists(base + ext):
            return base + ext
    raise EmbeddingShardError(f"shard {suffix}: no metadata file {base}.jsonl or {base}.parquet")


def _read_metadata(path: str) -> tuple[list[str], list[str]]:
    """(keys, captions) of a metadata file; only those two columns are read."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        columns = set(rows[0]) if rows else set(KEY_COLUMNS[:1] + CAPTION_COLUMNS[:1])
        table = None
    else:
        import pyarrow.parquet as pq  # a dependency of tensorflow-datasets

        columns = set(pq.read_schema(path).names)
        rows, table = None, pq
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption is None:
        raise EmbeddingShardError(
            f"{path}: no caption column (one of {', '.join(CAPTION_COLUMNS)}); columns: "
            f"{', '.join(sorted(columns))}"
        )
    if rows is None:
        wanted = [c for c in (key, caption) if c is not None]
        data = table.read_table(path, columns=wanted).to_pydict()
        keys = data[key] if key else [""] * len(data[caption])
        captions = data[caption]
    else:
        keys = [r.get(key, "") if key else "" for r in rows]
        captions = [r.get(caption) for r in rows]
    # A null caption (a failed download's row) is kept as "" so rows stay aligned.
    return ["" if k is None else str(k) for k in keys], [
        "" if c is None else str(c) for c in captions
    ]


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
        self.directory = directory
        self.expected_dim = expected_dim
        self._open()

    def _open(self) -> None:
        directory, dim = self.directory, self.expected_dim
        img_dir, text_dir = os.path.join(directory, "img_emb"), os.path.join(directory, "text_emb")
        if not os.path.isdir(img_dir):
            raise EmbeddingShardError(f"no embedding shards: {img_dir!r} does not exist")
        # clip-retrieval pads shard numbers to its partition count's width (img_emb_0.npy for
        # fewer than 10 partitions): keep each file's own suffix.
        suffixes = {}
        for folder in (img_dir, text_dir):
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if m := _SHARD.match(name):
                    suffixes.setdefault(int(m.group(1)), m.group(1))
        if not suffixes:
            raise EmbeddingShardError(f"no img_emb_N.npy files in {img_dir!r}")
        self._shards: list[_Shard] = []
        for index in sorted(suffixes):
            suffix = suffixes[index]
            img_path = os.path.join(img_dir, f"img_emb_{suffix}.npy")
            text_path = os.path.join(text_dir, f"text_emb_{suffix}.npy")
            for path in (img_path, text_path):
                if not os.path.exists(path):
                    raise EmbeddingShardError(f"shard {suffix}: {path} is missing")
            img = np.load(img_path, mmap_mode="r")
            text = np.load(text_path, mmap_mode="r")
            meta_path = _metadata_path(directory, suffix)
            keys, captions = _read_metadata(meta_path)
            for path, array in ((img_path, img), (text_path, text)):
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
            counts = {img_path: img.shape[0], text_path: text.shape[0], meta_path: len(keys)}
            if len(set(counts.values())) != 1:
                raise EmbeddingShardError(
                    "row counts disagree: " + ", ".join(f"{p}: {n}" for p, n in counts.items())
                )
            self._shards.append(_Shard(img, text, keys, captions))
        self.dim = int(dim)
        self._offsets = np.cumsum([0] + [s.img_emb.shape[0] for s in self._shards])

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for grain's worker processes: reopen the files there, don't copy them.
        return {"directory": self.directory, "expected_dim": self.expected_dim}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory, self.expected_dim = state["directory"], state["expected_dim"]
        self._open()

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

    def captions(self) -> list[str]:
        """Every row's caption, in row order (read from the metadata, no embedding loaded)."""
        return [caption for s in self._shards for caption in s.captions]


class WithImageEmbeddings:
    """A dataset source whose example i carries row i of its embedding shards as "z_i".

    For a stage that would otherwise run the frozen CLIP's image tower on every batch: the
    embedding job (`embed_job`) already wrote each example's z_i, row i for example i. Each
    read checks that the row's caption is the example's, so shards of another dataset, split
    or order fail at the first batch, naming the row, instead of training on wrong z_i.
    """

    def __init__(self, source: Any, shards: EmbeddingShards) -> None:
        if len(shards) != len(source):
            raise EmbeddingShardError(
                f"the embeddings in {shards.directory} have {len(shards)} rows, the dataset "
                f"{len(source)} examples: embed this dataset's split (row i is example i)"
            )
        self._source, self._shards = source, shards

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example, row = self._source[index], self._shards[index]
        if str(example["caption"]) != row["caption"]:
            raise EmbeddingShardError(
                f"row {index} of the embeddings in {self._shards.directory} is of the caption "
                f"{row['caption']!r}, but example {index} of the dataset has "
                f"{str(example['caption'])!r}: they were made from different data"
            )
        return {**example, "z_i": row["img_emb"]}
