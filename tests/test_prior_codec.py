"""The autoregressive prior's embedding codec: PCA, bucket quantisers, the dot-product token."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unclip_jax.config import load_config
from unclip_jax.models import prior_codec as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIM = 32
# A known spectrum with a clear gap between neighbours (ratio 0.75), from 4 down to ~5e-4.
SPECTRUM = 4.0 * 0.75 ** np.arange(DIM)
F32_ULP = float(np.finfo(np.float32).eps)


def _basis(dim: int = DIM, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q  # columns: the true eigenvectors


def _embeddings(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Correlated Gaussian rows z = mu + Q diag(sqrt(lambda)) g, float64."""
    rng = np.random.default_rng(1000 + seed)
    mu = np.linspace(-1.0, 1.0, dim)
    g = rng.normal(size=(n, dim))
    return mu + (g * np.sqrt(SPECTRUM[:dim])) @ _basis(dim).T


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------


def test_pca_components_are_orthonormal_and_ordered_by_eigenvalue():
    x = _embeddings(4000, seed=0)
    pca = C.fit_pca(x, 12)
    v = np.asarray(pca.components, np.float64)
    assert v.shape == (12, DIM) and pca.embed_dim == DIM and pca.num_components == 12
    # float64 orthonormal rows stored in float32: off by a few ulps.
    np.testing.assert_allclose(v @ v.T, np.eye(12), atol=10 * F32_ULP)
    lam = np.asarray(pca.explained_variance, np.float64)
    assert np.all(np.diff(lam) < 0)
    # They are the top eigenvalues of the 1/N covariance (float32 storage: rtol 1e-6) ...
    cov_eig = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    np.testing.assert_allclose(lam, cov_eig[:12], rtol=1e-6)
    assert float(pca.total_variance) == pytest.approx(np.trace(np.cov(x.T, bias=True)), rel=1e-6)
    # ... and estimate the true spectrum (sampling error sqrt(2/N) ~ 2%) and directions.
    np.testing.assert_allclose(lam[:6], SPECTRUM[:6], rtol=0.1)
    cos = np.abs(np.sum(v[:6] * _basis()[:, :6].T, axis=1))
    assert np.all(cos > 0.98)


@pytest.mark.parametrize("d", [1, 8, 20, DIM])
def test_pca_round_trip_error_is_the_discarded_energy(d):
    # float64 throughout, so the identity is checked to round-off, not to float32 noise.
    with jax.enable_x64(True):
        x = _embeddings(3000, seed=1)
        full = C.fit_pca(x, DIM, dtype=jnp.float64)
        pca = C.fit_pca(x, d, dtype=jnp.float64)
        for z in (x, _embeddings(500, seed=2)):  # the fitting set and held-out rows
            recon = np.asarray(C.pca_decode(pca, C.pca_encode(pca, jnp.asarray(z))))
            err = np.sum((z - recon) ** 2, axis=1)
            centred = z - np.asarray(full.mean)
            discarded = np.sum((centred @ np.asarray(full.components)[d:].T) ** 2, axis=1)
            energy = np.sum(centred**2, axis=1)
            np.testing.assert_allclose(err, discarded, rtol=1e-8, atol=1e-12 * energy.max())
        if d == DIM:
            assert err.max() < 1e-20 * energy.max()
        # On the fitting set, the mean error is the sum of the discarded eigenvalues (1/N cov).
        mean_err = np.mean(
            np.sum((x - np.asarray(C.pca_decode(pca, C.pca_encode(pca, x)))) ** 2, 1)
        )
        lam = np.asarray(full.explained_variance)
        assert mean_err == pytest.approx(lam[d:].sum(), rel=1e-8, abs=1e-14 * lam.sum())


