"""The decoder and upsampler stages: configs, CLIP conditioning, training, sample grids."""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clip_fixture import write_random_clip
from PIL import Image
from step_spec_check import assert_spec_is_the_stage

from unclip_jax.clip import load_pretrained
from unclip_jax.config import ConfigError, load_config
from unclip_jax.models.builders import (
    decoder_example_inputs,
    decoder_from_config,
    init_module,
    upsampler_example_inputs,
    upsampler_from_config,
)
from unclip_jax.models.clip import OPENAI_VIT_L14, ClipConfig, TextConfig, VisionConfig
from unclip_jax.models.unet import count_params
from unclip_jax.sampling import decoder_inverter, decoder_sampler, upsampler_sampler
from unclip_jax.training.decoder_stage import check_clip_fits
from unclip_jax.training.loop import train_and_evaluate
from unclip_jax.training.metrics import read_metrics
from unclip_jax.training.stages import build_stage, build_step_spec
from unclip_jax.training.state import TrainState
from unclip_jax.training.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The paper's CLIP: ViT-H/16 image tower, 1024-d embeddings, a 77-token text tower.
VIT_H_LIKE = ClipConfig(
    text=TextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
    ),
    vision=VisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=16,
    ),
    projection_dim=1024,
)


def config(stage: str, variant: str = "tiny", **overrides):
    return load_config(f"{ROOT}/configs/{stage}.py:{variant}", overrides)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_random_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


# --- every variant builds, with the sizes Table 3 gives ---------------------------------------

# (stage, variant, parameter count it must come near, relative tolerance); the paper's figures
# (Table 3: decoder 3.5B, 64->256 700M, 256->1024 300M) and Karlo's published U-Nets.
SIZES = [
    ("decoder", "paper", 3.5e9, 0.05),
    ("decoder", "karlo", 0.89e9, 0.05),
    ("upsampler", "paper", 0.7e9, 0.06),
    ("upsampler", "paper_1024", 0.3e9, 0.07),
]


def _abstract(stage: str, c):
    model = c.model.to_dict()
    if stage == "decoder":
        module, inputs = decoder_from_config(model), decoder_example_inputs(model, batch=2)
    else:
        module = upsampler_from_config(
            model, learned_variance=c.diffusion.variance == "learned_range"
        )
        inputs = upsampler_example_inputs(model, batch=2)
    params = jax.eval_shape(functools.partial(init_module, module, inputs), jax.random.key(0))
    out = jax.eval_shape(lambda p: module.apply({"params": nn.meta.unbox(p)}, **inputs), params)
    return params, out


@pytest.mark.parametrize(
    "stage,variant",
    [("decoder", v) for v in ("tiny", "shapes", "paper", "karlo")]
    + [("upsampler", v) for v in ("tiny", "shapes", "paper", "paper_1024", "karlo")],
)
def test_every_variant_builds_with_its_output_shape(stage, variant):
    c = config(stage, variant)
    _, out = _abstract(stage, c)  # abstract: the paper's 3.5B costs no memory
    res = c.model.resolution
    channels = 6 if c.diffusion.variance == "learned_range" else 3
    assert out.shape == (2, res, res, channels)


@pytest.mark.parametrize("stage,variant,expected,rtol", SIZES)
def test_paper_and_karlo_variants_have_their_published_sizes(stage, variant, expected, rtol):
    params, _ = _abstract(stage, config(stage, variant))
    assert count_params(params) == pytest.approx(expected, rel=rtol)


@pytest.mark.parametrize(
    "stage,variant",
    [("decoder", "paper"), ("decoder", "karlo")]
    + [("upsampler", v) for v in ("paper", "paper_1024", "karlo")],
)
def test_paper_scale_variants_shard_params_over_every_device(stage, variant):
    c = config(stage, variant)
    assert (c.mesh.data, c.mesh.fsdp) == (1, -1)


@pytest.mark.parametrize(
    "variant,clip_config",
    [("karlo", OPENAI_VIT_L14), ("paper", VIT_H_LIKE)],
)
def test_paper_and_karlo_decoders_fit_the_clip_they_are_meant_for(variant, clip_config):
    """Karlo's decoder reads CLIP ViT-L/14's text states; the paper's has its own caption
    transformer (128 tokens of CLIP's BPE) and only needs the CLIP's embedding width."""
    check_clip_fits(config("decoder", variant).model.to_dict(), clip_config, 49408, "clip")
    with pytest.raises(ConfigError, match=r"'model\.clip_dim'"):
        wrong = config("decoder", variant, **{"model.clip_dim": 512}).model
        check_clip_fits(wrong, clip_config, 49408, "c")


