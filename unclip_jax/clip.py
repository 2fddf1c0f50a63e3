"""CLIP for the rest of the project and for users: load a checkpoint directory, embed.

    from unclip_jax import clip
    m = clip.load_pretrained("path/to/clip-vit-large-patch14")   # offline, safetensors only
    z_t = m.encode_text(["a red circle"])                         # (B, projection_dim)
    states, mask = m.text_hidden_states(["a red circle"])        # (B, L, width), (B, L)
    z_i = m.encode_image(uint8_images)                            # any sizes, CLIP preprocessing

A checkpoint directory is Hugging Face's layout (config.json, model.safetensors, tokenizer
files, preprocessor_config.json); a CLIP trained here is saved in it too (`save_pretrained`).
`PretrainedClip.model` and `.params` are the linen module and its params for use inside jitted
train steps (e.g. `m.model.apply({"params": m.params}, ids, mask, method="encode_text")`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from unclip_jax.convert.hf_clip import CheckpointKeyError, hf_to_params, params_to_hf
from unclip_jax.models.clip import CLIP, ClipConfig, contrastive_loss, init_params
from unclip_jax.models.clip_tokenizer import ClipTokenizer

__all__ = [
    "CLIP",
    "CheckpointKeyError",
    "ClipConfig",
    "PretrainedClip",
    "contrastive_loss",
    "example_transform",
    "load_pretrained",
    "preprocess_images",
    "preprocess_images_jax",
    "save_pretrained",
]

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(
    images: np.ndarray | Sequence[np.ndarray],
    size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """uint8 HWC images of any sizes -> float32 (B, size, size, 3), as CLIPImageProcessor does.

    Bicubic resize of the shorter side to `size` (PIL, anti-aliased), centre crop, x/255,
    then (x - mean) / std.
    """
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image {i}: expected uint8 (H, W, 3), got {image.dtype} {image.shape}"
            )
        h, w = image.shape[:2]
        # The longer side is truncated, not rounded, as transformers' get_resize_output_image_size.
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) == (w, h):
            resized = image  # already the model's size (e.g. training data at its resolution)
        else:
            resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out[i] = resized[top : top + size, left : left + size] / 255.0
    return (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_images_jax(
    images: jax.Array,
    size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jax.Array:
    """Square float images in [-1, 1] (as the diffusion stages hold them) -> CLIP's input.

    Jittable, for use inside train steps: anti-aliased bicubic resize to `size`, then CLIP's
    normalisation of the [0, 1] pixels.
    """
    b, h, w, c = images.shape
    if h != w:
        raise ValueError(f"preprocess_images_jax takes square images, got {h}x{w}")
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if h != size:
        x = jax.image.resize(x, (b, size, size, c), method="bicubic", antialias=True)
    return (x - jnp.asarray(mean)) / jnp.asarray(std)


def example_transform(
    tokenizer: ClipTokenizer,
    config: ClipConfig,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    with_caption: bool = False,
    context_length: int | None = None,
) -> Any:
    """`transform(example, rng)` for `make_pipeline`: an {"image", "caption"} example ->
    {"input_ids", "attention_mask", "pixels"} tokenized and preprocessed as CLIP wants them,
    plus the "caption" and "key" strings when `with_caption` (not for batches that go to
    devices). `context_length` tokenizes to another length than the CLIP's (e.g. for a
    decoder's own caption transformer)."""
    length = context_length or config.context_length

    def transform(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        del rng
        caption = str(example["caption"])
        ids, mask = tokenizer([caption], context_length=length)
        size = config.require_vision("an image-text example").image_size
        pixels = preprocess_images([example["image"]], size, mean=mean, std=std)
        out = {"input_ids": ids[0], "attention_mask": mask[0], "pixels": pixels[0]}
        if with_caption:
            out["caption"] = caption
            out["key"] = str(example.get("key", ""))
        return out

    return transform


@dataclasses.dataclass
class PretrainedClip:
    """A CLIP with its params, tokenizer and image normalisation; methods take raw inputs."""

    config: ClipConfig
    params: Any
    tokenizer: ClipTokenizer
    dtype: Any = jnp.float32
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        self.model = CLIP(self.config, dtype=self.dtype)
        apply = self.model.apply
        self._text = jax.jit(lambda p, i, m: apply({"params": p}, i, m, method="encode_text"))
        self._states = jax.jit(
            lambda p, i, m: apply({"params": p}, i, m, method="text_hidden_states")
        )
        self._image = jax.jit(lambda p, x: apply({"params": p}, x, method="encode_image"))

    def tokenize(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 (B, context_length)."""
        return self.tokenizer(texts, context_length=self.config.context_length)

    def encode_text(self, texts: str | Sequence[str]) -> jax.Array:
        """Projected text embeddings z_t (B, projection_dim), not normalised."""
        return self.encode_tokens(*self.tokenize(texts))

    def encode_tokens(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Projected text embeddings of already tokenized captions."""
        return self._text(self.params, input_ids, attention_mask)

    def example_transform(self, *, with_caption: bool = False) -> Any:
        """A data-pipeline transform: {"image", "caption"} -> model inputs (host side)."""
        return example_transform(
            self.tokenizer,
            self.config,
            mean=self.image_mean,
            std=self.image_std,
            with_caption=with_caption,
        )

    def text_hidden_states(self, texts: str | Sequence[str]) -> tuple[jax.Array, np.ndarray]:
        """(last hidden states (B, L, width) after final_layer_norm, attention mask (B, L))."""
        ids, mask = self.tokenize(texts)
        return self._states(self.params, ids, mask), mask

    def encode_image(self, images: np.ndarray | Sequence[np.ndarray]) -> jax.Array:
        """Projected image embeddings z_i (B, projection_dim) of uint8 HWC images, any sizes."""
        pixels = preprocess_images(
            images,
            self.config.require_vision("encoding images").image_size,
            mean=self.image_mean,
            std=self.image_std,
        )
        return self._image(self.params, pixels)

    def encode_pixels(self, pixels: jax.Array) -> jax.Array:
        """Projected image embeddings of already preprocessed pixels (B, S, S, 3)."""
        return self._image(self.params, pixels)


def abstract_params(config: ClipConfig) -> Any:
    """ShapeDtypeStructs of a CLIP's params (no memory, no compute)."""
    boxed = jax.eval_shape(functools.partial(init_params, CLIP(config)), jax.random.key(0))
    return nn.meta.unbox(boxed)


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for name in files:
            tensors.update(load_file(os.path.join(path, name)))
        return tensors
    raise FileNotFoundError(
        f"no model.safetensors (or model.safetensors.index.json) in {path!r}; convert a "
        "pytorch_model.bin checkpoint to safetensors first"
    )


def _check_tokenizer_fits(config: ClipConfig, tokenizer: ClipTokenizer, path: str) -> None:
    """The text tower pools at the tokenizer's end-of-text id and embeds all its ids."""
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model embeds "
            f"{config.text.vocab_size}"
        )
    if config.text.eos_token_id != 2 and tokenizer.eos_id != config.text.eos_token_id:
        raise ValueError(
            f"{path}: the tokenizer's end-of-text id is {tokenizer.eos_id}, the model pools at "
            f"{config.text.eos_token_id}"
        )


def load_pretrained(path: str, *, dtype: Any = jnp.float32) -> PretrainedClip:
    """Loads a Hugging Face CLIP checkpoint directory offline (safetensors, no torch, no hub).

    `dtype` (float32 or bfloat16) is both the params' and the compute dtype. A tensor the
    config does not use, one it needs that is missing, or one of the wrong shape is a
    CheckpointKeyError naming it.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in CLIP checkpoint directory {path!r}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"CLIP config {config_path}: not JSON ({err})") from None
    config = ClipConfig.from_hf_dict(raw_config)
    params = hf_to_params(_read_tensors(path), abstract_params(config), source=path)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(preprocessor):
        with open(preprocessor, encoding="utf-8") as f:
            pre = json.load(f)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    tokenizer = ClipTokenizer.from_dir(path)
    _check_tokenizer_fits(config, tokenizer, path)
    return PretrainedClip(
        config=config,
        params=params,
        tokenizer=tokenizer,
        dtype=dtype,
        image_mean=mean,
        image_std=std,
    )


def save_pretrained(
    path: str,
    config: ClipConfig,
    params: Any,
    tokenizer: ClipTokenizer,
    *,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> None:
    """Writes a checkpoint directory in Hugging Face's layout (loadable by transformers too)."""
    _check_tokenizer_fits(config, tokenizer, path)
    os.makedirs(path, exist_ok=True)
    tensors = params_to_hf(jax.device_get(nn.meta.unbox(params)))
    tmp = os.path.join(path, f".model.safetensors.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    if config.vision is not None:
        _save_preprocessor(path, config.vision.image_size, image_mean, image_std)
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = config.context_length  # the model's position table
    try:
        tokenizer.save(path)
    finally:
        tokenizer.model_max_length = previous


def _save_preprocessor(
    path: str, size: int, image_mean: Sequence[float], image_std: Sequence[float]
) -> None:
    """preprocessor_config.json: transformers' CLIPImageProcessor with these settings."""
    with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": size},
                "do_center_crop": True,
                "crop_size": {"height": size, "width": size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(image_mean),
                "image_std": list(image_std),
                "resample": 3,
                "do_convert_rgb": True,
            },
            f,
            indent=2,
        )
