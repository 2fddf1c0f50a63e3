"""Corruptions of the low-res conditioning image for the diffusion upsamplers (host side, NumPy + PIL).

unCLIP (Ramesh et al. 2022, Appendix C) trains its upsamplers on a high-res image and a corrupted
low-res view of it, so that at sampling time they are robust to the artefacts of the stage below:

* 64 -> 256: the low-res image is blurred with a Gaussian, kernel size 3 and sigma 0.6
  (`gaussian_blur`, `make_low_res(kind="blur")`);
* 256 -> 1024: the "BSR degradation" of Zhang et al. 2021 ("Designing a Practical Degradation Model
  for Deep Blind Image Super-Resolution"), in the light variant that latent diffusion ships as
  `ldm/modules/image_degradation/bsrgan_light.py::degradation_bsrgan_variant`
  (`bsr_degradation`, `make_low_res(kind="bsr")`).

Everything runs inside the grain pipeline, so it is NumPy and PIL only (no OpenCV, no SciPy), and all
randomness comes from the `np.random.Generator` passed in: the same generator state gives the same
output. Images are uint8 (H, W, 3) RGB unless a function says otherwise.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from unclip_jax.data.images import resize

# Paper, Appendix C: the first upsampler's conditioning image is blurred with this Gaussian.
PAPER_BLUR_KERNEL_SIZE = 3
PAPER_BLUR_SIGMA = 0.6

LOW_RES_KINDS = ("none", "blur", "bsr")

# --- bsrgan_light's `degradation_bsrgan_variant` settings (the full BSRGAN's, where they differ,
# in brackets). The light variant is milder: one blur instead of two, noise level 1..2 instead of
# 2..25 (/255), JPEG quality 80..95 instead of 30..95, no camera-sensor (ISP) noise.
_SCALE2_PROB = 0.25  # x4 only: first halve the image, then degrade as for x2.
_RESIZE_PROB = (
    0.8  # downsample2: a random-factor resize, else shifted-Gaussian blur + subsample [0.75].
)
_JPEG_PROB = 0.9  # the JPEG step inside the shuffle; a final JPEG is always applied.
_NOISE_LEVELS = (1, 2)  # Gaussian noise std, in /255 units, inclusive [2, 25].
_JPEG_QUALITIES = (80, 95)  # inclusive [30, 95].
_INTERPOLATIONS = ("bilinear", "bicubic", "area")  # cv2.INTER_LINEAR, INTER_CUBIC, INTER_AREA.
_SHUFFLED_STEPS = ("blur", "downsample2", "downsample3", "noise", "jpeg")

# Keys' cubic with a = -0.75 is what cv2.INTER_CUBIC uses (PIL and MATLAB use -0.5).
_CUBIC_A = -0.75
# Floor for Gaussian variances, so that a drawn sigma of 0 gives a delta kernel, not a NaN.
_MIN_VARIANCE = 1e-12


# ----------------------------------------------------------------------------------------------
# Gaussian blur (first upsampler)
# ----------------------------------------------------------------------------------------------


def gaussian_kernel_1d(*, kernel_size: int, sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian taps exp(-x^2 / (2 sigma^2)) / Z, x = -(size // 2) .. size // 2.

    The 2-D Gaussian is their outer product, so blurring rows then columns is the 2-D blur.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    taps = np.exp(-(x**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def gaussian_blur(
    image: np.ndarray,
    *,
    kernel_size: int = PAPER_BLUR_KERNEL_SIZE,
    sigma: float = PAPER_BLUR_SIGMA,
) -> np.ndarray:
    """Blurs an (H, W) or (H, W, C) image with a `kernel_size` x `kernel_size` Gaussian.

    Accepts uint8 (any range, typically [0, 255]) or floating point (typically float32 in
    [-1, 1]); the result has the input's shape and dtype (uint8 is rounded). Borders are padded by
    reflection without repeating the edge pixel (NumPy's "reflect", OpenCV's default
    BORDER_REFLECT_101, PyTorch's "reflect"). The kernel is normalised, so constants are kept.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"gaussian_blur takes uint8 or floating images, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(f"gaussian_blur takes an (H, W) or (H, W, C) image, got {image.shape}")
    taps = gaussian_kernel_1d(kernel_size=kernel_size, sigma=sigma).astype(np.float32)
    radius = kernel_size // 2
    out = image.astype(np.float32)
    # Separable: a 1-D pass down the rows, then across the columns, each a sum of shifted copies.
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(
            tap * np.take(padded, np.arange(i, i + n), axis=axis) for i, tap in enumerate(taps)
        )
    if image.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out.astype(image.dtype)


# ----------------------------------------------------------------------------------------------
# Float [0, 1] building blocks of the BSR degradation
# ----------------------------------------------------------------------------------------------


def _gaussian_kernel_2d(
    *, size: int, inv_cov: np.ndarray, center: tuple[float, float] | None = None
) -> np.ndarray:
    """A (size, size) kernel k[y, x] ∝ exp(-d^T inv_cov d / 2), d = (x - cx, y - cy), summing to 1.

    The default centre is the middle of the grid ((size - 1) / 2, a half-pixel for even sizes, as
    bsrgan's `gm_blur_kernel`). Computed in log space so that tiny variances give a delta, not 0/0.
    """
    if center is None:
        center = ((size - 1) / 2.0, (size - 1) / 2.0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.stack([x - center[0], y - center[1]], axis=-1)
    log_k = -0.5 * np.einsum("...i,ij,...j->...", d, inv_cov, d)
    k = np.exp(log_k - log_k.max())
    return k / k.sum()


def _isotropic_kernel(*, size: int, sigma: float, center=None) -> np.ndarray:
    """MATLAB's fspecial('gaussian', size, sigma), optionally off-centre."""
    inv_var = 1.0 / max(sigma**2, _MIN_VARIANCE)
    return _gaussian_kernel_2d(size=size, inv_cov=np.eye(2) * inv_var, center=center)


def _anisotropic_kernel(*, size: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """bsrgan's `anisotropic_Gaussian`: covariance V diag(l1, l2) V^-1, V the reflection by theta."""
    v = np.array([np.cos(theta), np.sin(theta)])
    reflect = np.array([[v[0], v[1]], [v[1], -v[0]]])  # symmetric and orthogonal: V^-1 = V
    eig = np.maximum([l1, l2], _MIN_VARIANCE)
    inv_cov = reflect @ np.diag(1.0 / eig) @ reflect
    return _gaussian_kernel_2d(size=size, inv_cov=inv_cov)


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of each channel of a float (H, W, C) image, same size, "reflect" borders.

    out[i, j] = sum_{m, n} kernel[m, n] image[i - m + kh // 2, j - n + kw // 2], the origin of
    scipy.ndimage.convolve for odd kernels (bsrgan uses it with mode="mirror", NumPy's "reflect").
    Done with an FFT: kernels reach 25 x 25, where summing shifted copies is ~30x slower.
    """
    h, w = image.shape[:2]
    kh, kw = kernel.shape
    ch, cw = kh // 2, kw // 2
    padded = np.pad(image, ((kh - 1 - ch, ch), (kw - 1 - cw, cw), (0, 0)), mode="reflect")
    # Channels first and 5-smooth FFT sizes: a prime length such as 269 is several times slower.
    padded = np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)
    fft_size = (_next_fast_len(padded.shape[1]), _next_fast_len(padded.shape[2]))
    # Circular convolution of the zero-extended padded image: outputs from kh - 1 on never wrap.
    spectrum = np.fft.rfft2(padded, s=fft_size) * np.fft.rfft2(
        kernel.astype(np.float32), s=fft_size
    )
    out = np.fft.irfft2(spectrum, s=fft_size)[:, kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]
    return np.ascontiguousarray(out.transpose(1, 2, 0), dtype=np.float32)


def _next_fast_len(n: int) -> int:
    """The smallest 5-smooth integer (only factors 2, 3, 5) >= n, a fast FFT length."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """The (n_out, n_in) matrix of cv2.resize along one axis (half-pixel centres, edge replicate).

    bilinear and bicubic sample at the mapped centre without widening the filter, so shrinking
    aliases as OpenCV's does (part of the degradation); area averages the covered input pixels.
    """
    scale = n_in / n_out
    if method == "area":
        lo = np.arange(n_out)[:, None] * scale
        j = np.arange(n_in)[None, :]
        overlap = np.minimum(lo + scale, j + 1) - np.maximum(lo, j)
        return np.clip(overlap, 0.0, None) / scale
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    base = np.floor(src).astype(np.int64)
    frac = src - base
    if method == "bilinear":
        offsets = np.array([0, 1])
        weights = np.stack([1.0 - frac, frac], axis=1)
    elif method == "bicubic":
        offsets = np.array([-1, 0, 1, 2])
        dist = np.abs(frac[:, None] - offsets[None, :])
        a = _CUBIC_A
        near = ((a + 2) * dist - (a + 3)) * dist**2 + 1
        far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
        weights = np.where(dist <= 1, near, np.where(dist < 2, far, 0.0))
    else:
        raise ValueError(f"unknown interpolation {method!r}; valid: {_INTERPOLATIONS}")
    matrix = np.zeros((n_out, n_in))
    rows = np.repeat(np.arange(n_out), len(offsets))
    cols = np.clip(base[:, None] + offsets[None, :], 0, n_in - 1).ravel()
    np.add.at(matrix, (rows, cols), weights.ravel())
    return matrix


def _resize_float(image: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """cv2.resize of a float (H, W, C) image to (height, width) = `size`, then clipped to [0, 1]."""
    height, width = max(1, size[0]), max(1, size[1])
    rows = _resize_matrix(image.shape[0], height, method)
    cols = _resize_matrix(image.shape[1], width, method)
    h, w, c = image.shape
    # Two plain matrix products (rows, then columns), each one BLAS call on a 2-D view.
    out = rows.astype(np.float32) @ image.astype(np.float32).reshape(h, w * c)  # (height, w * c)
    out = out.reshape(height, w, c).transpose(1, 0, 2).reshape(w, height * c)
    out = (cols.astype(np.float32) @ out).reshape(width, height, c).transpose(1, 0, 2)
    return np.clip(out, 0.0, 1.0)


def _random_interpolation(rng: np.random.Generator) -> str:
    return _INTERPOLATIONS[int(rng.integers(len(_INTERPOLATIONS)))]


def _add_blur(image: np.ndarray, *, sf: int, rng: np.random.Generator) -> np.ndarray:
    """bsrgan_light's `add_blur`: half the time anisotropic (size 5..14), else isotropic (5..7).

    Even sizes centre the Gaussian between pixels, so they move the image half a pixel up-left,
    as scipy.ndimage.convolve does with them in bsrgan.
    """
    wd2 = (4.0 + sf) / 4.0  # eigenvalue (variance) bound of the anisotropic kernel
    wd = (2.0 + 0.2 * sf) / 4.0  # sigma bound of the isotropic kernel
    if rng.random() < 0.5:
        l1, l2 = wd2 * rng.random(), wd2 * rng.random()
        size = int(rng.integers(2, 12)) + 3
        kernel = _anisotropic_kernel(size=size, theta=rng.random() * np.pi, l1=l1, l2=l2)
    else:
        size = int(rng.integers(2, 5)) + 3
        kernel = _isotropic_kernel(size=size, sigma=wd * rng.random())
    return _convolve(image, kernel)


def _downsample_shifted_blur(image: np.ndarray, *, sf: int, rng: np.random.Generator) -> np.ndarray:
    """Blur with a 25 x 25 Gaussian moved up-left by (sf - 1) / 2, then keep every sf-th pixel.

    The shift makes pixel [i * sf] of the blurred image the centre of block i, so the subsampled
    image stays aligned. bsrgan moves the kernel with `shift_pixel` (scipy interp2d, bilinear,
    clamped at the kernel's border); here the Gaussian is evaluated at the moved centre directly.
    """
    shift = (sf - 1) / 2.0
    center = (12.0 - shift, 12.0 - shift)
    kernel = _isotropic_kernel(size=25, sigma=rng.uniform(0.1, 0.6 * sf), center=center)
    return _convolve(image, kernel)[::sf, ::sf]


def _add_gaussian_noise(image: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """bsrgan's `add_Gaussian_noise`: colour (40%), grey (40%) or channel-correlated (20%) noise."""
    low, high = _NOISE_LEVELS
    std = int(rng.integers(low, high + 1)) / 255.0
    r = rng.random()
    if r > 0.6:
        noise = rng.normal(0.0, std, image.shape)
    elif r < 0.4:
        noise = rng.normal(0.0, std, (*image.shape[:2], 1))
    else:
        # Covariance |L^2 U^T D U| with U a random orthonormal basis (scipy's orth, here via SVD).
        # The elementwise |.| can make it indefinite; bsrgan leaves that to
        # np.random.multivariate_normal, here negative eigenvalues are clipped to 0 explicitly.
        level = high / 255.0
        d = np.diag(rng.random(3))
        u = np.linalg.svd(rng.random((3, 3)))[0]
        cov = np.abs(level**2 * (u.T @ d @ u))
        eigval, eigvec = np.linalg.eigh(cov)
        factor = eigvec * np.sqrt(np.clip(eigval, 0.0, None))
        noise = rng.standard_normal((*image.shape[:2], 3)) @ factor.T
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


def _float_to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _add_jpeg_noise(image: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Round-trips through an in-memory JPEG of random quality (PIL; 4:2:0 chroma, as cv2)."""
    low, high = _JPEG_QUALITIES
    quality = int(rng.integers(low, high + 1))
    buffer = io.BytesIO()
    Image.fromarray(_float_to_uint8(image)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0


def _check_rgb_uint8(image: np.ndarray, name: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} takes a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def _check_scale(scale: int, image: np.ndarray) -> int:
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if min(image.shape[:2]) < scale:
        raise ValueError(f"image {image.shape[:2]} is smaller than the scale factor {scale}")
    return int(scale)


def _mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """The top-left crop whose sides are multiples of `scale` (bsrgan's mod crop)."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


# ----------------------------------------------------------------------------------------------
# BSR degradation (second upsampler)
# ----------------------------------------------------------------------------------------------


def bsr_degradation(image: np.ndarray, *, rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """Degrades a high-res uint8 (H, W, 3) image into a low-res uint8 (H // scale, W // scale, 3) one.

    Follows bsrgan_light's `degradation_bsrgan_variant` (latent diffusion), working in float
    [0, 1] between steps:

    1. mod crop to multiples of `scale` (rows/cols past the last full block are dropped);
    2. for scale 4, with probability 0.25: halve the image (cv2-style resize with a random
       interpolation, or anti-aliased bicubic as MATLAB's imresize) and degrade as for scale 2;
    3. in a random order, except that downsample2 always precedes downsample3:
       - blur: anisotropic (size 5..14) or isotropic (size 5..7) Gaussian kernel;
       - downsample2: with p = 0.8, resize by 1 / U(1, 2 sf) with a random interpolation among
         bilinear / bicubic / area, else a shifted 25 x 25 Gaussian blur and nearest subsampling;
       - downsample3: resize to exactly 1 / sf of the size before downsample2 (random interp.);
       - noise: Gaussian, std 1 or 2 (/255), colour, grey or channel-correlated;
       - jpeg: with p = 0.9, JPEG quality 80..95;
    4. a final JPEG (quality 80..95), always.

    Deviations, none of which changes what a step does: all draws come from `rng` (so a seed
    reproduces the output), not Python's and NumPy's global generators; resizes are a NumPy
    re-implementation of cv2.resize (OpenCV is not a dependency: same half-pixel grid, cubic
    a = -0.75, no anti-aliasing for bilinear/bicubic) and JPEG goes through PIL; the two no-op
    slots of bsrgan's 7-way shuffle (its commented-out second blur and camera ISP noise) are left
    out, which keeps the distribution of the order of the five live steps; the shifted kernel of
    downsample2 and the correlated noise's covariance are computed exactly rather than through
    interp2d and an indefinite covariance (see the helpers); the mod crop uses (H, W) where bsrgan
    swaps them (only non-square images differ). Kept as in bsrgan: even-sized anisotropic kernels
    move the image half a pixel up-left at the scale they are applied, and camera-sensor (ISP)
    noise is off (the light variant disables it; it needs a trained ISP model).
    """
    _check_rgb_uint8(image, "bsr_degradation")
    sf = _check_scale(scale, image)
    image = _mod_crop(image, sf)
    h, w = image.shape[:2]

    x = image.astype(np.float32) / 255.0
    if sf == 4 and rng.random() < _SCALE2_PROB:  # downsample1
        if rng.random() < 0.5:
            x = _resize_float(x, (h // 2, w // 2), _random_interpolation(rng))
        else:
            x = resize(image, (h // 2, w // 2), resample=Image.BICUBIC).astype(np.float32) / 255.0
        sf = 2

    order = [_SHUFFLED_STEPS[i] for i in rng.permutation(len(_SHUFFLED_STEPS))]
    i2, i3 = order.index("downsample2"), order.index("downsample3")
    if i2 > i3:  # downsample3 resizes to the size downsample2 started from, so it must come later
        order[i2], order[i3] = order[i3], order[i2]

    size_before_downsample2 = x.shape[:2]
    for step in order:
        if step == "blur":
            x = _add_blur(x, sf=sf, rng=rng)
        elif step == "downsample2":
            size_before_downsample2 = x.shape[:2]
            if rng.random() < _RESIZE_PROB:
                factor = rng.uniform(1.0, 2.0 * sf)
                new_size = (int(x.shape[0] / factor), int(x.shape[1] / factor))
                x = _resize_float(x, new_size, _random_interpolation(rng))
            else:
                x = np.clip(_downsample_shifted_blur(x, sf=sf, rng=rng), 0.0, 1.0)
        elif step == "downsample3":
            # Integer division, where bsrgan has int(1 / sf * a): same sizes, no float round-off.
            target = (size_before_downsample2[0] // sf, size_before_downsample2[1] // sf)
            x = _resize_float(x, target, _random_interpolation(rng))
        elif step == "noise":
            x = _add_gaussian_noise(x, rng=rng)
        elif step == "jpeg" and rng.random() < _JPEG_PROB:
            x = _add_jpeg_noise(x, rng=rng)

    x = _add_jpeg_noise(x, rng=rng)
    out = _float_to_uint8(x)
    assert out.shape == (h // scale, w // scale, 3), (out.shape, image.shape, scale)  # invariant
    return out


# ----------------------------------------------------------------------------------------------
# Training views
# ----------------------------------------------------------------------------------------------


def make_low_res(
    image_hr: np.ndarray,
    *,
    scale: int,
    kind: str,
    rng: np.random.Generator | None = None,
    blur_kernel_size: int = PAPER_BLUR_KERNEL_SIZE,
    blur_sigma: float = PAPER_BLUR_SIGMA,
) -> np.ndarray:
    """The low-res conditioning view of a high-res uint8 (H, W, 3) image, uint8 (H // s, W // s, 3).

    kind "none": anti-aliased bicubic downsampling only; "blur": that, then a Gaussian blur of
    the low-res image (the paper's kernel 3, sigma 0.6 by default); "bsr": `bsr_degradation` (needs `rng`).
    Every kind sees the same top-left (H - H % s, W - W % s) region, so views stay aligned.
    """
    if kind not in LOW_RES_KINDS:
        raise ValueError(f"unknown low-res kind {kind!r}; valid kinds: {', '.join(LOW_RES_KINDS)}")
    _check_rgb_uint8(image_hr, "make_low_res")
    scale = _check_scale(scale, image_hr)
    if kind == "bsr":
        if rng is None:
            raise ValueError('make_low_res(kind="bsr") needs an rng (np.random.Generator)')
        return bsr_degradation(image_hr, rng=rng, scale=scale)
    image_hr = _mod_crop(image_hr, scale)
    h, w = image_hr.shape[:2]
    low = resize(image_hr, (h // scale, w // scale))
    if kind == "blur":
        low = gaussian_blur(low, kernel_size=blur_kernel_size, sigma=blur_sigma)
    return low