def test_pca_round_trip_in_float32_under_jit_holds_to_round_off():
    x = _embeddings(2000, seed=3).astype(np.float32)
    pca = C.fit_pca(x, 8)
    z = _embeddings(256, seed=4).astype(np.float32)
    recon = np.asarray(jax.jit(lambda p, z: C.pca_decode(p, C.pca_encode(p, z)))(pca, z))
    assert recon.dtype == np.float32
    centred = z.astype(np.float64) - np.asarray(pca.mean, np.float64)
    coeffs = centred @ np.asarray(pca.components, np.float64).T
    energy = np.sum(centred**2, axis=1)
    err = np.sum((z - recon.astype(np.float64)) ** 2, axis=1)
    # ||z - recon||^2 = ||z - mean||^2 - ||c||^2, up to float32 round-off of ~1e-6 ||z - mean||^2.
    np.testing.assert_allclose(err, energy - np.sum(coeffs**2, axis=1), atol=1e-5 * energy.max())


def test_pca_signs_are_deterministic_across_refits():
    x = _embeddings(4000, seed=5)
    a, b = C.fit_pca(x, 6), C.fit_pca(x, 6)
    assert all(
        np.array_equal(u, w) for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    v = np.asarray(a.components)
    assert np.all(v[np.arange(6), np.argmax(np.abs(v), axis=1)] > 0)
    # Shuffled rows (a different summation order) give the same components, same signs.
    shuffled = C.fit_pca(x[np.random.default_rng(0).permutation(len(x))], 6)
    np.testing.assert_allclose(np.asarray(shuffled.components), v, atol=10 * F32_ULP)
    # A refit on 95% of the rows keeps every sign (cos close to +1, not -1). The convention
    # cannot help where a component's two largest entries are close and the refit swaps them.
    refit = np.asarray(C.fit_pca(x[:3800], 6).components)
    assert np.all(np.sum(v * refit, axis=1) > 0.99)


def test_pca_errors_name_the_problem():
    x = _embeddings(20, seed=7)
    with pytest.raises(ValueError, match=r"33 PCA components .* \[1, 20\]"):
        C.fit_pca(x[:, :], 33)  # more than min(N, D) = min(20, 32)
    with pytest.raises(ValueError, match=r"\[1, 20\]"):
        C.fit_pca(x, 21)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        C.fit_pca(x[0], 2)
    bad = x.copy()
    bad[3, 5] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"non-finite.*2 of 20 rows"):
        C.fit_pca(bad, 2)
    pca = C.fit_pca(_embeddings(64, seed=8, dim=16), 4)
    with pytest.raises(ValueError, match=r"dimension 24 .* D=16"):
        C.pca_encode(pca, jnp.zeros((3, 24)))
    with pytest.raises(ValueError, match=r"5 PCA coefficients .* d=4"):
        C.pca_decode(pca, jnp.zeros((3, 5)))


# ----------------------------------------------------------------------------------------------
# Quantiser
# ----------------------------------------------------------------------------------------------


def _skewed(n: int, seed: int) -> np.ndarray:
    """Three differently shaped columns: Gaussian, exponential (skewed), Student-t (heavy)."""
    rng = np.random.default_rng(seed)
    cols = [rng.normal(2.0, 3.0, n), rng.exponential(0.5, n), rng.standard_t(2.0, n)]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.mark.parametrize("method", C.BUCKETINGS)
def test_dequantize_is_within_half_a_bucket_inside_the_range(method):
    q = C.fit_quantizer(_skewed(3000, seed=0), 16, method=method, clip_quantile=0.99)
    edges, centres = np.asarray(q.edges, np.float64), np.asarray(q.centres, np.float64)
    # Fresh values inside the clipped range, plus every edge itself (the bucket boundaries).
    x = _skewed(4000, seed=1).astype(np.float64)
    x = np.concatenate([np.clip(x, edges[:, 0], edges[:, -1]), edges.T.astype(np.float64)])
    ids = np.asarray(jax.jit(C.quantize)(q, x.astype(np.float32)))
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 16
    cols = np.arange(3)
    lo, hi = edges[cols, ids], edges[cols, ids + 1]
    assert np.all((lo <= x) & (x <= hi))  # each value lies in its bucket
    # Buckets are half-open, [e_k, e_{k+1}): edge k opens bucket k (the last edge closes K - 1).
    np.testing.assert_array_equal(ids[-17:], np.minimum(np.arange(17), 15)[:, None] * np.ones(3))
    deq = np.asarray(jax.jit(C.dequantize)(q, ids), np.float64)
    np.testing.assert_array_equal(deq, centres[cols, ids])
    # |deq - x| <= width / 2, up to the float32 rounding of the stored midpoint (half an ulp).
    slack = np.spacing(np.abs(deq).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(deq - x) <= (hi - lo) / 2 + slack)


