"""The `prior` stage: P(z_i | y), trained on CLIP embedding shards.

Each example is a row of `data.embeddings_dir` (`unclip-jax embed`, clip-retrieval or LAION
npy shards): the image embedding z_i and the caption. The caption is tokenized with the frozen
CLIP of `clip.dir`, whose text tower gives z_t and the caption's token states inside the step.
`kind` "diffusion" trains the diffusion prior (x0 prediction, MSE, z_i scaled by
`embedding.normalization`); "autoregressive" the AR prior (cross-entropy over the quantised PCA
tokens of the unit-norm z_i, after the caption, z_t and the quantised z_i . z_t). Either drops
the text `guidance.cond_drop_prob` of the time. What is fitted on the training shards at the
first start is kept in the workdir, so a resumed run (and sampling) uses the same: the
per-dimension statistics of "standardize" (prior_embedding.safetensors) and the AR prior's PCA
and quantisers (prior_codec.safetensors).

Every `eval.every` steps the EMA prior samples z_i for test captions (best of
`guidance.num_candidates` by the dot product with z_t) and logs the cosine with the true z_i,
with z_t and with an unrelated caption's z_t, and the top-1 retrieval of the true image among
the test images by the sampled z_i.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from unclip_jax import diffusion as D
from unclip_jax.clip import PretrainedClip
from unclip_jax.config import ConfigError
from unclip_jax.data.embeddings import EmbeddingShards
from unclip_jax.embed_job import check_shards_come_from, open_shards
from unclip_jax.models.builders import init_module, prior_example_inputs, prior_from_config
from unclip_jax.models.clip import CLIP, ClipConfig
from unclip_jax.models.prior import (
    denormalize_embedding,
    fit_embedding_stats,
    normalize_embedding,
    unit_norm,
)
from unclip_jax.models.prior_codec import (
    PriorCodec,
    codec_encode,
    codec_from_arrays,
    codec_to_arrays,
    dot_tokens,
    fit_codec,
)
from unclip_jax.parallel import replicate
from unclip_jax.sampling.stages import ar_prior_sampler, prior_sampler, prior_text_conditioning
from unclip_jax.training.decoder_stage import (
    frozen_clip_layout,
    frozen_clip_spec,
    load_frozen_clip,
)
from unclip_jax.training.denoising import denoising_loss
from unclip_jax.training.files import load_arrays, save_arrays, write_bytes_atomically
from unclip_jax.training.samples import gather_to_host
from unclip_jax.training.stages import (
    Hook,
    HookContext,
    Stage,
    StepSpec,
    register_stage,
    register_step_spec,
    stage_pipeline,
)
from unclip_jax.training.step import COMPUTE_DTYPES, cast_floats

Array = jax.Array
log = logging.getLogger("unclip_jax.train")

PRIOR_KINDS = ("diffusion", "autoregressive")
STATS_FILE = "prior_embedding.safetensors"
CODEC_FILE = "prior_codec.safetensors"
# Rows the standardisation statistics are fitted on (a random subset of larger sets).
STATS_ROWS = 200_000


def check_prior_fits_clip(model: Mapping[str, Any], clip_config: ClipConfig, path: str) -> None:
    """ConfigError naming the first model key that disagrees with the CLIP at `path`."""
    wanted = {"clip_dim": clip_config.projection_dim, "text_tokens": clip_config.context_length}
    for key, value in wanted.items():
        if model[key] != value:
            raise ConfigError(
                f"config key 'model.{key}' is {model[key]!r}, but the CLIP at {path} needs "
                f"{value!r}"
            )


def fitted_once(
    name: str,
    fit: Callable[[], dict[str, np.ndarray]],
    *,
    workdir: str | None,
    init_from: str = "",
    settings: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Arrays fitted on the training data once per run and kept in WORKDIR/`name`.

    Read back when the workdir has them (a resume), else copied from `init_from`'s workdir (a
    run that starts from another's weights keeps the statistics those weights were trained
    with), else fitted. With several processes, process 0 fits and writes (atomically) and
    every process then reads the same file. `settings` (strings) are stored beside the arrays;
    reading a file made with other settings is a ConfigError naming them.
    """
    path = epath.Path(workdir, name) if workdir else None
    source = epath.Path(init_from, name) if init_from else None
    if path is None:
        return fit()
    if not path.exists():
        if jax.process_index() == 0:
            if source is not None and source.exists():
                write_bytes_atomically(path, source.read_bytes())
                log.info("using %s from train.init_from: %s", name, source)
            else:
                save_arrays(path, fit(), settings)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"fitted {name}")
    arrays, saved = load_arrays(path)
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in (settings or {}).items() if saved.get(k) != v
    ]
    if changed:
        raise ConfigError(
            f"{path} was fitted with other settings ({'; '.join(changed)}): restore them or "
            "start a new workdir"
        )
    return arrays


