"""One stage's sampler from its config: the diffusion prior (best of K), the decoder
(guided) and the upsamplers.

Each `*_sampler` returns a jitted pure function of (params, inputs, key) -> images in [-1, 1],
compiled once per input shape, so a training hook and a sampling job run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax import diffusion as D
from unclip_jax.models.prior import AutoregressivePrior, DiffusionPrior
from unclip_jax.models.unet import Decoder, UNet, upsampler_input

Array = jax.Array


def sampling_schedule(diffusion: Mapping[str, Any], sampling: Mapping[str, Any]) -> D.Schedule:
    """The training schedule respaced to `sampling.steps` ('250', 'ddim27', '10,10,5')."""
    return D.make_schedule(diffusion["schedule"], diffusion["num_steps"], sampling["steps"])


def _sample(
    model_fn: Callable[[Array, Array], Array],
    x_T: Array,
    key: Array,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
) -> Array:
    return D.sample(
        model_fn=model_fn,
        sched=sampling_schedule(diffusion, sampling),
        x_T=x_T,
        key=key,
        method=sampling["method"],
        eta=sampling.get("eta", 0.0),
        prediction=diffusion["prediction"],
        variance=diffusion["variance"],
        clip=sampling.get("clip_x0") or None,
        dynamic_threshold=sampling.get("dynamic_threshold") or None,
    )


def decoder_sampler(
    decoder: Decoder,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    *,
    resolution: int,
) -> Callable[[Any, Mapping[str, Array], Array], Array]:
    """`fn(params, cond, key) -> (B, resolution, resolution, 3)` images in [-1, 1].

    `cond` holds the decoder's conditioning, batch first: `z_i`, `text_mask`, and `input_ids`
    (a decoder with its own caption transformer) or `text_embeds` + `text_states` (CLIP's).
    With `sampling.guidance_scale` s != 1 the model runs on [cond; uncond] in one batch, the
    unconditional half with z_i replaced by the learned null embedding and the caption dropped
    (how guidance training dropped them), and the prediction is s cond + (1 - s) uncond.
    """
    scale = float(sampling["guidance_scale"])
    variance = diffusion["variance"]

    def model_fn(params: Any, x: Array, t: Array, c: Mapping[str, Array]) -> Array:
        c = dict(c)
        drop_image, drop_text = c.pop("drop_image", None), c.pop("drop_text", None)
        return decoder.apply(
            {"params": params},
            x,
            t,
            drop_image=drop_image,
            drop_text=drop_text,
            deterministic=True,
            **c,
        ).astype(jnp.float32)

    @jax.jit
    def fn(params: Any, cond: Mapping[str, Array], key: Array) -> Array:
        batch = cond["z_i"].shape[0]
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (batch, resolution, resolution, 3))
        if scale == 1.0:
            return _sample(
                lambda x, t: model_fn(params, x, t, cond), x_T, loop_key, diffusion, sampling
            )
        kept = {
            **cond,
            "drop_image": jnp.zeros((batch,), bool),
            "drop_text": jnp.zeros((batch,), bool),
        }
        dropped = {
            **cond,
            "drop_image": jnp.ones((batch,), bool),
            "drop_text": jnp.ones((batch,), bool),
        }
        guided = D.guided_model_fn(
            lambda x, t, c: model_fn(params, x, t, c),
            cond=kept,
            uncond=dropped,
            scale=scale,
            variance=variance,
        )
        return _sample(guided, x_T, loop_key, diffusion, sampling)

    return fn


def upsampler_sampler(
    unet: UNet,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    *,
    scale: int,
) -> Callable[[Any, Array, Array], Array]:
    """`fn(params, low_res, key) -> (B, scale h, scale w, 3)` images in [-1, 1].

    `low_res` (B, h, w, 3) in [-1, 1] is resized to the output size and concatenated to x_t
    at every step (`upsampler_input`); having no attention the U-Net runs on the whole image
    whatever crop size it trained on.
    """

    @jax.jit
    def fn(params: Any, low_res: Array, key: Array) -> Array:
        b, h, w, c = low_res.shape
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (b, scale * h, scale * w, c))

        def model_fn(x: Array, t: Array) -> Array:
            out = unet.apply({"params": params}, upsampler_input(x, low_res), t)
            return out.astype(jnp.float32)

        return _sample(model_fn, x_T, loop_key, diffusion, sampling)

    return fn


def best_of_candidates(candidates: Array, z_t: Array) -> Array:
    """candidates (B, K, D), z_t (B, D) -> (B, D): per row the candidate with the largest dot
    product with z_t (the paper's best-of-K for the diffusion prior)."""
    scores = jnp.einsum("bkd,bd->bk", candidates, z_t.astype(candidates.dtype))
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]


def prior_sampler(
    prior: DiffusionPrior,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    *,
    decode: Callable[[Array], Array],
    num_candidates: int = 1,
) -> Callable[[Any, Mapping[str, Array], Array], Array]:
    """`fn(params, cond, key) -> z_i (B, D)`: the diffusion prior's samples, best of K.

    `cond` holds `z_t` (B, D), `text_states` (B, L, W) and `text_mask` (B, L). Each caption
    gets `num_candidates` samples (guided with `sampling.guidance_scale`, the unconditional half
    with the text dropped), `decode` maps them from the diffusion space back to CLIP's (see
    `models.prior.denormalize_embedding`), and the one with the largest dot product with z_t
    is kept.
    """
    scale = float(sampling["guidance_scale"])
    k = int(num_candidates)
    if k < 1:
        raise ValueError(f"num_candidates must be at least 1, got {k}")

    def model_fn(params: Any, x: Array, t: Array, c: Mapping[str, Array]) -> Array:
        c = dict(c)
        drop_text = c.pop("drop_text", None)
        return prior.apply(
            {"params": params},
            x,
            t,
            c["z_t"],
            c["text_states"],
            c["text_mask"],
            drop_text=drop_text,
        ).astype(jnp.float32)

    @jax.jit
    def fn(params: Any, cond: Mapping[str, Array], key: Array) -> Array:
        b = cond["z_t"].shape[0]
        repeated = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), dict(cond))
        noise_key, loop_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (b * k, prior.clip_dim))
        if scale == 1.0:
            x0 = _sample(
                lambda x, t: model_fn(params, x, t, repeated), x_T, loop_key, diffusion, sampling
            )
        else:
            n = b * k
            guided = D.guided_model_fn(
                lambda x, t, c: model_fn(params, x, t, c),
                cond={**repeated, "drop_text": jnp.zeros((n,), bool)},
                uncond={**repeated, "drop_text": jnp.ones((n,), bool)},
                scale=scale,
                variance=diffusion["variance"],
            )
            x0 = _sample(guided, x_T, loop_key, diffusion, sampling)
        candidates = decode(x0).reshape(b, k, -1)
        return best_of_candidates(candidates, cond["z_t"])

    return fn


