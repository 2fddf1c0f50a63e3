"""CLIP: the param tree maps onto Hugging Face's, checkpoints load offline, embeddings match."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unclip_jax import clip
from unclip_jax.clip import abstract_params, preprocess_images, preprocess_images_jax
from unclip_jax.convert.hf_clip import CheckpointKeyError, hf_to_params, params_to_hf
from unclip_jax.models.clip import (
    CLIP,
    OPENAI_VIT_B32,
    ClipConfig,
    TextConfig,
    VisionConfig,
    init_params,
)
from unclip_jax.models.clip_tokenizer import ClipTokenizer

CAPTIONS = [
    "a small red circle in the top left on a gray background",
    "large blue triangle, bottom right, white background",
    "green square",
    "x",
]
TOKENIZER = ClipTokenizer.train(CAPTIONS * 20, vocab_size=600)
TINY = ClipConfig(
    text=TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=TOKENIZER.vocab_size,
        max_position_embeddings=16,
        eos_token_id=TOKENIZER.eos_id,
    ),
    vision=VisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    ),
    projection_dim=24,
)


def _random_params(config, seed=0):
    return nn.meta.unbox(init_params(CLIP(config), jax.random.key(seed)))


def _tokenizer():
    return TOKENIZER


def test_params_map_one_to_one_onto_hf_names_and_back():
    params = _random_params(TINY)
    tensors = params_to_hf(params)
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in tensors
    assert tensors["vision_model.embeddings.patch_embedding.weight"].shape == (48, 3, 8, 8)
    assert tensors["text_projection.weight"].shape == (24, 32)  # (out, in) as torch stores it
    back = hf_to_params(tensors, abstract_params(TINY))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_save_and_load_pretrained_round_trip(tmp_path):
    params = _random_params(TINY)
    tokenizer = _tokenizer()
    clip.save_pretrained(str(tmp_path), TINY, params, tokenizer)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    } <= set(os.listdir(tmp_path))
    m = clip.load_pretrained(str(tmp_path))
    assert m.config == TINY
    z = m.encode_text(CAPTIONS)
    assert z.shape == (4, 24)
    ids, mask = m.tokenize(CAPTIONS)
    expected = CLIP(TINY).apply({"params": params}, ids, mask, method="encode_text")
    np.testing.assert_allclose(z, expected, atol=1e-6)
    states, mask = m.text_hidden_states(CAPTIONS)
    assert states.shape == (4, 16, 32) and mask.shape == (4, 16)
    images = [
        np.random.default_rng(i).integers(0, 256, (40 + 9 * i, 50, 3), np.uint8) for i in range(3)
    ]
    assert m.encode_image(images).shape == (3, 24)
    bf16 = clip.load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert bf16.encode_text(CAPTIONS).dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: ~0.4% per value through 2 layers; |z| is about 1.
    np.testing.assert_allclose(np.asarray(bf16.encode_text(CAPTIONS), np.float32), z, atol=0.05)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda t: t.pop("text_model.final_layer_norm.weight"),
            r"'text_model.final_layer_norm.weight' is missing",
        ),
        (
            lambda t: t.update({"text_model.extra.weight": np.zeros(3, np.float32)}),
            r"'text_model.extra.weight' is not used",
        ),
        (
            lambda t: t.update({"visual_projection.weight": np.zeros((24, 40), np.float32)}),
            r"'visual_projection.weight' has shape \(24, 40\), the config needs \(24, 48\)",
        ),
    ],
)
def test_a_missing_unused_or_misshaped_tensor_is_named(tmp_path, mutate, message):
    clip.save_pretrained(str(tmp_path), TINY, _random_params(TINY), _tokenizer())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointKeyError, match=message):
        clip.load_pretrained(str(tmp_path))


def test_a_directory_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        clip.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        clip.load_pretrained(str(tmp_path))


def test_jax_preprocessing_matches_the_host_one_at_the_model_size():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    host = preprocess_images(images, 32)
    device = preprocess_images_jax(jnp.asarray(images / 127.5 - 1.0, jnp.float32), 32)
    np.testing.assert_allclose(device, host, atol=1e-5)
    assert preprocess_images_jax(jnp.zeros((1, 64, 64, 3)), 32).shape == (1, 32, 32, 3)


def test_contrastive_loss_matches_a_numpy_reference_with_the_clamped_scale():
    rng = np.random.default_rng(0)
    z_t, z_i = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))

    def reference(log_scale):
        a = z_t / np.linalg.norm(z_t, axis=1, keepdims=True)
        b = z_i / np.linalg.norm(z_i, axis=1, keepdims=True)
        logits = np.exp(min(log_scale, np.log(100.0))) * a @ b.T  # OpenAI clamps at 100

        def xent(m):
            m = m - m.max(axis=1, keepdims=True)
            return -np.mean(np.diag(m) - np.log(np.exp(m).sum(axis=1)))

        return (xent(logits) + xent(logits.T)) / 2

    for log_scale in (np.log(10.0), np.log(500.0)):
        loss, _ = clip.contrastive_loss(
            jnp.asarray(z_t, jnp.float32),
            jnp.asarray(z_i, jnp.float32),
            jnp.asarray(log_scale, jnp.float32),
        )
        np.testing.assert_allclose(float(loss), reference(log_scale), rtol=1e-5)
    z = jnp.asarray(z_t, jnp.float32)
    matched, metrics = clip.contrastive_loss(z, z, jnp.log(100.0))
    assert float(metrics["accuracy_t2i"]) == 1.0 and float(matched) < 0.05


def test_hard_negatives_join_only_the_image_to_text_softmax():
    rng = np.random.default_rng(0)
    z_t, z_i = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    z_n = rng.standard_normal((6, 3, 5))
    log_scale = jnp.log(20.0)

    def unit(z):
        return z / np.linalg.norm(z, axis=-1, keepdims=True)

    def xent(m):
        m = m - m.max(axis=1, keepdims=True)
        return -np.mean(np.diag(m) - np.log(np.exp(m).sum(axis=1)))

    logits = 20.0 * unit(z_t) @ unit(z_i).T
    negative_logits = 20.0 * np.einsum("bd,bkd->bk", unit(z_i), unit(z_n))
    # Image b's row: the batch's captions, then its own 3 negatives; text->image as before.
    expected = (xent(logits) + xent(np.concatenate([logits.T, negative_logits], 1))) / 2
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    loss, metrics = clip.contrastive_loss(f32(z_t), f32(z_i), log_scale, f32(z_n))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    best_negative = negative_logits.max(1) > np.diag(logits)
    assert float(metrics["negative_error"]) == pytest.approx(best_negative.mean())
    # A negative identical to the caption takes half the image's probability: loss rises.
    same = jnp.repeat(f32(z_t)[:, None], 3, axis=1)
    assert float(clip.contrastive_loss(f32(z_t), f32(z_i), log_scale, same)[0]) > float(
        clip.contrastive_loss(f32(z_t), f32(z_i), log_scale)[0]
    )


def test_configs_read_transformers_tower_dicts_and_reject_unknown_activations():
    legacy = {  # as openai/clip-vit-large-patch14's config.json: the *_dict fields win
        "projection_dim": 768,
        "text_config": {"hidden_act": "quick_gelu", "hidden_size": 1},
        "text_config_dict": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "hidden_act": "gelu",
        },
        "vision_config_dict": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "image_size": 224,
        },
    }
    config = ClipConfig.from_hf_dict(legacy)
    assert config.text.hidden_size == 768 and config.text.hidden_act == "gelu"
    assert config.vision.patch_size == 14 and config.projection_dim == 768
    with pytest.raises(ValueError, match="unknown hidden_act 'relu'; valid: quick_gelu, gelu"):
        TextConfig(
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            hidden_act="relu",
        )


# ---- parity with transformers (the peers extra) ----------------------------------------------

PEER_CONFIGS = {
    "tiny": TINY,
    "tiny_gelu_eps": ClipConfig(
        text=dataclasses.replace(TINY.text, hidden_act="gelu", layer_norm_eps=1e-6),
        vision=dataclasses.replace(TINY.vision, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=24,
    ),
    # ViT-B/32's shape (openai/clip-vit-base-patch32), random weights.
    "vit_b32": OPENAI_VIT_B32,
}


@pytest.mark.peers
@pytest.mark.parametrize("name", PEER_CONFIGS)
def test_embeddings_and_hidden_states_equal_transformers(tmp_path, name):
    torch = pytest.importorskip("torch", reason="needs the peers extra: pip install -e '.[peers]'")
    transformers = pytest.importorskip("transformers", reason="needs the peers extra")
    config = PEER_CONFIGS[name]
    hf_config = transformers.CLIPConfig(
        text_config={
            **config.to_hf_dict()["text_config"],
            "pad_token_id": 0,
        },
        vision_config=config.to_hf_dict()["vision_config"],
        projection_dim=config.projection_dim,
    )
    torch.manual_seed(0)
    peer = transformers.CLIPModel(hf_config).eval()
    peer.save_pretrained(str(tmp_path))
    _tokenizer().save(str(tmp_path))  # load_pretrained wants tokenizer files; ids are fed below
    ours = clip.load_pretrained(str(tmp_path))

    rng = np.random.default_rng(1)
    length, size = config.context_length, config.vision.image_size
    ids = rng.integers(1, config.text.vocab_size - 2, (3, length)).astype(np.int64)
    mask = np.ones_like(ids)
    eos = config.text.vocab_size - 1 if config.text.eos_token_id == 2 else config.text.eos_token_id
    for row, end in enumerate((5, length - 1, 9)):
        ids[row, 0], ids[row, end] = config.text.vocab_size - 2, eos
        ids[row, end + 1 :], mask[row, end + 1 :] = 0, 0  # padded with a small id
    mask[2, 3] = 0  # a masked key inside a caption, as a padding-in-the-middle batch has
    pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)

    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        text_out = peer.text_model(input_ids=t_ids, attention_mask=t_mask)
        peer_z_t = peer.text_projection(text_out.pooler_output).numpy()
        peer_states = text_out.last_hidden_state.numpy()
        vision_out = peer.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        peer_z_i = peer.visual_projection(vision_out.pooler_output).numpy()

    apply = ours.model.apply
    z_t = apply(
        {"params": ours.params}, ids.astype(np.int32), mask.astype(np.int32), method="encode_text"
    )
    states = apply(
        {"params": ours.params},
        ids.astype(np.int32),
        mask.astype(np.int32),
        method="text_hidden_states",
    )
    z_i = ours.encode_pixels(pixels)
    np.testing.assert_allclose(z_t, peer_z_t, atol=1e-4)
    np.testing.assert_allclose(states, peer_states, atol=1e-4)  # every position, padded ones too
    np.testing.assert_allclose(z_i, peer_z_i, atol=1e-4)


@pytest.mark.peers
def test_image_preprocessing_equals_clip_image_processor():
    transformers = pytest.importorskip("transformers", reason="needs the peers extra")
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (45, 60, 3), np.uint8),
        rng.integers(0, 256, (70, 33, 3), np.uint8),
    ]
    theirs = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    # PIL's bicubic on uint8 in both; the remaining difference is float rounding.
    np.testing.assert_allclose(preprocess_images(images, 32), theirs, atol=1e-5)
