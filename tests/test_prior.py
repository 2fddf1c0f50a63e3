"""The diffusion prior: its causal transformer, scaling, sampling, and the `prior` stage."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clip_fixture import write_random_clip
from step_spec_check import assert_spec_is_the_stage

from unclip_jax import diffusion as D
from unclip_jax.clip import load_pretrained
from unclip_jax.config import ConfigError, load_config
from unclip_jax.data.embeddings import EmbeddingShardError, write_embedding_shard
from unclip_jax.embed_job import embed_dataset
from unclip_jax.models.prior import (
    DiffusionPrior,
    TransformerBlock,
    causal_bias,
    denormalize_embedding,
    fit_embedding_stats,
    normalize_embedding,
)
from unclip_jax.sampling import best_of_candidates, prior_sampler
from unclip_jax.training.loop import train_and_evaluate
from unclip_jax.training.metrics import read_metrics
from unclip_jax.training.stages import build_stage, build_step_spec
from unclip_jax.training.state import TrainState
from unclip_jax.training.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(train_size=64, test_size=54)


def config(variant: str = "tiny", **overrides):
    return load_config(f"{ROOT}/configs/prior.py:{variant}", overrides)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(clip dir, train shards, test shards): the tiny random CLIP's embeddings of shapes."""
    clip_dir = write_random_clip(str(tmp_path_factory.mktemp("clip")))
    data_dir = str(tmp_path_factory.mktemp("data"))
    out = {}
    for split in ("train", "test"):
        out[split] = str(tmp_path_factory.mktemp(f"emb_{split}"))
        embed_dataset(
            clip_dir,
            "shapes:32",
            out[split],
            split=split,
            batch_size=16,
            data_dir=data_dir,
            **SIZES,
        )
    return clip_dir, out["train"], out["test"]


def stage_config(shards, **overrides):
    clip_dir, train, test = shards
    return config(
        **{
            "clip.dir": clip_dir,
            "data.embeddings_dir": train,
            "data.test_embeddings_dir": test,
            **overrides,
        }
    )


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_the_planned_prior_step_is_the_trained_one(shards, kind, tmp_path):
    """`unclip-jax plan` compiles the step from sizes alone: the same batch, frozen CLIP (and
    statistics or codec) and params as the stage built from the CLIP and shards on disk."""
    c = stage_config(shards, kind=kind)
    clip_config = load_pretrained(shards[0]).config
    stage = build_stage(c, str(tmp_path))
    assert_spec_is_the_stage(build_step_spec(c, clip_config), stage)


# --- the model ----------------------------------------------------------------------------------


def test_the_transformer_is_causal():
    """The state at position k does not change when any later token changes."""
    t, w = 7, 16
    block = TransformerBlock(heads=2)
    x = jax.random.normal(jax.random.key(0), (1, t, w))
    bias = causal_bias(jnp.ones((1, t), bool))
    params = block.init(jax.random.key(1), x, bias, deterministic=True)
    run = jax.jit(lambda x: block.apply(params, x, bias, deterministic=True))
    out = run(x)
    for k in range(t - 1):
        changed = x.at[:, k + 1 :].add(3.0)
        np.testing.assert_allclose(run(changed)[:, : k + 1], out[:, : k + 1], atol=1e-5)
        assert float(jnp.abs(run(changed)[:, k + 1 :] - out[:, k + 1 :]).max()) > 1e-3


def test_padded_caption_tokens_and_dropped_text_are_ignored():
    prior = DiffusionPrior(clip_dim=8, width=16, layers=2, heads=2, text_tokens=5)
    rng = np.random.default_rng(0)
    args = [
        jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
        jnp.array([10.0, 900.0]),
        jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32),
        jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
    ]
    params = prior.init(jax.random.key(0), *args)["params"]
    apply = jax.jit(lambda *a, drop=None: prior.apply({"params": params}, *a, drop_text=drop))
    out = apply(*args)
    states = args[3].at[0, 3:].add(5.0)  # only row 0's padded tokens move
    np.testing.assert_allclose(apply(*args[:3], states, args[4])[0], out[0], atol=1e-5)
    drop = jnp.array([True, False])
    other = [args[0], args[1], -args[2], args[3] + 1.0, args[4]]
    np.testing.assert_allclose(apply(*args, drop=drop)[0], apply(*other, drop=drop)[0], atol=1e-5)
    assert float(jnp.abs(apply(*args, drop=drop)[1] - apply(*other, drop=drop)[1]).max()) > 1e-3


