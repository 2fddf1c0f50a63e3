"""The ADM/GLIDE U-Net family of unCLIP: the 64 px decoder and the attention-free upsamplers.

Layout (NHWC throughout), as Dhariwal & Nichol's ADM with GLIDE's attention:

- `timestep_embedding` -> `time_embedding` MLP (Dense 4C, SiLU, Dense 4C); an optional extra
  embedding (the projection of z_i and of the pooled caption, from `DecoderConditioning`) is
  added after the MLP.
- down path: `conv_in`, then per level `num_res_blocks` x (`ResBlock` [+ `AttentionBlock`]) and,
  between levels, a down-sampling `ResBlock` (ADM's resblock_updown);
- middle: `ResBlock`, `AttentionBlock`, `ResBlock`;
- up path: mirrored with `num_res_blocks + 1` blocks per level, each fed the concatenation
  [h, skip], and an up-sampling `ResBlock` between levels;
- out: GroupNorm, SiLU, zero-initialised conv.

Module and param names follow diffusers' `UNet2DConditionModel` / `UNet2DModel` with the
`ResnetDownsampleBlock2D` / `SimpleCrossAttn*` blocks Karlo uses, and `UnCLIPTextProjModel`
(`down_blocks.1.attentions.0.to_q` is `down_blocks_1/attentions_0/to_q` here; Linear `weight`
is Dense `kernel` transposed, Conv2d `weight` (O, I, kh, kw) is Conv `kernel` (kh, kw, I, O),
GroupNorm/LayerNorm `weight` is `scale`), so importing Karlo's weights is a rename.

Every param has logical axis names (`unclip_jax.parallel.rules`). Every block's input and output
is pinned to batch-only sharding with `nn.with_logical_constraint`: jax 0.10.2's SPMD
partitioner miscompiles a convolution whose input is sharded along H on the mesh axis that also
shards the kernel's output channels, so XLA must never be left to shard a spatial dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.layers import GroupNorm, dense, layer_norm, torch_default_init

Array = jax.Array

# Activation sharding of every NHWC feature map at block boundaries: batch only.
IMAGE_AXES = ("batch", "activation_height", "activation_width", "activation_channels")
TOKEN_AXES = ("batch", "activation_length", "activation_embed")


def coordinate_grid(batch: int, height: int, width: int, dtype: Any = jnp.float32) -> Array:
    """(B, H, W, 2): each pixel centre's (y, x), from -1 (top, left) to 1 (bottom, right)."""
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    grid = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).astype(dtype)
    return jnp.broadcast_to(grid, (batch, height, width, 2))


def space_to_depth(x: Array, patch: int) -> Array:
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch stacked on channels, (dy, dx, c)
    order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x: Array, patch: int) -> Array:
    """The inverse of `space_to_depth`: (B, h, w, p*p*C) -> (B, h*p, w*p, C)."""
    b, h, w, pc = x.shape
    c = pc // (patch * patch)
    x = x.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, c)


def _pin_image(x: Array) -> Array:
    return nn.with_logical_constraint(x, IMAGE_AXES)


def _conv(
    features: int,
    *,
    kernel: int = 3,
    name: str,
    dtype: Any,
    zero_init: bool = False,
) -> nn.Conv:
    """A 'same'-padded stride-1 convolution with logical axis names on kernel and bias."""
    init = nn.initializers.zeros if zero_init else torch_default_init
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((kernel // 2, kernel // 2), (kernel // 2, kernel // 2)),
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
            init, ("conv_height", "conv_width", "channels_in", "channels")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
        name=name,
    )


def _group_norm(num_groups: int, eps: float, *, name: str, dtype: Any) -> GroupNorm:
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)


