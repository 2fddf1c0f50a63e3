"""The FID feature extractor: pytorch-fid's Inception-v3 in Flax, with its weights from a local
file (nothing is downloaded).

pytorch-fid (`pytorch_fid/inception.py`, `fid_inception_v3`) ports TensorFlow's 2015-12-05
Inception graph, which every standard FID implementation uses, onto torchvision's Inception-v3
with four kinds of changed blocks: `FIDInceptionA`/`C`/`E_1` average-pool without counting the
padding, and `FIDInceptionE_2` (Mixed_7c) max-pools where the paper average-pools. The
features are pool3, the 2048-d global average after Mixed_7c, of images resized to 299x299
(bilinear, `align_corners=False`, no antialiasing) and scaled from [0, 1] to [-1, 1].

Param names follow the PyTorch state dict (`Mixed_5b.branch1x1.conv.weight` is
`params/Mixed_5b/branch1x1/conv/kernel`), so loading is a transpose per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unclip_jax.embed_job import pad_rows

SIZE = 299  # the input side the network was trained at; every image is resized to it
FEATURES = 2048  # pool3 width
# Tensors of pytorch-fid's file that the features do not use: the 1008-way classifier.
UNUSED = ("fc.weight", "fc.bias")

_CONV_AXES = ("conv_height", "conv_width", "channels_in", "channels")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: a convolution without bias, BatchNorm(eps=0.001) with its
    running statistics (inference), ReLU. `kernel`, `stride` and `padding` as PyTorch's
    (height, width), the padding symmetric."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC in, NHWC out."""
        x = nn.Conv(
            self.features,
            _pair(self.kernel),
            strides=_pair(self.stride),
            padding=[(p, p) for p in _pair(self.padding)],
            use_bias=False,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=True,
            epsilon=1e-3,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("channels",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
            name="bn",
        )(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False): pytorch-fid's change
    # to torchvision, matching TF's SAME average pooling.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    # nn.MaxPool2d(3, stride=2), no padding, floor mode.
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1 branches, concatenated."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC in, NHWC out (224 + pool_features channels)."""
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, 1, name="branch1x1")(x)
        b5 = conv(48, 1, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's, unchanged): the 35 -> 17 reduction."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC in, NHWC out at half the side (480 + input channels)."""
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, 3, stride=2, name="branch3x3")(x)
        bd = conv(64, 1, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b/c/d/e: factorised 7x7 branches (1x7 and 7x1 convolutions)."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC in, NHWC out (768 channels)."""
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's, unchanged): the 17 -> 8 reduction."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC in, NHWC out at half the side (512 + input channels)."""
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, 1, name="branch3x3_1")(x)
        b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, 1, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (`pool="avg"`, pytorch-fid's FIDInceptionE_1) and Mixed_7c (`pool="max"`,
    FIDInceptionE_2: a 3x3 stride-1 max pool, padding 1, before the pool branch's 1x1)."""

    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC in, NHWC out (2048 channels)."""
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, 1, name="branch1x1")(x)
        b3 = conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, 1, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int = SIZE) -> jax.Array:
    """NHWC images resized to size x size as PyTorch's `F.interpolate(mode="bilinear",
    align_corners=False)` does: half-pixel centres, no antialiasing when shrinking."""
    if images.shape[1:3] == (size, size):
        return images
    shape = (images.shape[0], size, size, images.shape[3])
    return jax.image.resize(images, shape, "bilinear", antialias=False)


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 up to pool3: float NHWC images in [0, 1] of any size
    (resized to 299x299 first) -> (N, 2048).

    Convolutions run at `precision` (default HIGHEST: full float32 on TPU and recent NVIDIA
    GPUs too, where XLA's default precision may use bfloat16 or TF32 and move FID)."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """(N, H, W, 3) floats in [0, 1] -> (N, 2048) pool3 features."""
        x = 2.0 * resize_bilinear(images.astype(jnp.float32)) - 1.0
        conv = functools.partial(BasicConv2d, precision=self.precision)
        x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = conv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, self.precision, name="Mixed_5b")(x)
        x = FIDInceptionA(64, self.precision, name="Mixed_5c")(x)
        x = FIDInceptionA(64, self.precision, name="Mixed_5d")(x)
        x = InceptionB(self.precision, name="Mixed_6a")(x)
        x = FIDInceptionC(128, self.precision, name="Mixed_6b")(x)
        x = FIDInceptionC(160, self.precision, name="Mixed_6c")(x)
        x = FIDInceptionC(160, self.precision, name="Mixed_6d")(x)
        x = FIDInceptionC(192, self.precision, name="Mixed_6e")(x)
        x = InceptionD(self.precision, name="Mixed_7a")(x)
        x = FIDInceptionE("avg", self.precision, name="Mixed_7b")(x)
        x = FIDInceptionE("max", self.precision, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)), flattened


@dataclasses.dataclass(frozen=True)
class InceptionFeatures:
    """The FID Inception and its weights: `variables` is Flax's {"params": ...,
    "batch_stats": ...} (float32 NumPy arrays), as `module.apply` takes it."""

    module: InceptionV3
    variables: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Loading pytorch-fid's state dict
# ---------------------------------------------------------------------------------------------

# Flax leaf (collection, module, name) -> the PyTorch leaf it is read from.
_TORCH_LEAF = {
    ("params", "conv", "kernel"): "conv.weight",
    ("params", "bn", "scale"): "bn.weight",
    ("params", "bn", "bias"): "bn.bias",
    ("batch_stats", "bn", "mean"): "bn.running_mean",
    ("batch_stats", "bn", "var"): "bn.running_var",
}


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    # Flax's HWIO kernel is PyTorch's OIHW transposed; every other leaf is a vector.
    return (shape[3], shape[2], shape[0], shape[1]) if flax_path[-1] == "kernel" else shape


@functools.cache
def _layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (Flax path, Flax shape) for every tensor the features need."""
    module = InceptionV3()
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed))
    layout = {}
    for path, leaf in flat.items():
        collection, *modules, owner, name = path
        key = ".".join(modules) + "." + _TORCH_LEAF[collection, owner, name]
        layout[key] = (path, tuple(leaf.shape))
    return layout


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor `load_inception` reads from a pytorch-fid state dict: key -> its PyTorch
    shape (OIHW for convolution weights). `fc.*` and `*.num_batches_tracked` may also be
    present and are ignored."""
    return {key: _torch_shape(path, shape) for key, (path, shape) in _layout().items()}


def _ignored(key: str) -> bool:
    return key in UNUSED or key.endswith(".num_batches_tracked")


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch checkpoint and torch is not installed: install torch "
            "(pip install torch, or this project's peers extra) or convert the file to "
            ".safetensors with the same key names"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, found a {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if _ignored(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().to(torch.float32).numpy()
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(path).items() if not _ignored(k)}


def _keys(keys: Sequence[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def load_inception(path: str) -> InceptionFeatures:
    """pytorch-fid's FID Inception with the weights in `path`: its state dict
    (`pt_inception-2015-12-05-6726825d.pth`, read with torch) or the same tensors under the
    same names in a `.safetensors` file (read without torch).

    Raises FileNotFoundError for a missing file, ValueError naming the file and the key for a
    missing, unexpected or misshapen tensor, ImportError for a .pth without torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no Inception weights at {path!r}: pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (or its .safetensors conversion) must be on "
            "local disk; nothing is downloaded"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt"):
        tensors = _read_torch(path)
    elif ext == ".safetensors":
        tensors = _read_safetensors(path)
    else:
        raise ValueError(f"{path}: expected a .pth/.pt or .safetensors file, not {ext!r}")

    layout = _layout()
    if missing := layout.keys() - tensors.keys():
        raise ValueError(f"{path}: missing tensor(s) {_keys(missing)}")
    if unexpected := tensors.keys() - layout.keys():
        raise ValueError(
            f"{path}: unexpected tensor(s) {_keys(unexpected)} (not pytorch-fid's FID "
            "Inception state dict?)"
        )
    flat = {}
    for key, (flax_path, shape) in layout.items():
        value, want = tensors[key], _torch_shape(flax_path, shape)
        if value.shape != want:
            raise ValueError(f"{path}: {key!r} has shape {value.shape}, expected {want}")
        value = np.asarray(value, np.float32)
        flat[flax_path] = value.transpose(2, 3, 1, 0) if flax_path[-1] == "kernel" else value
    return InceptionFeatures(module=InceptionV3(), variables=traverse_util.unflatten_dict(flat))


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _pool3(module: InceptionV3, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    # uint8 pixels scale to [0, 1] as torchvision's ToTensor does (a division by 255).
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return module.apply(variables, images)


def _resize_host(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """One uint8 HxWx3 image -> size x size float32 in [0, 1], bilinear as `resize_bilinear`
    (for batches of mixed sizes, which cannot be stacked before resizing)."""
    x = image.astype(np.float32) / np.float32(255.0)
    for axis in (0, 1):
        n = x.shape[axis]
        src = np.maximum((np.arange(size, dtype=np.float32) + 0.5) * (n / size) - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
        hi = np.minimum(lo + 1, n - 1)
        w = (src - lo).astype(np.float32)
        w = w[:, None, None] if axis == 0 else w[None, :, None]
        x = np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w
    return x


def inception_features(
    model: InceptionFeatures, images: Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """pool3 features (N, 2048) float32 of uint8 HxWx3 images of any size, as pytorch-fid
    computes them from the same pixels; each batch split over this process's devices.

    A batch whose images share a size is resized on the devices (one compilation per input
    size); a batch of mixed sizes is resized here first."""
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected uint8 HxWx3, got {image.dtype} {tuple(image.shape)}"
            )
    if len(images) == 0:
        return np.zeros((0, FEATURES), np.float32)
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))
    rows, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(model.variables, whole)
    batch = math.ceil(min(batch_size, len(images)) / len(devices)) * len(devices)
    out = []
    for start in range(0, len(images), batch):
        chunk = list(images[start : start + batch])
        if len({image.shape for image in chunk}) == 1:
            pixels = np.stack(chunk)
        else:
            pixels = np.stack([_resize_host(image) for image in chunk])
        pixels = pad_rows(pixels, batch - len(chunk))
        features = _pool3(model.module, variables, jax.device_put(pixels, rows))
        out.append(np.asarray(features)[: len(chunk)])
    return np.concatenate(out).astype(np.float32)
