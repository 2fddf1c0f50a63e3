"""Training CLIP from scratch through the generic loop, and the embedding job."""

import os
import subprocess
import sys

import numpy as np
import pytest
from step_spec_check import assert_spec_is_the_stage

from unclip_jax import clip
from unclip_jax.config import load_config
from unclip_jax.data.embeddings import EmbeddingShards
from unclip_jax.embed_job import embed_dataset
from unclip_jax.training import read_metrics, train_and_evaluate
from unclip_jax.training.stages import build_stage, build_step_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    """The tiny CLIP config trained for a few steps on a small shapes build."""
    workdir = tmp_path_factory.mktemp("clip_run")
    data_dir = str(tmp_path_factory.mktemp("clip_data"))
    config = load_config(
        f"{ROOT}/configs/clip.py:tiny",
        {"data.data_dir": data_dir, "eval.every": 4, "train.steps": 4},
    )
    train_and_evaluate(config, str(workdir))
    return workdir, data_dir


def test_the_planned_clip_step_is_the_trained_one(tmp_path):
    """`unclip-jax plan` compiles CLIP's step from the config alone: the same batch and params
    as the stage (whose tokenizer, trained on the captions, has model.vocab_size tokens)."""
    config = load_config(f"{ROOT}/configs/clip.py:tiny", {"data.data_dir": str(tmp_path / "data")})
    stage = build_stage(config, str(tmp_path / "run"))
    assert_spec_is_the_stage(build_step_spec(config), stage)


def test_clip_trains_against_hard_negative_captions(tmp_path):
    """With hard_negatives.num K each batch row carries K swapped captions, the planned step
    is still the trained one, and training logs how often an image prefers a negative."""
    overrides = {
        "data.data_dir": str(tmp_path / "data"),
        "hard_negatives.num": 2,
        "train.steps": 2,
        "train.checkpoint_every": 2,
    }
    config = load_config(f"{ROOT}/configs/clip.py:tiny", overrides)
    stage = build_stage(config, str(tmp_path / "run"))
    assert next(stage.make_data(0, 1))["negative_ids"].shape == (8, 2, 16)
    assert_spec_is_the_stage(build_step_spec(config), stage)
    train_and_evaluate(config, str(tmp_path / "run"))
    logged = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(0.0 <= r["negative_error"] <= 1.0 for r in logged)


def test_hard_negatives_need_shapes_captions(tmp_path):
    config = load_config(
        f"{ROOT}/configs/clip.py:tiny",
        {"data.dataset": "image_text", "data.data_dir": str(tmp_path), "hard_negatives.num": 1},
    )
    with pytest.raises(ValueError, match=r"hard_negatives\.num 1 swaps attribute words"):
        build_stage(config, str(tmp_path / "run"))


