"""conv2d's hand-written backward matches XLA's autodiff; Conv is interchangeable with nn.Conv."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax.models.conv import Conv, conv2d, resolve_impl
from unclip_jax.parallel import make_mesh

# (kernel, stride, padding, input height/width): 3x3 SAME (the U-Net's body), 1x1 (skips),
# stride 2 SAME on even and odd sizes (downsampling), 4x4 stride 2 VALID, and uneven explicit
# padding, which exercise every branch of the input-gradient padding formula.
CASES = [
    (3, 1, "SAME", (8, 8)),
    (1, 1, "SAME", (8, 8)),
    (3, 2, "SAME", (8, 8)),
    (3, 2, "SAME", (9, 7)),
    (4, 2, "VALID", (9, 9)),
    (3, 1, ((2, 0), (1, 3)), (7, 8)),
]
IDS = ["3x3", "1x1", "3x3-s2", "3x3-s2-odd", "4x4-s2-valid", "3x3-explicit-pad"]


def _reference(x, kernel, stride, padding):
    """lax.conv_general_dilated in f32 at HIGHEST precision: the ground truth."""
    return lax.conv_general_dilated(
        x.astype(jnp.float32),
        kernel.astype(jnp.float32),
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def _inputs(kernel_size, hw, dtype=jnp.float32, batch=4, cin=8, cout=16, seed=0):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (batch, *hw, cin))
    k = jax.random.normal(jax.random.fold_in(key, 1), (kernel_size, kernel_size, cin, cout))
    k = k / np.sqrt(kernel_size * kernel_size * cin)
    return x.astype(dtype), k.astype(dtype)


def _grads(fn, x, kernel, stride, padding):
    """Gradients w.r.t. (x, kernel) of sum(sin(conv)), a loss with a non-constant cotangent."""

    def loss(x, kernel):
        return jnp.sum(jnp.sin(fn(x, kernel, stride, padding).astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


def _rel_err(a, b):
    """max |a - b| / max |b|: error measured against the array's scale."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _conv(impl):
    return lambda x, k, s, p: conv2d(x, k, stride=s, padding=p, impl=impl)


@pytest.mark.parametrize("impl", ["xla", "custom"])
@pytest.mark.parametrize(("kernel_size", "stride", "padding", "hw"), CASES, ids=IDS)
def test_forward_equals_lax_conv(impl, kernel_size, stride, padding, hw):
    x, k = _inputs(kernel_size, hw)
    y = jax.jit(_conv(impl), static_argnums=(2, 3))(x, k, stride, padding)
    ref = _reference(x, k, stride, padding)
    assert y.shape == ref.shape
    # Same op as the reference, at default precision: only summation order / f32 rounding
    # differs (<= ~72 terms of O(1) values), so 1e-5 of the output's scale is generous.
    assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(("kernel_size", "stride", "padding", "hw"), CASES, ids=IDS)
def test_custom_gradients_equal_autodiff_f32(kernel_size, stride, padding, hw):
    x, k = _inputs(kernel_size, hw)
    dx, dk = _grads(_conv("custom"), x, k, stride, padding)
    rx, rk = _grads(_conv("xla"), x, k, stride, padding)
    assert dx.shape == x.shape and dk.shape == k.shape
    assert dx.dtype == x.dtype and dk.dtype == k.dtype
    # Both are exact formulas for the same gradient in f32; they differ only in summation order
    # (the kernel gradient sums B*H*W = 256 products). Observed <= 5.5e-7 of the gradient's (the input
    # gradients are bitwise equal: XLA's transpose is the same flipped-kernel convolution)
    # scale; 1e-5 leaves room for another XLA version's reassociation, and a wrong tap or
    # padding offset gives errors of order 1.
    assert _rel_err(dx, rx) < 1e-5
    assert _rel_err(dk, rk) < 1e-5


@pytest.mark.parametrize(("kernel_size", "stride", "padding", "hw"), CASES[:3], ids=IDS[:3])
def test_custom_gradients_bf16(kernel_size, stride, padding, hw):
    x, k = _inputs(kernel_size, hw, dtype=jnp.bfloat16)
    dx, dk = _grads(_conv("custom"), x, k, stride, padding)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    # Ground truth: the f32 gradient of the same (bf16-rounded) inputs.
    ref = _grads(_conv("xla"), x.astype(jnp.float32), k.astype(jnp.float32), stride, padding)
    xla_bf16 = _grads(_conv("xla"), x, k, stride, padding)
    for ours, theirs, truth in zip((dx, dk), xla_bf16, ref, strict=True):
        # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3); the cotangent, the
        # forward output and the result are each rounded, so a few 1e-3 of the scale is the
        # floor (observed 2.5e-3 to 3.2e-3, the same as XLA's bf16 gradient). 2e-2 of the scale
        # is that with margin; a wrong formula is off by O(1).
        assert _rel_err(ours, truth) < 2e-2
        # And no worse than XLA's own bf16 gradient (the kernel gradient accumulates in f32).
        assert _rel_err(ours, truth) <= 2 * _rel_err(theirs, truth) + 1e-3