# --- the decoder stage --------------------------------------------------------------------------


def test_decoder_stage_refuses_a_clip_of_another_width(clip_dir, data_dir):
    c = config("decoder", **{"clip.dir": clip_dir, "data.data_dir": data_dir, "model.clip_dim": 32})
    with pytest.raises(ConfigError, match=r"'model.clip_dim' is 32, but the CLIP .* needs 16"):
        build_stage(c)
    karlo_style = config(
        "decoder",
        **{"clip.dir": clip_dir, "data.data_dir": data_dir, "model.text_encoder": "clip"},
    )
    with pytest.raises(ConfigError, match=r"'model.text_width' is 16, but .* needs 32"):
        build_stage(karlo_style)


def test_decoder_stage_names_a_missing_clip_dir(tmp_path):
    c = config("decoder", **{"clip.dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_stage(c)


def _stage_and_batch(c):
    stage = build_stage(c)
    data = stage.make_data(0, 1)
    batch = jax.tree.map(jnp.asarray, next(data))
    params = nn.meta.unbox(jax.jit(stage.init_params)(jax.random.key(0)))
    return stage, batch, params


def _adam_steps(stage, params):
    """(a fresh TrainState of `params`, a jitted Adam 3e-3 step of the stage's loss, no EMA)."""
    tx = optax.adam(3e-3)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(1)),
    )
    return state, jax.jit(make_train_step(stage.loss_fn, tx, ema_decay=0.0))


@pytest.mark.parametrize("text_encoder", ["transformer", "clip"])
def test_a_few_decoder_steps_on_a_shapes_batch_lower_the_loss(clip_dir, data_dir, text_encoder):
    overrides = {"clip.dir": clip_dir, "data.data_dir": data_dir}
    if text_encoder == "clip":  # Karlo's way: the CLIP's own text states (width 32)
        overrides.update({"model.text_encoder": "clip", "model.text_width": 32})
    c = config("decoder", **overrides)
    stage, batch, params = _stage_and_batch(c)
    assert batch["image"].shape == (8, 16, 16, 3)  # 32 px shapes resized to the model's 16
    state, step = _adam_steps(stage, params)
    frozen = stage.frozen
    probe = jax.jit(stage.loss_fn)  # one fixed (t, noise, drops) draw to compare params on
    key = jax.random.key(7)
    before, metrics = probe(params, batch, key, frozen)
    # The hybrid loss is L_simple + lambda N L_vlb (lambda 0.001, N 1000).
    np.testing.assert_allclose(before, metrics["mse"] + 1.0 * metrics["vlb"], rtol=1e-5)
    for _ in range(12):
        state, _ = step(state, batch, frozen)
    after, after_metrics = probe(state.params, batch, key, frozen)
    assert float(after_metrics["mse"]) < 0.8 * float(metrics["mse"])
    assert float(after) < float(before)


def test_decoder_guidance_scale_zero_is_the_unconditional_model():
    """Scale 0 keeps only the half with z_i -> null and the caption dropped; scale 1 only the
    conditional half; other scales mix them. (DDIM with eta 0 reads only the predicted noise:
    the learned variance, taken from the conditional half as GLIDE does, plays no part.)"""
    model = config("decoder").model.to_dict()
    decoder = decoder_from_config(model)
    inputs = decoder_example_inputs(model, batch=2)
    params = nn.meta.unbox(
        jax.jit(functools.partial(init_module, decoder, inputs))(jax.random.key(0))
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)
    cond = {
        "z_i": jnp.asarray(rng.standard_normal((2, 16)), jnp.float32),
        "input_ids": jnp.asarray(rng.integers(0, 600, (2, 16)), jnp.int32),
        "text_mask": jnp.ones((2, 16), bool),
    }
    other = {**cond, "z_i": -cond["z_i"], "input_ids": cond["input_ids"][::-1]}
    diffusion = config("decoder").diffusion
    key = jax.random.key(1)

    def run(scale, c):
        sampling = {
            **config("decoder").sampling.to_dict(),
            "method": "ddim",
            "eta": 0.0,
            "guidance_scale": scale,
        }
        sampler = decoder_sampler(decoder, diffusion, sampling, resolution=16)
        return np.asarray(sampler(params, c, key))

    np.testing.assert_allclose(run(0.0, cond), run(0.0, other), atol=1e-5)
    assert np.abs(run(1.0, cond) - run(1.0, other)).max() > 1e-3
    assert np.abs(run(3.0, cond) - run(1.0, cond)).max() > 1e-3