@pytest.mark.parametrize("method", ["constant", "sqrt_dim", "standardize"])
def test_embedding_scaling_round_trips(method):
    z = np.random.default_rng(1).standard_normal((100, 16)).astype(np.float32) * 3 + 1
    stats = fit_embedding_stats(z)
    x = normalize_embedding(z, method=method, scale=17.2, stats=stats)
    if method == "standardize":
        np.testing.assert_allclose(np.asarray(x).mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(x).std(0), 1, atol=1e-4)
        back = denormalize_embedding(x, method=method, stats=stats)
        np.testing.assert_allclose(back, z, rtol=1e-5, atol=1e-5)
    else:
        norm = 17.2 if method == "constant" else 4.0  # sqrt(16)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), norm, rtol=1e-5)
        back = denormalize_embedding(x, method=method)
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        np.testing.assert_allclose(back, unit, atol=1e-6)


def test_best_of_k_picks_the_largest_dot_product():
    rng = np.random.default_rng(2)
    candidates = jnp.asarray(rng.standard_normal((4, 3, 8)), jnp.float32)
    z_t = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    best = np.asarray(best_of_candidates(candidates, z_t))
    for b in range(4):
        dots = [float(candidates[b, k] @ z_t[b]) for k in range(3)]
        np.testing.assert_array_equal(best[b], candidates[b, int(np.argmax(dots))])


def test_guidance_scale_one_is_the_conditional_model():
    prior = DiffusionPrior(clip_dim=8, width=16, layers=1, heads=2, text_tokens=4)
    rng = np.random.default_rng(3)
    cond = {
        "z_t": jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
        "text_states": jnp.asarray(rng.standard_normal((2, 4, 12)), jnp.float32),
        "text_mask": jnp.ones((2, 4), bool),
    }
    params = prior.init(
        jax.random.key(0),
        jnp.zeros((2, 8)),
        jnp.zeros((2,)),
        cond["z_t"],
        cond["text_states"],
        cond["text_mask"],
    )["params"]
    params = jax.tree.map(lambda x: x + 0.1, params)
    c = config()
    diffusion = c.diffusion.to_dict()
    key = jax.random.key(5)

    def sampler(scale):
        sampling = {**c.sampling.to_dict(), "guidance_scale": scale}
        return prior_sampler(prior, diffusion, sampling, decode=lambda x: x)

    # The conditional model alone, run by hand with the sampler's own noise.
    noise_key, loop_key = jax.random.split(key)
    by_hand = D.sample(
        model_fn=lambda x, t: prior.apply(
            {"params": params}, x, t, cond["z_t"], cond["text_states"], cond["text_mask"]
        ),
        sched=D.make_schedule("cosine", 1000, c.sampling.steps),
        x_T=jax.random.normal(noise_key, (2, 8)),
        key=loop_key,
        method=c.sampling.method,
        prediction="x0",
        variance="fixed_small",
    )
    np.testing.assert_allclose(sampler(1.0)(params, cond, key), by_hand, atol=1e-5)
    assert float(jnp.abs(sampler(3.0)(params, cond, key) - by_hand).max()) > 1e-3


# --- the stage -----------------------------------------------------------------------------------


