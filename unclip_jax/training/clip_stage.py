"""The `clip` stage: CLIP trained from scratch with the contrastive loss (`configs/clip.py`).

The tokenizer is a byte-level BPE trained on the training captions (or read from
`model.tokenizer_dir`); at the end of training the EMA params, the tokenizer and the
preprocessing config are written to WORKDIR/clip in Hugging Face's layout, so the result loads
with `clip.load_pretrained` like a downloaded CLIP, and text -> image retrieval on the test split
is logged (overall and per attribute on `shapes`).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from unclip_jax.clip import (
    CLIP_MEAN,
    CLIP_STD,
    PretrainedClip,
    example_transform,
    save_pretrained,
)
from unclip_jax.data.pipeline import dataset_spec, open_dataset
from unclip_jax.data.shapes import ATTRIBUTES, hard_negative_captions, make_caption
from unclip_jax.evaluation.retrieval import text_to_image_top1
from unclip_jax.models.clip import CLIP, ClipConfig, contrastive_loss
from unclip_jax.models.clip import init_params as init_clip_params
from unclip_jax.models.clip_tokenizer import ClipTokenizer
from unclip_jax.training.files import copy_tree, is_remote, local_dir_of
from unclip_jax.training.stages import (
    Hook,
    HookContext,
    Stage,
    StepSpec,
    register_stage,
    register_step_spec,
    stage_pipeline,
)

log = logging.getLogger("unclip_jax.train")


def clip_tokenizer(
    config: ml_collections.ConfigDict, source: Any, workdir: str | None = None
) -> ClipTokenizer:
    """The run's tokenizer: model.tokenizer_dir's, the one this run saved, or a new BPE.

    A BPE trained on the training captions is saved to WORKDIR/tokenizer at the run's first
    start and read back on every resume, so the ids a checkpoint was trained with never change
    (training is deterministic, but a `tokenizers` upgrade between two starts could differ).
    """
    if config.model.get("tokenizer_dir"):
        return ClipTokenizer.from_dir(config.model.tokenizer_dir)
    saved = epath.Path(workdir, "tokenizer") if workdir else None
    if saved and (saved / "tokenizer.json").exists():
        return ClipTokenizer.from_dir(local_dir_of(saved))
    count = min(len(source), config.model.get("tokenizer_captions", 10_000))
    captions = [str(source[i]["caption"]) for i in range(count)]
    tokenizer = ClipTokenizer.train(captions, vocab_size=config.model.vocab_size)
    if saved and jax.process_index() == 0:
        _save_through_local(saved, tokenizer.save)
    return tokenizer


def _save_through_local(out: epath.Path, save: Any) -> None:
    """`save(directory)` into `out`, through a local directory when `out` is a URI."""
    if not is_remote(out):
        save(str(out))
        return
    with tempfile.TemporaryDirectory() as local:
        save(local)
        copy_tree(local, out)


def _retrieval_hook(
    config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, clip_config: ClipConfig
) -> Hook:
    spec, kwargs = dataset_spec(config.data)
    cache: dict[str, Any] = {}

    def test_inputs() -> dict[str, Any]:
        # Read and preprocess the test examples once; every evaluation reuses them.
        if not cache:
            test = open_dataset(spec, "test", **kwargs)
            examples = [test[i] for i in range(min(len(test), config.eval.num_examples))]
            transform = example_transform(tokenizer, clip_config)
            rows = [transform(e, None) for e in examples]
            cache.update(
                {
                    k: np.stack([r[k] for r in rows])
                    for k in ("input_ids", "attention_mask", "pixels")
                }
            )
            if "labels" in examples[0]:
                cache["labels"] = {
                    k: np.array([e["labels"][k] for e in examples]) for k in examples[0]["labels"]
                }
        return cache

    def run(ctx: HookContext) -> dict[str, float]:
        inputs = test_inputs()
        model = PretrainedClip(clip_config, ctx.state.ema_params, tokenizer)
        n, batch = len(inputs["pixels"]), 256
        z_t = np.concatenate(
            [
                np.asarray(
                    model.encode_tokens(
                        inputs["input_ids"][i : i + batch], inputs["attention_mask"][i : i + batch]
                    )
                )
                for i in range(0, n, batch)
            ]
        )
        z_i = np.concatenate(
            [
                np.asarray(model.encode_pixels(inputs["pixels"][i : i + batch]))
                for i in range(0, n, batch)
            ]
        )
        scores = text_to_image_top1(z_t, z_i, inputs.get("labels"))
        log.info("text->image top-1 on %d test examples: %s", n, scores)
        return scores

    return Hook("retrieval", config.eval.every, run)


def _export_hook(
    config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, clip_config: ClipConfig
) -> Hook:
    def run(ctx: HookContext) -> None:
        if ctx.step != config.train.steps:
            return None
        params = jax.device_get(ctx.state.ema_params)
        if jax.process_index() == 0:
            out = epath.Path(ctx.workdir, "clip")
            _save_through_local(
                out,
                lambda d: save_pretrained(
                    d, clip_config, params, tokenizer, image_mean=CLIP_MEAN, image_std=CLIP_STD
                ),
            )
            log.info("wrote the trained CLIP (EMA params) to %s", out)
        return None

    return Hook("export", config.train.steps, run)


def _num_negatives(config: ml_collections.ConfigDict) -> int:
    """Hard-negative captions per example (config `hard_negatives.num`; absent in old configs)."""
    return int(config.get("hard_negatives", {}).get("num", 0))


def _check_hard_negatives(config: ml_collections.ConfigDict) -> None:
    """Refuses hard negatives a run cannot make, before any data is read."""
    num = _num_negatives(config)
    if num < 0:
        raise ValueError(f"hard_negatives.num must be 0 (none) or more, got {num}")
    if num == 0:
        return
    if config.data.dataset != "shapes":
        raise ValueError(
            f"hard_negatives.num {num} swaps attribute words of `shapes` captions; "
            f"data.dataset is {config.data.dataset!r}: set hard_negatives.num=0"
        )
    hard_negative_captions(  # checks the attributes and that num swaps exist
        make_caption(dict.fromkeys(ATTRIBUTES, 0)),
        np.random.default_rng(0),
        num=num,
        attributes=tuple(config.hard_negatives.attributes),
    )


def _with_hard_negatives(
    config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, clip_config: ClipConfig
) -> Any:
    """The example transform, plus `negative_ids`/`negative_mask` (K, L) when
    `hard_negatives.num` K > 0: the caption with one attribute swapped, K times (`shapes`)."""
    transform = example_transform(tokenizer, clip_config)
    num = _num_negatives(config)
    if num == 0:
        return transform
    attributes = tuple(config.hard_negatives.attributes)

    def transform_with_negatives(example: dict[str, Any], rng: np.random.Generator) -> dict:
        out = transform(example, rng)
        negatives = hard_negative_captions(
            str(example["caption"]), rng, num=num, attributes=attributes
        )
        out["negative_ids"], out["negative_mask"] = tokenizer(
            negatives, context_length=clip_config.context_length
        )
        return out

    return transform_with_negatives


def _clip_step(config: ml_collections.ConfigDict, clip_config: ClipConfig) -> dict[str, Any]:
    """The CLIP, its init and contrastive loss: what training and planning share."""
    dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
    model = CLIP(clip_config, dtype=dtype, remat=config.train.get("remat", False))
    num = _num_negatives(config)

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array, frozen: None) -> tuple:
        del rng, frozen
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, length = ids.shape
        if num:  # one pass of the text tower over the captions and their negatives
            ids = jnp.concatenate([ids, batch["negative_ids"].reshape(b * num, length)])
            mask = jnp.concatenate([mask, batch["negative_mask"].reshape(b * num, length)])
        z_text, z_i, scale = model.apply({"params": params}, ids, mask, batch["pixels"])
        negatives = z_text[b:].reshape(b, num, -1) if num else None
        return contrastive_loss(z_text[:b], z_i, scale, negatives)

    return dict(init_params=functools.partial(init_clip_params, model), loss_fn=loss_fn)


@register_step_spec("clip")
def clip_step_spec(config: ml_collections.ConfigDict, clip_config: None = None) -> StepSpec:
    """CLIP's contrastive train step, its vocabulary the config's `model.vocab_size`."""
    del clip_config
    clip_config = ClipConfig.from_model_config(config.model.to_dict())
    tokens, size = clip_config.context_length, clip_config.vision.image_size
    row = {
        "input_ids": jax.ShapeDtypeStruct((tokens,), np.int32),
        "attention_mask": jax.ShapeDtypeStruct((tokens,), np.int32),
        "pixels": jax.ShapeDtypeStruct((size, size, 3), np.float32),
    }
    if num := _num_negatives(config):
        row["negative_ids"] = jax.ShapeDtypeStruct((num, tokens), np.int32)
        row["negative_mask"] = jax.ShapeDtypeStruct((num, tokens), np.int32)
    return StepSpec(
        init_params=(step := _clip_step(config, clip_config))["init_params"],
        loss_fn=step["loss_fn"],
        batch_row=row,
    )


@register_stage("clip")
def build_clip_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> Stage:
    """CLIP from scratch: init, the symmetric contrastive loss, image-text batches, hooks."""
    _check_hard_negatives(config)
    spec, kwargs = dataset_spec(config.data)
    train_source = open_dataset(spec, "train", **kwargs)
    tokenizer = clip_tokenizer(config, train_source, workdir)
    clip_config = ClipConfig.from_model_config(
        {
            **config.model.to_dict(),
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_id,
        }
    )
    step = _clip_step(config, clip_config)
    transform = _with_hard_negatives(config, tokenizer, clip_config)
    hooks = [_export_hook(config, tokenizer, clip_config)]
    if config.eval.every > 0:
        hooks.insert(0, _retrieval_hook(config, tokenizer, clip_config))
    return Stage(
        init_params=step["init_params"],
        loss_fn=step["loss_fn"],
        make_data=functools.partial(stage_pipeline, config, train_source, transform),
        hooks=tuple(hooks),
    )
