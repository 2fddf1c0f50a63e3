"""Image-text sources and builds, embedding shards, the input pipeline and `data show`."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data.degradations import make_low_res
from unclip_jax.data.embeddings import EmbeddingShardError, EmbeddingShards, write_embedding_shard
from unclip_jax.data.image_text import build_image_text
from unclip_jax.data.images import to_float
from unclip_jax.data.pipeline import (
    DecodedSource,
    image_caption,
    make_pipeline,
    open_dataset,
    upsampler_views,
)
from unclip_jax.data.show import show_dataset, write_examples
from unclip_jax.data.sources import SourceError, iter_source


def _png(color, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = {f"img{i}": ((30 * i, 100, 200 - 20 * i), f"a picture number {i}") for i in range(6)}


def _write_folder(root):
    os.makedirs(root / "sub", exist_ok=True)
    for i, (key, (color, caption)) in enumerate(GOOD.items()):
        where = root / "sub" if i % 2 else root
        (where / f"{key}.png").write_bytes(_png(color))
        (where / f"{key}.txt").write_text(caption + "\n")
    (root / "corrupt.jpg").write_bytes(b"not an image at all")
    (root / "corrupt.txt").write_text("a corrupt one")
    (root / "nocaption.png").write_bytes(_png((1, 2, 3)))
    (root / "tiny.png").write_bytes(_png((9, 9, 9), size=(8, 8)))
    (root / "tiny.txt").write_text("too small")


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_webdataset(root):
    os.makedirs(root)
    items = list(GOOD.items())
    for shard, chunk in enumerate((items[:3], items[3:])):
        members = []
        for key, (color, caption) in chunk:
            members.append((f"{key}.png", _png(color)))
            if shard == 0:
                members.append((f"{key}.txt", caption.encode()))
            else:  # captions only in the json, as some img2dataset runs write them
                members.append((f"{key}.json", json.dumps({"caption": caption}).encode()))
        if shard == 1:
            members += [
                ("bad.jpg", b"\xff\xd8garbage"),
                ("bad.txt", b"broken"),
                ("nocap.png", _png((5, 5, 5))),
                ("failed.json", b'{"status": "failed"}'),
            ]
        _write_tar(root / f"{shard:05d}.tar", members)


@pytest.mark.parametrize("kind", ["folder", "webdataset"])
def test_build_skips_and_counts_bad_examples_and_keeps_the_rest(tmp_path, kind):
    source = tmp_path / "src"
    if kind == "folder":
        _write_folder(source)
    else:
        _write_webdataset(source)
    report = build_image_text(str(source), 16, str(tmp_path / "out"), test_fraction=0.0)
    assert report.written == {"train": 6, "test": 0}
    expected_skips = {"undecodable": 1, "no_caption": 1, "too_small": 1 if kind == "folder" else 0}
    assert report.skipped == expected_skips
    data = open_dataset(str(tmp_path / "out"), "train")
    assert len(data) == 6
    by_caption = {data[i]["caption"]: data[i] for i in range(len(data))}
    assert set(by_caption) == {caption for _, caption in GOOD.values()}
    for color, caption in GOOD.values():
        image = by_caption[caption]["image"]
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        np.testing.assert_allclose(image[8, 8], color, atol=2)  # a flat colour survives resizing


def test_build_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    source = tmp_path / "src"
    os.makedirs(source)
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a white band in the middle third
    Image.fromarray(wide).save(source / "wide.png")
    (source / "wide.txt").write_text("a white band")
    build_image_text(str(source), 10, str(tmp_path / "out"), test_fraction=0.0, min_size=10)
    image = open_dataset(str(tmp_path / "out"), "train")[0]["image"]
    # Shorter side 20 -> 10: 60 wide -> 30 wide; the centre 10 columns are the white band.
    assert image.shape == (10, 10, 3) and image[:, 2:8].min() > 200


def test_a_missing_or_empty_source_is_one_clear_error(tmp_path):
    with pytest.raises(SourceError, match="data source not found"):
        build_image_text(str(tmp_path / "nope"), 16, str(tmp_path / "out"))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="is empty"):
        build_image_text(str(tmp_path / "empty"), 16, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_the_test_split_is_a_stable_fraction_by_key(tmp_path):
    _write_folder(tmp_path / "src")
    report = build_image_text(str(tmp_path / "src"), 16, str(tmp_path / "out"), test_fraction=0.5)
    assert sum(report.written.values()) == 6 and report.written["test"] >= 1
    keys = [
        e["key"]
        for e in (
            open_dataset(str(tmp_path / "out"), "test")[i] for i in range(report.written["test"])
        )
    ]
    again = build_image_text(str(tmp_path / "src"), 16, str(tmp_path / "out2"), test_fraction=0.5)
    assert again.written == report.written
    assert sorted(keys) == sorted(
        open_dataset(str(tmp_path / "out2"), "test")[i]["key"] for i in range(again.written["test"])
    )


def test_sources_read_webdataset_captions_from_txt_or_json(tmp_path):
    _write_webdataset(tmp_path / "wds")
    examples = {e.key: e for e in iter_source(str(tmp_path / "wds"))}
    assert examples["00000/img0"].caption == "a picture number 0"
    assert examples["00001/img4"].caption == "a picture number 4"
    assert examples["00001/nocap"].caption is None


def test_cli_data_build_prints_the_counts(tmp_path):
    _write_folder(tmp_path / "src")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_jax",
            "data",
            "build",
            "--source",
            str(tmp_path / "src"),
            "--resolution",
            "16",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "skipped: undecodable 1, too_small 1, no_caption 1" in run.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_jax",
            "data",
            "build",
            "--source",
            str(tmp_path / "nope"),
            "--resolution",
            "16",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "data source not found" in missing.stderr


# ---- embedding shards ---------------------------------------------------------------------


def _shard(directory, index, rows, dim=8, seed=0):
    rng = np.random.default_rng(seed + index)
    img, text = rng.standard_normal((rows, dim)), rng.standard_normal((rows, dim))
    keys = [f"k{index}_{i}" for i in range(rows)]
    write_embedding_shard(
        str(directory),
        index,
        img_emb=img.astype(np.float16),
        text_emb=text.astype(np.float16),
        keys=keys,
        captions=[f"caption {k}" for k in keys],
    )
    return img.astype(np.float16), keys


def test_embedding_shards_round_trip_in_row_order(tmp_path):
    img0, _ = _shard(tmp_path, 0, 5)
    img1, keys1 = _shard(tmp_path, 1, 3)
    shards = EmbeddingShards(str(tmp_path), expected_dim=8)
    assert len(shards) == 8 and shards.dim == 8
    assert shards[6]["key"] == keys1[1] and shards[6]["caption"] == f"caption {keys1[1]}"
    np.testing.assert_array_equal(shards[6]["img_emb"], img1[1].astype(np.float32))
    np.testing.assert_array_equal(shards.all_img_emb()[:5], img0.astype(np.float32))
    with pytest.raises(IndexError):
        shards[8]


def test_embedding_shards_read_clip_retrieval_parquet_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _shard(tmp_path, 0, 4)
    os.remove(tmp_path / "metadata" / "metadata_0000.jsonl")
    pq.write_table(
        pa.table(
            {"image_path": [f"p{i}" for i in range(4)], "caption": [f"c{i}" for i in range(4)]}
        ),
        tmp_path / "metadata" / "metadata_0000.parquet",
    )
    shards = EmbeddingShards(str(tmp_path))
    assert shards[2]["key"] == "p2" and shards[2]["caption"] == "c2"


def test_embedding_shards_that_disagree_are_named(tmp_path):
    _shard(tmp_path, 0, 5)
    _shard(tmp_path, 1, 3, dim=6)
    with pytest.raises(
        EmbeddingShardError, match=r"img_emb_0001\.npy: embedding dimension 6, expected 8"
    ):
        EmbeddingShards(str(tmp_path))
    np.save(tmp_path / "text_emb" / "text_emb_0000.npy", np.zeros((4, 8)))
    with pytest.raises(EmbeddingShardError, match=r"row counts disagree: .*img_emb_0000\.npy: 5"):
        EmbeddingShards(str(tmp_path))
    with pytest.raises(EmbeddingShardError, match="expected 512"):
        _shard(tmp_path / "b", 0, 2)
        EmbeddingShards(str(tmp_path / "b"), expected_dim=512)
    with pytest.raises(EmbeddingShardError, match="does not exist"):
        EmbeddingShards(str(tmp_path / "nothing"))


# ---- the pipeline -------------------------------------------------------------------------


class _Indices:
    """A random-access source whose example i is {"i": i}."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": np.int64(i)}


