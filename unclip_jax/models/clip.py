"""CLIP in Flax linen, with a param tree that maps one to one onto Hugging Face's `CLIPModel`.

Module and param names follow transformers' CLIP (`text_model.encoder.layers.3.self_attn.q_proj`
is `text_model/encoder/layers_3/self_attn/q_proj` here; Linear `weight` is Dense `kernel`
transposed, LayerNorm `weight` is `scale`, Embedding `weight` is `embedding`), so importing a
checkpoint is a rename (`unclip_jax.convert.hf_clip`). Every param has logical axis names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower (text or vision), in Hugging Face's field names."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unknown hidden_act {self.hidden_act!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
    """The text tower: a causal transformer pooled at the end-of-text token."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    # transformers' pooling: eos_token_id 2 (old configs) pools at argmax(input_ids), which is
    # the EOT token of OpenAI's vocabulary; any other id pools at its first occurrence.
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
    """The vision tower: a ViT with a class token, pooled at it."""

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A whole CLIP: both towers, the shared embedding width and the initial logit scale.

    `vision` None is a text tower alone with its projection (transformers'
    `CLIPTextModelWithProjection`, e.g. Karlo's `text_encoder`): it embeds captions, not images.
    """

    text: TextConfig
    vision: VisionConfig | None
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)

    @property
    def context_length(self) -> int:
        """Tokens per caption."""
        return self.text.max_position_embeddings

    def require_vision(self, what: str) -> VisionConfig:
        """The vision tower's config, or a ValueError saying that `what` needs one."""
        if self.vision is None:
            raise ValueError(
                f"{what} needs a CLIP with a vision tower; this one is a text tower alone (e.g. "
                "Karlo's text_encoder): use a whole CLIP, e.g. openai/clip-vit-large-patch14"
            )
        return self.vision

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of a transformers `CLIPModel` with these sizes (of a
        `CLIPTextModelWithProjection` for a text tower alone)."""

        def tower(c: TowerConfig) -> dict[str, Any]:
            return dataclasses.asdict(c)

        if self.vision is None:
            return {
                "architectures": ["CLIPTextModelWithProjection"],
                **tower(self.text),
                "model_type": "clip_text_model",
                "projection_dim": self.projection_dim,
                "bos_token_id": self.text.eos_token_id - 1,
            }
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {
                **tower(self.text),
                "model_type": "clip_text_model",
                "projection_dim": self.projection_dim,
                "bos_token_id": self.text.eos_token_id - 1,
            },
            "vision_config": {
                **tower(self.vision),
                "model_type": "clip_vision_model",
                "projection_dim": self.projection_dim,
            },
        }

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> ClipConfig:
        """Reads a transformers CLIP config.json (defaults as transformers' CLIPConfig); a
        `clip_text_model` one (`CLIPTextModelWithProjection`) is a text tower alone."""

        def pick(kind: type, values: Mapping[str, Any], defaults: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            merged = {**defaults, **{k: v for k, v in values.items() if k in names}}
            return kind(**merged)

        text_defaults = dict(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8
        )
        vision_defaults = dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        )

        def tower(name: str) -> dict[str, Any]:
            # transformers rebuilds a tower from `<name>_dict` when present (older configs,
            # e.g. openai/clip-vit-large-patch14), ignoring `<name>` then.
            override = config.get(f"{name}_dict")
            return dict(override) if override else dict(config.get(name) or {})

        if config.get("model_type") == "clip_text_model":
            return cls(
                text=pick(TextConfig, config, text_defaults),
                vision=None,
                projection_dim=int(config.get("projection_dim", 512)),
            )
        return cls(
            text=pick(TextConfig, tower("text_config"), text_defaults),
            vision=pick(VisionConfig, tower("vision_config"), vision_defaults),
            projection_dim=int(config.get("projection_dim", 512)),
            logit_scale_init_value=float(config.get("logit_scale_init_value", math.log(1 / 0.07))),
        )

    @classmethod
    def from_model_config(cls, model: Mapping[str, Any]) -> ClipConfig:
        """From a `configs/clip.py` model block (MLP width 4x, quick_gelu, as OpenAI's)."""
        return cls(
            text=TextConfig(
                hidden_size=model["text_width"],
                intermediate_size=4 * model["text_width"],
                num_hidden_layers=model["text_layers"],
                num_attention_heads=model["text_heads"],
                vocab_size=model["vocab_size"],
                max_position_embeddings=model["context_length"],
                eos_token_id=model.get("eos_token_id", model["vocab_size"] - 1),
            ),
            vision=VisionConfig(
                hidden_size=model["vision_width"],
                intermediate_size=4 * model["vision_width"],
                num_hidden_layers=model["vision_layers"],
                num_attention_heads=model["vision_heads"],
                image_size=model["image_size"],
                patch_size=model["patch_size"],
            ),
            projection_dim=model["embed_dim"],
        )


# The shapes of OpenAI's public CLIPs (their config.json: eos_token_id 2, i.e. transformers'
# legacy rule of pooling at argmax(input_ids), which is the EOT token of OpenAI's vocabulary).
OPENAI_VIT_B32 = ClipConfig(
    text=TextConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        eos_token_id=2,
    ),
    vision=VisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    ),
    projection_dim=512,
)
OPENAI_VIT_L14 = ClipConfig(
    text=TextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        eos_token_id=2,
    ),
    vision=VisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    ),
    projection_dim=768,
)


