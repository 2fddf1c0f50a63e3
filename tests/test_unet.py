"""The decoder and upsampler U-Nets (`unclip_jax.models.unet`) at tiny width on CPU."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.unet import (
    AttentionBlock,
    Decoder,
    DecoderConditioning,
    ResBlock,
    UNet,
    coordinate_grid,
    count_params,
    depth_to_space,
    space_to_depth,
    timestep_embedding,
    upsampler_input,
)

B, RES, CLIP, TEXT, L, CROSS, TEMB = 3, 16, 12, 20, 7, 24, 64
TINY = dict(
    channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    head_channels=8,
    resolution=RES,
    num_groups=8,
    time_embed_dim=TEMB,
)
# float32 forward passes of a few hundred ops: rounding stays far below this.
ATOL = 1e-5


def key(seed: int) -> jax.Array:
    """A PRNG key for `init`: the RBG generator compiles ~4x faster than threefry on XLA CPU,
    and these tests spend most of their time compiling."""
    return jax.random.key(seed, impl="unsafe_rbg")


def decoder() -> Decoder:
    return Decoder(
        unet=UNet(in_channels=3, out_channels=6, attention_resolutions=(8,), **TINY),
        text_proj=DecoderConditioning(clip_dim=CLIP, time_embed_dim=TEMB, cross_dim=CROSS),
    )


def upsampler() -> UNet:
    return UNet(
        in_channels=6, out_channels=3, attention_resolutions=(), mid_attention=False, **TINY
    )


def randomise_zeros(params, seed: int):
    """Give every all-zero leaf (zero-init convs, biases, the null embedding) random values.

    ADM zero-initialises the output layers, so at init the output ignores every input; the
    properties below are about the wiring, which needs a generic point in parameter space.
    """
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(params)
    leaves = [
        jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) if not np.any(np.asarray(x)) else x
        for x in leaves
    ]
    return jax.tree.unflatten(tree, leaves)


def inputs(seed: int = 1):
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    mask = np.ones((B, L), bool)
    mask[:, 5:] = False  # the last two caption tokens are padding
    return dict(
        x=normal(B, RES, RES, 3),
        t=jnp.array([3.0, 500.0, 999.0]),
        z_i=normal(B, CLIP),
        text_embeds=normal(B, CLIP),
        text_states=normal(B, L, TEXT),
        text_mask=jnp.asarray(mask),
    )


@pytest.fixture(scope="module")
def dec():
    """(model, boxed params, unboxed params with the zero-init leaves randomised, apply)."""
    model = decoder()
    a = inputs()
    boxed = jax.jit(model.init)(
        key(0),
        a["x"],
        a["t"],
        a["z_i"],
        a["text_embeds"],
        a["text_states"],
        a["text_mask"],
    )["params"]
    params = randomise_zeros(nn.meta.unbox(boxed), 2)

    @jax.jit
    def apply(params, a, drop_image=None, drop_text=None):
        return model.apply(
            {"params": params},
            a["x"],
            a["t"],
            a["z_i"],
            a["text_embeds"],
            a["text_states"],
            a["text_mask"],
            drop_image=drop_image,
            drop_text=drop_text,
        )

    return model, boxed, params, apply


def unboxed_leaf_paths(boxed) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    return [jax.tree_util.keystr(p) for p, x in flat if not isinstance(x, nn.LogicallyPartitioned)]


# --- shapes and sharding names -------------------------------------------------------------


def test_decoder_output_shape_and_logical_names(dec):
    _, boxed, params, apply = dec
    out = apply(params, inputs())
    assert out.shape == (B, RES, RES, 6)  # mean (3) + learned-range variance (3)
    assert np.all(np.isfinite(np.asarray(out)))
    assert unboxed_leaf_paths(boxed) == []
    # The conditioning and the U-Net sit side by side, with diffusers' block names.
    assert set(boxed) == {"text_proj", "unet"}
    assert {"down_blocks_0", "down_blocks_1", "mid_block", "up_blocks_0", "up_blocks_1"} <= set(
        boxed["unet"]
    )
    assert "attentions_0" in boxed["unet"]["down_blocks_1"]  # 8 px level attends
    assert "attentions_0" not in boxed["unet"]["down_blocks_0"]  # 16 px level does not


def test_upsampler_shape_names_and_no_attention():
    model = upsampler()
    x = upsampler_input(jnp.zeros((2, RES, RES, 3)), jnp.zeros((2, RES // 4, RES // 4, 3)))
    boxed = jax.jit(model.init)(key(0), x, jnp.zeros((2,)))["params"]
    out = jax.jit(model.apply)({"params": boxed}, x, jnp.zeros((2,)))
    assert out.shape == (2, RES, RES, 3)
    assert unboxed_leaf_paths(boxed) == []
    flat, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))
    names = " ".join(jax.tree_util.keystr(p) for p, _ in flat)
    assert "attentions" not in names and "add_k_proj" not in names


# --- conditioning ---------------------------------------------------------------------------


def test_z_i_reaches_output_through_both_paths(dec):
    _, _, params, apply = dec
    a = inputs()
    cond = params["text_proj"]
    zeroed = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731

    def grad_norm(p):
        def f(z):
            return jnp.sum(apply(p, {**a, "z_i": z}) ** 2)

        return float(jnp.linalg.norm(jax.grad(f)(a["z_i"])))

    emb_only = {
        **params,
        "text_proj": {
            **cond,
            "clip_extra_context_tokens_proj": zeroed(cond["clip_extra_context_tokens_proj"]),
        },
    }
    ctx_only = {
        **params,
        "text_proj": {
            **cond,
            "clip_image_embeddings_project_to_time_embeddings": zeroed(
                cond["clip_image_embeddings_project_to_time_embeddings"]
            ),
        },
    }
    neither = {
        **emb_only,
        "text_proj": {
            **emb_only["text_proj"],
            "clip_image_embeddings_project_to_time_embeddings": zeroed(
                cond["clip_image_embeddings_project_to_time_embeddings"]
            ),
        },
    }
    assert grad_norm(emb_only) > 1e-3
    assert grad_norm(ctx_only) > 1e-3
    # Cutting both projections cuts z_i off entirely, so each case above isolates one path.
    assert grad_norm(neither) == 0.0


def test_dropped_z_i_is_the_learned_null_embedding(dec):
    _, _, params, apply = dec
    a = inputs()
    drop = jnp.array([True, False, True])
    other = {**a, "z_i": a["z_i"] + 1.0}
    out, out_other = apply(params, a, drop), apply(params, other, drop)
    np.testing.assert_array_equal(out[drop], out_other[drop])  # dropped rows ignore z_i
    assert float(jnp.max(jnp.abs(out[~drop] - out_other[~drop]))) > 1e-3  # kept rows do not
    # ... and see exactly the learned embedding in z_i's place.
    null = params["text_proj"]["learned_classifier_free_guidance_embeddings"]
    assert float(jnp.max(jnp.abs(null))) > 0  # randomised: not the same as zeroing z_i
    as_null = apply(params, {**a, "z_i": jnp.broadcast_to(null, a["z_i"].shape)})
    np.testing.assert_allclose(out[drop], as_null[drop], atol=ATOL)


def test_dropped_caption_is_ignored(dec):
    _, _, params, apply = dec
    a = inputs()
    drop = jnp.array([False, True, False])
    other = {
        **a,
        "text_states": a["text_states"] + 1.0,
        "text_embeds": a["text_embeds"] - 1.0,
    }
    out, out_other = apply(params, a, None, drop), apply(params, other, None, drop)
    np.testing.assert_array_equal(out[drop], out_other[drop])
    assert float(jnp.max(jnp.abs(out[~drop] - out_other[~drop]))) > 1e-3


def test_padded_caption_tokens_do_not_change_the_output(dec):
    _, _, params, apply = dec
    a = inputs()
    pad = ~np.asarray(a["text_mask"])
    noisy = a["text_states"] + 100.0 * pad[..., None]
    out = apply(params, a)
    np.testing.assert_allclose(apply(params, {**a, "text_states": noisy}), out, atol=ATOL)
    # Valid tokens do change it (so the comparison above is not vacuous).
    moved = a["text_states"] + (~pad)[..., None]
    assert float(jnp.max(jnp.abs(apply(params, {**a, "text_states": moved}) - out))) > 1e-3


def test_conditioning_layout_is_karlos():
    """Tokens channel-major: token k, channel c is projection output c * 4 + k (Karlo)."""
    cond = DecoderConditioning(clip_dim=CLIP, time_embed_dim=TEMB, cross_dim=CROSS)
    a = inputs()
    args = (a["z_i"], a["text_embeds"], a["text_states"], a["text_mask"])
    params = nn.meta.unbox(cond.init(key(0), *args)["params"])
    emb, context, mask = cond.apply({"params": params}, *args)
    assert emb.shape == (B, TEMB) and context.shape == (B, 4 + L, CROSS)
    np.testing.assert_array_equal(mask[:, :4], True)
    np.testing.assert_array_equal(mask[:, 4:], a["text_mask"])
    p = params["clip_extra_context_tokens_proj"]
    flat = np.asarray(a["z_i"] @ p["kernel"] + p["bias"])  # (B, 4 * CROSS)
    want = flat.reshape(B, CROSS, 4).transpose(0, 2, 1)
    np.testing.assert_allclose(context[:, :4], want, atol=ATOL)


# --- attention ------------------------------------------------------------------------------


def _self_attention_reference(params, x, *, head_channels, groups, eps=1e-5):
    """GroupNorm + multi-head self-attention + residual, in numpy."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    n = ((g - mean) / np.sqrt(var + eps)).reshape(b, h * w, c)
    n = n * params["group_norm"]["scale"] + params["group_norm"]["bias"]

    def lin(name, y):
        return y @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"])

    heads = c // head_channels
    q, k, v = (
        lin(n_, n).reshape(b, h * w, heads, head_channels) for n_ in ("to_q", "to_k", "to_v")
    )
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_channels)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h * w, c)
    return x + lin("to_out_0", out).reshape(b, h, w, c)