def top_p_logits(logits: Array, top_p: float) -> Array:
    """Logits with everything outside the nucleus set to -inf: the smallest set of the most
    likely values whose probabilities sum to at least `top_p` (1.0 keeps all)."""
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a value if the mass strictly before it is below top_p (the most likely always stays).
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    return jnp.where(keep, logits, -jnp.inf)


def ar_prior_sampler(
    prior: AutoregressivePrior,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    dot_percentile: float = 50.0,
) -> Callable[[Any, Any, Mapping[str, Array], Array], Array]:
    """`fn(params, codec, cond, key) -> z_i (B, D)`: the autoregressive prior's samples.

    `cond` holds `input_ids`, `text_mask` (B, L) and the unit-norm `z_t` (B, D). The
    dot-product token is drawn from its training distribution above `dot_percentile`
    (`models.prior_codec.sample_dot_tokens`); then each of the d PCA tokens in turn from
    softmax(guided logits / temperature) restricted to the top-p nucleus, the guided logits
    being s * cond + (1 - s) * uncond with the text dropped in the unconditional half. The
    tokens are decoded through the inverse PCA (`codec_decode`) and scaled back to unit norm
    (`fn.tokens(params, codec, cond, key)` gives the (dot, tokens) drawn, before decoding)
    (the PCA was fitted on unit-norm z_i; truncation and quantisation shrink the norm). Each
    step reruns the whole prefix (no key/value cache): d forward passes of the full sequence.
    """
    from unclip_jax.models.prior import unit_norm
    from unclip_jax.models.prior_codec import codec_decode, sample_dot_tokens

    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    d = prior.num_tokens

    def logits_at(params: Any, cond: Mapping[str, Array], dot: Array, tokens: Array, j: Array):
        def run(drop: bool) -> Array:
            b = tokens.shape[0]
            logits = prior.apply(
                {"params": params},
                cond["input_ids"],
                cond["text_mask"],
                cond["z_t"],
                dot,
                tokens,
                drop_text=jnp.full((b,), drop),
            )
            return jax.lax.dynamic_index_in_dim(logits, j, axis=1, keepdims=False)

        if guidance_scale == 1.0:
            return run(False)
        return guidance_scale * run(False) + (1.0 - guidance_scale) * run(True)

    def tokens_fn(
        params: Any, codec: Any, cond: Mapping[str, Array], key: Array
    ) -> tuple[Array, Array]:
        b = cond["z_t"].shape[0]
        dot_key, loop_key = jax.random.split(key)
        dot = sample_dot_tokens(codec.dot, dot_key, (b,), percentile=dot_percentile)
        dot = dot.reshape(b).astype(jnp.int32)

        def body(j: Array, tokens: Array) -> Array:
            logits = logits_at(params, cond, dot, tokens, j) / temperature
            logits = top_p_logits(logits, top_p)
            token = jax.random.categorical(jax.random.fold_in(loop_key, j), logits, axis=-1)
            return tokens.at[:, j].set(token.astype(jnp.int32))

        return dot, jax.lax.fori_loop(0, d, body, jnp.zeros((b, d), jnp.int32))

    @jax.jit
    def fn(params: Any, codec: Any, cond: Mapping[str, Array], key: Array) -> Array:
        _, tokens = tokens_fn(params, codec, cond, key)
        return unit_norm(codec_decode(codec, tokens))

    fn.tokens = jax.jit(tokens_fn)  # (dot token (B,), PCA tokens (B, d)) before decoding
    return fn