def timestep_embedding(
    t: Array, dim: int, *, flip_sin_to_cos: bool = True, max_period: float = 10000.0
) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim), float32.

    With half = dim // 2 and freq_k = exp(-ln(max_period) * k / half), k = 0 .. half-1:
        emb = [cos(t freq_k)]_k ++ [sin(t freq_k)]_k   (flip_sin_to_cos=True, Karlo/ADM order)
        emb = [sin(t freq_k)]_k ++ [cos(t freq_k)]_k   (flip_sin_to_cos=False)
    and one zero column appended when dim is odd. This is diffusers' `get_timestep_embedding`
    with downscale_freq_shift=0 and scale=1 (ADM's `timestep_embedding` when flipped).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def upsample_nearest_2x(x: Array) -> Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated (PyTorch's nearest interpolation)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x(x: Array) -> Array:
    """(B, H, W, C) -> (B, H/2, W/2, C), the mean of each 2x2 patch (H and W must be even)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm (diffusers' `ResnetBlock2D`, "scale_shift").

        h = conv1(resample(SiLU(norm1(x))))
        scale, shift = split(time_emb_proj(SiLU(emb)))      (first half scale, as ADM)
        h = norm2(h) * (1 + scale) + shift
    or, with `scale_shift=False` (ADM's use_scale_shift_norm=False, diffusers' "default", as
    Karlo's super-res U-Nets), h = norm2(h + time_emb_proj(SiLU(emb)));
        h = conv2(dropout(SiLU(h)))                          (conv2 zero-initialised, as ADM)
        out = skip(resample(x)) + h
    `resample` is nearest 2x up (`up`) or 2x2 average pooling (`down`), applied to both h and
    x (ADM's resblock_updown); `skip` is a 1x1 conv when the channel count changes.
    """

    out_channels: int
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, deterministic: bool = True) -> Array:
        """x (B, H, W, Cin), emb (B, E) -> (B, H', W', out_channels)."""
        if self.up and self.down:
            raise ValueError("a ResBlock resamples up or down, not both")
        x = _pin_image(x)
        c = self.out_channels
        h = _group_norm(self.num_groups, self.norm_eps, name="norm1", dtype=self.dtype)(x)
        h = nn.silu(h)
        if self.up:
            h, x = upsample_nearest_2x(h), upsample_nearest_2x(x)
        elif self.down:
            h, x = avg_pool_2x(h), avg_pool_2x(x)
        h = _conv(c, name="conv1", dtype=self.dtype)(h)

        width = 2 * c if self.scale_shift else c
        temb = dense(width, ("embed", "channels"), name="time_emb_proj", dtype=self.dtype)(
            nn.silu(emb)
        )[:, None, None, :]
        norm2 = _group_norm(self.num_groups, self.norm_eps, name="norm2", dtype=self.dtype)
        if self.scale_shift:
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + temb)
        h = nn.Dropout(self.dropout, name="dropout")(nn.silu(h), deterministic=deterministic)
        h = _conv(c, name="conv2", dtype=self.dtype, zero_init=True)(h)

        if x.shape[-1] != c:
            x = _conv(c, kernel=1, name="conv_shortcut", dtype=self.dtype)(x)
        return _pin_image(x + h)


class AttentionBlock(nn.Module):
    """GLIDE attention: spatial self-attention with context tokens as extra keys and values.

    With n = GroupNorm(x) flattened to H*W tokens and c the context tokens (B, Lc, Dc):
        q = to_q(n),  k = [add_k_proj(c) ; to_k(n)],  v = [add_v_proj(c) ; to_v(n)]
        out = x + to_out(softmax(q k^T / sqrt(head_channels) + mask) v)
    per head of `head_channels` channels; the context keys come BEFORE the spatial ones
    (GLIDE's encoder_kv, diffusers' `AttnAddedKVProcessor`). `context_mask` (B, Lc) marks the
    valid context tokens; masked ones get zero weight (spatial keys are always valid, so no
    row is ever fully masked). Logits and softmax are float32.

    The q/k/v projections are separate Denses (diffusers' to_q/to_k/to_v/add_k_proj/add_v_proj)
    rather than GLIDE's fused 1x1 qkv conv and encoder_kv Dense: the same maps, a rename for
    Karlo's weights (GLIDE's would be a split). to_out is zero-initialised (ADM).
    """

    head_channels: int = 64
    num_groups: int = 32
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None = None, context_mask: Array | None = None
    ) -> Array:
        """x (B, H, W, C), context (B, Lc, Dc) or None, context_mask (B, Lc) -> (B, H, W, C)."""
        x = _pin_image(x)
        b, hh, ww, c = x.shape
        if c % self.head_channels:
            raise ValueError(
                f"channels {c} are not a multiple of head_channels {self.head_channels}"
            )
        heads, d = c // self.head_channels, self.head_channels

        n = _group_norm(self.num_groups, self.norm_eps, name="group_norm", dtype=self.dtype)(x)
        n = nn.with_logical_constraint(n.reshape(b, hh * ww, c), TOKEN_AXES)

        def proj(name: str, inp: Array) -> Array:
            y = dense(c, ("embed", "heads"), name=name, dtype=self.dtype)(inp)
            return y.reshape(*inp.shape[:-1], heads, d)

        q, k, v = proj("to_q", n), proj("to_k", n), proj("to_v", n)
        if context is not None:
            k = jnp.concatenate([proj("add_k_proj", context), k], axis=1)
            v = jnp.concatenate([proj("add_v_proj", context), v], axis=1)

        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
        if context is not None and context_mask is not None:
            valid = jnp.concatenate(
                [context_mask.astype(bool), jnp.ones((b, hh * ww), dtype=bool)], axis=1
            )
            logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hh * ww, c)
        out = dense(c, ("heads", "embed"), name="to_out_0", dtype=self.dtype, zero_init=True)(out)
        return _pin_image(x + out.reshape(b, hh, ww, c).astype(x.dtype))