def _dense(
    features: int,
    axes: tuple[str | None, str | None],
    name: str | None,
    dtype: Any,
    use_bias: bool = True,
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def _layer_norm(eps: float, name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (transformers' CLIPAttention)."""

    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size
        head_dim = width // heads

        def project(name: str) -> Array:
            y = _dense(width, ("embed", "heads"), name, self.dtype)(x)
            return y.reshape(*x.shape[:-1], heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        # softmax(q k^T / sqrt(d) + bias) v, the logits and softmax in float32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:-1], width)
        return _dense(width, ("heads", "embed"), "out_proj", self.dtype)(out)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2."""

    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = _dense(c.intermediate_size, ("embed", "mlp"), "fc1", self.dtype)(x)
        h = ACTIVATIONS[c.hidden_act](h)
        return _dense(c.hidden_size, ("mlp", "embed"), "fc2", self.dtype)(h)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        c = self.config
        x = x + Attention(c, self.dtype, name="self_attn")(
            _layer_norm(c.layer_norm_eps, "layer_norm1", self.dtype)(x), bias
        )
        return x + Mlp(c, self.dtype, name="mlp")(
            _layer_norm(c.layer_norm_eps, "layer_norm2", self.dtype)(x)
        )


class Encoder(nn.Module):
    """The stack of layers, named layers_0 ... layers_{N-1} as transformers' layers.0 ...

    With `remat` each layer recomputes its activations in the backward pass (training memory).
    """

    config: TowerConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        layer = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, self.dtype, name=f"layers_{i}")(x, bias)
            x = nn.with_logical_constraint(x, ("batch", "activation_length", "activation_embed"))
        return x


class TextEmbeddings(nn.Module):
    """Token plus learned position embeddings."""

    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        c = self.config
        tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="token_embedding",
        )(input_ids)
        positions = nn.Embed(
            c.max_position_embeddings,
            c.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.01), ("length", "embed")
            ),
            name="position_embedding",
        )(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """Where each caption's end-of-text token is (transformers' pooling rule)."""
    if eos_token_id == 2:  # legacy configs: OpenAI's EOT has the largest id
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
    """Causal text encoder: (last hidden states, pooled EOT state)."""

    config: TextConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each layer (see `Encoder`)

    @nn.compact
    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None
    ) -> tuple[Array, Array]:
        c = self.config
        x = TextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        length = input_ids.shape[1]
        # Additive bias: -inf above the diagonal (causal) and on padded keys.
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        allowed = causal[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        x = Encoder(c, self.dtype, self.remat, name="encoder")(x, bias)
        x = _layer_norm(c.layer_norm_eps, "final_layer_norm", self.dtype)(x)
        pooled = jnp.take_along_axis(
            x, eos_positions(input_ids, c.eos_token_id)[:, None, None], axis=1
        )[:, 0]
        return x, pooled


class VisionEmbeddings(nn.Module):
    """Patch embedding (a stride-P convolution, no bias), class token, positions."""

    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        c = self.config
        patches = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("conv_height", "conv_width", "channels_in", "embed")
            ),
            name="patch_embedding",
        )(pixels.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (c.hidden_size,),
        )
        x = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1
        )
        positions = nn.Embed(
            x.shape[1],
            c.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("length", "embed")
            ),
            name="position_embedding",
        )(jnp.arange(x.shape[1]))
        return x + positions[None]


class VisionTransformer(nn.Module):
    """ViT: (last hidden states, pooled class-token state after post_layernorm)."""

    config: VisionConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each layer (see `Encoder`)

    @nn.compact
    def __call__(self, pixels: Array) -> tuple[Array, Array]:
        c = self.config
        x = VisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = _layer_norm(c.layer_norm_eps, "pre_layrnorm", self.dtype)(x)  # sic: transformers' name
        x = Encoder(c, self.dtype, self.remat, name="encoder")(x, None)
        pooled = _layer_norm(c.layer_norm_eps, "post_layernorm", self.dtype)(x[:, 0])
        return x, pooled


class CLIP(nn.Module):
    """Both towers, their projections into the shared space, and the logit scale.

    Images are NHWC float pixels already resized and normalised with CLIP's mean/std. With
    `config.vision` None, the text tower and its projection alone (no logit scale either, as
    transformers' `CLIPTextModelWithProjection`).
    """

    config: ClipConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each layer of both towers (see `Encoder`)

    def setup(self) -> None:
        c = self.config
        self.text_model = TextTransformer(c.text, self.dtype, self.remat)
        if c.vision is not None:
            self.vision_model = VisionTransformer(c.vision, self.dtype, self.remat)
        # In setup, the attribute names the submodule.
        self.text_projection = _dense(
            c.projection_dim, ("embed", None), None, self.dtype, use_bias=False
        )
        if c.vision is None:
            return
        self.visual_projection = _dense(
            c.projection_dim, ("embed", None), None, self.dtype, use_bias=False
        )
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(c.logit_scale_init_value), ()),
            (),
        )

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Projected (unnormalised) text embeddings z_t, (B, projection_dim)."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled)

    def text_hidden_states(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """The text tower's last hidden states after final_layer_norm, (B, L, width)."""
        hidden, _ = self.text_model(input_ids, attention_mask)
        return hidden

    def encode_text_and_states(
        self, input_ids: Array, attention_mask: Array | None = None
    ) -> tuple[Array, Array]:
        """(z_t (B, projection_dim), last hidden states (B, L, width)) in one pass of the tower:
        what a decoder conditioned on CLIP's text (Karlo's) reads."""
        hidden, pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled), hidden

    def encode_image(self, pixels: Array) -> Array:
        """Projected (unnormalised) image embeddings z_i, (B, projection_dim)."""
        self.config.require_vision("encoding images")
        _, pooled = self.vision_model(pixels)
        return self.visual_projection(pooled)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None, pixels: Array
    ) -> tuple[Array, Array, Array]:
        """(z_t, z_i, logit_scale) for a batch of pairs: what the contrastive loss needs."""
        self.config.require_vision("the contrastive loss")
        return (
            self.encode_text(input_ids, attention_mask),
            self.encode_image(pixels),
            self.logit_scale,
        )


def contrastive_loss(
    z_text: Array, z_image: Array, logit_scale: Array, z_negatives: Array | None = None
) -> tuple[Array, dict[str, Array]]:
    """CLIP's symmetric cross-entropy over the (global) batch, with a learned temperature.

    logits = exp(s) <z_t / |z_t|, z_i / |z_i|>, s clipped at log 100 as OpenAI does; the loss
    is the mean of the text->image and image->text cross-entropies with the diagonal as targets.
    `z_negatives` (B, K, D), embeddings of K hard-negative captions per image (NegCLIP), join
    each image's row of the image->text softmax: image b must pick its caption among the
    batch's and its own K negatives. The text->image direction is unchanged.
    """

    def unit(z: Array) -> Array:
        z = z.astype(jnp.float32)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    z_text, z_image = unit(z_text), unit(z_image)
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), math.log(100.0)))
    logits = scale * z_text @ z_image.T
    labels = jnp.arange(logits.shape[0])
    text_to_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
    image_logits = logits.T  # (images, texts)
    metrics = {}
    if z_negatives is not None:
        negative_logits = scale * jnp.einsum("bd,bkd->bk", z_image, unit(z_negatives))
        # How often an image prefers one of its own negatives to its caption.
        metrics["negative_error"] = (
            negative_logits.max(axis=1) > jnp.diagonal(image_logits)
        ).mean()
        image_logits = jnp.concatenate([image_logits, negative_logits], axis=1)
    image_to_text = -jnp.take_along_axis(
        jax.nn.log_softmax(image_logits, axis=1), labels[:, None], 1
    )
    loss = (text_to_image.mean() + image_to_text.mean()) / 2
    accuracy = (jnp.argmax(logits, axis=1) == labels).mean()
    return loss, {"accuracy_t2i": accuracy, "temperature": 1.0 / scale, **metrics}


def init_params(model: CLIP, rng: jax.Array) -> Any:
    """A CLIP's params (with their logical axis names), from dummy inputs of its sizes."""
    c = model.config
    if c.vision is None:
        ids = jnp.zeros((1, c.context_length), jnp.int32)
        return model.init(rng, ids, None, method="encode_text")["params"]
    size = c.vision.image_size
    return model.init(
        rng, jnp.zeros((1, c.context_length), jnp.int32), None, jnp.zeros((1, size, size, 3))
    )["params"]