def embedding_stats(
    config: ml_collections.ConfigDict, shards: EmbeddingShards, workdir: str | None
) -> dict[str, np.ndarray] | None:
    """The run's clip_mean/clip_std ("standardize", fitted on the training shards at the first
    start, `fitted_once`); None for the other normalizations."""
    if config.embedding.normalization != "standardize":
        return None

    def fit() -> dict[str, np.ndarray]:
        return fit_embedding_stats(_training_rows(shards)[0])

    stats = fitted_once(
        STATS_FILE, fit, workdir=workdir, init_from=config.train.get("init_from", "")
    )
    if stats["clip_mean"].shape != (config.model.clip_dim,):
        raise ConfigError(
            f"{STATS_FILE} holds statistics of {stats['clip_mean'].shape[0]}-d embeddings, "
            f"model.clip_dim is {config.model.clip_dim}"
        )
    return stats


def _training_rows(shards: EmbeddingShards) -> tuple[np.ndarray, np.ndarray]:
    """(z_i, z_t) of the rows fitting uses: all of them, or a seeded random STATS_ROWS."""
    rows = len(shards)
    index = range(rows)
    if rows > STATS_ROWS:
        index = np.sort(np.random.default_rng(0).choice(rows, STATS_ROWS, replace=False))
    pairs = [shards[int(i)] for i in index]
    return np.stack([p["img_emb"] for p in pairs]), np.stack([p["text_emb"] for p in pairs])