class _BlockFields(nn.Module):
    """Fields shared by the U-Net's blocks."""

    out_channels: int
    num_layers: int
    attention: bool = False
    resample: bool = False
    head_channels: int = 64
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = True
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    def res(self, out: int, name: str, **kw: Any) -> ResBlock:
        # `deterministic` (argument 3, after self, x, emb) is a Python bool: static under remat.
        block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        return block(
            out,
            dropout=self.dropout,
            num_groups=self.num_groups,
            norm_eps=self.norm_eps,
            scale_shift=self.scale_shift,
            dtype=self.dtype,
            name=name,
            **kw,
        )

    def attn(self, name: str) -> AttentionBlock:
        block = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        return block(
            self.head_channels,
            num_groups=self.num_groups,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            name=name,
        )


class DownBlock(_BlockFields):
    """`num_layers` x (ResBlock [+ attention]), then a down-sampling ResBlock if `resample`.

    diffusers' `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D`; returns the output and
    every intermediate output (the skips the up path consumes).
    """

    @nn.compact
    def __call__(
        self,
        h: Array,
        temb: Array,
        context: Array | None,
        context_mask: Array | None,
        *,
        deterministic: bool,
    ) -> tuple[Array, list[Array]]:
        skips = []
        for j in range(self.num_layers):
            h = self.res(self.out_channels, f"resnets_{j}")(h, temb, deterministic)
            if self.attention:
                h = self.attn(f"attentions_{j}")(h, context, context_mask)
            skips.append(h)
        if self.resample:
            h = self.res(self.out_channels, "downsamplers_0", down=True)(h, temb, deterministic)
            skips.append(h)
        return h, skips


class UpBlock(_BlockFields):
    """`num_layers` x (ResBlock on [h ; skip] [+ attention]), then an up-sampling ResBlock.

    diffusers' `ResnetUpsampleBlock2D` / `SimpleCrossAttnUpBlock2D`; `skips` are consumed from
    the end (the most recent down-path output first).
    """

    @nn.compact
    def __call__(
        self,
        h: Array,
        skips: list[Array],
        temb: Array,
        context: Array | None,
        context_mask: Array | None,
        *,
        deterministic: bool,
    ) -> Array:
        skips = list(skips)
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self.res(self.out_channels, f"resnets_{j}")(h, temb, deterministic)
            if self.attention:
                h = self.attn(f"attentions_{j}")(h, context, context_mask)
        if self.resample:
            h = self.res(self.out_channels, "upsamplers_0", up=True)(h, temb, deterministic)
        return h


class MidBlock(_BlockFields):
    """ResBlock, attention (if `attention`), ResBlock (`UNetMidBlock2DSimpleCrossAttn`)."""

    @nn.compact
    def __call__(
        self,
        h: Array,
        temb: Array,
        context: Array | None,
        context_mask: Array | None,
        *,
        deterministic: bool,
    ) -> Array:
        h = self.res(self.out_channels, "resnets_0")(h, temb, deterministic)
        if self.attention:
            h = self.attn("attentions_0")(h, context, context_mask)
        return self.res(self.out_channels, "resnets_1")(h, temb, deterministic)


