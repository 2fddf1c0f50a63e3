"""The diffusion prior P(z_i | y): a causal transformer that predicts the clean image embedding.

Sequence (unCLIP Section 2.2; diffusers' `PriorTransformer`, Karlo's layout):

    [caption token states (L) ; z_t ; timestep embedding ; noised z_i ; learned query]

each projected to `width`, plus a learned positional embedding, through `layers` pre-LN
transformer blocks with a causal mask (position k attends to positions <= k) and the caption's
padding masked out; the final LayerNorm'd state of the query token is projected to the
predicted clean z_i (the x0 parameterisation, trained with an MSE).

Param names follow diffusers' `PriorTransformer` (time_embedding.linear_1, proj_in,
embedding_proj, encoder_hidden_states_proj, positional_embedding, prd_embedding,
transformer_blocks_N/{norm1, attn1/{to_q, to_k, to_v, to_out_0}, norm3, ff/{net_0_proj, net_2}},
norm_out, proj_to_clip_embeddings), so Karlo's prior imports by renaming.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.layers import dense, layer_norm
from unclip_jax.models.unet import TimestepEmbedding, timestep_embedding

Array = jax.Array

TOKEN_AXES = ("batch", "activation_length", "activation_embed")
# Extra tokens after the caption: z_t, the timestep, the noised z_i and the query.
NUM_EXTRA_TOKENS = 4

# The learned query and positions (diffusers initialises them to zeros, for loading weights).
_small_normal = nn.initializers.normal(0.02)


def causal_bias(valid: Array) -> Array:
    """Additive attention bias (B, 1, T, T), float32: 0 where query q may attend key k
    (k <= q and key k valid), the float32 minimum elsewhere. `valid` (B, T) marks valid keys."""
    t = valid.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :]
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive bias (diffusers' `Attention` names)."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array, *, queries: Array | None = None) -> Array:
        """x (B, T, W), bias (B, 1, Tq, T) -> (B, Tq, W); the queries are x, or `queries`
        (B, Tq, W) attending to all of x (e.g. only the last token's)."""
        queries = x if queries is None else queries
        b, _, w = x.shape
        d = w // self.heads

        def proj(name: str, inp: Array) -> Array:
            y = dense(w, ("embed", "heads"), name=name, dtype=self.dtype)(inp)
            # Heads-major (B, H, T, D): the two products below are plain batched matmuls,
            # which XLA's CPU backend runs faster than the equivalent einsums (benchmarks/).
            return y.reshape(b, inp.shape[1], self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = proj("to_q", queries), proj("to_k", x), proj("to_v", x)
        logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) / math.sqrt(d)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, queries.shape[1], w)
        return dense(w, ("heads", "embed"), name="to_out_0", dtype=self.dtype)(out)


