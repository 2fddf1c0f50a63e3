"""Parity of our decoder and upsampler with diffusers' Karlo modules, through the converter.

Tiny sizes (2 levels of 32/64 channels, one resnet per level, 8 norm groups, head dim 16,
a 5-token caption with padding) so that it runs on a CPU in seconds; every weight is random
(the zero-initialised ones perturbed) so that every tensor takes part. Needs the `peers` extra.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the peers extra: pip install -e '.[peers]'")
diffusers = pytest.importorskip(
    "diffusers", reason="needs the peers extra: pip install -e '.[peers]'"
)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

from unclip_jax.convert.diffusers_unet import (  # noqa: E402
    CheckpointKeyError,
    decoder_to_params,
    params_to_text_proj,
    params_to_unet,
    unet_to_params,
)
from unclip_jax.models.unet import Decoder, DecoderConditioning, UNet  # noqa: E402

pytestmark = pytest.mark.peers

# float32 end to end: the outputs must agree to 1e-4 of their own scale (max |output|). Both
# sides compute the same ops in a different order (NCHW vs NHWC convolutions, batched
# matmuls), which costs ~1e-6 relative; a wrong op, layout or param is O(1).
RTOL_OF_SCALE = 1e-4

BATCH, RES, CLIP_DIM, CROSS_DIM, N_TOKENS = 2, 16, 20, 24, 5
CHANNELS, MULT, GROUPS, HEAD = 32, (1, 2), 8, 16
TIME_DIM = 4 * CHANNELS
# Valid caption tokens; element 0 has one padded token, element 1 two. diffusers pads this mask
# by HW zeros inside the attention only when 4 + N_TOKENS != HW, so 9 must not equal the 64
# tokens of the 8x8 attention level (it does not).
TEXT_MASK = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)


def _randomise(module, seed):
    """Every param of a torch module perturbed, so that none is zero, one or symmetric."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * (0.5 * std if std > 0 else 0.1))
    return module.eval()


def _state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _nhwc(x):
    return jnp.asarray(np.transpose(x.numpy(), (0, 2, 3, 1)))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _abstract(module, *args):
    return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)["params"]))


def _assert_close(ours, ref, what):
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert scale > 1e-2, f"{what}: the reference output is ~0, the check would be vacuous"
    assert err <= RTOL_OF_SCALE * scale, f"{what}: max |diff| {err:.3g}, output scale {scale:.3g}"
    return err, scale


def peer_decoder():
    """diffusers' Karlo decoder layout at a tiny size (the `decoder` of UnCLIPPipeline)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=RES,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=tuple(CHANNELS * m for m in MULT),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=HEAD,
        class_embed_type="identity",
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=GROUPS,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def peer_super_res(time_scale_shift="scale_shift"):
    """diffusers' Karlo super-res layout (UNet2DModel, no attention) at a tiny size."""
    torch.manual_seed(1)
    return diffusers.UNet2DModel(
        sample_size=RES,
        in_channels=6,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=tuple(CHANNELS * m for m in MULT),
        down_block_types=("ResnetDownsampleBlock2D",) * len(MULT),
        up_block_types=("ResnetUpsampleBlock2D",) * len(MULT),
        add_attention=False,
        norm_num_groups=GROUPS,
        resnet_time_scale_shift=time_scale_shift,
    )


