"""Workdir files through etils.epath: the same code for a local path and a gs:// URI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unclip_jax.training import files, metrics
from unclip_jax.training.metrics import MetricsWriter, read_metrics


def test_a_uri_workdir_is_kept_as_given_and_a_local_one_made_absolute(tmp_path, monkeypatch):
    assert files.workdir_path("gs://bucket/runs/decoder") == "gs://bucket/runs/decoder"
    monkeypatch.chdir(tmp_path)
    assert files.workdir_path("run") == str(tmp_path / "run")


def test_arrays_and_their_metadata_round_trip(tmp_path):
    arrays = {"clip_mean": np.arange(4, dtype=np.float32), "n": np.ones((2, 3), np.int32)}
    path = tmp_path / "sub" / "stats.safetensors"
    files.save_arrays(path, arrays, {"bucketing": "quantile"})
    loaded, metadata = files.load_arrays(path)
    assert metadata == {"bucketing": "quantile"}
    assert loaded.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]  # no temporaries


def test_copy_tree_copies_nested_files(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("1")
    (src / "a" / "b" / "deep.json").write_text(json.dumps({"x": 2}))
    files.copy_tree(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "top.txt").read_text() == "1"
    assert json.loads((tmp_path / "dst" / "a" / "b" / "deep.json").read_text()) == {"x": 2}


@pytest.mark.parametrize("remote", [False, True], ids=["local", "object-store"])
def test_metrics_resume_drops_steps_after_the_checkpoint(tmp_path, monkeypatch, remote):
    # An object store cannot append: there the writer rewrites the whole file each time.
    monkeypatch.setattr(metrics, "is_remote", lambda path: remote)
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step})
    writer.close()
    writer = MetricsWriter(str(tmp_path), enabled=True, start_step=2)  # resumed at step 2
    writer.write_scalars(3, {"loss": 0.25})
    writer.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == [1.0, 0.5, 0.25]