class FeedForward(nn.Module):
    """Dense(4W), exact GELU, dropout, Dense(W) (diffusers' `FeedForward`, activation "gelu")."""

    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        w = x.shape[-1]
        h = nn.gelu(
            dense(4 * w, ("embed", "mlp"), name="net_0_proj", dtype=self.dtype)(x),
            approximate=False,
        )
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(w, ("mlp", "embed"), name="net_2", dtype=self.dtype)(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn1(norm1(x)), then + ff(norm3(x)) (diffusers'
    `BasicTransformerBlock` without cross-attention)."""

    heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, bias: Array, deterministic: bool = True, last_only: bool = False
    ) -> Array:
        """x (B, T, W) -> (B, T, W), or (B, 1, W) with `last_only`: the last token's output
        alone (it attends to every token; nothing else is computed), for a final block whose
        other outputs nobody reads."""
        x = nn.with_logical_constraint(x, TOKEN_AXES)
        normed = layer_norm("norm1", self.dtype)(x)
        if last_only:
            h = SelfAttention(self.heads, self.dtype, name="attn1")(
                normed, bias[:, :, -1:, :], queries=normed[:, -1:]
            )
            x = x[:, -1:]
        else:
            h = SelfAttention(self.heads, self.dtype, name="attn1")(normed, bias)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = FeedForward(self.dropout, self.dtype, name="ff")(
            layer_norm("norm3", self.dtype)(x), deterministic=deterministic
        )
        return x + h


def drop_caption(text_mask: Array, z_t: Array, drop_text: Array | None) -> tuple[Array, Array]:
    """(text_mask, z_t) with the rows of `drop_text` (guidance dropout) masked out / zeroed."""
    text_mask = text_mask.astype(bool)
    if drop_text is None:
        return text_mask, z_t
    drop_text = drop_text.astype(bool)
    return text_mask & ~drop_text[:, None], jnp.where(drop_text[:, None], 0, z_t)


def causal_blocks(
    parent: nn.Module, h: Array, valid: Array, *, deterministic: bool, last_only: bool = False
) -> Array:
    """`parent.layers` causal `TransformerBlock`s (named transformer_blocks_N in `parent`, whose
    heads, dropout and dtype they take) over h (B, T, W), keys limited to `valid` (B, T); with
    `last_only` the last block computes the last token alone (B, 1, W). Call it from `parent`'s
    compact `__call__`."""
    bias = causal_bias(valid)
    # With the parent's `remat`, each block recomputes its activations in the backward pass;
    # `deterministic` and `last_only` (arguments 3 and 4 after self) are static Python bools.
    block = nn.remat(TransformerBlock, static_argnums=(3, 4)) if parent.remat else TransformerBlock
    for i in range(parent.layers):
        h = block(parent.heads, parent.dropout, parent.dtype, name=f"transformer_blocks_{i}")(
            h, bias, deterministic, last_only and i == parent.layers - 1
        )
    return h


class DiffusionPrior(nn.Module):
    """The diffusion prior's network: (noised z_i, t, z_t, caption states) -> predicted z_i.

    `clip_dim` is the width of z_i and z_t; `width` = heads x head dim; `text_tokens` the
    caption length the positional embedding covers. Dropping the text (`drop_text`, for
    guidance) masks every caption token out and zeroes z_t, so the model sees only the
    timestep, the noised z_i and the query.
    """

    clip_dim: int
    width: int
    layers: int
    heads: int
    text_tokens: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each transformer block in training

    @nn.compact
    def __call__(
        self,
        x_t: Array,
        t: Array,
        z_t: Array,
        text_states: Array,
        text_mask: Array,
        *,
        drop_text: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """x_t (B, D), t (B,), z_t (B, D), text_states (B, L, Wt), text_mask (B, L) -> (B, D)."""
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        b, length = text_mask.shape
        if length != self.text_tokens:
            raise ValueError(f"expected {self.text_tokens} caption tokens, got {length}")
        dt, w = self.dtype, self.width
        text_mask, z_t = drop_caption(text_mask, z_t.astype(dt), drop_text)

        temb = TimestepEmbedding(w, dtype=dt, name="time_embedding")(
            timestep_embedding(t, w).astype(dt)
        )
        tokens = jnp.concatenate(
            [
                dense(w, ("embed", "mlp"), name="encoder_hidden_states_proj", dtype=dt)(
                    text_states.astype(dt)
                ),
                dense(w, ("embed", "mlp"), name="embedding_proj", dtype=dt)(z_t)[:, None],
                temb[:, None],
                dense(w, ("embed", "mlp"), name="proj_in", dtype=dt)(x_t.astype(dt))[:, None],
                jnp.broadcast_to(
                    self.param(
                        "prd_embedding",
                        nn.with_logical_partitioning(_small_normal, (None, None, "embed")),
                        (1, 1, w),
                    ).astype(dt),
                    (b, 1, w),
                ),
            ],
            axis=1,
        )
        position = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(_small_normal, (None, None, "embed")),
            (1, self.text_tokens + NUM_EXTRA_TOKENS, w),
        )
        h = tokens + position.astype(dt)
        valid = jnp.concatenate([text_mask, jnp.ones((b, NUM_EXTRA_TOKENS), bool)], axis=1)
        # Only the query's state is read out: the last block computes it alone.
        h = causal_blocks(self, h, valid, deterministic=deterministic, last_only=True)
        h = layer_norm("norm_out", dt)(h[:, -1])
        return dense(self.clip_dim, ("mlp", "embed"), name="proj_to_clip_embeddings", dtype=dt)(h)


# ---- how z_i is scaled for diffusion ------------------------------------------------------------


def unit_norm(z: Array, eps: float = 1e-12) -> Array:
    """z / ||z|| along the last axis, float32 (CLIP embeddings compare by cosine)."""
    z = jnp.asarray(z, jnp.float32)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(eps)


NORMALIZATIONS = ("constant", "sqrt_dim", "standardize")


def fit_embedding_stats(embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension mean and std of training image embeddings (N, D), float32 (Karlo's
    clip_mean / clip_std); a constant dimension gets std 1 so it maps to 0, not to inf."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"expected a non-empty (N, D) array of embeddings, got {x.shape}")
    std = x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return {"clip_mean": x.mean(axis=0).astype(np.float32), "clip_std": std.astype(np.float32)}


def normalize_embedding(
    z: Array,
    *,
    method: str,
    scale: float = 17.2,
    stats: dict[str, Any] | None = None,
) -> Array:
    """z_i (.., D) -> the prior's diffusion space.

    "constant": z / ||z|| * scale (the paper's 17.2); "sqrt_dim": z / ||z|| * sqrt(D), so each
    coordinate has about unit variance; "standardize": (z - mean) / std with `stats` from
    `fit_embedding_stats` (Karlo). The first two keep only z's direction (CLIP embeddings are
    compared by cosine); "standardize" keeps its norm.
    """
    z = jnp.asarray(z, jnp.float32)
    if method == "standardize":
        if stats is None:
            raise ValueError('normalization "standardize" needs the fitted clip_mean/clip_std')
        return (z - stats["clip_mean"]) / stats["clip_std"]
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; valid: {', '.join(NORMALIZATIONS)}")
    factor = scale if method == "constant" else math.sqrt(z.shape[-1])
    return unit_norm(z) * factor


def denormalize_embedding(
    x: Array,
    *,
    method: str,
    scale: float = 17.2,
    stats: dict[str, Any] | None = None,
) -> Array:
    """The inverse of `normalize_embedding` (up to the norm, for the direction-only methods:
    the result then has unit norm)."""
    x = jnp.asarray(x, jnp.float32)
    if method == "standardize":
        if stats is None:
            raise ValueError('normalization "standardize" needs the fitted clip_mean/clip_std')
        return x * stats["clip_std"] + stats["clip_mean"]
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; valid: {', '.join(NORMALIZATIONS)}")
    return unit_norm(x)


class AutoregressivePrior(nn.Module):
    """The autoregressive prior's network: next-token logits over the PCA tokens of z_i.

    Sequence (unCLIP Section 2.2): [caption tokens (L) ; z_t ; dot-product token ; PCA tokens
    0 .. d-2], with learned positions, through `layers` causal pre-LN blocks (the caption's
    padding masked out). The output at the dot-product token predicts PCA token 0 and the
    output at PCA token j predicts token j + 1, so `tokens` (B, d) are teacher-forced and the
    logits are (B, d, num_buckets). The caption tokens are the CLIP tokenizer's ids, embedded by
    this model (`vocab_size`); z_t is projected to one token. Dropping the text (`drop_text`,
    for guidance) masks the caption out and zeroes z_t.
    """

    vocab_size: int
    num_buckets: int
    num_tokens: int
    width: int
    layers: int
    heads: int
    text_tokens: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each transformer block in training

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        text_mask: Array,
        z_t: Array,
        dot: Array,
        tokens: Array,
        *,
        drop_text: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """input_ids, text_mask (B, L), z_t (B, D), dot (B,) and tokens (B, d) int ->
        logits (B, d, num_buckets), float32."""
        b, length = input_ids.shape
        if length != self.text_tokens:
            raise ValueError(f"expected {self.text_tokens} caption tokens, got {length}")
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} PCA tokens, got {tokens.shape[1]}")
        dt, w = self.dtype, self.width
        text_mask, z_t = drop_caption(text_mask, z_t.astype(dt), drop_text)

        def table(name: str, rows: int) -> nn.Embed:
            return nn.Embed(
                rows,
                w,
                dtype=dt,
                embedding_init=nn.with_logical_partitioning(_small_normal, ("vocab", "embed")),
                name=name,
            )

        sequence = jnp.concatenate(
            [
                table("text_embedding", self.vocab_size)(input_ids),
                dense(w, ("embed", "mlp"), name="text_embed_proj", dtype=dt)(z_t)[:, None],
                table("dot_embedding", self.num_buckets)(dot)[:, None],
                table("token_embedding", self.num_buckets)(tokens[:, :-1]),
            ],
            axis=1,
        )
        total = length + 1 + self.num_tokens
        position = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(_small_normal, (None, None, "embed")),
            (1, total, w),
        )
        h = sequence + position.astype(dt)
        valid = jnp.concatenate([text_mask, jnp.ones((b, 1 + self.num_tokens), bool)], axis=1)
        h = causal_blocks(self, h, valid, deterministic=deterministic)
        h = layer_norm("norm_out", dt)(h[:, length + 1 :])
        # The K-way logits in float32 whatever the compute dtype (a 1024-way softmax).
        logits = dense(self.num_buckets, ("embed", "vocab"), name="to_logits", dtype=jnp.float32)
        return logits(h.astype(jnp.float32))