@pytest.mark.parametrize(("clip", "interior", "end"), [(1.0, 200, 200), (0.99, 196, 228)])
def test_quantile_buckets_are_equally_populated_on_the_fitting_data(clip, interior, end):
    # N = 3200, K = 16: each bucket holds (2c - 1) N / K of the data inside the clipped range;
    # the end buckets also hold the clipped tails, (1 - c) N = 32 values each when c = 0.99.
    x = _skewed(3200, seed=2)
    q = C.fit_quantizer(x, 16, method="quantile", clip_quantile=clip)
    ids = np.asarray(C.quantize(q, x))
    for j in range(3):
        counts = np.bincount(ids[:, j], minlength=16)
        assert counts.sum() == 3200
        # Interpolated quantile edges fall between order statistics: off by at most ~1 count.
        assert np.all(np.abs(counts[1:-1] - interior) <= 2), counts
        assert np.all(np.abs(counts[[0, -1]] - end) <= 2), counts


def test_uniform_buckets_are_equal_width_over_the_clipped_range_and_clip_outliers():
    x = _skewed(3000, seed=3)
    q = C.fit_quantizer(x, 8, method="uniform", clip_quantile=0.95)
    edges = np.asarray(q.edges, np.float64)
    np.testing.assert_allclose(edges[:, 0], np.quantile(x, 0.05, axis=0), rtol=1e-6)
    np.testing.assert_allclose(edges[:, -1], np.quantile(x, 0.95, axis=0), rtol=1e-6)
    widths = np.diff(edges, axis=1)
    np.testing.assert_allclose(widths, widths[:, :1] * np.ones((1, 8)), rtol=1e-5)
    # Values outside [q_lo, q_hi] map to the end buckets and decode to the end centres.
    far = np.array([[-1e6, -1e6, -1e6], [1e6, 1e6, 1e6]], np.float32)
    ids = np.asarray(C.quantize(q, far))
    np.testing.assert_array_equal(ids, [[0, 0, 0], [7, 7, 7]])
    np.testing.assert_array_equal(
        np.asarray(C.dequantize(q, ids)), np.asarray(q.centres)[:, [0, 7]].T
    )
    # Out-of-range ids are clipped, not read from a neighbouring dimension.
    np.testing.assert_array_equal(
        np.asarray(C.dequantize(q, np.array([[-5, 99, 7]]))),
        np.asarray(q.centres)[[0, 1, 2], [0, 7, 7]][None],
    )


@pytest.mark.parametrize("method", C.BUCKETINGS)
def test_a_constant_dimension_gives_finite_zero_width_buckets(method):
    x = _skewed(500, seed=4)
    x[:, 1] = 3.0
    q = C.fit_quantizer(x, 8, method=method)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(q)]
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    np.testing.assert_array_equal(np.asarray(q.edges)[1], 3.0)
    probe = np.array([[0.0, -7.0, 0.0], [0.0, 3.0, 0.0], [0.0, 9.0, 0.0]], np.float32)
    deq = np.asarray(C.dequantize(q, C.quantize(q, probe)))
    np.testing.assert_array_equal(deq[:, 1], 3.0)


def test_quantizer_errors_name_the_problem():
    x = _skewed(100, seed=5)
    with pytest.raises(ValueError, match="unknown bucketing 'kmeans'"):
        C.fit_quantizer(x, 8, method="kmeans")
    with pytest.raises(ValueError, match="clip_quantile"):
        C.fit_quantizer(x, 8, clip_quantile=0.3)
    with pytest.raises(ValueError, match="num_buckets"):
        C.fit_quantizer(x, 0)
    q = C.fit_quantizer(x, 8)
    with pytest.raises(ValueError, match=r"trailing dimension 4 .* d=3"):
        C.quantize(q, jnp.zeros((2, 4)))


