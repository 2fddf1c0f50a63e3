"""2-D convolution with a per-platform choice of gradient, and a drop-in for `flax.linen.Conv`.

shared/PERF.md measured XLA's CPU convolution gradient (autodiff of `lax.conv_general_dilated`)
at about 7x slower than PyTorch's (4 conv3x3 layers, 128 channels, 64x64, batch 8: 486 ms
forward, 8.1 s forward+backward) and a hand-written backward at 2.2 s:

* input gradient: a *forward* convolution of the output gradient with the spatially flipped,
  in/out-swapped kernel (the transpose of a correlation is a full correlation with the flipped
  kernel), which runs on XLA CPU's fast forward path;
* kernel gradient: one matmul over the flattened batch x space per kernel tap,
  dW[i, j] = sum_{b,h,w} x_pad[b, s*h + i, s*w + j, :]^T dy[b, h, w, :].

With jax/jaxlib 0.10.2 that gap did not reproduce: `benchmarks/conv_grad.py` (and PERF.md's own
scripts) put XLA's autodiff at 0.96-2.6 s and the hand-written backward at 1.06-3.7 s on the
loaded 2-core CPU, i.e. no faster. Both are kept, tested equal, and chosen by `impl`; on TPU
and GPU XLA's own gradients are the right choice, so `impl="auto"` picks the hand-written
backward only where `use_fast_cpu_conv_grad()` says so (the CPU backend).

Layouts are NHWC for activations and HWIO for kernels, as in `flax.linen.Conv`, so params are
interchangeable between `Conv` here and `nn.Conv`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Impl = Literal["auto", "xla", "custom"]
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

_DN = ("NHWC", "HWIO", "NHWC")


# Whether the hand-written backward beats XLA's on the CPU. PERF.md measured 3.7x with an older
# jaxlib; with jaxlib 0.10.2 `benchmarks/conv_grad.py` measures it 10-18% SLOWER than XLA's own
# gradient (4 conv3x3 x 128 ch, 64x64, batch 8: 958 ms xla vs 1059 ms custom), so it is off.
# Flip it where a jaxlib brings the slow CPU conv gradient back; the tests hold either way.
CUSTOM_GRAD_ON_CPU = False


def use_fast_cpu_conv_grad() -> bool:
    """Whether `impl="auto"` picks the hand-written backward: on the CPU backend, if enabled."""
    return CUSTOM_GRAD_ON_CPU and jax.default_backend() == "cpu"


def resolve_impl(impl: Impl) -> Literal["xla", "custom"]:
    """'auto' -> 'custom' where `use_fast_cpu_conv_grad()`, else 'xla'; the others pass through."""
    if impl == "auto":
        return "custom" if use_fast_cpu_conv_grad() else "xla"
    if impl not in ("xla", "custom"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'custom', got {impl!r}")
    return impl


def _pairs(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a (height, width) pair."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value}")
    return value


def explicit_padding(
    padding: PaddingLike,
    *,
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) for 'SAME'/'VALID', an int, ints or pairs (nn.Conv's forms)."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or explicit, got {padding!r}")
        return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    padding = list(padding)
    if len(padding) != 2:
        raise ValueError(f"padding needs one entry per spatial dim (2), got {padding}")
    return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)


def _conv_fwd_only(
    x: Array, kernel: Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
) -> Array:
    """y[b, h, w, o] = sum_{i,j,c} x_pad[b, s*h + i, s*w + j, c] kernel[i, j, c, o]."""
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_custom(
    x: Array, kernel: Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
) -> Array:
    """The forward convolution, with the hand-written backward below."""
    return _conv_fwd_only(x, kernel, strides, pads)


def _conv_custom_fwd(
    x: Array, kernel: Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
) -> tuple[Array, tuple[Array, Array]]:
    """The forward convolution; keeps x and kernel for the backward."""
    return _conv_fwd_only(x, kernel, strides, pads), (x, kernel)


def _conv_custom_bwd(
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], ...],
    residuals: tuple[Array, Array],
    dy: Array,
) -> tuple[Array, Array]:
    """(dL/dx, dL/dkernel) from dL/dy, by the two formulas of the module docstring."""
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (sh, sw) = strides
    (pt, pb), (pl, pr) = pads
    h, w = x.shape[1:3]
    ho, wo = dy.shape[1:3]
    hp, wp = h + pt + pb, w + pl + pr  # padded input size

    # --- input gradient -------------------------------------------------------------------
    # Forward: x_pad[s*ho + i] meets kernel[i]. Its transpose scatters dy back:
    #   dx_pad[p] = sum_i dy_up[p - i] kernel[i],   dy_up = dy with s-1 zeros between entries,
    # a full correlation of dy_up with the flipped kernel (kernel[k-1-i]) and I/O swapped.
    # Padding dy_up by k-1 on the low side and cropping/padding the result to x_pad, then
    # dropping x_pad's border, folds into one padding of dy_up:
    #   low = k-1 - pad_lo,  high = (k-1) + (hp - ((ho-1)*s + k)) - pad_hi.
    # That is a stride-1 forward convolution, XLA CPU's fast path.
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    lo_h, hi_h = kh - 1 - pt, kh - 1 + (hp - ((ho - 1) * sh + kh)) - pb
    lo_w, hi_w = kw - 1 - pl, kw - 1 + (wp - ((wo - 1) * sw + kw)) - pr
    if sh == sw == 1 and min(lo_h, hi_h, lo_w, hi_w) >= 0:
        dx = lax.conv_general_dilated(
            dy, flipped, (1, 1), ((lo_h, hi_h), (lo_w, hi_w)), dimension_numbers=_DN
        )
    else:
        # Stride > 1 (zeros inserted between dy's entries) or negative padding: do the padding
        # with lax.pad (interior padding = the zero insertion) and a VALID stride-1 convolution.
        # For stride 2 this spends 4x the flops of the minimum on zeros, but stays on the fast
        # forward path; strided convolutions are the few downsampling layers of a U-Net.
        zero = jnp.zeros((), dy.dtype)
        dy_up = lax.pad(
            dy, zero, ((0, 0, 0), (lo_h, hi_h, sh - 1), (lo_w, hi_w, sw - 1), (0, 0, 0))
        )
        dx = lax.conv_general_dilated(dy_up, flipped, (1, 1), "VALID", dimension_numbers=_DN)

    # --- kernel gradient ------------------------------------------------------------------
    # dK[i, j] = sum_{b,h,w} x_pad[b, s*h + i, s*w + j, :]^T dy[b, h, w, :]: kh*kw matmuls with
    # a contraction over batch x space (B*H*W terms, 32768 in PERF.md's setting), accumulated
    # in f32 so bf16 inputs do not lose the sum. Under batch sharding XLA partitions each
    # contraction into a per-device matmul plus an all-reduce.
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    taps = []
    for i in range(kh):
        row = []
        for j in range(kw):
            window = lax.slice(
                x_pad,
                (0, i, j, 0),
                (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3]),
                (1, sh, sw, 1),
            )
            row.append(jnp.einsum("bhwc,bhwd->cd", window, dy, preferred_element_type=jnp.float32))
        taps.append(jnp.stack(row))
    dkernel = jnp.stack(taps).astype(kernel.dtype)
    return dx.astype(x.dtype), dkernel


_conv_custom.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def conv2d(
    x: Array,
    kernel: Array,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
    impl: Impl = "auto",
) -> Array:
    """2-D convolution of NHWC `x` with an HWIO `kernel` (cross-correlation, as in nn.Conv).

    The forward is `lax.conv_general_dilated` whatever `impl` is; `impl` picks the gradient:
    "xla" is autodiff of that op (the right choice on TPU/GPU), "custom" the hand-written
    backward of this module's docstring (PERF.md's fix for slow XLA CPU gradients), and
    "auto" is "custom" on the CPU backend and "xla" elsewhere. Both give the same gradients to
    float rounding. `x` and `kernel` are promoted to a common dtype; the computation runs in it
    (the kernel gradient accumulates in f32). No dilation or feature groups.
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d wants NHWC x and HWIO kernel, got {x.shape} and {kernel.shape}")
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(f"x has {x.shape[3]} channels, kernel expects {kernel.shape[2]}")
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    strides = _pairs(stride, "stride")
    pads = explicit_padding(
        padding, in_hw=x.shape[1:3], kernel_hw=kernel.shape[:2], strides=strides
    )
    if resolve_impl(impl) == "xla":
        return _conv_fwd_only(x, kernel, strides, pads)
    return _conv_custom(x, kernel, strides, pads)


