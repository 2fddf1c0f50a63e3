"""Low-res corruptions for the upsamplers: the paper's Gaussian blur, the BSR degradation, crops."""

import numpy as np
import pytest

from unclip_jax.data import degradations as deg
from unclip_jax.data.images import resize, to_float

# 3 x 3 Gaussian, sigma 0.6, by hand: 1-D taps (e, 1, e) / (1 + 2e), e = exp(-1 / (2 * 0.36)).
_E = np.exp(-1.0 / 0.72)
_TAPS = np.array([_E, 1.0, _E]) / (1.0 + 2.0 * _E)  # 0.166379, 0.667243, 0.166379
_PAPER_KERNEL = np.array(
    [
        [0.0276818, 0.1110149, 0.0276818],
        [0.1110149, 0.4452132, 0.1110149],
        [0.0276818, 0.1110149, 0.0276818],
    ]
)


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth_image(size=256):
    """Low-frequency colour gradients and waves: content that survives a x4 downsampling."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * (x + 0.3 * y)),
            0.5 + 0.3 * np.cos(4 * np.pi * y),
            0.2 + 0.6 * x * y,
        ],
        axis=-1,
    )
    return np.round(image * 255).astype(np.uint8)


def _square_image():
    """A bright 72 x 88 rectangle on a dark ground, edges on the x4 grid: centre (28.5, 35.5) at 64."""
    image = np.full((256, 256, 3), 40, np.uint8)
    image[80:152, 100:188] = 220
    return image


def _bright_centroid(image):
    """(row, col) centre of mass of the pixels brighter than mid-grey (130)."""
    weight = np.clip(image.astype(np.float64).mean(-1) - 130.0, 0.0, None)
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(weight * rows).sum(), (weight * cols).sum()]) / weight.sum()


# --------------------------------------------------------------------------------------------
# gaussian_blur
# --------------------------------------------------------------------------------------------


def test_hand_computed_kernel_is_the_paper_gaussian():
    np.testing.assert_allclose(np.outer(_TAPS, _TAPS), _PAPER_KERNEL, atol=1e-7)
    np.testing.assert_allclose(deg.gaussian_kernel_1d(kernel_size=3, sigma=0.6), _TAPS, rtol=1e-12)


@pytest.mark.parametrize(
    "image",
    [
        _random_image((17, 23, 3)),
        to_float(_random_image((17, 23, 3))),
        to_float(_random_image((8, 8, 3))).astype(np.float64),
        _random_image((9, 5)),
    ],
    ids=["uint8", "float32", "float64", "grey-uint8"],
)
def test_gaussian_blur_keeps_shape_and_dtype(image):
    out = deg.gaussian_blur(image)
    assert out.shape == image.shape
    assert out.dtype == image.dtype


def test_gaussian_blur_keeps_constants():
    # The kernel sums to 1 and reflection pads with image pixels, so borders stay exact too.
    assert np.all(deg.gaussian_blur(np.full((6, 7, 3), 137, np.uint8)) == 137)
    const = np.full((6, 7, 3), -0.3, np.float32)
    np.testing.assert_allclose(deg.gaussian_blur(const), const, atol=1e-6)  # float32 round-off


def test_gaussian_blur_impulse_response_is_the_kernel():
    impulse = np.zeros((7, 7, 3), np.float32)
    impulse[3, 3] = 1.0
    out = deg.gaussian_blur(impulse, kernel_size=3, sigma=0.6)
    for c in range(3):
        # The printed kernel has 7 decimals; float32 sums add ~1e-7.
        np.testing.assert_allclose(out[2:5, 2:5, c], _PAPER_KERNEL, atol=2e-7)
    assert np.all(out[:2] == 0) and np.all(out[5:] == 0)
    np.testing.assert_allclose(out.sum(axis=(0, 1)), 1.0, rtol=1e-6)  # mass kept


def test_gaussian_blur_uses_reflect_padding():
    # A ramp 0, 1, 2, ... reflected without repeating the edge gives ..., 1 | 0, 1, ...: the
    # corner pixel becomes 0 + 2 * (taps[0] * 1) along each axis.
    ramp = np.add.outer(np.arange(5.0), np.arange(5.0)).astype(np.float32)[..., None]
    out = deg.gaussian_blur(ramp)
    np.testing.assert_allclose(out[0, 0, 0], 4 * _TAPS[0], rtol=1e-6)
    np.testing.assert_allclose(out[2, 2, 0], ramp[2, 2, 0], rtol=1e-6)  # linear inside: kept


def test_gaussian_blur_damps_high_frequencies():
    # A +-1 checkerboard is the Nyquist frequency in both axes; each 1-D pass multiplies it by
    # taps[1] - 2 taps[0] = 0.3345, so the blur leaves 0.1119 of it, exactly (reflect keeps the
    # checkerboard). A smooth ramp (tested above) is untouched, so this is a low-pass filter.
    checker = np.where(np.add.outer(np.arange(16), np.arange(16)) % 2 == 0, 1.0, -1.0)
    checker = np.repeat(checker[..., None], 3, axis=-1).astype(np.float32)
    gain = (_TAPS[1] - 2 * _TAPS[0]) ** 2
    np.testing.assert_allclose(deg.gaussian_blur(checker), gain * checker, atol=1e-6)

    noise = to_float(_random_image((64, 64, 3), seed=1))

    def hf_energy(x):
        return np.sum(np.diff(x, axis=0) ** 2) + np.sum(np.diff(x, axis=1) ** 2)

    # For white noise the expected ratio of finite-difference energies is
    # ||taps * [1, -1]||^2 ||taps||^2 / ||[1, -1]||^2 = 0.139; 12k differences per axis put the
    # sample within a few percent of it.
    a, b = _TAPS[0], _TAPS[1]
    expected = (2 * a**2 + 2 * (b - a) ** 2) * (2 * a**2 + b**2) / 2
    ratio = hf_energy(deg.gaussian_blur(noise)) / hf_energy(noise)
    np.testing.assert_allclose(ratio, expected, rtol=0.1)


def test_gaussian_blur_errors():
    image = _random_image((8, 8, 3))
    with pytest.raises(ValueError, match="odd"):
        deg.gaussian_blur(image, kernel_size=4)
    with pytest.raises(ValueError, match="sigma"):
        deg.gaussian_blur(image, sigma=0.0)
    with pytest.raises(TypeError, match="uint8 or floating"):
        deg.gaussian_blur(image.astype(np.int16))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        deg.gaussian_blur(image[None])


# --------------------------------------------------------------------------------------------
# BSR building blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "area"])
@pytest.mark.parametrize(("n_in", "n_out"), [(256, 64), (64, 256), (100, 37), (37, 100)])
def test_resize_matrix_keeps_constants(method, n_in, n_out):
    matrix = deg._resize_matrix(n_in, n_out, method)
    assert matrix.shape == (n_out, n_in)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)


def test_bilinear_resize_uses_half_pixel_centres():
    # cv2.resize maps output pixel i to input (i + 0.5) * n_in / n_out - 0.5; bilinear
    # interpolation of a ramp returns that coordinate (away from the clamped borders).
    for n_in, n_out in [(256, 64), (64, 256), (100, 37)]:
        out = deg._resize_matrix(n_in, n_out, "bilinear") @ np.arange(n_in, dtype=np.float64)
        expected = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        np.testing.assert_allclose(out[3:-3], expected[3:-3], atol=1e-9)


def test_convolve_matches_direct_sum():
    x = _random_image((20, 24, 3)).astype(np.float32) / 255.0
    kernel = np.random.default_rng(0).random((5, 3))
    out = deg._convolve(x, kernel)
    padded = np.pad(x, ((2, 2), (1, 1), (0, 0)), mode="reflect")
    direct = sum(
        kernel[m, n] * padded[4 - m : 4 - m + 20, 2 - n : 2 - n + 24]
        for m in range(5)
        for n in range(3)
    )
    np.testing.assert_allclose(out, direct, atol=1e-5)  # float32 FFT round-off


def test_blur_kernels_are_normalised_and_finite():
    kernels = [
        deg._anisotropic_kernel(size=14, theta=0.7, l1=1.9, l2=0.1),
        deg._anisotropic_kernel(size=5, theta=0.0, l1=0.0, l2=0.0),  # sigma 0: a delta
        deg._isotropic_kernel(size=7, sigma=0.0),
    ]
    for kernel in kernels:
        assert np.all(np.isfinite(kernel)) and np.all(kernel >= 0)
        np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-12)
    assert kernels[1][2, 2] == 1.0


@pytest.mark.parametrize("sf", [2, 4])
def test_shifted_blur_downsampling_is_aligned(sf):
    # Nearest subsampling after the up-left-shifted kernel keeps block centres: the rectangle's
    # centre lands where an aligned downsampling puts it, for narrow and wide kernels alike.
    x = _square_image().astype(np.float32) / 255.0
    expected = (np.array([115.5, 143.5]) + 0.5) / sf - 0.5
    for seed in range(3):
        out = deg._downsample_shifted_blur(x, sf=sf, rng=np.random.default_rng(seed))
        assert out.shape == (256 // sf, 256 // sf, 3)
        np.testing.assert_allclose(_bright_centroid(out * 255), expected, atol=1e-4)


# --------------------------------------------------------------------------------------------
# bsr_degradation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "scale", "expected"),
    [((64, 64, 3), 4, (16, 16, 3)), ((70, 90, 3), 4, (17, 22, 3)), ((48, 40, 3), 2, (24, 20, 3))],
)
def test_bsr_degradation_shape_and_dtype(shape, scale, expected):
    image = _random_image(shape)
    # 40 seeds take every branch (seeds 29, 32 and 34 the rarest, the x4 pre-halving with PIL's
    # bicubic, p = 1/8), so odd sizes are checked through each resize path.
    for seed in range(40):
        out = deg.bsr_degradation(image, rng=np.random.default_rng(seed), scale=scale)
        assert out.shape == expected
        assert out.dtype == np.uint8


def test_bsr_degradation_is_deterministic_by_seed():
    image = _smooth_image(128)
    a = deg.bsr_degradation(image, rng=np.random.default_rng(7))
    b = deg.bsr_degradation(image, rng=np.random.default_rng(7))
    c = deg.bsr_degradation(image, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bsr_degradation_corrupts_detail_but_keeps_content():
    image = _smooth_image()
    plain = deg.make_low_res(image, scale=4, kind="none").astype(np.float64)
    for seed in range(12):
        out = deg.bsr_degradation(image, rng=np.random.default_rng(seed)).astype(np.float64)
        # Two JPEG passes and the noise always change pixels: >= ~1 grey level on average here.
        assert np.abs(out - plain).mean() > 0.5
        # The light BSR variant blurs and compresses but keeps a smooth image: correlation with a
        # clean downsampling is > 0.99 for 200 seeds; 0.95 flags a broken step (shift, colour).
        assert np.corrcoef(out.ravel(), plain.ravel())[0, 1] > 0.95


def test_bsr_degradation_stays_spatially_aligned():
    # The upsampler learns to copy structure from its conditioning, so the degraded view must not
    # move: the rectangle's centre stays at (28.5, 35.5). Single draws can move it by up to ~1.3
    # low-res pixels (edges aliased by a non-anti-aliased downsampling of up to x8, as cv2 does);
    # even-sized blur kernels add bsrgan's own half-pixel up-left shift, ~0.15 on average.
    image = _square_image()
    offsets = np.array(
        [
            _bright_centroid(deg.bsr_degradation(image, rng=np.random.default_rng(seed)))
            - [28.5, 35.5]
            for seed in range(20)
        ]
    )
    assert np.abs(offsets).max() < 1.6
    assert np.all(np.abs(offsets.mean(axis=0)) < 0.35)


def test_bsr_degradation_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        deg.bsr_degradation(to_float(_random_image((16, 16, 3))), rng=rng)
    with pytest.raises(ValueError, match="positive integer"):
        deg.bsr_degradation(_random_image((16, 16, 3)), rng=rng, scale=0)
    with pytest.raises(ValueError, match="smaller than the scale"):
        deg.bsr_degradation(_random_image((3, 16, 3)), rng=rng, scale=4)


# --------------------------------------------------------------------------------------------
# make_low_res
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", deg.LOW_RES_KINDS)
@pytest.mark.parametrize(("shape", "scale"), [((64, 64, 3), 4), ((66, 50, 3), 4), ((32, 48, 3), 2)])
def test_make_low_res_shape_and_dtype(kind, shape, scale):
    out = deg.make_low_res(
        _random_image(shape), scale=scale, kind=kind, rng=np.random.default_rng(0)
    )
    assert out.shape == (shape[0] // scale, shape[1] // scale, 3)
    assert out.dtype == np.uint8


def test_make_low_res_kinds_are_what_they_say():
    image = _random_image((64, 64, 3))
    plain = resize(image, (16, 16))
    np.testing.assert_array_equal(deg.make_low_res(image, scale=4, kind="none"), plain)
    np.testing.assert_array_equal(
        deg.make_low_res(image, scale=4, kind="blur"),
        deg.gaussian_blur(plain, kernel_size=3, sigma=0.6),
    )
    np.testing.assert_array_equal(
        deg.make_low_res(image, scale=4, kind="bsr", rng=np.random.default_rng(3)),
        deg.bsr_degradation(image, rng=np.random.default_rng(3), scale=4),
    )
    # Non-multiple sizes: every kind sees the same top-left crop of whole blocks.
    np.testing.assert_array_equal(
        deg.make_low_res(_random_image((66, 67, 3)), scale=4, kind="none"),
        resize(_random_image((66, 67, 3))[:64, :64], (16, 16)),
    )


def test_make_low_res_errors():
    image = _random_image((16, 16, 3))
    with pytest.raises(ValueError, match="valid kinds: none, blur, bsr"):
        deg.make_low_res(image, scale=4, kind="jpeg")
    with pytest.raises(ValueError, match="needs an rng"):
        deg.make_low_res(image, scale=4, kind="bsr", rng=None)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        deg.make_low_res(image[..., 0], scale=4, kind="none")