# ----------------------------------------------------------------------------------------------
# The dot-product token
# ----------------------------------------------------------------------------------------------


def _dots(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).beta(8.0, 20.0, n).astype(np.float32)  # skewed, in (0, 1)


@pytest.mark.parametrize("method", C.BUCKETINGS)
@pytest.mark.parametrize("percentile", [50.0, 90.0])
def test_dot_token_range_keeps_the_tokens_above_the_percentile(method, percentile):
    dots = _dots(5000, seed=0)
    q = C.fit_dot_quantizer(dots, 64, method=method)
    lo, hi = C.dot_token_range(q, percentile=percentile)
    lo = int(lo)
    assert hi == 64 and 0 < lo < 64
    tokens = np.asarray(C.quantize_dot(q, dots))
    # Every training dot at or above the percentile has a token in [lo, K) ...
    assert np.all(tokens[dots >= np.percentile(dots, percentile)] >= lo)
    # ... and the range holds the top (100 - p)% plus at most the rest of bucket lo.
    kept = np.mean(tokens >= lo)
    assert 1 - percentile / 100 - 1 / 5000 <= kept <= 1 - percentile / 100 + np.mean(tokens == lo)
    assert int(C.dot_token_range(q, percentile=0.0)[0]) == 0


@pytest.mark.parametrize("method", C.BUCKETINGS)
def test_sampled_dot_tokens_follow_the_top_half_of_the_training_distribution(method):
    dots = _dots(5000, seed=1)
    q = C.fit_dot_quantizer(dots, 64, method=method)
    lo = int(C.dot_token_range(q, percentile=50.0)[0])
    sampled = np.asarray(
        jax.jit(lambda k: C.sample_dot_tokens(q, k, (20_000,), percentile=50.0))(jax.random.key(0))
    )
    assert sampled.shape == (20_000,) and sampled.min() >= lo
    target = np.asarray(C.quantize_dot(q, dots[dots >= np.median(dots)]))
    # Quartiles agree to a bucket: the inverse CDF is linear between stored integer percentiles,
    # and 20000 draws put the sampling error of a quartile well under one bucket.
    for r in (0.25, 0.5, 0.75):
        assert abs(np.quantile(sampled, r) - np.quantile(target, r)) <= 1.0


def test_dot_token_helpers_reject_bad_arguments():
    q = C.fit_dot_quantizer(_dots(200, seed=2), 16)
    with pytest.raises(ValueError, match="percentile"):
        C.dot_token_range(q, percentile=100.0)
    with pytest.raises(ValueError, match="d=3"):
        C.dot_token_range(C.fit_quantizer(_skewed(50, seed=3), 4), percentile=50.0)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        C.fit_dot_quantizer(_skewed(50, seed=3), 4)


# ----------------------------------------------------------------------------------------------
# The whole codec: round trip, config, save / load
# ----------------------------------------------------------------------------------------------