def test_a_shard_of_the_wrong_dimension_is_named(shards, tmp_path):
    write_embedding_shard(
        str(tmp_path),
        0,
        img_emb=np.zeros((3, 24), np.float32),
        text_emb=np.zeros((3, 24), np.float32),
        keys=["a", "b", "c"],
        captions=["x", "y", "z"],
    )
    with pytest.raises(EmbeddingShardError, match=r"img_emb_0000\.npy: embedding dimension 24"):
        build_stage(stage_config(shards, **{"data.embeddings_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"'model\.clip_dim' is 32, but the CLIP"):
        build_stage(stage_config(shards, **{"model.clip_dim": 32}))
    with pytest.raises(ConfigError, match=r"'data\.embeddings_dir' is empty"):
        build_stage(stage_config(shards, **{"data.embeddings_dir": ""}))
    with pytest.raises(ConfigError, match="'kind' is 'flow'"):
        build_stage(stage_config(shards, kind="flow"))


@pytest.mark.parametrize(
    "kind,normalization",
    [("diffusion", "sqrt_dim"), ("diffusion", "standardize"), ("autoregressive", "sqrt_dim")],
)
def test_a_few_prior_steps_lower_the_loss(shards, kind, normalization, tmp_path):
    c = stage_config(shards, kind=kind, **{"embedding.normalization": normalization})
    stage = build_stage(c, str(tmp_path))
    if normalization == "standardize":  # fitted on the shards and kept with the run
        assert os.path.exists(tmp_path / "prior_embedding.safetensors")
    if kind == "autoregressive":  # the PCA and quantisers, likewise
        assert os.path.exists(tmp_path / "prior_codec.safetensors")
    batch = jax.tree.map(jnp.asarray, next(stage.make_data(0, 1)))
    params = nn.meta.unbox(jax.jit(stage.init_params)(jax.random.key(0)))
    tx = optax.adam(3e-3)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(1)),
    )
    step = jax.jit(make_train_step(stage.loss_fn, tx, ema_decay=0.0))
    probe = jax.jit(stage.loss_fn)
    key = jax.random.key(7)
    before, _ = probe(params, batch, key, stage.frozen)
    for _ in range(15):
        state, _ = step(state, batch, stage.frozen)
    after, _ = probe(state.params, batch, key, stage.frozen)
    assert float(after) < 0.7 * float(before)


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_the_prior_trains_through_the_loop_and_logs_its_evaluation(shards, kind, tmp_path):
    c = stage_config(shards, kind=kind, **{"eval.every": 2})
    train_and_evaluate(c, str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if "eval/cos_true" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert -1 <= r["eval/cos_true"] <= 1 and -1 <= r["eval/cos_text"] <= 1
        assert -1 <= r["eval/cos_unrelated"] <= 1 and 0 <= r["eval/top1"] <= 1


def test_prior_scores_of_perfect_samples():
    from unclip_jax.training.prior_stage import prior_scores

    rng = np.random.default_rng(4)
    z_i, z_t = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    perfect = prior_scores(3.0 * z_i, z_i, z_t)  # the scale does not matter: cosines
    assert perfect["cos_true"] == pytest.approx(1.0) and perfect["top1"] == 1.0
    shuffled = prior_scores(np.roll(z_i, 1, axis=0), z_i, z_t)
    assert shuffled["top1"] == 0.0 and shuffled["cos_true"] < 0.9


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    from unclip_jax.sampling import top_p_logits

    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = np.isfinite(np.asarray(top_p_logits(logits, 0.7)))[0]
    np.testing.assert_array_equal(kept, [False, True, False, True])  # 0.5 + 0.3 >= 0.7
    assert np.isfinite(np.asarray(top_p_logits(logits, 1.0))).all()
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(top_p_logits(logits, 0.1)))[0], [0, 1, 0, 0]
    )


@pytest.mark.parametrize(
    "variant,expected", [("paper", 1.23e9), ("paper_ar", 0.89e9), ("karlo", 1.02e9)]
)
def test_paper_priors_have_about_a_billion_params_and_shard(variant, expected):
    """Table 3: 1B each (width 2048 x 24 blocks for the diffusion prior counts 1.23B; the AR
    prior's 1664 x 24 with a 49,408-token caption vocabulary 0.89B); Karlo's is 1.02B."""
    from unclip_jax.models.unet import count_params

    c = config(variant)
    m = c.model
    length, dim = m.text_tokens, m.clip_dim
    if c.kind == "diffusion":
        module = DiffusionPrior(
            clip_dim=dim, width=m.width, layers=m.layers, heads=m.heads, text_tokens=length
        )
        args = (
            jnp.zeros((1, dim)),
            jnp.zeros((1,)),
            jnp.zeros((1, dim)),
            jnp.zeros((1, length, dim)),
            jnp.ones((1, length), bool),
        )
    else:
        from unclip_jax.models.prior import AutoregressivePrior

        d = c.ar.pca_components
        module = AutoregressivePrior(
            vocab_size=49408,
            num_buckets=c.ar.num_buckets,
            num_tokens=d,
            width=m.width,
            layers=m.layers,
            heads=m.heads,
            text_tokens=length,
        )
        args = (
            jnp.zeros((1, length), jnp.int32),
            jnp.ones((1, length), bool),
            jnp.zeros((1, dim)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, d), jnp.int32),
        )
    params = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)
    assert count_params(params) == pytest.approx(expected, rel=0.02)
    assert (c.mesh.data, c.mesh.fsdp) == (1, -1)