def _noisy(example, rng):
    return {"i": example["i"], "noise": rng.standard_normal(3).astype(np.float32)}


def test_processes_read_disjoint_shares_that_cover_the_data():
    n, processes = 40, 4
    seen = []
    for p in range(processes):
        it = make_pipeline(
            _Indices(n),
            global_batch_size=8,
            seed=1,
            process_index=p,
            process_count=processes,
            num_epochs=1,
        )
        seen.append([int(i) for batch in it for i in batch["i"]])
    for p in range(processes):
        for q in range(p + 1, processes):
            assert not set(seen[p]) & set(seen[q])
    assert sorted(i for s in seen for i in s) == list(range(n))


def test_shuffling_is_seeded_and_changes_every_epoch():
    def first_epochs(seed):
        it = make_pipeline(
            _Indices(12), global_batch_size=4, seed=seed, process_index=0, process_count=1
        )
        return [[int(i) for i in next(it)["i"]] for _ in range(6)]

    a, b = first_epochs(0), first_epochs(0)
    assert a == b and a != first_epochs(1)
    epoch1 = [i for batch in a[:3] for i in batch]
    epoch2 = [i for batch in a[3:] for i in batch]
    assert sorted(epoch1) == sorted(epoch2) == list(range(12)) and epoch1 != epoch2