def test_guidance_dropout_rates_come_from_the_config(clip_dir, data_dir):
    """With z_i always dropped the loss cannot depend on the image's CLIP embedding."""
    c = config(
        "decoder",
        **{
            "clip.dir": clip_dir,
            "data.data_dir": data_dir,
            "guidance.clip_drop_prob": 1.0,
            "guidance.text_drop_prob": 1.0,
            "model.dropout": 0.0,
        },
    )
    stage, batch, params = _stage_and_batch(c)
    params = jax.tree.map(lambda x: x + 0.05, params)  # no zero-initialised shortcut
    loss = jax.jit(stage.loss_fn)
    key = jax.random.key(3)
    other = {
        **batch,
        "clip_pixels": batch["clip_pixels"][::-1],
        "input_ids": batch["input_ids"][::-1],
        "text_mask": batch["text_mask"][::-1],
    }
    a, _ = loss(params, batch, key, stage.frozen)
    b, _ = loss(params, other, key, stage.frozen)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    kept = config("decoder", **{"clip.dir": clip_dir, "data.data_dir": data_dir})
    kept.guidance.update(clip_drop_prob=0.0, text_drop_prob=0.0)
    kept.model.dropout = 0.0
    stage = build_stage(kept)
    a, _ = jax.jit(stage.loss_fn)(params, batch, key, stage.frozen)
    b, _ = jax.jit(stage.loss_fn)(params, other, key, stage.frozen)
    assert abs(float(a) - float(b)) > 1e-4


@pytest.fixture(scope="module")
def decoder_run(clip_dir, data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("decoder_run"))
    c = config("decoder", **{"clip.dir": clip_dir, "data.data_dir": data_dir, "samples.every": 2})
    train_and_evaluate(c, workdir, stop_after=2)
    train_and_evaluate(c, workdir)  # resumes at 2, with the frozen CLIP passed again
    return workdir


def test_decoder_trains_through_the_loop_and_writes_sample_grids(decoder_run):
    records = read_metrics(decoder_run)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["vlb"]) for r in records if "loss" in r)
    grids = sorted(os.listdir(os.path.join(decoder_run, "samples")))
    assert grids == ["decoder_00000002.png", "decoder_00000004.png"]
    with Image.open(os.path.join(decoder_run, "samples", grids[-1])) as grid:
        assert grid.size[0] >= 2 * 16  # two samples side by side, captions under them
    assert os.listdir(os.path.join(decoder_run, "tensorboard"))


@pytest.mark.parametrize("text_encoder", ["transformer", "clip"])
def test_the_planned_decoder_step_is_the_trained_one(clip_dir, data_dir, text_encoder):
    """`unclip-jax plan` compiles the step from sizes alone: the same batch, frozen CLIP and
    params as the stage built from the CLIP and data on disk."""
    overrides = {"clip.dir": clip_dir, "data.data_dir": data_dir}
    if text_encoder == "clip":
        overrides.update({"model.text_encoder": "clip", "model.text_width": 32})
    c = config("decoder", **overrides)
    clip_config = load_pretrained(clip_dir).config
    assert_spec_is_the_stage(build_step_spec(c, clip_config), build_stage(c))


# --- the upsampler stage ------------------------------------------------------------------------


def test_the_planned_upsampler_step_is_the_trained_one(data_dir):
    c = config("upsampler", **{"data.data_dir": data_dir})
    assert_spec_is_the_stage(build_step_spec(c), build_stage(c))


def test_upsampler_config_errors_name_the_keys(data_dir):
    with pytest.raises(ConfigError, match="'train_crop' is 10"):
        build_stage(config("upsampler", train_crop=10, **{"data.data_dir": data_dir}))
    with pytest.raises(ConfigError, match=r"'model\.low_resolution'"):
        build_stage(config("upsampler", **{"model.low_resolution": 12}))
    with pytest.raises(ConfigError, match=r"'degradation\.kind'"):
        config("upsampler", **{"degradation.kind": "jpeg"})