# --- the autoregressive prior's alignment, and what a run fits once ------------------------------


def _ar_model_and_params(d=4, k=8, length=5):
    from unclip_jax.models.prior import AutoregressivePrior

    model = AutoregressivePrior(
        vocab_size=20, num_buckets=k, num_tokens=d, width=16, layers=2, heads=2, text_tokens=length
    )
    rng = np.random.default_rng(0)
    inputs = dict(
        input_ids=jnp.asarray(rng.integers(0, 20, (2, length)), jnp.int32),
        text_mask=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
        z_t=jnp.asarray(rng.standard_normal((2, 8)), jnp.float32),
        dot=jnp.array([1, 6], jnp.int32),
        tokens=jnp.asarray(rng.integers(0, k, (2, d)), jnp.int32),
    )
    params = model.init(jax.random.key(0), **inputs)["params"]
    return model, params, inputs


def test_ar_logits_at_j_see_only_the_tokens_before_j():
    model, params, inputs = _ar_model_and_params()
    apply = jax.jit(lambda **a: model.apply({"params": params}, **a))
    logits = apply(**inputs)
    for j in range(4):
        later = {**inputs, "tokens": inputs["tokens"].at[:, j:].set(7 - inputs["tokens"][:, j:])}
        np.testing.assert_allclose(apply(**later)[:, : j + 1], logits[:, : j + 1], atol=1e-5)
        if j > 0:
            earlier = {**inputs, "tokens": inputs["tokens"].at[:, j - 1].add(1)}
            assert float(jnp.abs(apply(**earlier)[:, j] - logits[:, j]).max()) > 1e-4


def test_greedy_ar_sampling_picks_each_teacher_forced_argmax():
    """With a nucleus of one token, every sampled token is the argmax of the model's logits at
    its position given the tokens sampled before it: the sampler and training agree on the
    alignment. The decoded result has unit norm."""
    from unclip_jax.models.prior_codec import fit_codec
    from unclip_jax.sampling import ar_prior_sampler

    model, params, inputs = _ar_model_and_params()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((200, 8)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    codec = fit_codec(z, z[::-1].copy(), components=4, num_buckets=8)
    sampler = ar_prior_sampler(model, top_p=1e-6)
    cond = {k: inputs[k] for k in ("input_ids", "text_mask", "z_t")}
    z_i = sampler(params, codec, cond, jax.random.key(3))
    np.testing.assert_allclose(np.linalg.norm(z_i, axis=1), 1.0, rtol=1e-5)
    dot, tokens = sampler.tokens(params, codec, cond, jax.random.key(3))
    logits = model.apply({"params": params}, **cond, dot=dot, tokens=tokens)
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), tokens)


def test_fitted_arrays_are_kept_copied_from_init_from_and_checked(tmp_path):
    from unclip_jax.training.prior_stage import fitted_once

    calls = []

    def fit():
        calls.append(1)
        return {"x": np.arange(3, dtype=np.float32)}

    first = fitted_once("f.safetensors", fit, workdir=str(tmp_path / "a"), settings={"m": "q"})
    again = fitted_once("f.safetensors", fit, workdir=str(tmp_path / "a"), settings={"m": "q"})
    assert len(calls) == 1 and np.array_equal(first["x"], again["x"])  # read back, not refit
    copied = fitted_once(
        "f.safetensors",
        fit,
        workdir=str(tmp_path / "b"),
        init_from=str(tmp_path / "a"),
        settings={"m": "q"},
    )
    assert len(calls) == 1 and np.array_equal(copied["x"], first["x"])
    with pytest.raises(ConfigError, match="'q' -> 'u'"):
        fitted_once("f.safetensors", fit, workdir=str(tmp_path / "a"), settings={"m": "u"})


def test_shards_of_another_clip_are_refused(shards, tmp_path):
    import json
    import shutil

    from unclip_jax.embed_job import check_shards_come_from

    clip_dir, train, _ = shards
    check_shards_come_from(train, clip_dir)  # made by it: fine
    other = tmp_path / "emb"
    shutil.copytree(train, other)
    manifest = json.loads((other / "embed_manifest.json").read_text())
    (other / "embed_manifest.json").write_text(json.dumps({**manifest, "clip": "0" * 40}))
    with pytest.raises(ConfigError, match=r"another CLIP than clip\.dir"):
        check_shards_come_from(str(other), clip_dir)