def our_decoder():
    return Decoder(
        unet=UNet(
            in_channels=3,
            out_channels=6,
            channels=CHANNELS,
            channel_mult=MULT,
            num_res_blocks=1,
            attention_resolutions=(RES // 2,),  # level 1, as SimpleCrossAttnDownBlock2D
            resolution=RES,
            head_channels=HEAD,
            num_groups=GROUPS,
        ),
        text_proj=DecoderConditioning(
            clip_dim=CLIP_DIM, time_embed_dim=TIME_DIM, cross_dim=CROSS_DIM, num_extra_tokens=4
        ),
    )


def our_upsampler(scale_shift=True):
    return UNet(
        scale_shift=scale_shift,
        in_channels=6,
        out_channels=3,
        channels=CHANNELS,
        channel_mult=MULT,
        num_res_blocks=1,
        attention_resolutions=(),
        mid_attention=False,
        resolution=RES,
        num_groups=GROUPS,
    )


def _decoder_inputs():
    g = torch.Generator().manual_seed(42)
    return dict(
        x=torch.randn(BATCH, 3, RES, RES, generator=g),
        t=torch.tensor([3, 717]),
        z_i=torch.randn(BATCH, CLIP_DIM, generator=g),
        text_embeds=torch.randn(BATCH, CLIP_DIM, generator=g),
        text_states=torch.randn(BATCH, N_TOKENS, CLIP_DIM, generator=g),
        text_mask=torch.from_numpy(TEXT_MASK),
    )


@pytest.fixture(scope="module")
def decoder_pair():
    unet = _randomise(peer_decoder(), seed=10)
    text_proj = _randomise(
        UnCLIPTextProjModel(
            clip_extra_context_tokens=4,
            clip_embeddings_dim=CLIP_DIM,
            time_embed_dim=TIME_DIM,
            cross_attention_dim=CROSS_DIM,
        ),
        seed=11,
    )
    ours = our_decoder()
    abstract = _abstract(
        ours,
        jnp.zeros((BATCH, RES, RES, 3)),
        jnp.zeros((BATCH,)),
        jnp.zeros((BATCH, CLIP_DIM)),
        jnp.zeros((BATCH, CLIP_DIM)),
        jnp.zeros((BATCH, N_TOKENS, CLIP_DIM)),
        jnp.ones((BATCH, N_TOKENS), bool),
    )
    params = decoder_to_params(_state_dict(unet), _state_dict(text_proj), abstract)
    return unet, text_proj, ours, params


def test_decoder_equals_diffusers_unclip_decoder(decoder_pair):
    unet, text_proj, ours, params = decoder_pair
    inp = _decoder_inputs()

    # As UnCLIPPipeline with guidance: text_proj puts the learned null embedding in front of
    # the image embeddings (batch element 0 is the unconditional one), and the decoder's
    # attention mask is the caption mask padded on the left by the 4 z_i tokens.
    with torch.no_grad():
        context, emb_add = text_proj(
            image_embeddings=inp["z_i"][1:],
            prompt_embeds=inp["text_embeds"],
            text_encoder_hidden_states=inp["text_states"],
            do_classifier_free_guidance=True,
        )
        mask = F.pad(inp["text_mask"], (4, 0), value=True)
        ref = unet(
            sample=inp["x"],
            timestep=inp["t"],
            encoder_hidden_states=context,
            class_labels=emb_add,
            attention_mask=mask,
        ).sample.numpy()

    drop_image = jnp.array([True, False])
    our_emb, our_context, our_mask = ours.text_proj.apply(
        {"params": params["text_proj"]},
        jnp.asarray(inp["z_i"].numpy()),
        jnp.asarray(inp["text_embeds"].numpy()),
        jnp.asarray(inp["text_states"].numpy()),
        jnp.asarray(TEXT_MASK),
        drop_image=drop_image,
    )
    _assert_close(np.asarray(our_emb), emb_add.numpy(), "text_proj time embedding")
    _assert_close(np.asarray(our_context), context.numpy(), "text_proj context")
    np.testing.assert_array_equal(np.asarray(our_mask), mask.numpy())

    out = ours.apply(
        {"params": params},
        _nhwc(inp["x"]),
        jnp.asarray(inp["t"].numpy(), jnp.float32),
        jnp.asarray(inp["z_i"].numpy()),
        jnp.asarray(inp["text_embeds"].numpy()),
        jnp.asarray(inp["text_states"].numpy()),
        jnp.asarray(TEXT_MASK),
        drop_image=drop_image,
    )
    err, scale = _assert_close(_nchw(out), ref, "decoder output")
    print(f"decoder: max |diff| {err:.3g} at output scale {scale:.3g}")


def test_the_caption_mask_matters(decoder_pair):
    """The padded caption token changes nothing; a valid one does (so the mask is exercised)."""
    _, _, ours, params = decoder_pair
    inp = _decoder_inputs()

    def run(states):
        return np.asarray(
            ours.apply(
                {"params": params},
                _nhwc(inp["x"]),
                jnp.asarray(inp["t"].numpy(), jnp.float32),
                jnp.asarray(inp["z_i"].numpy()),
                jnp.asarray(inp["text_embeds"].numpy()),
                jnp.asarray(states),
                jnp.asarray(TEXT_MASK),
            )
        )

    states = inp["text_states"].numpy()
    base = run(states)
    padded, valid = states.copy(), states.copy()
    padded[0, -1] += 5.0
    valid[0, 0] += 5.0
    np.testing.assert_allclose(run(padded), base, atol=1e-6)
    assert np.abs(run(valid)[0] - base[0]).max() > 1e-3


def test_upsampler_equals_diffusers_super_res_unet():
    peer = _randomise(peer_super_res(), seed=20)
    ours = our_upsampler()
    abstract = _abstract(ours, jnp.zeros((BATCH, RES, RES, 6)), jnp.zeros((BATCH,)))
    params = unet_to_params(_state_dict(peer), abstract, source="tiny super_res")

    g = torch.Generator().manual_seed(43)
    x = torch.randn(BATCH, 6, RES, RES, generator=g)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        ref = peer(sample=x, timestep=t).sample.numpy()
    out = ours.apply({"params": params}, _nhwc(x), jnp.asarray(t.numpy(), jnp.float32))
    err, scale = _assert_close(_nchw(out), ref, "upsampler output")
    print(f"upsampler: max |diff| {err:.3g} at output scale {scale:.3g}")


def test_karlos_additive_time_embedding_equals_diffusers_default_resnets():
    """Karlo's super-res resnets ADD the time embedding (diffusers' "default", ADM's
    use_scale_shift_norm=False): our ResBlock with scale_shift=False, while the scale-shift
    upsampler refuses such a checkpoint, naming the first time_emb_proj."""
    peer = _randomise(peer_super_res(time_scale_shift="default"), seed=21)
    abstract = _abstract(our_upsampler(), jnp.zeros((1, RES, RES, 6)), jnp.zeros((1,)))
    with pytest.raises(
        CheckpointKeyError,
        match=r"'down_blocks\.0\.resnets\.0\.time_emb_proj\.weight' has shape \(32, 128\), "
        r"the U-Net needs \(64, 128\)",
    ):
        unet_to_params(_state_dict(peer), abstract)
    ours = our_upsampler(scale_shift=False)
    abstract = _abstract(ours, jnp.zeros((BATCH, RES, RES, 6)), jnp.zeros((BATCH,)))
    params = unet_to_params(_state_dict(peer), abstract, source="tiny super_res, default")
    g = torch.Generator().manual_seed(44)
    x = torch.randn(BATCH, 6, RES, RES, generator=g)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        ref = peer(sample=x, timestep=t).sample.numpy()
    out = ours.apply({"params": params}, _nhwc(x), jnp.asarray(t.numpy(), jnp.float32))
    _assert_close(_nchw(out), ref, "additive-time upsampler output")


def test_params_round_trip_to_diffusers_state_dicts(decoder_pair):
    unet, text_proj, _, params = decoder_pair
    for peer, tensors in (
        (unet, params_to_unet(params["unet"])),
        (text_proj, params_to_text_proj(params["text_proj"])),
    ):
        reference = _state_dict(peer)
        assert sorted(tensors) == sorted(reference)
        for key, value in reference.items():
            np.testing.assert_array_equal(tensors[key], value, err_msg=key)
        peer.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda sd: sd.pop("mid_block.attentions.0.add_k_proj.weight"),
            r"'mid_block\.attentions\.0\.add_k_proj\.weight' is missing \(1 in all\)",
        ),
        (
            lambda sd: sd.update({"up_blocks.0.attentions.0.to_out.1.weight": np.ones((4, 4))}),
            r"'up_blocks\.0\.attentions\.0\.to_out\.1\.weight' is not used by this U-Net",
        ),
        (
            lambda sd: sd.update({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}),
            r"'conv_in\.weight' has shape \(32, 4, 3, 3\), the U-Net needs \(32, 3, 3, 3\)",
        ),
    ],
)
def test_a_missing_unused_or_misshaped_unet_tensor_is_named(decoder_pair, mutate, message):
    unet, _, _, params = decoder_pair
    sd = _state_dict(unet)
    mutate(sd)
    with pytest.raises(CheckpointKeyError, match=message):
        unet_to_params(sd, params["unet"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda sd: sd.pop("learned_classifier_free_guidance_embeddings"),
            r"'learned_classifier_free_guidance_embeddings' is missing",
        ),
        (
            lambda sd: sd.update({"clip_extra_context_tokens_proj.scale": np.ones(3)}),
            r"unexpected tensor 'clip_extra_context_tokens_proj\.scale'",
        ),
        (
            lambda sd: sd.update({"prompt_proj.weight": np.ones((3, 3))}),
            r"text_proj: tensor 'prompt_proj\.weight' is not used by this text projection",
        ),
    ],
)
def test_a_missing_or_unused_text_proj_tensor_is_named(decoder_pair, mutate, message):
    unet, text_proj, _, params = decoder_pair
    sd = _state_dict(text_proj)
    mutate(sd)
    with pytest.raises(CheckpointKeyError, match=message):
        decoder_to_params(_state_dict(unet), sd, params)