def prior_transform(clip: PretrainedClip) -> Any:
    """`transform(row, rng)`: an embedding-shard row -> {"z_i", "input_ids", "text_mask"}."""
    tokenizer, length = clip.tokenizer, clip.config.context_length  # not the whole CLIP

    def transform(row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        del rng
        ids, mask = tokenizer([str(row["caption"])], context_length=length)
        return {
            "z_i": np.asarray(row["img_emb"], np.float32),
            "input_ids": ids[0],
            "text_mask": mask[0].astype(bool),
        }

    return transform


def prior_scores(sampled: np.ndarray, true_z_i: np.ndarray, z_t: np.ndarray) -> dict[str, float]:
    """The evaluation of sampled z_i (N, D) against the true ones and the captions' z_t.

    cos_true: mean cosine with the true z_i; cos_text: with the caption's z_t; cos_unrelated:
    with another caption's z_t (the next row's); top1: how often the true image is the
    nearest of the N test images (by cosine) to the sampled z_i.
    """

    s, i, t = (np.asarray(unit_norm(x), np.float64) for x in (sampled, true_z_i, z_t))
    # Retrieval among the distinct test images (rows of one image with several captions count
    # once), and for each row the next caption (cyclically) that is not its own.
    images, image_of_row = np.unique(np.round(i, 5), axis=0, return_inverse=True)
    nearest = np.argmax(s @ np.asarray(unit_norm(images)).T, axis=1)
    n = len(s)
    unrelated = np.arange(n)
    for r in range(n):
        for shift in range(1, n):
            other = (r + shift) % n
            if (
                t[other] @ t[r] < 1 - 1e-6
                and image_of_row.ravel()[other] != image_of_row.ravel()[r]
            ):
                unrelated[r] = other
                break
    return {
        "cos_true": float(np.mean(np.sum(s * i, axis=1))),
        "cos_text": float(np.mean(np.sum(s * t, axis=1))),
        "cos_unrelated": float(np.mean(np.sum(s * t[unrelated], axis=1))),
        "top1": float(np.mean(nearest == image_of_row.ravel())),
    }


def _eval_hook(
    config: ml_collections.ConfigDict,
    sample: Any,
    encode: Any,
    clip: PretrainedClip,
    clip_params: Any,
) -> Hook:
    """`sample(params, cond, key) -> z_i` on the first test captions, scored by `prior_scores`."""
    shards = open_shards(
        config.data.test_embeddings_dir, "data.test_embeddings_dir", config.model.clip_dim
    )
    transform = prior_transform(clip)
    cache: dict[str, Any] = {}

    def run(ctx: HookContext) -> dict[str, float]:
        if not cache:
            count = min(len(shards), config.eval.num_examples)
            rows = [transform(shards[i], None) for i in range(count)]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            cond = jax.device_get(
                jax.jit(encode)(clip_params, batch["input_ids"], batch["text_mask"])
            )
            cond["input_ids"] = batch["input_ids"]
            cache.update(cond=replicate(cond, ctx.mesh), z_t=cond["z_t"], z_i=batch["z_i"])
        key = jax.random.key(config.train.seed)
        sampled = gather_to_host(sample(ctx.state.ema_params, cache["cond"], key))
        scores = prior_scores(sampled, cache["z_i"], cache["z_t"])
        log.info("prior samples on %d test captions: %s", len(sampled), scores)
        return scores

    return Hook("eval", config.eval.every, run)


def _diffusion_step(config, clip_config, encode, dtype) -> dict[str, Any]:
    """The diffusion prior, its init and loss (the "standardize" statistics come in
    `frozen["stats"]`; other normalizations have none)."""
    prior = prior_from_config(
        config,
        vocab_size=clip_config.text.vocab_size,
        dtype=dtype,
        remat=config.train.get("remat", False),
    )
    sched = D.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
    emb = config.embedding
    drop_prob = config.guidance.cond_drop_prob

    def loss_fn(params: Any, batch: Any, rng: Array, frozen: Any) -> tuple:
        cond = encode(frozen["clip"], batch["input_ids"], batch["text_mask"])
        x0 = normalize_embedding(
            batch["z_i"], method=emb.normalization, scale=emb.embed_scale, stats=frozen.get("stats")
        )
        drop_key, dropout_key, diffusion_key = jax.random.split(rng, 3)
        drop_text = jax.random.bernoulli(drop_key, drop_prob, (x0.shape[0],))

        def apply(x_t: Array, t: Array) -> Array:
            return prior.apply(
                {"params": params},
                x_t,
                t,
                cond["z_t"],
                cond["text_states"],
                cond["text_mask"],
                drop_text=drop_text,
                deterministic=False,
                rngs={"dropout": dropout_key},
            )

        return denoising_loss(apply, x0, diffusion_key, sched=sched, diffusion=config.diffusion)

    init_params = functools.partial(
        init_module, prior, prior_example_inputs(config, text_width=clip_config.text.hidden_size)
    )
    return dict(prior=prior, init_params=init_params, loss_fn=loss_fn)


def _diffusion_sampler(config, prior, stats) -> Callable[..., Array]:
    """`sample(params, cond, key)`: the diffusion prior's z_i for `cond`'s captions."""
    emb = config.embedding
    decode = functools.partial(
        denormalize_embedding, method=emb.normalization, scale=emb.embed_scale, stats=stats
    )
    sampler = prior_sampler(
        prior,
        config.diffusion,
        config.sampling,
        decode=decode,
        num_candidates=config.guidance.num_candidates,
    )

    def sample(params: Any, cond: Mapping[str, Array], key: Array) -> Array:
        return sampler(params, {k: cond[k] for k in ("z_t", "text_states", "text_mask")}, key)

    return sample


def prior_codec(
    config: ml_collections.ConfigDict, shards: EmbeddingShards, workdir: str | None
) -> PriorCodec:
    """The autoregressive prior's PCA + quantisers, fitted on the training shards' unit-norm
    z_i and z_t at the first start (`fitted_once`)."""
    ar = config.ar

    def fit() -> dict[str, np.ndarray]:
        z_i, z_t = _training_rows(shards)
        codec = fit_codec(
            np.asarray(unit_norm(z_i)),
            np.asarray(unit_norm(z_t)),
            components=ar.pca_components,
            num_buckets=ar.num_buckets,
            method=ar.bucketing,
            clip_quantile=ar.clip_quantile,
        )
        return codec_to_arrays(codec)

    settings = {"bucketing": ar.bucketing, "clip_quantile": str(ar.clip_quantile)}
    arrays = fitted_once(
        CODEC_FILE,
        fit,
        workdir=workdir,
        init_from=config.train.get("init_from", ""),
        settings=settings,
    )
    return codec_from_arrays(
        arrays,
        embed_dim=config.model.clip_dim,
        components=ar.pca_components,
        num_buckets=ar.num_buckets,
    )


def _autoregressive_step(config, clip_config, encode, dtype) -> dict[str, Any]:
    """The autoregressive prior, its init and loss (the codec comes in `frozen["codec"]`)."""
    prior = prior_from_config(
        config,
        vocab_size=clip_config.text.vocab_size,
        dtype=dtype,
        remat=config.train.get("remat", False),
    )
    drop_prob = config.guidance.cond_drop_prob

    def loss_fn(params: Any, batch: Any, rng: Array, frozen: Any) -> tuple:
        codec = frozen["codec"]
        z_t = unit_norm(encode(frozen["clip"], batch["input_ids"], batch["text_mask"])["z_t"])
        z_i = unit_norm(batch["z_i"])
        tokens = codec_encode(codec, z_i)
        dot = dot_tokens(codec, z_i, z_t).reshape(-1)
        drop_key, dropout_key = jax.random.split(rng)
        drop_text = jax.random.bernoulli(drop_key, drop_prob, (z_i.shape[0],))
        logits = prior.apply(
            {"params": params},
            batch["input_ids"],
            batch["text_mask"],
            z_t,
            dot,
            tokens,
            drop_text=drop_text,
            deterministic=False,
            rngs={"dropout": dropout_key},
        )
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == tokens)
        return jnp.mean(nll), {"token_accuracy": accuracy}

    init_params = functools.partial(
        init_module, prior, prior_example_inputs(config, text_width=clip_config.text.hidden_size)
    )
    return dict(prior=prior, init_params=init_params, loss_fn=loss_fn)