def test_upsampler_trains_on_crops_and_samples_the_whole_image(data_dir, tmp_path):
    c = config("upsampler", **{"data.data_dir": data_dir, "samples.every": 4})
    stage = build_stage(c)
    batch = next(stage.make_data(0, 1))
    # Trained on 8 px crops (1/4 of 32) of the image and their 2 px blurred views ...
    assert batch["high"].shape == (8, 8, 8, 3) and batch["low"].shape == (8, 2, 2, 3)
    state = train_and_evaluate(c, str(tmp_path), stage=stage)
    # ... it samples 32 px images from whole 8 px ones.
    sampler = upsampler_sampler(
        upsampler_from_config(c.model.to_dict()), c.diffusion, c.sampling, scale=4
    )
    low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    out = sampler(jax.device_get(state.ema_params), low, jax.random.key(0))
    assert out.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(out)))
    grid = os.path.join(str(tmp_path), "samples", "upsampler_00000004.png")
    assert os.path.exists(grid)


def test_the_decoder_conditions_on_unit_z_i_unless_told_otherwise(clip_dir, data_dir):
    """Unit-norm z_i is the space the priors sample in; Karlo's decoder reads raw embeds."""
    from unclip_jax.clip import load_pretrained
    from unclip_jax.models.clip import CLIP
    from unclip_jax.sampling import decoder_conditioning

    clip = load_pretrained(clip_dir)
    stage = build_stage(config("decoder", **{"clip.dir": clip_dir, "data.data_dir": data_dir}))
    batch = next(stage.make_data(0, 1))
    for unit in (True, False):
        encode = decoder_conditioning(CLIP(clip.config), text_encoder="transformer", unit_z_i=unit)
        norms = np.linalg.norm(np.asarray(encode(clip.params, batch)["z_i"]), axis=-1)
        if unit:
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        else:
            assert np.abs(norms - 1.0).max() > 1e-2
    assert config("decoder", "karlo").model.unit_z_i is False


def test_z_i_norm_scales_unit_z_i_and_a_bad_norm_is_refused(clip_dir, data_dir):
    """model.z_i_norm sets the norm unit z_i reaches the decoder at (4 sqrt(clip_dim) in the
    shapes demo, 1 elsewhere), the same direction; a norm <= 0, or one other than 1 for raw
    (non-unit) embeddings, is an error naming the key."""
    from unclip_jax.clip import load_pretrained
    from unclip_jax.models.clip import CLIP
    from unclip_jax.sampling import decoder_conditioning

    clip = load_pretrained(clip_dir)
    stage = build_stage(config("decoder", **{"clip.dir": clip_dir, "data.data_dir": data_dir}))
    batch = next(stage.make_data(0, 1))

    def z_i(**kwargs):
        encode = decoder_conditioning(CLIP(clip.config), text_encoder="transformer", **kwargs)
        return np.asarray(encode(clip.params, batch)["z_i"])

    unit, scaled = z_i(unit_z_i=True), z_i(unit_z_i=True, z_i_norm=4.0)
    np.testing.assert_allclose(np.linalg.norm(scaled, axis=-1), 4.0, rtol=1e-5)
    np.testing.assert_allclose(scaled, 4.0 * unit, rtol=1e-5, atol=1e-7)
    for bad in (dict(unit_z_i=True, z_i_norm=0.0), dict(unit_z_i=False, z_i_norm=2.0)):
        with pytest.raises(ValueError, match=r"model\.z_i_norm"):
            z_i(**bad)
    assert config("decoder", "shapes").model.z_i_norm == pytest.approx(4 * 128**0.5)
    assert config("decoder", "paper").model.z_i_norm == 1.0


def test_a_self_conditioned_decoder_reads_six_channels_samples_and_refuses_inversion(
    clip_dir, data_dir
):
    c = config("decoder", **{"clip.dir": clip_dir, "data.data_dir": data_dir})
    c.model.self_condition = True
    stage, batch, params = _stage_and_batch(c)
    assert params["unet"]["conv_in"]["kernel"].shape[2] == 6  # [x_t ; x0_prev]
    loss, metrics = jax.jit(stage.loss_fn)(params, batch, jax.random.key(7), stage.frozen)
    assert np.isfinite(float(loss)) and float(metrics["mse"]) > 0
    # (How the estimate is fed in training and sampling: tests/test_losses.py, test_samplers.py.)

    decoder = decoder_from_config(c.model.to_dict())
    sampling = {**c.sampling.to_dict(), "guidance_scale": 1.0}
    sampler = decoder_sampler(decoder, c.diffusion, sampling, resolution=16)
    cond = {
        "z_i": jnp.ones((2, 16)),
        "input_ids": jnp.zeros((2, 16), jnp.int32),
        "text_mask": jnp.ones((2, 16), bool),
    }
    images = np.asarray(sampler(params, cond, jax.random.key(0)))
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="inversion of a self-conditioned decoder"):
        decoder_inverter(decoder, c.diffusion, sampling)


# --- z_i and caption states computed before training ---------------------------------------------

