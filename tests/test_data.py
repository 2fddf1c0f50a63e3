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
from unclip_jax.data.embeddings import (
    EmbeddingShardError,
    EmbeddingShards,
    WithImageEmbeddings,
    write_embedding_shard,
)
from unclip_jax.data.image_text import build_image_text
from unclip_jax.data.images import to_float
from unclip_jax.data.pipeline import (
    DecodedSource,
    MemoizedSource,
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
    (root / "twice.png").write_bytes(_png((7, 7, 7)))  # two images, one caption file
    (root / "twice.jpg").write_bytes(_png((7, 7, 7)))
    (root / "twice.txt").write_text("\ufeffthe same key twice")  # with a byte-order mark


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
    folder = kind == "folder"
    assert report.written == {"train": 7 if folder else 6, "test": 0}
    expected_skips = {
        "undecodable": 1,
        "no_caption": 1,
        "too_small": int(folder),
        "duplicate_key": int(folder),
    }
    assert report.skipped == expected_skips
    data = open_dataset(str(tmp_path / "out"), "train")
    by_caption = {data[i]["caption"]: data[i] for i in range(len(data))}
    extra = {"the same key twice"} if folder else set()
    assert set(by_caption) == {caption for _, caption in GOOD.values()} | extra
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
    assert sum(report.written.values()) == 7 and report.written["test"] >= 1
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


def test_images_decode_upright_and_in_range_whatever_their_mode():
    from PIL import Image as PILImage

    from unclip_jax.data.images import to_rgb_array

    deep = PILImage.fromarray(np.full((4, 6), 30000, np.uint16))  # 16-bit grey
    np.testing.assert_array_equal(to_rgb_array(deep)[0, 0], [117, 117, 117])
    sideways = PILImage.new("RGB", (40, 20), (200, 10, 10))
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", exif=exif)
    assert to_rgb_array(PILImage.open(io.BytesIO(buffer.getvalue()))).shape == (40, 20, 3)
    rgba = PILImage.new("RGBA", (2, 2), (0, 0, 0, 0))
    np.testing.assert_array_equal(to_rgb_array(rgba)[0, 0], [255, 255, 255])  # on white


def test_gzipped_shards_in_subfolders_keep_distinct_keys(tmp_path):
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        with tarfile.open(tmp_path / sub / "00000.tar.gz", "w:gz") as tar:
            for name, data in (("k.png", _png((1, 2, 3))), ("k.txt", f"from {sub}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    keys = {e.key: e.caption for e in iter_source(str(tmp_path))}
    assert keys == {"a/00000/k": "from a", "b/00000/k": "from b"}


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
    assert "skipped: undecodable 1, too_small 1, no_caption 1, duplicate_key 1" in run.stdout
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


def test_examples_carry_their_rows_embedding_and_a_row_of_other_data_is_named(tmp_path):
    _shard(tmp_path, 0, 5)
    img1, keys1 = _shard(tmp_path, 1, 3)
    shards = EmbeddingShards(str(tmp_path))
    captions = [shards[i]["caption"] for i in range(8)]
    examples = [{"image": np.zeros((2, 2, 3), np.uint8), "caption": c} for c in captions]
    joined = WithImageEmbeddings(examples, shards)
    assert len(joined) == 8 and joined[6]["caption"] == f"caption {keys1[1]}"
    np.testing.assert_array_equal(joined[6]["z_i"], img1[1].astype(np.float32))
    assert "z_i" not in examples[6]  # the source's own example is left as it was
    examples[6] = {**examples[6], "caption": "a red circle"}
    with pytest.raises(EmbeddingShardError, match=r"row 6 of the embeddings .* 'a red circle'"):
        joined[6]
    with pytest.raises(EmbeddingShardError, match="have 8 rows, the dataset 7 examples"):
        WithImageEmbeddings(examples[:7], shards)


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


@pytest.mark.parametrize("n,processes", [(40, 4), (10, 3)])
def test_processes_read_equal_disjoint_shares_that_cover_the_data(n, processes):
    seen = []
    for p in range(processes):
        it = make_pipeline(
            _Indices(n),
            global_batch_size=processes,
            seed=1,
            process_index=p,
            process_count=processes,
            num_epochs=1,
        )
        seen.append([int(i) for batch in it for i in batch["i"]])
    assert len({len(s) for s in seen}) == 1  # as many batches everywhere: no host waits
    for p in range(processes):
        for q in range(p + 1, processes):
            assert not set(seen[p]) & set(seen[q])
    covered = sorted(i for s in seen for i in s)
    assert len(covered) == n // processes * processes and set(covered) <= set(range(n))


def test_a_global_batch_is_the_same_whatever_the_process_count():
    def global_batches(processes):
        its = [
            make_pipeline(
                _Indices(64),
                global_batch_size=8,
                seed=2,
                transform=_noisy,
                process_index=p,
                process_count=processes,
            )
            for p in range(processes)
        ]
        out = []
        for _ in range(5):
            parts = [next(it) for it in its]
            rows = sorted(
                zip(
                    np.concatenate([b["i"] for b in parts]).tolist(),
                    np.concatenate([b["noise"] for b in parts]).tolist(),
                    strict=True,
                )
            )
            out.append(rows)
        return out

    one, two, four = global_batches(1), global_batches(2), global_batches(4)
    assert one == two == four  # same examples, same augmentation draws
    noise = [row[1] for row in one[0]]
    assert len({tuple(x) for x in noise}) == len(noise)  # every example its own draw


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


def test_the_iterator_resumes_with_worker_processes_too():
    def pipeline():
        return make_pipeline(
            _Indices(30),
            global_batch_size=4,
            seed=3,
            transform=_noisy,
            process_index=0,
            process_count=1,
            worker_count=1,
        )

    it = pipeline()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    resumed = pipeline()
    resumed.set_state(state)
    got = next(resumed)
    np.testing.assert_array_equal(got["i"], want["i"])
    np.testing.assert_array_equal(got["noise"], want["noise"])
    in_process = make_pipeline(
        _Indices(30), global_batch_size=4, seed=3, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="saved with 1 worker processes and this pipeline has 0"):
        in_process.set_state(state)


class _CountedReads(_Indices):
    """_Indices with an image per example, counting the reads of the underlying source."""

    def __init__(self, n):
        super().__init__(n)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return {"i": np.int64(i), "image": np.full((2, 2, 3), i, np.uint8)}


def test_a_memoized_source_reads_each_example_once_and_batches_as_the_source_does():
    def pipeline(source):
        return make_pipeline(
            source,
            global_batch_size=4,
            seed=5,
            transform=lambda e, rng: {**_noisy(e, rng), "image": e["image"]},
            process_index=0,
            process_count=1,
            read_threads=1,
        )

    disk = _CountedReads(12)
    memo = MemoizedSource(disk)
    plain, cached = pipeline(_CountedReads(12)), pipeline(memo)
    for _ in range(9):  # three epochs
        want, got = next(plain), next(cached)
        for key in ("i", "noise", "image"):
            np.testing.assert_array_equal(got[key], want[key])
    assert disk.reads == 12 and len(memo) == 12
    # A transform that wrote into a kept example would change every later epoch: it fails.
    with pytest.raises(ValueError, match="read-only"):
        memo[3]["image"][0, 0, 0] = 255


def test_pipeline_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        make_pipeline(_Indices(10), global_batch_size=8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="smaller than one global batch"):
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
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    for i in range(8):  # unshuffled: row i is example i, mapped to [-1, 1]
        np.testing.assert_array_equal(batch["image"][i], to_float(source[i]["image"]))
        assert batch["caption"][i] == source[i]["caption"]


def _find_window(image, window):
    size = window.shape[0]
    for top in range(image.shape[0] - size + 1):
        for left in range(image.shape[1] - size + 1):
            if np.array_equal(image[top : top + size, left : left + size], window):
                return top, left
    return None


def test_upsampler_views_are_a_random_crop_and_its_degraded_low_res_view(small_shapes):
    source = open_dataset("shapes:32", "train", **small_shapes)
    example = source[3]
    views = upsampler_views(scale=2, crop_fraction=0.5, kind="blur")
    a = views(example, np.random.default_rng(5))
    assert a["high"].shape == (16, 16, 3) and a["low"].shape == (8, 8, 3)
    np.testing.assert_array_equal(views(example, np.random.default_rng(5))["high"], a["high"])
    # The high view is a window of the example; different draws give different windows.
    high_uint8 = np.round((a["high"] + 1) * 127.5).astype(np.uint8)
    assert _find_window(example["image"], high_uint8) is not None
    windows = {
        _find_window(
            example["image"],
            np.round((views(example, np.random.default_rng(s))["high"] + 1) * 127.5).astype(
                np.uint8
            ),
        )
        for s in range(8)
    }
    assert len(windows) > 1
    # The low view is exactly the paper's blur degradation of the high-res crop.
    np.testing.assert_allclose(
        a["low"], to_float(make_low_res(high_uint8, scale=2, kind="blur")), atol=1e-6
    )
    whole = upsampler_views(scale=4, crop_fraction=None, kind="bsr")(
        example, np.random.default_rng(0)
    )
    assert whole["high"].shape == (32, 32, 3) and whole["low"].shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"crop_fraction must be in \(0, 1\]"):
        upsampler_views(scale=4, crop_fraction=1.5, kind="blur")


def test_show_writes_any_dataset_for_people_to_look_at(small_shapes, tmp_path):
    rows = show_dataset("shapes:32", "test", 6, str(tmp_path), **small_shapes)
    assert len(rows) == 6 and os.path.exists(tmp_path / "grid.png")
    source = open_dataset("shapes:32", "test", **small_shapes)
    assert [r["caption"] for r in rows] == [source[i]["caption"] for i in range(6)]
    _write_folder(tmp_path / "src")
    build_image_text(str(tmp_path / "src"), 16, str(tmp_path / "built"), test_fraction=0.0)
    with pytest.raises(ValueError, match="no split 'valid'"):
        open_dataset(str(tmp_path / "built"), "valid")


def test_embedding_shards_read_clip_retrievals_own_names_and_null_captions(tmp_path):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    for folder in ("img_emb", "text_emb", "metadata"):
        os.makedirs(tmp_path / folder)
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", np.ones((3, 4), np.float16))
    np.save(tmp_path / "text_emb" / "text_emb_0.npy", np.zeros((3, 4), np.float16))
    pq.write_table(
        pa.table({"url": ["u0", "u1", "u2"], "caption": ["a", None, "c"]}),
        tmp_path / "metadata" / "metadata_0.parquet",
    )
    shards = EmbeddingShards(str(tmp_path))
    assert [shards[i]["caption"] for i in range(3)] == ["a", "", "c"]
    assert shards[1]["key"] == "u1"
    assert len(pickle.dumps(shards)) < 1000  # workers reopen the files, nothing is copied
    pq.write_table(
        pa.table({"url": ["u0", "u1", "u2"], "alt": ["a", "b", "c"]}),
        tmp_path / "metadata" / "metadata_0.parquet",
    )
    with pytest.raises(EmbeddingShardError, match=r"no caption column .*columns: alt, url"):
        EmbeddingShards(str(tmp_path))


def test_embedding_shard_writes_refuse_disagreeing_dims_and_a_lost_file_is_named(tmp_path):
    with pytest.raises(EmbeddingShardError, match="image embeddings have dim 4, text 6"):
        write_embedding_shard(
            str(tmp_path),
            0,
            img_emb=np.zeros((2, 4)),
            text_emb=np.zeros((2, 6)),
            keys=["a", "b"],
            captions=["a", "b"],
        )
    _shard(tmp_path, 0, 3)
    _shard(tmp_path, 1, 3)
    os.remove(tmp_path / "img_emb" / "img_emb_0001.npy")
    with pytest.raises(EmbeddingShardError, match=r"img_emb_0001\.npy is missing"):
        EmbeddingShards(str(tmp_path))
    assert not [f for f in os.listdir(tmp_path / "img_emb") if ".tmp-" in f]


def test_cli_data_show_writes_pngs_a_grid_and_a_manifest(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_jax",
            "data",
            "show",
            "--data",
            "shapes:32",
            "--split",
            "test",
            "--n",
            "4",
            "--out",
            str(tmp_path / "look"),
            "--data-dir",
            str(tmp_path / "data"),
            "--shapes-train-size",
            "60",
            "--shapes-test-size",
            "54",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    manifest = [
        json.loads(line) for line in (tmp_path / "look" / "manifest.jsonl").read_text().splitlines()
    ]
    assert len(manifest) == 4 and all(
        os.path.exists(tmp_path / "look" / m["file"]) for m in manifest
    )
    assert os.path.exists(tmp_path / "look" / "grid.png")