def test_clip_trains_and_exports_a_loadable_checkpoint(trained_clip):
    workdir, _ = trained_clip
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    # Retrieval on the test split is logged, overall and per attribute, as fractions.
    retrieval = [r for r in records if "retrieval/all_attributes" in r][-1]
    for name in ("exact", "all_attributes", "background", "shape", "colour", "size", "position"):
        assert 0.0 <= retrieval[f"retrieval/{name}"] <= 1.0
    m = clip.load_pretrained(str(workdir / "clip"))
    assert m.tokenizer.vocab_size <= m.config.text.vocab_size
    # The run keeps its tokenizer from its first start, for resumes, and exports the same one.
    from unclip_jax.models.clip_tokenizer import ClipTokenizer

    kept = ClipTokenizer.from_dir(str(workdir / "tokenizer"))
    caption = "a small red circle in the top left on a gray background"
    np.testing.assert_array_equal(kept([caption], context_length=16)[0], m.tokenize([caption])[0])
    assert m.tokenizer.model_max_length == m.config.context_length
    # The exported weights are the run's final EMA params, and the tokenizer the run's.
    from unclip_jax.training import checkpoint_manager, restore_subtrees

    with checkpoint_manager(workdir / "checkpoints", read_only=True) as manager:
        step = manager.latest_step()
    import jax

    ema, _ = restore_subtrees(
        str(workdir / "checkpoints"),
        {"ema_params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m.params)},
        step,
    )
    caption = ["a small red circle in the top left on a gray background"]
    ids, mask = m.tokenize(caption)
    expected = m.model.apply({"params": ema["ema_params"]}, ids, mask, method="encode_text")
    np.testing.assert_allclose(m.encode_text(caption), expected, atol=1e-6)


def test_the_embedding_job_writes_every_row_once_and_resumes(trained_clip, tmp_path):
    workdir, data_dir = trained_clip
    kwargs = dict(
        split="test", batch_size=8, shard_size=20, data_dir=data_dir, train_size=64, test_size=54
    )
    report = embed_dataset(str(workdir / "clip"), "shapes:32", str(tmp_path), **kwargs)
    assert report.written == [0, 1, 2] and report.rows == 54
    shards = EmbeddingShards(str(tmp_path), expected_dim=16)
    assert len(shards) == 54 and shards[0]["img_emb"].dtype == np.float32
    first = [shards[i]["img_emb"] for i in range(54)]

    # Interrupt: shard 1 lost its metadata (as if the job died while writing it).
    os.remove(tmp_path / "metadata" / "metadata_0001.jsonl")
    before = os.path.getmtime(tmp_path / "img_emb" / "img_emb_0000.npy")
    again = embed_dataset(str(workdir / "clip"), "shapes:32", str(tmp_path), **kwargs)
    assert again.written == [1] and again.skipped == [0, 2] and again.rows == 20
    assert os.path.getmtime(tmp_path / "img_emb" / "img_emb_0000.npy") == before
    shards = EmbeddingShards(str(tmp_path))
    assert sorted(shards[i]["key"] for i in range(54)) == sorted(f"test/{i}" for i in range(54))
    for i in range(54):  # the same rows, recomputed identically, in the same order
        np.testing.assert_allclose(shards[i]["img_emb"], first[i], atol=1e-3)
    # The embeddings are the model's: row 5 equals encode_image of example 5.
    from unclip_jax.data.pipeline import open_dataset

    m = clip.load_pretrained(str(workdir / "clip"))
    example = open_dataset("shapes:32", "test", data_dir=data_dir, train_size=64, test_size=54)[5]
    np.testing.assert_allclose(
        shards[5]["img_emb"], np.asarray(m.encode_image([example["image"]]))[0], atol=1e-3
    )


def test_resuming_the_embedding_job_with_other_settings_is_refused(trained_clip, tmp_path):
    workdir, data_dir = trained_clip
    kwargs = dict(split="test", batch_size=8, data_dir=data_dir, train_size=64, test_size=54)
    embed_dataset(str(workdir / "clip"), "shapes:32", str(tmp_path), shard_size=30, **kwargs)
    with pytest.raises(ValueError, match="shard_size: 30 -> 20"):
        embed_dataset(str(workdir / "clip"), "shapes:32", str(tmp_path), shard_size=20, **kwargs)
    with pytest.raises(ValueError, match="split: 'test' -> 'train'"):
        embed_dataset(
            str(workdir / "clip"),
            "shapes:32",
            str(tmp_path),
            shard_size=30,
            **{**kwargs, "split": "train"},
        )
    assert len(EmbeddingShards(str(tmp_path))) == 54  # nothing was added


def test_processes_embed_disjoint_shards(trained_clip, tmp_path):
    workdir, data_dir = trained_clip
    kwargs = dict(
        split="test",
        batch_size=8,
        shard_size=20,
        data_dir=data_dir,
        train_size=64,
        test_size=54,
        dtype="float16",
    )
    a = embed_dataset(
        str(workdir / "clip"),
        "shapes:32",
        str(tmp_path),
        process_index=0,
        process_count=2,
        **kwargs,
    )
    b = embed_dataset(
        str(workdir / "clip"),
        "shapes:32",
        str(tmp_path),
        process_index=1,
        process_count=2,
        **kwargs,
    )
    assert a.written == [0, 2] and b.written == [1] and a.rows + b.rows == 54
    shards = EmbeddingShards(str(tmp_path))
    assert (
        len(shards) == 54 and np.load(tmp_path / "img_emb" / "img_emb_0000.npy").dtype == np.float16
    )


def test_the_cli_embed_reports_a_missing_checkpoint(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_jax",
            "embed",
            "--clip",
            str(tmp_path / "x"),
            "--data",
            "shapes:32",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "no config.json" in run.stderr