KARLO_STYLE = {"model.text_encoder": "clip", "model.text_width": 32}


def _embed(clip_dir, data_dir, out, split):
    """`split` of the tiny decoder's `shapes` embedded by the CLIP at `clip_dir` into `out`, as
    `unclip-jax embed` writes it (float32, so the rows are the image tower's output exactly)."""
    from unclip_jax.embed_job import embed_dataset

    data = config("decoder").data
    embed_dataset(
        clip_dir,
        "shapes:32",
        out,
        split=split,
        dtype="float32",
        data_dir=data_dir,
        train_size=data.train_size,
        test_size=data.test_size,
    )
    return out


@pytest.fixture(scope="module")
def train_embeddings(clip_dir, data_dir, tmp_path_factory):
    """The tiny decoder's train split embedded by its CLIP."""
    return _embed(clip_dir, data_dir, str(tmp_path_factory.mktemp("embed") / "train"), "train")


def _precomputed(clip_dir, data_dir, embeddings, **overrides):
    return config(
        "decoder",
        **{
            "clip.dir": clip_dir,
            "data.data_dir": data_dir,
            "data.embeddings_dir": embeddings,
            "data.caption_states": True,
            **KARLO_STYLE,
            **overrides,
        },
    )


def test_precomputed_z_i_and_caption_states_train_on_the_in_step_loss(
    clip_dir, data_dir, train_embeddings
):
    """z_i read from the embedding shards and the caption states from the table made at the
    start are what the frozen CLIP computes in the step: the same batch of examples gives the
    same loss, and the batch no longer carries CLIP pixels."""
    base = {"clip.dir": clip_dir, "data.data_dir": data_dir, **KARLO_STYLE}
    in_step, batch, params = _stage_and_batch(config("decoder", **base))
    stage, precomputed, _ = _stage_and_batch(_precomputed(clip_dir, data_dir, train_embeddings))
    assert "clip_pixels" in batch and "clip_pixels" not in precomputed
    assert precomputed["z_i"].shape == (8, 16) and precomputed["text_states"].shape == (8, 16, 32)
    np.testing.assert_array_equal(precomputed["image"], batch["image"])  # the same examples
    key = jax.random.key(5)
    want, _ = jax.jit(in_step.loss_fn)(params, batch, key, in_step.frozen)
    got, _ = jax.jit(stage.loss_fn)(params, precomputed, key, stage.frozen)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_planned_decoder_step_reads_precomputed_conditioning(
    clip_dir, data_dir, train_embeddings
):
    c = _precomputed(clip_dir, data_dir, train_embeddings)
    clip_config = load_pretrained(clip_dir).config
    assert_spec_is_the_stage(build_step_spec(c, clip_config), build_stage(c))
    z_i_only = _precomputed(clip_dir, data_dir, train_embeddings, **{"data.caption_states": False})
    assert_spec_is_the_stage(build_step_spec(z_i_only, clip_config), build_stage(z_i_only))


def test_precomputed_conditioning_refuses_what_does_not_fit(
    clip_dir, data_dir, train_embeddings, tmp_path
):
    import json
    import shutil

    from unclip_jax.data.embeddings import EmbeddingShardError

    with pytest.raises(ConfigError, match=r"'data\.embeddings_dir' is empty"):
        build_stage(_precomputed(clip_dir, data_dir, ""))
    with pytest.raises(ConfigError, match=r"'model\.text_encoder' is 'transformer'"):
        build_stage(
            _precomputed(
                clip_dir, data_dir, train_embeddings, **{"model.text_encoder": "transformer"}
            )
        )
    with pytest.raises(EmbeddingShardError, match="no embedding shards"):
        build_stage(_precomputed(clip_dir, data_dir, str(tmp_path / "nowhere")))
    # Another CLIP's shards (their manifest names another) ...
    other = tmp_path / "other"
    shutil.copytree(train_embeddings, other)
    manifest = json.loads((other / "embed_manifest.json").read_text())
    (other / "embed_manifest.json").write_text(json.dumps({**manifest, "clip": "0" * 40}))
    with pytest.raises(ConfigError, match="embedded with another CLIP"):
        build_stage(_precomputed(clip_dir, data_dir, str(other)))
    # ... and the test split's (54 rows for 64 train examples).
    test = _embed(clip_dir, data_dir, str(tmp_path / "test"), "test")
    with pytest.raises(EmbeddingShardError, match="have 54 rows, the dataset 64 examples"):
        build_stage(_precomputed(clip_dir, data_dir, test))
