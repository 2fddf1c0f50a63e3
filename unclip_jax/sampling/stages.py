"""One stage's sampler from its config: the diffusion prior (best of K), the decoder
(guided) and the upsamplers.

Each `*_sampler` returns a jitted pure function of (params, inputs, key) -> images in [-1, 1],
compiled once per input shape, so a training hook and a sampling job run the same code.

Sampling method "karlo" (`sampling.method`) runs ancestral DDPM steps on diffusers'
`UnCLIPScheduler`'s schedule (`D.karlo_schedule`); with `sampling.uncond_text` "empty" the
caller puts the empty caption's encoding in `cond["uncond"]` and guidance contrasts with it
(Karlo's pipeline) instead of dropping the caption.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion as D
from unclip_jax.models.clip import CLIP
from unclip_jax.models.prior import AutoregressivePrior, DiffusionPrior, unit_norm
from unclip_jax.models.unet import Decoder, LastStepUNets, UNet, upsampler_input

Array = jax.Array
log = logging.getLogger("unclip_jax.sample")
# Fixed-point refinements of each DDIM inversion step (`diffusion.ddim_invert`).
INVERSION_ITERS = 5


def sampling_schedule(diffusion: Mapping[str, Any], sampling: Mapping[str, Any]) -> D.Schedule:
    """The training schedule respaced to `sampling.steps` ('250', 'ddim27', '10,10,5'); with
    method "karlo", `UnCLIPScheduler`'s schedule of that many steps (`D.karlo_schedule`)."""
    if sampling["method"] == "karlo":
        steps = str(sampling["steps"]).strip()
        if diffusion["schedule"] != "cosine" or not steps.isdigit():
            raise ValueError(
                f"sampling method 'karlo' takes a number of steps of a cosine schedule, got "
                f"steps {steps!r} of a {diffusion['schedule']} schedule"
            )
        return D.karlo_schedule(diffusion["num_steps"], int(steps))
    return D.make_schedule(diffusion["schedule"], diffusion["num_steps"], sampling["steps"])