def _pairs(n: int, seed: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm (z_i, z_t) pairs whose cosine varies, like CLIP's."""
    zi = _embeddings(n, seed=seed, dim=dim)
    zt = zi + np.random.default_rng(seed).normal(size=zi.shape) * 2.0
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    return unit(zi).astype(np.float32), unit(zt).astype(np.float32)


def test_codec_round_trip_error_is_pca_plus_at_most_half_a_bucket_per_token():
    with jax.enable_x64(True):
        zi, zt = _pairs(3000, seed=0)
        zi, zt = zi.astype(np.float64), zt.astype(np.float64)
        codec = C.fit_codec(zi, zt, components=12, num_buckets=32, dtype=jnp.float64)
        z = _pairs(400, seed=1)[0].astype(np.float64)
        coeffs = np.asarray(C.pca_encode(codec.pca, z))
        ids = C.codec_encode(codec, z)
        deq = np.asarray(C.dequantize(codec.tokens, ids))
        err = np.sum((z - np.asarray(C.codec_decode(codec, ids))) ** 2, axis=1)
        pca_err = np.sum((z - np.asarray(C.pca_decode(codec.pca, coeffs))) ** 2, axis=1)
        # Orthonormal rows: the two errors add exactly (Pythagoras).
        np.testing.assert_allclose(err, pca_err + np.sum((coeffs - deq) ** 2, axis=1), rtol=1e-9)
        edges = np.asarray(codec.tokens.edges)
        inside = np.all((coeffs >= edges[:, 0]) & (coeffs <= edges[:, -1]), axis=1)
        half = np.diff(edges, axis=1)[np.arange(12), np.asarray(ids)] / 2
        assert inside.mean() > 0.9  # most rows are in range with clip_quantile = 0.999
        assert np.all(err[inside] <= pca_err[inside] + np.sum(half[inside] ** 2, axis=1) + 1e-15)


def test_codec_fits_from_the_ar_config():
    ar = load_config(f"{ROOT}/configs/prior.py:tiny").ar
    dim = load_config(f"{ROOT}/configs/prior.py:tiny").model.clip_dim
    zi, zt = _pairs(500, seed=2, dim=dim)
    codec = C.fit_codec(
        zi,
        zt,
        components=ar.pca_components,
        num_buckets=ar.num_buckets,
        method=ar.bucketing,
        clip_quantile=ar.clip_quantile,
    )
    ids = C.codec_encode(codec, zi[:4])
    assert ids.shape == (4, ar.pca_components) and int(ids.max()) < ar.num_buckets
    dot_ids = C.dot_tokens(codec, zi[:4], zt[:4])
    assert dot_ids.shape == (4,) and int(dot_ids.max()) < ar.num_buckets
    tokens = C.sample_dot_tokens(
        codec.dot, jax.random.key(1), (8,), percentile=ar.dot_product_percentile
    )
    assert int(tokens.min()) >= int(C.dot_token_range(codec.dot, percentile=50.0)[0])


def test_codec_save_load_round_trip_is_exact(tmp_path):
    zi, zt = _pairs(800, seed=3)
    codec = C.fit_codec(zi, zt, components=8, num_buckets=16)
    arrays = C.codec_to_arrays(codec, prefix="ar_codec/")
    assert all(k.startswith("ar_codec/") and isinstance(v, np.ndarray) for k, v in arrays.items())
    save_file(arrays, str(tmp_path / "codec.safetensors"))
    loaded = C.codec_from_arrays(
        load_file(str(tmp_path / "codec.safetensors")),
        prefix="ar_codec/",
        embed_dim=DIM,
        components=8,
        num_buckets=16,
    )
    assert jax.tree.structure(loaded) == jax.tree.structure(codec)
    for a, b in zip(jax.tree.leaves(codec), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(
        np.asarray(C.codec_encode(codec, zi)), np.asarray(jax.jit(C.codec_encode)(loaded, zi))
    )


def test_codec_dimension_mismatch_is_a_clear_error():
    zi, zt = _pairs(300, seed=4, dim=16)
    codec = C.fit_codec(zi, zt, components=4, num_buckets=8)
    arrays = C.codec_to_arrays(codec)
    with pytest.raises(ValueError, match=r"embedding dimension D is 16, but 24 was expected"):
        C.codec_from_arrays(arrays, embed_dim=24)
    with pytest.raises(ValueError, match=r"number of PCA components d is 4, but 319"):
        C.codec_from_arrays(arrays, components=319)
    with pytest.raises(ValueError, match=r"number of buckets K is 8, but 1024"):
        C.codec_from_arrays(arrays, num_buckets=1024)
    with pytest.raises(ValueError, match=r"dimension 24 .* D=16"):
        C.codec_encode(codec, np.zeros((2, 24), np.float32))
    with pytest.raises(ValueError, match=r"missing pca\.mean"):
        C.codec_from_arrays({k: v for k, v in arrays.items() if k != "pca.mean"})
    bad = dict(arrays, **{"pca.components": arrays["pca.components"][:, :12]})
    with pytest.raises(
        ValueError, match=r"'pca.components' has shape \(4, 12\); expected \(\*, 16\)"
    ):
        C.codec_from_arrays(bad)
    with pytest.raises(ValueError, match="paired rows"):
        C.fit_codec(zi, zt[:, :8], components=4, num_buckets=8)
