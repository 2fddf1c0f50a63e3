"""PyTorch `.bin` state dicts (`torch.save`'s zip format) read into numpy, without torch.

A `torch.save` file (PyTorch >= 1.6) is a zip archive: `<name>/data.pkl`, a pickle whose
tensors refer by key to raw little-endian storages `<name>/data/<key>`. This reads it with an
unpickler that only builds what a state dict holds (an OrderedDict of tensors, views of
storages at an offset with strides), and refuses any other class, so reading a checkpoint runs
no code from it (as `torch.load(weights_only=True)`). bfloat16 is widened to float32 (numpy has
no bfloat16); every other dtype keeps its own.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import numpy as np

__all__ = ["TorchBinError", "read_torch_bin"]

# torch's storage classes, as pickled, and their element type ("bfloat16": stored as uint16).
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchBinError(ValueError):
    """A `.bin` file that is not a readable `torch.save` state dict, named in the message."""


class _Storage:
    """A pickled storage class: its element dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGES[name]


def _rebuild_tensor(
    storage: np.ndarray,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: Any,
) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a storage, copied."""
    if not size:
        return np.array(storage[offset])
    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=tuple(size),
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_parameter: a Parameter is its data here."""
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _Storage(name)
        raise TorchBinError(
            f"{self.path}: holds a {module}.{name}, not only tensors; refusing to unpickle it "
            "(convert the checkpoint to safetensors with torch)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        # ("storage", storage class, key, location, number of elements)
        kind, storage, key, _, numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise TorchBinError(f"{self.path}: unknown persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        if storage.dtype == "bfloat16":
            bits = np.frombuffer(raw, "<u2", count=numel).astype(np.uint32) << 16
            return bits.view(np.float32)
        return np.frombuffer(raw, np.dtype(storage.dtype).newbyteorder("<"), count=numel)


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} of a `torch.save`d state dict (zip format, PyTorch >= 1.6).

    Raises TorchBinError for a file that is not one (an older pickle, a big-endian archive,
    or one holding anything but tensors in a dict).
    """
    if not zipfile.is_zipfile(path):
        raise TorchBinError(
            f"{path}: not a zip-format torch.save file (saved by PyTorch < 1.6?); convert it "
            "to safetensors with torch"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise TorchBinError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and archive.read(order).strip() != b"little":
            raise TorchBinError(f"{path}: a big-endian archive")
        with archive.open(pickles[0]) as f:
            state = _Unpickler(f, archive, prefix, path).load()
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise TorchBinError(f"{path}: not a state dict of tensors")
    return dict(state)
