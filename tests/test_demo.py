"""`unclip-jax demo` end to end with the tiny configs (the `test` preset): every stage trains,
the grid, the samples of the test prompts and the scores are written, and a rerun resumes."""

import json
import os
import shutil

from unclip_jax.cli import _set_cpu_xla_flags, main
from unclip_jax.data.shapes import ATTRIBUTES
from unclip_jax.demo import DEMO_STAGES, PRESETS, demo_cpu_devices, stage_configs
from unclip_jax.training.upsampler_stage import upsampler_scale


def test_the_demo_runs_every_stage_and_a_rerun_does_nothing_again(tmp_path, capfd):
    workdir = str(tmp_path / "demo")
    assert main(["demo", "--workdir", workdir, "--preset", "test"]) == 0
    for stage in ("clip", "prior", "decoder", "upsampler"):
        assert os.path.isdir(os.path.join(workdir, stage, "checkpoints")), stage
    assert os.path.isfile(os.path.join(workdir, "clip", "clip", "model.safetensors"))
    assert os.path.isfile(os.path.join(workdir, "demo_grid.png"))
    with open(os.path.join(workdir, "samples", "manifest.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 54  # the tiny test split: 54 examples, one prompt each
    with open(os.path.join(workdir, "scores.json"), encoding="utf-8") as f:
        scores = json.load(f)
    for key in ("frechet_clip", "clip_score", "precision", "recall", "shapes_probe"):
        assert key in scores
    # Each stage ran in its own process, logged to its own file and was timed.
    with open(os.path.join(workdir, "timings.json"), encoding="utf-8") as f:
        assert set(json.load(f)) == set(DEMO_STAGES)
    for stage in DEMO_STAGES:
        assert os.path.isfile(os.path.join(workdir, "logs", f"{stage}.log")), stage
    seen, held_out = scores["shapes"]["seen"], scores["shapes"]["held_out"]
    assert seen["count"] + held_out["count"] == 54
    assert set(ATTRIBUTES) <= set(seen)
    # A rerun finds every stage done and every image on disk.
    before = os.path.getmtime(os.path.join(workdir, "samples", rows[0]["file"]))
    assert main(["demo", "--workdir", workdir, "--preset", "test"]) == 0
    assert os.path.getmtime(os.path.join(workdir, "samples", rows[0]["file"])) == before
    assert main(["demo", "--workdir", workdir, "--steps", "decodr=3"]) == 2
    # A stage that fails stops the demo with one error naming the stage and its log; the
    # child's own error names the file at fault.
    with open(os.path.join(workdir, "clip", "clip", "config.json"), "w") as f:
        f.write("{not json")
    shutil.rmtree(os.path.join(workdir, "embed"))
    assert main(["demo", "--workdir", workdir, "--preset", "test"]) == 2
    err = capfd.readouterr().err
    assert "demo stage embed failed" in err and os.path.join("logs", "embed.log") in err
    assert "clip/config.json: not JSON" in err


def test_the_full_and_quick_presets_build_valid_configs_with_quarter_crops(tmp_path):
    # The `shapes` presets only run for minutes outside the tests: their configs must at least
    # load and pass the stages' own checks, the upsampler on crops of 1/4 of its resolution.
    for preset in ("full", "quick"):
        configs = stage_configs(str(tmp_path), preset, {})
        upsampler = configs["upsampler"]
        assert upsampler_scale(upsampler) == 2
        assert upsampler.train_crop * 4 == upsampler.model.resolution == 64
        for stage, config in configs.items():
            assert config.train.steps == PRESETS[preset].steps[stage], (preset, stage)
            # A U-Net stage runs on one CPU device per core (2 on the demo's machine): its
            # batch must split evenly over them. The transformers keep JAX's one device.
            assert config.train.batch_size % demo_cpu_devices(stage) == 0, (preset, stage)
    assert demo_cpu_devices("clip") == demo_cpu_devices("prior") == 1
    assert demo_cpu_devices("decoder") == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)


def test_a_demo_stage_asks_for_its_cpu_devices_unless_the_user_chose_a_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    _set_cpu_xla_flags("decoder", cpu_devices=2, stage_flags=False)  # as the demo asks
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=2"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    _set_cpu_xla_flags("decoder")  # as `unclip-jax train` asks: the stage's CPU_XLA_FLAGS
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_cpu_experimental_ynn_fusion_type="]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    _set_cpu_xla_flags("clip", cpu_devices=2)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", "")
    _set_cpu_xla_flags("clip")  # one device: JAX's default, no flag
    assert os.environ["XLA_FLAGS"] == ""