def _autoregressive_sampler(config, prior, codec) -> Callable[..., Array]:
    """`sample(params, cond, key)`: the AR prior's z_i for `cond`'s captions."""
    ar = config.ar
    sampler = ar_prior_sampler(
        prior,
        temperature=ar.temperature,
        top_p=ar.top_p,
        guidance_scale=config.sampling.guidance_scale,
        dot_percentile=ar.dot_product_percentile,
    )

    def sample(params: Any, cond: Mapping[str, Array], key: Array) -> Array:
        inputs = {
            "input_ids": cond["input_ids"],
            "text_mask": cond["text_mask"],
            "z_t": unit_norm(cond["z_t"]),
        }
        return sampler(params, codec, inputs, key)

    return sample


def check_prior_kind(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming a `kind` or AR sampling setting out of range."""
    if config.kind not in PRIOR_KINDS:
        raise ConfigError(
            f"config key 'kind' is {config.kind!r}; valid values: {', '.join(PRIOR_KINDS)}"
        )
    if config.kind == "autoregressive":
        if not config.ar.temperature > 0:
            raise ConfigError(f"config key 'ar.temperature' is {config.ar.temperature}: > 0")
        if not 0 < config.ar.top_p <= 1:
            raise ConfigError(f"config key 'ar.top_p' is {config.ar.top_p}: in (0, 1]")


def _frozen_extras_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """ShapeDtypeStructs of what a prior fits on its shards: the "standardize" statistics, or
    the AR prior's codec (its shapes follow from the config alone)."""
    dim = config.model.clip_dim
    if config.kind == "diffusion":
        if config.embedding.normalization != "standardize":
            return {}
        row = jax.ShapeDtypeStruct((dim,), np.float32)
        return {"stats": {"clip_mean": row, "clip_std": row}}
    ar = config.ar
    # A codec fitted to random rows has the shapes of one fitted to real embeddings.
    rows = np.random.default_rng(0).normal(size=(max(4 * ar.pca_components, 64), dim))
    codec = fit_codec(
        np.asarray(unit_norm(rows), np.float32),
        np.asarray(unit_norm(rows[::-1]), np.float32),
        components=ar.pca_components,
        num_buckets=ar.num_buckets,
        method=ar.bucketing,
        clip_quantile=ar.clip_quantile,
    )
    return {"codec": jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), codec)}