def broadcast_rows(tree: Any, batch: int) -> Any:
    """Each leaf of `tree` (1, ...) broadcast to (batch, ...): one conditioning for every row
    (e.g. the empty caption's encoding, the unconditional half of Karlo's guidance)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])), tree)


def _sample(
    model_fn: Callable[[Array, Array], Array],
    x_T: Array,
    key: Array,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    self_condition: bool = False,
) -> Array:
    return D.sample(
        model_fn=model_fn,
        sched=sampling_schedule(diffusion, sampling),
        x_T=x_T,
        key=key,
        # "karlo" is DDPM's ancestral step on UnCLIPScheduler's schedule.
        method="ddpm" if sampling["method"] == "karlo" else sampling["method"],
        eta=sampling.get("eta", 0.0),
        prediction=diffusion["prediction"],
        variance=diffusion["variance"],
        clip=sampling.get("clip_x0") or None,
        dynamic_threshold=sampling.get("dynamic_threshold") or None,
        self_condition=self_condition,
    )


def decoder_conditioning(
    clip_model: CLIP, *, text_encoder: str, unit_z_i: bool, z_i_norm: float = 1.0
) -> Callable[[Any, Mapping[str, Array]], dict[str, Array]]:
    """`encode(clip_params, batch) -> cond`: the decoder's conditioning from a frozen CLIP.

    `batch` holds `input_ids` and `text_mask` (the caption, tokenized at the decoder's
    text_tokens) and either `clip_pixels` (CLIP-preprocessed images, encoded here) or `z_i`
    (an embedding already, e.g. a prior's sample); z_i is scaled to unit norm when
    `unit_z_i`, the priors' output space, then to norm `z_i_norm` (the decoder's
    `model.z_i_norm`: sqrt(clip_dim) gives entries of order 1, like the caption's). A decoder
    with its own caption transformer reads `input_ids`; one on CLIP's text (Karlo's) reads the
    text tower's `text_embeds` and `text_states`, taken from `batch` when it holds them
    (computed once per distinct caption: `decoder_stage.caption_state_table`).
    """

    if not z_i_norm > 0 or (z_i_norm != 1.0 and not unit_z_i):
        raise ValueError(
            f"model.z_i_norm {z_i_norm!r}: the norm unit z_i is scaled to must be > 0, and 1 "
            "when model.unit_z_i is False (raw CLIP embeddings keep their own norm)"
        )

    def encode(clip_params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
        variables = {"params": clip_params}
        z_i = batch.get("z_i")
        if z_i is None:
            z_i = clip_model.apply(variables, batch["clip_pixels"], method="encode_image")
        if unit_z_i:
            z_i = unit_norm(z_i) * z_i_norm
        cond = {"z_i": z_i, "text_mask": batch["text_mask"]}
        if text_encoder == "transformer":
            cond["input_ids"] = batch["input_ids"]
        elif "text_states" in batch:
            cond["text_embeds"], cond["text_states"] = batch["text_embeds"], batch["text_states"]
        else:
            mask = batch["text_mask"].astype(jnp.int32)
            cond["text_embeds"], cond["text_states"] = clip_model.apply(
                variables, batch["input_ids"], mask, method="encode_text_and_states"
            )
        return cond

    return encode


def prior_text_conditioning(
    clip_model: CLIP,
) -> Callable[[Any, Array, Array], dict[str, Array]]:
    """`encode(clip_params, input_ids, text_mask) -> {"z_t", "text_states", "text_mask"}`:
    the priors' conditioning, from one pass of the frozen CLIP's text tower."""

    def encode(clip_params: Any, input_ids: Array, text_mask: Array) -> dict[str, Array]:
        z_t, states = clip_model.apply(
            {"params": clip_params},
            input_ids,
            text_mask.astype(jnp.int32),
            method="encode_text_and_states",
        )
        return {"z_t": z_t, "text_states": states, "text_mask": text_mask}

    return encode


def split_key(key: Array) -> tuple[Array, Array]:
    """Two independent keys (or batches of keys, row by row) from one key or one per row."""
    return D.fold_in(key, 0), D.fold_in(key, 1)


def _decoder_model_fn(
    decoder: Decoder,
    params: Any,
    cond: Mapping[str, Array],
    *,
    sampling: Mapping[str, Any],
    variance: str,
) -> Callable[[Array, Array], Array]:
    """The decoder as the samplers' `model_fn(x, t)` on `cond`, guided when
    `sampling.guidance_scale` != 1 (at t >= `sampling.guidance_min_t` only, where it is set).

    `cond` may hold a per-row `drop_text` (bool): those rows are conditioned on z_i alone
    (image variations, inversion); and a per-row `drop_image`: those rows are conditioned on
    the caption alone, z_i replaced by the learned null embedding (what the decoder draws
    from the caption, e.g. `benchmarks/decoder_oracle.py --ablate z_i`). With guidance the
    unconditional half has z_i replaced by the learned null embedding and the caption
    dropped, as guidance training dropped them.
    When `cond` holds `uncond` (the caption keys of one row, e.g. the empty caption's
    encoding: Karlo's way), that caption stands for "no caption" instead of dropping it: in
    every row of the unconditional half and in the `drop_text` rows (as Karlo's variation
    pipeline encodes "" for them).
    """
    scale = float(sampling["guidance_scale"])
    cond = dict(cond)
    batch = cond["z_i"].shape[0]
    drop_text = cond.pop("drop_text", None)
    drop_image = cond.pop("drop_image", jnp.zeros((batch,), bool))
    uncond = cond.pop("uncond", None)
    if uncond is not None:
        uncond = broadcast_rows(dict(uncond), batch)
        if drop_text is not None:
            for name, empty in uncond.items():
                rows = drop_text.reshape((batch,) + (1,) * (empty.ndim - 1))
                cond[name] = jnp.where(rows, empty, cond[name])
            drop_text = None

    def apply(x: Array, t: Array, c: Mapping[str, Array]) -> Array:
        c = dict(c)
        drop_image, drop = c.pop("drop_image", None), c.pop("drop_text", None)
        return decoder.apply(
            {"params": params},
            x,
            t,
            drop_image=drop_image,
            drop_text=drop,
            deterministic=True,
            **c,
        ).astype(jnp.float32)

    if drop_text is None:
        drop_text = jnp.zeros((batch,), bool)
    kept = {**cond, "drop_image": drop_image, "drop_text": drop_text}
    if scale == 1.0:
        return lambda x, t: apply(x, t, kept)
    dropped = {
        **cond,
        "drop_image": jnp.ones((batch,), bool),
        "drop_text": jnp.ones((batch,), bool),
    }
    if uncond is not None:
        dropped.update(uncond, drop_text=jnp.zeros((batch,), bool))
    return D.guided_model_fn(
        apply,
        cond=kept,
        uncond=dropped,
        scale=scale,
        variance=variance,
        min_t=int(sampling.get("guidance_min_t", 0)),
    )


def decoder_sampler(
    decoder: Decoder,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    *,
    resolution: int,
) -> Callable[..., Array]:
    """`fn(params, cond, key, x_T=None) -> (B, resolution, resolution, 3)` images in [-1, 1].

    `cond` holds the decoder's conditioning, batch first: `z_i`, `text_mask`, and `input_ids`
    (a decoder with its own caption transformer) or `text_embeds` + `text_states` (CLIP's),
    and optionally `drop_text` (B,) bool to condition rows on z_i alone. With
    `sampling.guidance_scale` s != 1 the model runs on [cond; uncond] in one batch, the
    unconditional half with z_i replaced by the learned null embedding and the caption dropped
    (how guidance training dropped them) or, when `cond` holds `uncond` (one row of caption
    keys), replaced by that caption; the prediction is s cond + (1 - s) uncond.
    `key` is one key or one per row (each row's noise then comes from its own key alone); x_T
    (e.g. a DDIM inversion) replaces the noise the sampler would start from.
    """
    variance = diffusion["variance"]

    @jax.jit
    def fn(params: Any, cond: Mapping[str, Array], key: Array, x_T: Array | None = None) -> Array:
        batch = cond["z_i"].shape[0]
        noise_key, loop_key = split_key(key)
        if x_T is None:
            x_T = D.row_normal(noise_key, (batch, resolution, resolution, 3))
        model_fn = _decoder_model_fn(decoder, params, cond, sampling=sampling, variance=variance)
        return _sample(model_fn, x_T, loop_key, diffusion, sampling, decoder.self_conditioned)

    return fn


def decoder_inverter(
    decoder: Decoder,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    *,
    fixed_point_iters: int = INVERSION_ITERS,
) -> Callable[[Any, Mapping[str, Array], Array], Array]:
    """`fn(params, cond, x0) -> x_T`: DDIM inversion of images x0 (B, H, W, 3) in [-1, 1]
    through the decoder on `cond` (as `decoder_sampler` takes it, guided the same way).

    Decoding x_T with `decoder_sampler` under the same settings with method "ddim", eta 0 and
    no x0 clipping reconstructs x0 (`inversion_sampling` gives those settings); the
    fixed-point refinement of each step (`diffusion.ddim_invert`) makes it exact up to the
    iteration's convergence.
    """
    if decoder.self_conditioned:
        raise ValueError(
            "DDIM inversion of a self-conditioned decoder (model.self_condition) is not "
            "supported: its steps read the previous x0 estimate, which inversion does not have"
        )
    sched = sampling_schedule(diffusion, sampling)

    @jax.jit
    def fn(params: Any, cond: Mapping[str, Array], x0: Array) -> Array:
        model_fn = _decoder_model_fn(
            decoder, params, cond, sampling=sampling, variance=diffusion["variance"]
        )
        return D.ddim_invert(
            model_fn=model_fn,
            sched=sched,
            x0=x0.astype(jnp.float32),
            prediction=diffusion["prediction"],
            variance=diffusion["variance"],
            fixed_point_iters=fixed_point_iters,
        )

    return fn


def decoder_x0_predictor(
    decoder: Decoder, diffusion: Mapping[str, Any], sampling: Mapping[str, Any]
) -> Callable[[Any, Mapping[str, Array], Array, Array, Array], Array]:
    """`fn(params, cond, x0, t, key) -> x0_hat`: images x0 (B, H, W, 3) in [-1, 1] noised to
    training timestep t (B,) int, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with eps from
    `key` (one key or one per row), and the decoder's one-step estimate of x0 from x_t on `cond` (as
    `decoder_sampler` takes it, guided with `sampling.guidance_scale` the same way).

    What the decoder makes of a real image at one noise level, without the sampler's other
    steps: where in t a sample's shape or place goes wrong (`benchmarks/decoder_oracle.py
    --x0-at`)."""
    sched = D.make_schedule(diffusion["schedule"], diffusion["num_steps"])

    @jax.jit
    def fn(params: Any, cond: Mapping[str, Array], x0: Array, t: Array, key: Array) -> Array:
        x0 = x0.astype(jnp.float32)
        x_t = D.q_sample(x0=x0, t=t, noise=D.row_normal(key, x0.shape), sched=sched)
        model_fn = _decoder_model_fn(
            decoder, params, cond, sampling=sampling, variance=diffusion["variance"]
        )
        # A self-conditioned decoder's first step: no previous estimate (zeros).
        inputs = D.self_conditioning_input(x_t) if decoder.self_conditioned else x_t
        pred, _ = D.split_output(model_fn(inputs, t), variance=diffusion["variance"])
        return D.predict_x0(
            prediction=diffusion["prediction"], pred=pred, x_t=x_t, t=t, sched=sched
        )

    return fn


def inversion_sampling(sampling: Mapping[str, Any], num_steps: int | None = None) -> dict[str, Any]:
    """`sampling` made deterministic and invertible: DDIM, eta 0, no x0 clipping or
    thresholding (the decode that maps a DDIM inversion back to its image).

    A plain step count "N" becomes DDIM's own spacing "ddimN" (stride num_steps / N from 0)
    where `num_steps` (the training schedule's length) allows it: evenly strided steps end at
    t = T - 1, where the cosine schedule's abar is ~2e-9, and the first decode step divides by
    sqrt(abar) (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)), magnifying any mismatch of the
    inverted eps 2e4 times; DDIM's spacing stops at a step with abar well above 0.
    """
    steps = str(sampling["steps"]).strip()
    if num_steps and steps.isdigit():
        try:
            D.space_timesteps(num_steps, f"ddim{steps}")
            steps = f"ddim{steps}"
        except ValueError:  # no integer stride gives exactly N steps: keep the given spacing
            log.warning(
                "no integer stride gives exactly %s DDIM steps of %d: inverting on evenly "
                "strided steps, whose last step (t = %d) may reconstruct poorly",
                steps,
                num_steps,
                num_steps - 1,
            )
    return {
        **sampling,
        "steps": steps,
        "method": "ddim",
        "eta": 0.0,
        "clip_x0": 0.0,
        "dynamic_threshold": 0.0,
    }


def upsampler_sampler(
    unet: UNet | LastStepUNets,
    diffusion: Mapping[str, Any],
    sampling: Mapping[str, Any],
    *,
    scale: int,
) -> Callable[[Any, Array, Array], Array]:
    """`fn(params, low_res, key) -> (B, scale h, scale w, 3)` images in [-1, 1].

    `low_res` (B, h, w, 3) in [-1, 1] is resized to the output size and concatenated to x_t
    at every step (`upsampler_input`); having no attention the U-Net runs on the whole image
    whatever crop size it trained on. `key` is one key or one per row. A `LastStepUNets`
    (Karlo's super-res) runs its `super_res_last` at the last step, `super_res_first` before.
    """
    # The original timestep of the last step (the schedule's first), where a LastStepUNets
    # switches nets.
    last_t = int(np.asarray(sampling_schedule(diffusion, sampling).timesteps)[0])

    @jax.jit
    def fn(params: Any, low_res: Array, key: Array) -> Array:
        b, h, w, c = low_res.shape
        noise_key, loop_key = split_key(key)
        x_T = D.row_normal(noise_key, (b, scale * h, scale * w, c))

        def model_fn(x: Array, t: Array) -> Array:
            inputs = upsampler_input(x, low_res)
            if isinstance(unet, LastStepUNets):
                out = jax.lax.cond(
                    t[0] == last_t,
                    lambda: unet.apply({"params": params}, inputs, t, last=True),
                    lambda: unet.apply({"params": params}, inputs, t, last=False),
                )
            else:
                out = unet.apply({"params": params}, inputs, t)
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
    with the text dropped, or, when `cond` holds `uncond` (the same three keys for one row,
    e.g. the empty caption's encoding: Karlo's guidance), on that caption), `decode` maps them
    from the diffusion space back to CLIP's (see `models.prior.denormalize_embedding`), and
    the one with the largest dot product with z_t is kept. `key` is one key or one per
    caption.
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
        cond = dict(cond)
        uncond = cond.pop("uncond", None)
        b = cond["z_t"].shape[0]
        repeated = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), cond)
        if D.is_key_batch(key):  # row r's K candidates from key r alone
            key = jax.vmap(
                lambda row: jax.vmap(lambda j: jax.random.fold_in(row, j))(jnp.arange(k))
            )(key)
            key = key.reshape(b * k, *key.shape[2:])  # raw uint32 keys keep their last axis
        noise_key, loop_key = split_key(key)
        x_T = D.row_normal(noise_key, (b * k, prior.clip_dim))
        if scale == 1.0:
            x0 = _sample(
                lambda x, t: model_fn(params, x, t, repeated), x_T, loop_key, diffusion, sampling
            )
        else:
            n = b * k
            if uncond is None:
                unconditional = {**repeated, "drop_text": jnp.ones((n,), bool)}
            else:
                unconditional = {
                    **broadcast_rows(dict(uncond), n),
                    "drop_text": jnp.zeros((n,), bool),
                }
            guided = D.guided_model_fn(
                lambda x, t, c: model_fn(params, x, t, c),
                cond={**repeated, "drop_text": jnp.zeros((n,), bool)},
                uncond=unconditional,
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


def _categorical(key: Array, logits: Array) -> Array:
    """A draw per row of logits (B, V), from one key or from each row's own key."""
    if D.is_key_batch(key):
        return jax.vmap(jax.random.categorical)(key, logits)
    return jax.random.categorical(key, logits, axis=-1)


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
    `key` is one key or one per caption.
    """
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
        dot_key, loop_key = split_key(key)
        if D.is_key_batch(key):
            draw = functools.partial(sample_dot_tokens, codec.dot, percentile=dot_percentile)
            dot = jax.vmap(draw)(dot_key)
        else:
            dot = sample_dot_tokens(codec.dot, dot_key, (b,), percentile=dot_percentile)
        dot = dot.reshape(b).astype(jnp.int32)

        def body(j: Array, tokens: Array) -> Array:
            logits = logits_at(params, cond, dot, tokens, j) / temperature
            logits = top_p_logits(logits, top_p)
            token = _categorical(D.fold_in(loop_key, j), logits)
            return tokens.at[:, j].set(token.astype(jnp.int32))

        return dot, jax.lax.fori_loop(0, d, body, jnp.zeros((b, d), jnp.int32))

    @jax.jit
    def fn(params: Any, codec: Any, cond: Mapping[str, Array], key: Array) -> Array:
        _, tokens = tokens_fn(params, codec, cond, key)
        return unit_norm(codec_decode(codec, tokens))

    fn.tokens = jax.jit(tokens_fn)  # (dot token (B,), PCA tokens (B, d)) before decoding
    return fn