def test_attention_without_context_is_self_attention():
    block = AttentionBlock(head_channels=8, num_groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 10))
    params = nn.meta.unbox(block.init(key(2), x, ctx)["params"])
    params = randomise_zeros(params, 3)
    got = block.apply({"params": params}, x)
    want = _self_attention_reference(params, x, head_channels=8, groups=4)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # A fully masked context is the same as none; an unmasked one is not.
    masked = block.apply({"params": params}, x, ctx, jnp.zeros((2, 3), bool))
    np.testing.assert_allclose(masked, got, atol=ATOL)
    assert float(jnp.max(jnp.abs(block.apply({"params": params}, x, ctx) - got))) > 1e-3


# --- upsampler ------------------------------------------------------------------------------


def test_upsampler_is_fully_convolutional():
    """Initialised on 16x16 crops, the same params run on 32x32 images (no attention, no
    size-dependent params), conditioned on the low-res image."""
    model = upsampler()
    crop = upsampler_input(jnp.zeros((1, RES, RES, 3)), jnp.zeros((1, RES // 4, RES // 4, 3)))
    params = nn.meta.unbox(jax.jit(model.init)(key(0), crop, jnp.zeros((1,)))["params"])
    params = randomise_zeros(params, 1)
    rng = np.random.default_rng(2)
    x_t = jnp.asarray(rng.standard_normal((1, 2 * RES, 2 * RES, 3)), jnp.float32)
    low = jnp.asarray(rng.standard_normal((1, RES // 2, RES // 2, 3)), jnp.float32)

    @jax.jit
    def run(low):
        return model.apply({"params": params}, upsampler_input(x_t, low), jnp.array([10.0]))

    out = run(low)
    assert out.shape == (1, 2 * RES, 2 * RES, 3)
    assert np.all(np.isfinite(np.asarray(out)))
    assert float(jnp.max(jnp.abs(run(-low) - out))) > 1e-3  # the low-res image matters


def test_upsampler_input_concatenates_the_resized_low_res():
    x_t = jnp.ones((2, 8, 8, 3))
    low = jnp.full((2, 4, 4, 3), 0.25)
    got = upsampler_input(x_t, low)
    assert got.shape == (2, 8, 8, 6)
    np.testing.assert_array_equal(got[..., :3], x_t)
    np.testing.assert_allclose(got[..., 3:], 0.25, atol=1e-6)  # resizing a constant image


# --- pieces ---------------------------------------------------------------------------------


def _diffusers_timestep_embedding(
    t, dim, flip_sin_to_cos, downscale_freq_shift=0.0, max_period=1e4
):
    """diffusers.models.embeddings.get_timestep_embedding, in numpy."""
    half = dim // 2
    exponent = (
        -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - downscale_freq_shift)
    )
    emb = np.asarray(t, np.float32)[:, None] * np.exp(exponent)[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


@pytest.mark.parametrize("dim", [16, 320, 7])
@pytest.mark.parametrize("flip", [True, False])
def test_timestep_embedding_matches_diffusers(dim, flip):
    t = np.array([0.0, 1.0, 17.0, 250.5, 999.0])
    got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip)
    # float32 sin/cos of arguments up to 1e3: ~1e-4 absolute rounding in either implementation.
    np.testing.assert_allclose(got, _diffusers_timestep_embedding(t, dim, flip), atol=2e-4)


def test_resblock_resamples_and_skips():
    emb = jnp.zeros((2, 8))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
    for kw, side in (({}, 8), ({"up": True}, 16), ({"down": True}, 4)):
        block = ResBlock(32, num_groups=8, **kw)
        out = jax.eval_shape(lambda b=block: b.init_with_output(key(1), x, emb)[0])
        assert out.shape == (2, side, side, 32)
    # conv2 is zero-initialised: at init a block is its (resampled) skip connection.
    block = ResBlock(16, num_groups=8, down=True)
    params = block.init(key(1), x, emb)["params"]
    pooled = x.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
    np.testing.assert_allclose(block.apply({"params": params}, x, emb), pooled, atol=ATOL)


def test_count_params():
    cin, cout, e = 16, 32, 8
    block = ResBlock(cout, num_groups=8)
    x, emb = jnp.zeros((1, 8, 8, cin)), jnp.zeros((1, e))
    params = block.init(key(0), x, emb)["params"]
    want = (
        2 * cin  # norm1
        + 9 * cin * cout
        + cout  # conv1
        + e * 2 * cout
        + 2 * cout  # time_emb_proj
        + 2 * cout  # norm2
        + 9 * cout * cout
        + cout  # conv2
        + cin * cout
        + cout  # conv_shortcut (1x1)
    )
    assert count_params(params) == want
    abstract = jax.eval_shape(lambda: block.init(key(0), x, emb)["params"])
    assert count_params(abstract) == want


def test_coordinate_channels_give_each_pixel_its_place():
    """coord_channels appends (y, x) of each pixel centre in [-1, 1] to the input, so conv_in
    reads 5 channels; the grid runs top to bottom and left to right."""
    grid = np.asarray(coordinate_grid(2, 4, 8))
    assert grid.shape == (2, 4, 8, 2)
    np.testing.assert_allclose(grid[0, :, 0, 0], [-0.75, -0.25, 0.25, 0.75])  # y, downwards
    np.testing.assert_allclose(grid[1, 0, :, 1], (np.arange(8) + 0.5) / 4 - 1)  # x, rightwards
    model = UNet(in_channels=3, out_channels=3, coord_channels=True, **TINY)
    params = jax.jit(model.init)(key(0), jnp.zeros((1, RES, RES, 3)), jnp.zeros((1,)))["params"]
    assert nn.meta.unbox(params)["conv_in"]["kernel"].shape == (3, 3, 5, TINY["channels"])


def test_space_to_depth_stacks_each_patch_and_depth_to_space_inverts_it():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # Patch (1, 2) of image 1 holds pixels (2..3, 4..5) in (dy, dx, channel) order.
    want = np.concatenate([x[1, 2, 4], x[1, 2, 5], x[1, 3, 4], x[1, 3, 5]])
    np.testing.assert_array_equal(y[1, 1, 2], want)
    np.testing.assert_array_equal(depth_to_space(y, 2), x)


def test_a_patched_unet_maps_images_to_their_size_with_attention_at_feature_map_sizes():
    """patch_size 2 runs the U-Net on 2x2 patches: conv_in reads 4x the channels, conv_out
    writes 4x and they are unstacked to full size; attention_resolutions name feature maps
    (16 px images: levels at 8 and 4 px, attention at 4)."""
    model = UNet(in_channels=3, out_channels=6, attention_resolutions=(4,), patch_size=2, **TINY)
    x = jax.random.normal(jax.random.key(0), (B, RES, RES, 3))
    params = randomise_zeros(
        nn.meta.unbox(jax.jit(model.init)(key(0), x[:1], jnp.zeros((1,)))["params"]), 1
    )
    assert params["conv_in"]["kernel"].shape == (3, 3, 12, TINY["channels"])
    assert params["conv_out"]["kernel"].shape[-1] == 24
    assert "attentions_0" in params["down_blocks_1"]
    assert "attentions_0" not in params["down_blocks_0"]
    out = model.apply({"params": params}, x, jnp.zeros((B,)))
    assert out.shape == (B, RES, RES, 6)
    # Each output pixel depends on its own input pixel (through its patch), not only on its
    # patch's first pixel: changing pixel (5, 7) changes the output there.
    bumped = model.apply({"params": params}, x.at[:, 5, 7].add(1.0), jnp.zeros((B,)))
    assert float(jnp.max(jnp.abs(bumped - out)[:, 5, 7])) > 1e-4
    with pytest.raises(ValueError, match="divisible by 4"):
        model.apply({"params": params}, jnp.zeros((1, 18, 18, 3)), jnp.zeros((1,)))


def test_a_pixel_head_starts_as_the_patched_unet_and_then_corrects_it():
    """pixel_head adds a full-resolution correction, read from the unstacked output and the
    input pixels, whose last conv starts at zero: at init the output is the patched U-Net's to
    the bit, and once its weights move (here: random) the output moves; it needs patches."""
    plain = UNet(in_channels=3, out_channels=6, patch_size=2, **TINY)
    headed = UNet(in_channels=3, out_channels=6, patch_size=2, pixel_head=8, **TINY)
    x = jax.random.normal(jax.random.key(0), (B, RES, RES, 3))
    t = jnp.full((B,), 10)
    params = nn.meta.unbox(jax.jit(headed.init)(key(0), x[:1], t[:1])["params"])
    assert params["pixel_head_in"]["kernel"].shape == (3, 3, 6 + 3, 8)
    assert params["pixel_head_out"]["kernel"].shape == (3, 3, 8, 6)
    base = {k: v for k, v in params.items() if not k.startswith("pixel_head")}
    np.testing.assert_array_equal(
        headed.apply({"params": params}, x, t), plain.apply({"params": base}, x, t)
    )
    moved = randomise_zeros(params, 1)
    out = headed.apply({"params": moved}, x, t)
    assert out.shape == (B, RES, RES, 6)
    unheaded = {k: v for k, v in moved.items() if not k.startswith("pixel_head")}
    assert float(jnp.max(jnp.abs(out - plain.apply({"params": unheaded}, x, t)))) > 1e-3
    with pytest.raises(ValueError, match=r"pixel_head .* needs patch_size > 1"):
        UNet(in_channels=3, out_channels=6, pixel_head=8, **TINY).init(key(0), x[:1], t[:1])


@pytest.mark.parametrize(
    "groups,channels,dtype", [(8, 16, jnp.float32), (16, 16, jnp.float32), (4, 16, jnp.bfloat16)]
)
def test_group_norm_matches_flax_group_norm_with_the_same_params(groups, channels, dtype):
    # Our GroupNorm replaces flax's for speed: same params (names, shapes, logical axes), same
    # outputs and gradients, so checkpoints and Karlo imports are unaffected.
    from unclip_jax.models.layers import GroupNorm

    x = jax.random.normal(jax.random.key(0), (2, 5, 6, channels)) * 3.0 + 1.5
    ours = GroupNorm(num_groups=groups, dtype=dtype)
    theirs = nn.GroupNorm(num_groups=groups, dtype=dtype)
    boxed = ours.init(jax.random.key(1), x)["params"]
    assert {k: v.names for k, v in boxed.items()} == {"scale": ("norm",), "bias": ("norm",)}
    params = {
        "scale": jax.random.normal(jax.random.key(2), (channels,)),
        "bias": jax.random.normal(jax.random.key(3), (channels,)),
    }
    assert jax.tree.map(jnp.shape, nn.unbox(boxed)) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.key(1), x)["params"]
    )
    y = ours.apply({"params": params}, x.astype(dtype))
    want = theirs.apply({"params": params}, x.astype(dtype))
    assert y.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2  # bf16 keeps 8 bits of mantissa
    np.testing.assert_allclose(np.float32(y), np.float32(want), atol=tol * 4, rtol=tol)

    def grads(module):
        def loss(p, x):
            return jnp.sum(jnp.sin(module.apply({"params": p}, x).astype(jnp.float32)))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    if dtype == jnp.float32:
        for g, w in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs)), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_group_norm_names_the_layer_whose_channels_do_not_split():
    from unclip_jax.models.layers import GroupNorm

    with pytest.raises(ValueError, match=r"GroupNorm norm1: 12 channels .* 8 groups"):
        GroupNorm(num_groups=8, name="norm1").init(jax.random.key(0), jnp.zeros((1, 2, 2, 12)))
