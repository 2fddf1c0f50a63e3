"""The embedding codec of the autoregressive prior (unCLIP, Section 2.2).

A CLIP image embedding z_i (dimension D) becomes d discrete tokens:

    c = (z_i - mean) V^T            PCA: V (d, D) are the top-d eigenvectors of Cov(z_i)
    token_k = bucket of c_k          per-component scalar quantiser, K buckets

and back: z_i ~ mean + dequantize(tokens) V. The paper keeps d = 319 of D = 1024 components
and K = 1024 buckets. A further conditioning token holds the dot product z_i . z_t quantised
with the same scalar quantiser (one dimension); at sampling it is drawn from the top half of
its training distribution (`sample_dot_tokens`, `dot_token_range`).

Fitting is float64 NumPy (chunked over rows, so a memory-mapped shard works); the fitted
arrays are stored as frozen pytrees of JAX arrays (float32 by default, as `Schedule` is), and
encoding/decoding is jax.numpy, so it jits. `codec_to_arrays` / `codec_from_arrays` flatten a
codec to a dict of NumPy arrays for a checkpoint or a safetensors file.

The quantiser's bucket centres are the midpoints of the bucket edges (not the conditional
means), so that dequantize(quantize(x)) is within half a bucket of x for every x in range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

Array = jax.Array

BUCKETINGS = ("uniform", "quantile")
# Percentile levels (0, 1, ..., 100) of the training distribution kept in every Quantizer.
PERCENTILE_LEVELS = np.linspace(0.0, 100.0, 101)
_CHUNK_ROWS = 65_536  # rows per float64 chunk when fitting


# ----------------------------------------------------------------------------------------------
# Pytrees
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pca:
    """The top-d principal components of a set of D-dimensional embeddings.

    Rows of `components` are orthonormal eigenvectors of the (1/N) covariance, ordered by
    eigenvalue, largest first; each row's entry of largest magnitude is positive.
    """

    mean: Array  # (D,)
    components: Array  # (d, D): V, orthonormal rows
    explained_variance: Array  # (d,): eigenvalues lambda_1 >= ... >= lambda_d >= 0
    total_variance: Array  # (): trace of the covariance = sum of all D eigenvalues

    @property
    def embed_dim(self) -> int:
        """D, the dimension of the embeddings the PCA was fitted on (static)."""
        return self.mean.shape[0]

    @property
    def num_components(self) -> int:
        """d, the number of kept components (static)."""
        return self.components.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantizer:
    """A per-dimension scalar quantiser with K buckets for each of d dimensions.

    Bucket k of dimension j is [edges[j, k], edges[j, k+1]) (the last one closed); values
    below edges[j, 0] fall in bucket 0, values above edges[j, K] in bucket K - 1.
    """

    edges: Array  # (d, K+1), non-decreasing along K
    centres: Array  # (d, K): (edges[:, k] + edges[:, k+1]) / 2
    # (d, 101): the 0th, 1st, ..., 100th percentiles of the fitting data (np.percentile,
    # linear), so a percentile of the training distribution can be chosen after fitting.
    percentiles: Array

    @property
    def num_dims(self) -> int:
        """d, the number of quantised dimensions (static)."""
        return self.edges.shape[0]

    @property
    def num_buckets(self) -> int:
        """K, the number of buckets per dimension (static)."""
        return self.centres.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PriorCodec:
    """Everything the autoregressive prior needs to turn (z_i, z_t) into tokens and back."""

    pca: Pca  # z_i -> d PCA coefficients
    tokens: Quantizer  # d dimensions: PCA coefficients -> token ids
    dot: Quantizer  # 1 dimension: z_i . z_t -> the dot-product token


# ----------------------------------------------------------------------------------------------
# Input checks (NumPy side)
# ----------------------------------------------------------------------------------------------


def _check_matrix(x: np.ndarray, *, name: str, ndim: int = 2) -> None:
    if x.ndim != ndim:
        shape = "(N, D)" if ndim == 2 else "(N,)"
        raise ValueError(f"{name} must have shape {shape}; got shape {x.shape}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty (shape {x.shape})")


def _count_nonfinite_rows(x: np.ndarray) -> int:
    bad = 0
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = np.asarray(x[start : start + _CHUNK_ROWS])
        bad += int((~np.isfinite(chunk.reshape(chunk.shape[0], -1))).any(axis=1).sum())
    return bad


def _check_finite(x: np.ndarray, *, name: str) -> None:
    bad = _count_nonfinite_rows(x)
    if bad:
        raise ValueError(f"{name} has non-finite values (NaN or inf) in {bad} of {x.shape[0]} rows")


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------


def _fit_pca64(embeddings: np.ndarray, components: int) -> tuple[np.ndarray, ...]:
    """(mean, V, eigenvalues, total variance) in float64, without casting."""
    _check_matrix(embeddings, name="embeddings")
    n, dim = embeddings.shape
    if not 1 <= components <= min(n, dim):
        raise ValueError(
            f"cannot keep {components} PCA components of {n} embeddings of dimension {dim}: "
            f"components must lie in [1, min(N, D)] = [1, {min(n, dim)}]"
        )
    _check_finite(embeddings, name="embeddings")
    # Two passes (mean, then the scatter of the centred rows), float64, chunked over rows.
    total = np.zeros(dim, np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        total += np.asarray(embeddings[start : start + _CHUNK_ROWS], np.float64).sum(axis=0)
    mean = total / n
    scatter = np.zeros((dim, dim), np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        xc = np.asarray(embeddings[start : start + _CHUNK_ROWS], np.float64) - mean
        scatter += xc.T @ xc
    cov = scatter / n  # the biased (1/N) covariance
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(-eigvals, kind="stable")[:components]
    vecs = eigvecs[:, order].T  # (d, D)
    # Sign convention: the entry of largest magnitude of each component is positive.
    pivot = vecs[np.arange(components), np.argmax(np.abs(vecs), axis=1)]
    vecs = vecs * np.where(pivot < 0, -1.0, 1.0)[:, None]
    lam = np.maximum(eigvals[order], 0.0)  # round-off can make a zero eigenvalue -1e-17
    return mean, vecs, lam, np.float64(np.trace(cov))


def fit_pca(embeddings: np.ndarray, components: int, *, dtype: DTypeLike = jnp.float32) -> Pca:
    """The top `components` principal components of `embeddings` (N, D).

    Computed in float64: mean m = (1/N) sum_n z_n, covariance C = (1/N) sum_n (z_n - m)(z_n - m)^T,
    C = sum_k lambda_k v_k v_k^T with lambda_1 >= lambda_2 >= ...; keeps v_1..v_d, each signed
    so that its entry of largest magnitude is positive (so refits agree on signs), and stores
    them as `dtype` (float64 needs jax_enable_x64). With the 1/N covariance the mean squared
    reconstruction error over the fitting set is exactly sum_{k>d} lambda_k.

    Accepts any array that slices into NumPy rows (e.g. np.memmap): it is read in chunks.
    Raises ValueError for a non-2D or empty input, non-finite values, or components outside
    [1, min(N, D)].
    """
    mean, vecs, lam, total = _fit_pca64(embeddings, components)
    return Pca(
        mean=jnp.asarray(mean, dtype),
        components=jnp.asarray(vecs, dtype),
        explained_variance=jnp.asarray(lam, dtype),
        total_variance=jnp.asarray(total, dtype),
    )


def pca_encode(pca: Pca, z: Array) -> Array:
    """PCA coefficients c = (z - mean) V^T, (.., D) -> (.., d).

    Round-trip bound (exact in exact arithmetic, as V's rows are orthonormal):
        ||z - pca_decode(pca_encode(z))||^2 = ||z - mean||^2 - ||c||^2
                                           = sum_{k>d} ((z - mean) . v_k)^2,
    the energy of z - mean in the discarded eigenvectors; 0 when d = D. In float32 it holds to
    round-off, about 1e-6 ||z - mean||^2.
    """
    z = jnp.asarray(z)
    if z.ndim < 1 or z.shape[-1] != pca.embed_dim:
        raise ValueError(
            f"embeddings of dimension {z.shape[-1] if z.ndim else 'scalar'} given to a PCA "
            f"fitted on D={pca.embed_dim} embeddings"
        )
    return (z - pca.mean) @ pca.components.T


def pca_decode(pca: Pca, coeffs: Array) -> Array:
    """Embeddings from PCA coefficients: z = mean + c V, (.., d) -> (.., D)."""
    coeffs = jnp.asarray(coeffs)
    if coeffs.ndim < 1 or coeffs.shape[-1] != pca.num_components:
        raise ValueError(
            f"{coeffs.shape[-1] if coeffs.ndim else 'scalar'} PCA coefficients given to a PCA "
            f"with d={pca.num_components} components"
        )
    return coeffs @ pca.components + pca.mean


# ----------------------------------------------------------------------------------------------
# Scalar quantiser
# ----------------------------------------------------------------------------------------------


def _column_quantiles(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """(d, L) float64 quantiles of each column at `levels` in [0, 1] (np.quantile, linear)."""
    n, dims = values.shape
    pos = np.asarray(levels, np.float64) * (n - 1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    out = np.empty((dims, len(pos)), np.float64)
    for j in range(dims):
        col = np.sort(np.asarray(values[:, j], np.float64))
        out[j] = col[lo] + frac * (col[hi] - col[lo])
    return out


def fit_quantizer(
    values: np.ndarray,
    num_buckets: int,
    *,
    method: str = "quantile",
    clip_quantile: float = 0.999,
    dtype: DTypeLike = jnp.float32,
) -> Quantizer:
    """A K-bucket scalar quantiser for each column of `values` (N, d).

    Both methods cover the clipped range [q_lo, q_hi] of each dimension, the
    (1 - clip_quantile) and clip_quantile quantiles of its values (clip_quantile = 1: the
    min and max); values outside it fall in the end buckets.
    - "uniform": K equal-width buckets, edges_k = q_lo + k (q_hi - q_lo) / K;
    - "quantile": edges at the quantiles of levels (1 - c) + k (2c - 1) / K (c = clip_quantile),
      so each bucket holds the same share, (2c - 1) / K, of the fitting data inside the range
      (the end buckets also hold the clipped tails, 1 - c each).
    Centres are the bucket midpoints, (edges_k + edges_{k+1}) / 2, computed from the stored
    edges. A constant dimension gets zero-width buckets that all decode to the constant.
    """
    _check_matrix(values, name="values")
    if method not in BUCKETINGS:
        raise ValueError(f"unknown bucketing {method!r}; valid: {', '.join(BUCKETINGS)}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be at least 1; got {num_buckets}")
    if not 0.5 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile must lie in (0.5, 1]; got {clip_quantile}")
    _check_finite(values, name="values")
    lo_level = 1.0 - clip_quantile
    if method == "uniform":
        q_lo, q_hi = _column_quantiles(values, np.array([lo_level, clip_quantile])).T
        frac = np.linspace(0.0, 1.0, num_buckets + 1)
        edges = q_lo[:, None] + frac[None, :] * (q_hi - q_lo)[:, None]
        edges[:, -1] = q_hi  # exact end, whatever the round-off of the sum above
    else:
        levels = np.linspace(lo_level, clip_quantile, num_buckets + 1)
        edges = _column_quantiles(values, levels)
    edges = np.maximum.accumulate(edges, axis=1)  # guard against round-off inversions
    edges_stored = np.asarray(jnp.asarray(edges, dtype))  # centres from the stored edges
    centres = 0.5 * (edges_stored[:, :-1].astype(np.float64) + edges_stored[:, 1:])
    percentiles = _column_quantiles(values, PERCENTILE_LEVELS / 100.0)
    return Quantizer(
        edges=jnp.asarray(edges_stored),
        centres=jnp.asarray(centres, dtype),
        percentiles=jnp.asarray(percentiles, dtype),
    )


def quantize(q: Quantizer, values: Array) -> Array:
    """Bucket ids, int32 (.., d), of values (.., d): id_j = #{interior edges of j <= x_j}.

    Ids lie in [0, K): values below the range map to bucket 0, above it to bucket K - 1.
    """
    values = jnp.asarray(values)
    d = q.num_dims
    if values.ndim < 1 or values.shape[-1] != d:
        raise ValueError(
            f"values of trailing dimension {values.shape[-1] if values.ndim else 'scalar'} "
            f"given to a quantiser of d={d} dimensions"
        )
    lead = values.shape[:-1]
    flat = values.astype(q.edges.dtype).reshape(-1, d).T  # (d, M)
    search = jax.vmap(lambda e, x: jnp.searchsorted(e, x, side="right"))
    ids = search(q.edges[:, 1:-1], flat)  # (d, M) in [0, K-1]
    return ids.T.reshape(*lead, d).astype(jnp.int32)


def dequantize(q: Quantizer, ids: Array) -> Array:
    """Bucket centres (.., d) of bucket ids (.., d); ids are clipped to [0, K)."""
    ids = jnp.asarray(ids)
    d = q.num_dims
    if ids.ndim < 1 or ids.shape[-1] != d:
        raise ValueError(
            f"ids of trailing dimension {ids.shape[-1] if ids.ndim else 'scalar'} given to a "
            f"quantiser of d={d} dimensions"
        )
    flat = jnp.clip(ids.astype(jnp.int32), 0, q.num_buckets - 1).reshape(-1, d).T  # (d, M)
    return jnp.take_along_axis(q.centres, flat, axis=1).T.reshape(ids.shape)


# ----------------------------------------------------------------------------------------------
# The dot-product token
# ----------------------------------------------------------------------------------------------


def fit_dot_quantizer(
    dots: np.ndarray,
    num_buckets: int,
    *,
    method: str = "quantile",
    clip_quantile: float = 0.999,
    dtype: DTypeLike = jnp.float32,
) -> Quantizer:
    """The quantiser of the dot products z_i . z_t (N,): `fit_quantizer` with d = 1."""
    dots = np.asarray(dots)
    _check_matrix(dots, name="dots", ndim=1)
    return fit_quantizer(
        dots[:, None], num_buckets, method=method, clip_quantile=clip_quantile, dtype=dtype
    )


def quantize_dot(q: Quantizer, dots: Array) -> Array:
    """Dot-product token ids, int32 (..), of dot products (..)."""
    return quantize(q, jnp.asarray(dots)[..., None])[..., 0]


def _check_percentile(q: Quantizer, percentile: float) -> float:
    if q.num_dims != 1:
        raise ValueError(f"a dot-product quantiser has d=1 dimension; got d={q.num_dims}")
    percentile = float(percentile)
    if not 0.0 <= percentile < 100.0:
        raise ValueError(f"percentile must lie in [0, 100); got {percentile}")
    return percentile


def _dot_at_percentile(q: Quantizer, percentiles: Array) -> Array:
    """The training dot products at `percentiles` (linear between the stored integer ones)."""
    return jnp.interp(
        percentiles, jnp.asarray(PERCENTILE_LEVELS, q.percentiles.dtype), q.percentiles[0]
    )


def dot_token_range(q: Quantizer, *, percentile: float = 50.0) -> tuple[Array, int]:
    """Ids [lo, K) of the dot-product tokens at or above `percentile` of the training dots.

    lo = quantize(P_percentile(dots)). Every training dot product at or above the percentile
    has a token in [lo, K); as the bucket holding the percentile is kept whole, the range
    holds between 100 - percentile % and that plus one bucket's share of the training data.
    Use it to mask a token distribution; `sample_dot_tokens` draws the paper's sampling token.
    """
    percentile = _check_percentile(q, percentile)
    value = _dot_at_percentile(q, jnp.asarray(percentile, q.percentiles.dtype))
    return quantize_dot(q, value), q.num_buckets


def sample_dot_tokens(
    q: Quantizer, key: Array, shape: tuple[int, ...] = (), *, percentile: float = 50.0
) -> Array:
    """Dot-product tokens for sampling, drawn from the training distribution above `percentile`.

    u ~ U(percentile, 100) (in percent), dot = F^-1(u) (the training dots' inverse CDF,
    linear between the stored integer percentiles), token = quantize_dot(dot); so
    percentile = 50 draws from the top half of the training distribution, as the paper does.
    (Drawing ids uniformly from `dot_token_range` would instead over-weight the rare extreme
    buckets of "uniform" bucketing; for "quantile" bucketing the two nearly agree.) Every
    token lies in `dot_token_range`. Jittable; `percentile` is static.
    """
    percentile = _check_percentile(q, percentile)
    u = jax.random.uniform(key, shape, q.percentiles.dtype, minval=percentile, maxval=100.0)
    return quantize_dot(q, _dot_at_percentile(q, u))


# ----------------------------------------------------------------------------------------------
# The whole codec
# ----------------------------------------------------------------------------------------------


def fit_codec(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    *,
    components: int,
    num_buckets: int,
    method: str = "quantile",
    clip_quantile: float = 0.999,
    dtype: DTypeLike = jnp.float32,
) -> PriorCodec:
    """The codec of the autoregressive prior, fitted on paired training embeddings (N, D).

    PCA on z_i (`fit_pca`); a token quantiser on the stored PCA's coefficients of z_i
    (`fit_quantizer`); a dot-token quantiser on z_i . z_t (`fit_dot_quantizer`), all with the
    same K, bucketing and clip quantile (configs/prior.py's `ar` block). Pass z_i and z_t with
    the normalisation the prior sees (CLIP's unit-norm embeddings: z_i . z_t is the cosine).
    """
    _check_matrix(image_embeddings, name="image_embeddings")
    _check_matrix(text_embeddings, name="text_embeddings")
    if text_embeddings.shape != image_embeddings.shape:
        raise ValueError(
            f"image_embeddings {image_embeddings.shape} and text_embeddings "
            f"{text_embeddings.shape} must be paired rows of the same dimension"
        )
    _check_finite(text_embeddings, name="text_embeddings")
    pca = fit_pca(image_embeddings, components, dtype=dtype)
    n = image_embeddings.shape[0]
    mean, vecs = np.asarray(pca.mean, np.float64), np.asarray(pca.components, np.float64)
    coeffs = np.empty((n, components), np.float64)
    dots = np.empty((n,), np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        zi = np.asarray(image_embeddings[start : start + _CHUNK_ROWS], np.float64)
        zt = np.asarray(text_embeddings[start : start + _CHUNK_ROWS], np.float64)
        coeffs[start : start + len(zi)] = (zi - mean) @ vecs.T
        dots[start : start + len(zi)] = np.einsum("nd,nd->n", zi, zt)
    kw = dict(method=method, clip_quantile=clip_quantile, dtype=dtype)
    return PriorCodec(
        pca=pca,
        tokens=fit_quantizer(coeffs, num_buckets, **kw),
        dot=fit_dot_quantizer(dots, num_buckets, **kw),
    )


def codec_encode(codec: PriorCodec, z_i: Array) -> Array:
    """Token ids, int32 (.., d), of image embeddings (.., D)."""
    return quantize(codec.tokens, pca_encode(codec.pca, z_i))


def codec_decode(codec: PriorCodec, ids: Array) -> Array:
    """Image embeddings (.., D) from token ids (.., d): mean + dequantize(ids) V.

    As V's rows are orthonormal, ||z - codec_decode(codec_encode(z))||^2 is the PCA round-trip
    error (`pca_encode`) plus sum_k (c_k - dequantize(id_k))^2, at most sum_k (width_k / 2)^2
    when every coefficient lies inside its clipped range.
    """
    return pca_decode(codec.pca, dequantize(codec.tokens, ids))


def dot_tokens(codec: PriorCodec, z_i: Array, z_t: Array) -> Array:
    """The dot-product token ids, int32 (..), of paired embeddings z_i, z_t (.., D)."""
    z_i, z_t = jnp.asarray(z_i), jnp.asarray(z_t)
    if z_i.shape != z_t.shape:
        raise ValueError(f"z_i {z_i.shape} and z_t {z_t.shape} must have the same shape")
    return quantize_dot(codec.dot, jnp.sum(z_i * z_t, axis=-1))


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------

_PCA_KEYS = ("mean", "components", "explained_variance", "total_variance")
_QUANTIZER_KEYS = ("edges", "centres", "percentiles")


def codec_to_arrays(codec: PriorCodec, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The codec as a flat dict of contiguous NumPy arrays, keys `{prefix}pca.mean` etc.

    Ready for safetensors.numpy.save_file or a checkpoint; `codec_from_arrays` inverts it.
    """
    out = {f"{prefix}pca.{k}": getattr(codec.pca, k) for k in _PCA_KEYS}
    for part in ("tokens", "dot"):
        q = getattr(codec, part)
        out.update({f"{prefix}{part}.{k}": getattr(q, k) for k in _QUANTIZER_KEYS})
    return {k: np.array(v, order="C") for k, v in out.items()}  # (ascontiguousarray makes 0-d 1-d)


def _expect(name: str, shape: tuple[int, ...], want: tuple[int | None, ...], why: str) -> None:
    if len(shape) != len(want) or any(
        w is not None and s != w for s, w in zip(shape, want, strict=True)
    ):
        spelled = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
        raise ValueError(f"codec array {name!r} has shape {shape}; expected {spelled} ({why})")


def codec_from_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    prefix: str = "",
    embed_dim: int | None = None,
    components: int | None = None,
    num_buckets: int | None = None,
) -> PriorCodec:
    """The codec saved by `codec_to_arrays`, checked for consistency.

    Raises ValueError naming the key for a missing array or inconsistent shapes, and naming
    both numbers when the codec's D, d or K differs from `embed_dim`, `components` or
    `num_buckets` (e.g. the model's clip_dim and the `ar` config), where those are given.
    """
    names = [f"pca.{k}" for k in _PCA_KEYS]
    names += [f"{part}.{k}" for part in ("tokens", "dot") for k in _QUANTIZER_KEYS]
    missing = [n for n in names if prefix + n not in arrays]
    if missing:
        raise ValueError(f"codec arrays are missing {', '.join(prefix + n for n in missing)}")
    a = {n: np.asarray(arrays[prefix + n]) for n in names}
    _expect("pca.mean", a["pca.mean"].shape, (None,), "D")
    dim = a["pca.mean"].shape[0]
    _expect("pca.components", a["pca.components"].shape, (None, dim), "d, D")
    d = a["pca.components"].shape[0]
    _expect("pca.explained_variance", a["pca.explained_variance"].shape, (d,), "d")
    _expect("pca.total_variance", a["pca.total_variance"].shape, (), "a scalar")
    for part, dims in (("tokens", d), ("dot", 1)):
        _expect(f"{part}.edges", a[f"{part}.edges"].shape, (dims, None), f"{dims}, K + 1")
        k = a[f"{part}.edges"].shape[1] - 1
        _expect(f"{part}.centres", a[f"{part}.centres"].shape, (dims, k), f"{dims}, K")
        _expect(
            f"{part}.percentiles",
            a[f"{part}.percentiles"].shape,
            (dims, len(PERCENTILE_LEVELS)),
            f"{dims}, {len(PERCENTILE_LEVELS)}",
        )
    got_k = a["tokens.centres"].shape[1]
    for what, got, want in (
        ("embedding dimension D", dim, embed_dim),
        ("number of PCA components d", d, components),
        ("number of buckets K", got_k, num_buckets),
    ):
        if want is not None and got != want:
            raise ValueError(f"the codec's {what} is {got}, but {want} was expected")
    pca = Pca(**{k: jnp.asarray(a[f"pca.{k}"]) for k in _PCA_KEYS})
    tokens, dot = (
        Quantizer(**{k: jnp.asarray(a[f"{part}.{k}"]) for k in _QUANTIZER_KEYS})
        for part in ("tokens", "dot")
    )
    return PriorCodec(pca=pca, tokens=tokens, dot=dot)