def test_the_iterator_resumes_to_the_same_next_batch():
    def pipeline():
        return make_pipeline(
            _Indices(30),
            global_batch_size=4,
            seed=3,
            transform=_noisy,
            process_index=0,
            process_count=1,
        )

    it = pipeline()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    expected = [next(it) for _ in range(3)]
    resumed = pipeline()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["i"], want["i"])
        np.testing.assert_array_equal(got["noise"], want["noise"])


def test_pipeline_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        make_pipeline(_Indices(10), global_batch_size=8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="smaller than its batch"):
        make_pipeline(_Indices(3), global_batch_size=8, process_index=0, process_count=1)


def test_decoded_source_turns_text_bytes_into_str():
    source = DecodedSource([{"caption": b"a red circle", "image": np.zeros((2, 2, 3))}])
    assert source[0]["caption"] == "a red circle" and len(source) == 1


def test_write_examples_writes_pngs_a_grid_and_a_manifest(tmp_path):
    images = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)]
    captions = [f"caption {i}" for i in range(5)]
    rows = write_examples(images, captions, str(tmp_path))
    assert [r["caption"] for r in rows] == captions
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert manifest == rows
    for row, image in zip(rows, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / row["file"])), image)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width >= 3 * 8 and grid.height >= 2 * 8


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """A 32 px shapes build with 60 train / 54 test examples."""
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    return dict(data_dir=data_dir, train_size=60, test_size=54)


def test_shapes_batches_come_out_as_float_images_with_captions(small_shapes):
    source = open_dataset("shapes:32", "train", **small_shapes)
    it = make_pipeline(
        source,
        global_batch_size=8,
        seed=0,
        transform=image_caption,
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert len(batch["caption"]) == 8 and all(isinstance(str(c), str) for c in batch["caption"])


def test_upsampler_views_are_an_aligned_crop_and_its_degraded_low_res_view(small_shapes):
    source = open_dataset("shapes:32", "train", **small_shapes)
    example = source[0]
    views = upsampler_views(scale=2, crop=16, kind="blur")
    a = views(example, np.random.default_rng(5))
    b = views(example, np.random.default_rng(5))
    assert a["high"].shape == (16, 16, 3) and a["low"].shape == (8, 8, 3)
    np.testing.assert_array_equal(a["high"], b["high"])  # seeded
    # The low view is exactly the paper's blur degradation of the high-res crop.
    high_uint8 = np.round((a["high"] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(
        a["low"], to_float(make_low_res(high_uint8, scale=2, kind="blur")), atol=1e-6
    )
    whole = upsampler_views(scale=4, crop=None, kind="bsr")(example, np.random.default_rng(0))
    assert whole["high"].shape == (32, 32, 3) and whole["low"].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="not a multiple of the scale"):
        upsampler_views(scale=4, crop=10, kind="blur")


def test_show_writes_any_dataset_for_people_to_look_at(small_shapes, tmp_path):
    rows = show_dataset("shapes:32", "test", 6, str(tmp_path), **small_shapes)
    assert len(rows) == 6 and os.path.exists(tmp_path / "grid.png")
    source = open_dataset("shapes:32", "test", **small_shapes)
    assert [r["caption"] for r in rows] == [source[i]["caption"] for i in range(6)]
    with pytest.raises(ValueError, match="no split 'valid'"):
        _write_folder(tmp_path / "src")
        build_image_text(str(tmp_path / "src"), 16, str(tmp_path / "built"), test_fraction=0.0)
        open_dataset(str(tmp_path / "built"), "valid")
