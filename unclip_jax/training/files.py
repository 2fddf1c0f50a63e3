"""Files in a workdir that may be a URI (gs://bucket/run on a TPU pod) or a local path.

Everything a run keeps in its workdir goes through `etils.epath` (orbax's file layer), which
writes to local disks and, with `gcsfs` installed (the `tpu` extra), to GCS.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
from etils import epath
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (gs://bucket/run, ...) rather than a local file system path."""
    return "://" in str(path)


def workdir_path(workdir: str | os.PathLike) -> str:
    """A local workdir made absolute; a URI as given (os.path.abspath would turn gs://b/run
    into a local directory ./gs:/b/run and the run would silently write there)."""
    return str(workdir) if is_remote(workdir) else os.path.abspath(workdir)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that a reader never sees half of it (a local temporary file
    renamed over it; an object store's single write is atomic already)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: Any) -> None:
    """Arrays (and string metadata) as one safetensors file, written atomically."""
    write_bytes_atomically(path, save_safetensors_bytes(arrays, metadata=metadata))


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a safetensors file at a local path or URI."""
    data = epath.Path(path).read_bytes()
    header_size = int.from_bytes(data[:8], "little")  # the format: u64 size, JSON header
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    return load_safetensors_bytes(data), metadata


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies the files under `src` to `dst` (either may be a URI), replacing existing ones."""
    src, dst = epath.Path(src), epath.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():  # (epath refuses rglob: one RPC per file on GCS anyway)
        if entry.is_dir():
            copy_tree(entry, dst / entry.name)
        else:
            entry.copy(dst / entry.name, overwrite=True)


def local_dir_of(path: str | os.PathLike) -> str:
    """A local directory holding the files of `path`: itself when local, else a temporary copy
    (for readers that need local files, e.g. a tokenizer)."""
    if not is_remote(path):
        return str(path)
    local = tempfile.mkdtemp(prefix="unclip-jax-")
    copy_tree(path, local)
    return local