@register_step_spec("prior", clip_conditioned=True)
def prior_step_spec(config: ml_collections.ConfigDict, clip_config: ClipConfig) -> StepSpec:
    """The prior's train step for a CLIP of `clip_config`, with no CLIP or shards on disk."""
    check_prior_kind(config)
    check_prior_fits_clip(config.model, clip_config, "the planned CLIP")
    dtype = COMPUTE_DTYPES[config.train.compute_dtype]
    encode = prior_text_conditioning(CLIP(clip_config, dtype=dtype))
    build = _diffusion_step if config.kind == "diffusion" else _autoregressive_step
    step = build(config, clip_config, encode, dtype)
    tokens = clip_config.context_length
    return StepSpec(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        batch_row={
            "z_i": jax.ShapeDtypeStruct((config.model.clip_dim,), np.float32),
            "input_ids": jax.ShapeDtypeStruct((tokens,), np.int32),
            "text_mask": jax.ShapeDtypeStruct((tokens,), np.bool_),
        },
        frozen=(
            frozen := {"clip": frozen_clip_spec(clip_config, dtype), **_frozen_extras_spec(config)}
        ),
        frozen_layout={**frozen, "clip": frozen_clip_layout(clip_config)},
    )


@register_stage("prior")
def build_prior_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> Stage:
    """The diffusion or autoregressive prior (`kind`) on embedding shards, conditioned by the
    frozen CLIP's text tower."""
    check_prior_kind(config)
    clip = load_frozen_clip(config)
    check_prior_fits_clip(config.model, clip.config, config.clip.dir)
    train_source = open_shards(
        config.data.embeddings_dir, "data.embeddings_dir", config.model.clip_dim
    )
    check_shards_come_from(config.data.embeddings_dir, config.clip.dir)
    dtype = COMPUTE_DTYPES[config.train.compute_dtype]
    # A host copy in the compute dtype: the loop replicates it on the mesh.
    clip_params = cast_floats(jax.device_get(clip.params), dtype)
    encode = prior_text_conditioning(CLIP(clip.config, dtype=dtype))
    if config.kind == "diffusion":
        step = _diffusion_step(config, clip.config, encode, dtype)
        stats = embedding_stats(config, train_source, workdir)
        sample = _diffusion_sampler(config, step["prior"], stats)
        extras = {} if stats is None else {"stats": stats}
    else:
        step = _autoregressive_step(config, clip.config, encode, dtype)
        codec = jax.tree.map(np.asarray, prior_codec(config, train_source, workdir))
        sample = _autoregressive_sampler(config, step["prior"], codec)
        extras = {"codec": codec}
    hooks = []
    if config.eval.every > 0:
        hooks.append(_eval_hook(config, sample, encode, clip, clip_params))
    return Stage(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        make_data=functools.partial(stage_pipeline, config, train_source, prior_transform(clip)),
        hooks=tuple(hooks),
        frozen={"clip": clip_params, **extras},
        frozen_layout={"clip": frozen_clip_layout(clip.config), **extras},
    )