class Conv(nn.Module):
    """Drop-in for `flax.linen.Conv` (2-D, NHWC) that uses `conv2d`'s per-platform gradient.

    Params `kernel` (kh, kw, in, features; HWIO) and `bias` (features,) have nn.Conv's names,
    shapes and default initialisers, so a param tree works with either module. Logical axis
    names come with `kernel_init`/`bias_init` (`nn.with_logical_partitioning`) from the caller.
    Inputs may have extra leading batch dims (flattened around the convolution).
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Array] = nn.linear.default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    impl: Impl = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """y = conv2d(x, kernel) + bias, computed in `dtype` (promoted from x and params if None)."""
        kernel_hw = _pairs(self.kernel_size, "kernel_size")
        if x.ndim < 4:
            raise ValueError(f"Conv wants (..., H, W, C) with a batch dim, got {x.shape}")
        kernel = self.param(
            "kernel", self.kernel_init, (*kernel_hw, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        # nn.Conv's promotion: inputs and params to `dtype` (or their common type if None).
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        lead = x.shape[:-3]
        y = conv2d(
            x.reshape((-1, *x.shape[-3:])),
            kernel,
            stride=self.strides,
            padding=self.padding,
            impl=self.impl,
        )
        y = y.reshape((*lead, *y.shape[1:]))
        if bias is not None:
            y = y + bias
        return y