class TimestepEmbedding(nn.Module):
    """sinusoid(t) (B, C) -> Dense(E) -> SiLU -> Dense(E) (diffusers' `TimestepEmbedding`)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.features, ("embed", "mlp"), name="linear_1", dtype=self.dtype)(x)
        return dense(self.features, ("mlp", "embed"), name="linear_2", dtype=self.dtype)(nn.silu(h))


class UNet(nn.Module):
    """ADM/GLIDE U-Net: the unCLIP decoder (with attention and context) or an upsampler.

    The decoder (Table 3): channels 512, channel_mult (1, 2, 3, 4), num_res_blocks 3,
    attention_resolutions (32, 16, 8), head_channels 64, resolution 64, in 3, out 6 (mean and
    the learned-range variance interpolation). An upsampler: attention_resolutions (),
    mid_attention False, in_channels 6 (see `upsampler_input`), out 3, no context; having no
    attention it is fully convolutional and runs at any size divisible by
    patch_size 2**(levels - 1).
    `resolution` only turns `attention_resolutions` (pixels) into levels.
    """

    in_channels: int = 3
    out_channels: int = 6
    channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = ()
    head_channels: int = 64
    dropout: float = 0.0
    resolution: int = 64
    mid_attention: bool = True
    time_embed_dim: int | None = None  # default 4 * channels
    num_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = True  # ResBlock's time conditioning: scale-shift norm, or an add
    # Two more input channels holding each pixel's (y, x) in [-1, 1]: a position signal the
    # convolutions otherwise only get from the zero padding at the border (CoordConv). Off in
    # the paper's and Karlo's U-Nets.
    coord_channels: bool = False
    # The U-Net runs on patch_size x patch_size patches stacked on channels (`space_to_depth`)
    # and unstacks its output (not in the paper): p = 2 drops the full-resolution level, most
    # of a small U-Net's cost. `resolution` stays the image's; `attention_resolutions` name
    # feature-map sizes (resolution / (patch_size 2^level)).
    patch_size: int = 1
    # A small full-resolution head after the patched U-Net (0: none; needs patch_size > 1):
    # two 3x3 convolutions with this many channels, at the image's own pixels, reading the
    # U-Net's unstacked output next to the input x_t and adding a correction to it (zero at
    # initialisation). A patched U-Net sees pixels only through its patches' linear embedding
    # and read-out; at low noise the eps/v target is x_t's pixel-level detail.
    pixel_head: int = 0
    dtype: Any = jnp.float32
    # Rematerialisation: each ResBlock and attention block recomputes its activations in the
    # backward pass instead of keeping them (less memory, about a third more compute).
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        *,
        emb: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """x (B, H, W, in_channels), t (B,) -> (B, H, W, out_channels).

        `emb` (B, time_embed_dim) is added to the timestep embedding after its MLP (diffusers'
        class_embed_type "identity"); `context` (B, Lc, Dc) with `context_mask` (B, Lc) feeds
        the attention blocks.
        """
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[-1]}")
        if self.pixel_head and self.patch_size == 1:
            raise ValueError("pixel_head refines a patched U-Net's output: it needs patch_size > 1")
        levels = len(self.channel_mult)
        factor = self.patch_size * 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"H and W {x.shape[1:3]} must be divisible by {factor}")
        dt = self.dtype
        common = dict(
            head_channels=self.head_channels,
            dropout=self.dropout,
            num_groups=self.num_groups,
            norm_eps=self.norm_eps,
            scale_shift=self.scale_shift,
            dtype=dt,
            remat=self.remat,
        )
        cond = dict(context=context, context_mask=context_mask, deterministic=deterministic)

        def attends(level: int) -> bool:
            return self.resolution // (self.patch_size * 2**level) in self.attention_resolutions

        temb = timestep_embedding(t, self.channels).astype(dt)
        temb = TimestepEmbedding(
            self.time_embed_dim or 4 * self.channels, dtype=dt, name="time_embedding"
        )(temb)
        if emb is not None:
            temb = temb + emb.astype(temb.dtype)

        x = x.astype(dt)
        if self.coord_channels:
            x = jnp.concatenate([x, coordinate_grid(x.shape[0], x.shape[1], x.shape[2], dt)], -1)
        pixels = x
        if self.patch_size > 1:
            x = space_to_depth(x, self.patch_size)
        h = _conv(self.channels, name="conv_in", dtype=dt)(_pin_image(x))
        skips = [h]
        for i, mult in enumerate(self.channel_mult):
            h, level_skips = DownBlock(
                self.channels * mult,
                self.num_res_blocks,
                attention=attends(i),
                resample=i < levels - 1,
                name=f"down_blocks_{i}",
                **common,
            )(h, temb, **cond)
            skips += level_skips

        h = MidBlock(h.shape[-1], 1, attention=self.mid_attention, name="mid_block", **common)(
            h, temb, **cond
        )

        # up_blocks_0 is the lowest resolution (diffusers' order).
        for u, i in enumerate(reversed(range(levels))):
            n = self.num_res_blocks + 1
            level_skips, skips = skips[-n:], skips[:-n]
            h = UpBlock(
                self.channels * self.channel_mult[i],
                n,
                attention=attends(i),
                resample=i > 0,
                name=f"up_blocks_{u}",
                **common,
            )(h, level_skips, temb, **cond)
        assert not skips

        h = _group_norm(self.num_groups, self.norm_eps, name="conv_norm_out", dtype=dt)(h)
        p2 = self.patch_size**2
        h = _conv(self.out_channels * p2, name="conv_out", dtype=dt, zero_init=True)(nn.silu(h))
        if self.patch_size > 1:
            h = depth_to_space(h, self.patch_size)
        if self.pixel_head:
            r = _conv(self.pixel_head, name="pixel_head_in", dtype=dt)(
                _pin_image(jnp.concatenate([h, pixels], -1))
            )
            t_bias = dense(self.pixel_head, ("embed", "channels"), name="pixel_head_time", dtype=dt)
            r = nn.silu(r + t_bias(nn.silu(temb))[:, None, None, :])
            h = h + _conv(self.out_channels, name="pixel_head_out", dtype=dt, zero_init=True)(r)
        return _pin_image(h)


class DecoderConditioning(nn.Module):
    """unCLIP's conditioning of the decoder (diffusers' `UnCLIPTextProjModel`, Karlo).

    Inputs: z_i (B, clip_dim) the CLIP image embedding, `text_embeds` (B, clip_dim) the pooled
    caption embedding, `text_states` (B, L, Dt) the caption encoder's hidden states with
    `text_mask` (B, L), and optional boolean drop masks (B,) for guidance training.
        z = null where drop_image else z_i                (learned null embedding)
        emb_add = clip_image_embeddings_project_to_time_embeddings(z) + embedding_proj(pooled)
        tokens = clip_extra_context_tokens_proj(z) reshaped (B, cross_dim, 4) -> (B, 4, cross_dim)
        context = [tokens ; LayerNorm(encoder_hidden_states_proj(text_states))]
        context_mask = [1, 1, 1, 1 ; text_mask]
    The channel-major token layout (reshape to (B, cross_dim, 4), then swap the last two axes)
    is Karlo's, so its weights import unchanged.

    Caption dropping (`drop_text`): the caption states are masked out entirely (their mask set
    to zero, so the attention sees only the 4 z_i tokens and the spatial tokens) and the pooled
    caption embedding is zeroed (emb_add keeps only embedding_proj's bias). Karlo's sampler
    instead encodes the empty caption "" for its unconditional branch; a sampler using imported
    Karlo weights should do that rather than set drop_text.
    """

    clip_dim: int = 768
    time_embed_dim: int = 1280
    cross_dim: int = 1536
    num_extra_tokens: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        z_i: Array,
        text_embeds: Array,
        text_states: Array,
        text_mask: Array,
        *,
        drop_image: Array | None = None,
        drop_text: Array | None = None,
    ) -> tuple[Array, Array, Array]:
        """-> (emb_add (B, time_embed_dim), context (B, 4 + L, cross_dim), mask (B, 4 + L))."""
        dt = self.dtype
        b = z_i.shape[0]
        null = self.param(
            "learned_classifier_free_guidance_embeddings",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (self.clip_dim,),
        )
        z = z_i.astype(dt)
        if drop_image is not None:
            z = jnp.where(drop_image.astype(bool)[:, None], jnp.asarray(null, dt)[None], z)
        text_mask = text_mask.astype(bool)
        text_embeds = text_embeds.astype(dt)
        if drop_text is not None:
            drop_text = drop_text.astype(bool)
            text_mask = text_mask & ~drop_text[:, None]
            text_embeds = jnp.where(drop_text[:, None], 0, text_embeds)

        def proj(features: int, name: str) -> nn.Dense:
            return dense(features, ("embed", "mlp"), name=name, dtype=dt)

        emb_add = proj(self.time_embed_dim, "clip_image_embeddings_project_to_time_embeddings")(
            z
        ) + proj(self.time_embed_dim, "embedding_proj")(text_embeds)

        n = self.num_extra_tokens
        tokens = proj(n * self.cross_dim, "clip_extra_context_tokens_proj")(z)
        tokens = tokens.reshape(b, self.cross_dim, n).swapaxes(1, 2)
        states = proj(self.cross_dim, "encoder_hidden_states_proj")(text_states.astype(dt))
        states = layer_norm("text_encoder_hidden_states_norm", dt)(states)
        context = nn.with_logical_constraint(jnp.concatenate([tokens, states], axis=1), TOKEN_AXES)
        mask = jnp.concatenate([jnp.ones((b, n), dtype=bool), text_mask], axis=1)
        return emb_add, context, mask


class Decoder(nn.Module):
    """The whole conditioned decoder: `DecoderConditioning` ("text_proj") + `UNet` ("unet"),
    and optionally its own caption encoder ("caption_encoder").

    Two ways to encode the caption (the paper leaves it open):
    - Karlo's: a frozen CLIP text tower outside this module; pass its pooled projection
      `text_embeds` (B, D) and its last hidden states `text_states` (B, L, W).
    - GLIDE's: `caption_encoder`, a transformer trained with the decoder (CLIP's text tower
      architecture, `models.clip.TextTransformer`); pass `input_ids` (B, L) and the decoder
      encodes them itself, its pooled end-of-text state playing `text_embeds`.
    `text_mask` (B, L) marks the valid caption tokens either way. The submodule names are the
    unCLIP pipeline's components (`text_proj`; diffusers calls the U-Net `decoder`).
    """

    unet: UNet
    text_proj: DecoderConditioning
    caption_encoder: nn.Module | None = None

    @property
    def self_conditioned(self) -> bool:
        """Whether the U-Net reads the previous x0 estimate next to x_t (6 input channels)."""
        return self.unet.in_channels == 6

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        z_i: Array,
        text_embeds: Array | None = None,
        text_states: Array | None = None,
        text_mask: Array | None = None,
        *,
        input_ids: Array | None = None,
        drop_image: Array | None = None,
        drop_text: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """x_t (B, H, W, 3), t (B,), z_i (B, D), the caption as above -> (B, H, W, out).

        A self-conditioned decoder (`self_conditioned`) reads [x_t ; x0_prev] (B, H, W, 6)."""
        if text_mask is None:
            raise ValueError("the decoder needs text_mask (B, L), the valid caption tokens")
        if self.caption_encoder is not None:
            if input_ids is None:
                raise ValueError("this decoder encodes captions itself: pass input_ids")
            text_states, text_embeds = self.caption_encoder(input_ids, text_mask)
        elif text_embeds is None or text_states is None:
            raise ValueError(
                "this decoder reads a CLIP text encoder's outputs: pass text_embeds and text_states"
            )
        emb, context, mask = self.text_proj(
            z_i, text_embeds, text_states, text_mask, drop_image=drop_image, drop_text=drop_text
        )
        return self.unet(
            x, t, emb=emb, context=context, context_mask=mask, deterministic=deterministic
        )


class LastStepUNets(nn.Module):
    """Two U-Nets of one architecture, as Karlo's super-res stage has them: `super_res_first`
    denoises every sampling step but the last, `super_res_last` the last one (t = 0).

    `last` picks the net (a Python bool; a sampler selects with `jax.lax.cond` on the step).
    `init` initialises both. Param names are diffusers' component names.
    """

    super_res_first: UNet
    super_res_last: UNet

    def __call__(
        self, x: Array, t: Array, *, last: bool = False, deterministic: bool = True
    ) -> Array:
        """x (B, H, W, in_channels), t (B,) -> (B, H, W, out_channels) of the chosen net."""
        if self.is_initializing():
            self.super_res_last(x, t, deterministic=deterministic)
            return self.super_res_first(x, t, deterministic=deterministic)
        net = self.super_res_last if last else self.super_res_first
        return net(x, t, deterministic=deterministic)


def upsampler_input(x_t: Array, low_res: Array, *, method: str = "bicubic") -> Array:
    """[x_t ; resize(low_res to x_t's H, W)] on channels: (B, H, W, C) + (B, h, w, C') -> C+C'.

    `method` is a `jax.image.resize` method; "bicubic" is Karlo's choice. Its pipeline upsamples
    with PyTorch's `F.interpolate(mode="bicubic", antialias=True)`, whose anti-aliased path uses
    Keys' kernel with a = -0.5 and renormalises the weights at the borders, as jax does: the two
    agree to 2.4e-7 upscaling 16 -> 64 px (PyTorch without antialias, a = -0.75 and clamped
    borders, differs by up to 0.17). The resized image is not clipped.
    """
    b, h, w, _ = x_t.shape
    up = jax.image.resize(low_res, (b, h, w, low_res.shape[-1]), method=method)
    return jnp.concatenate([x_t, up.astype(x_t.dtype)], axis=-1)


def count_params(params: Any) -> int:
    """Number of scalars in a param tree (arrays, ShapeDtypeStructs or boxed leaves)."""
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))