def test_xla_and_custom_agree_through_a_jitted_stack():
    """A 3-layer conv/SiLU stack (stride 1, then 2, then a 1x1): the same value and grads."""
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (2, 12, 12, 8))
    ks = [
        jax.random.normal(jax.random.fold_in(key, i), shape) * 0.2
        for i, shape in enumerate([(3, 3, 8, 8), (3, 3, 8, 16), (1, 1, 16, 8)])
    ]

    def loss(ks, x, impl):
        for k, s in zip(ks, (1, 2, 1), strict=True):
            x = jax.nn.silu(conv2d(x, k, stride=s, impl=impl))
        return jnp.mean(x**2)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (va, (gka, gxa)), (vb, (gkb, gxb)) = f(ks, x, "xla"), f(ks, x, "custom")
    np.testing.assert_allclose(va, vb, rtol=1e-6)  # same forward op: bitwise up to fusion
    for a, b in zip([*gka, gxa], [*gkb, gxb], strict=True):
        assert _rel_err(b, a) < 1e-5  # f32 summation order only, as above


def test_batch_sharded_gradients_on_8_devices():
    """Batch sharded over data=8: the kernel gradient's batch x space matmuls all-reduce."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = make_mesh(dict(data=8))
    x, k = _inputs(3, (8, 8), batch=16)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ks = jax.device_put(k, NamedSharding(mesh, P()))
    for stride in (1, 2):
        dx, dk = _grads(_conv("custom"), xs, ks, stride, "SAME")
        rx, rk = _grads(_conv("xla"), x, k, stride, "SAME")
        # The input gradient stays batch-sharded; the kernel gradient is a full sum over devices.
        assert dx.sharding.spec[0] == "data"
        assert _rel_err(dx, rx) < 1e-5  # f32 summation order only
        assert _rel_err(dk, rk) < 1e-5  # ditto, plus the all-reduce's order


def test_auto_follows_the_platform_policy():
    from unclip_jax.models import conv

    assert resolve_impl("auto") == ("custom" if conv.use_fast_cpu_conv_grad() else "xla")
    assert not conv.use_fast_cpu_conv_grad() or jax.default_backend() == "cpu"  # never off-CPU
    assert resolve_impl("xla") == "xla" and resolve_impl("custom") == "custom"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cudnn")


@pytest.mark.parametrize(
    ("kwargs", "hw"),
    [
        (dict(features=16, kernel_size=(3, 3)), (8, 8)),
        (dict(features=16, kernel_size=(1, 1), use_bias=False), (8, 8)),
        (dict(features=8, kernel_size=(3, 3), strides=(2, 2)), (9, 9)),
        (dict(features=8, kernel_size=(3, 3), padding=((1, 0), (2, 1))), (8, 8)),
        (dict(features=16, kernel_size=(3, 3), dtype=jnp.bfloat16), (8, 8)),
    ],
    ids=["3x3", "1x1-nobias", "s2", "explicit-pad", "bf16"],
)
def test_conv_module_interchangeable_with_nn_conv(kwargs, hw):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *hw, 8))
    ours, flax_conv = Conv(**kwargs, impl="custom"), nn.Conv(**kwargs)
    params = flax_conv.init(jax.random.PRNGKey(1), x)
    # Same tree (names, shapes, dtypes) from either module's init.
    ours_shapes = jax.tree.map(lambda a: (a.shape, a.dtype), ours.init(jax.random.PRNGKey(1), x))
    assert ours_shapes == jax.tree.map(lambda a: (a.shape, a.dtype), params)
    params = jax.tree.map(lambda a: a + 0.1, params)  # a nonzero bias
    y, ref = ours.apply(params, x), flax_conv.apply(params, x)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # The same lax op underneath; bf16 outputs may round differently after fusion (1 ulp ~ 4e-3).
    tol = 1e-2 if kwargs.get("dtype") == jnp.bfloat16 else 1e-6
    assert _rel_err(y, ref) < tol

    def loss(module, params):
        return jnp.sum(jnp.sin(module.apply(params, x).astype(jnp.float32)))

    g, r = jax.grad(loss, argnums=1)(ours, params), jax.grad(loss, argnums=1)(flax_conv, params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r), strict=True):
        assert _rel_err(a, b) < (2e-2 if kwargs.get("dtype") == jnp.bfloat16 else 1e-5)


def test_conv_module_logical_partitioning_and_leading_dims():
    """Logical axis names pass through kernel_init/bias_init; extra leading dims are kept."""
    conv = Conv(
        features=4,
        kernel_size=(3, 3),
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_height", "conv_width", "channels_in", "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 6, 6, 5))
    variables = conv.init(jax.random.PRNGKey(1), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["kernel"] == P("conv_height", "conv_width", "channels_in", "embed")
    assert specs["bias"] == P("embed")
    y = conv.apply(variables, x)
    flat = conv.apply(variables, x.reshape(6, 6, 6, 5))
    assert y.shape == (3, 2, 6, 6, 4)
    np.testing.assert_array_equal(y.reshape(flat.shape), flat)
