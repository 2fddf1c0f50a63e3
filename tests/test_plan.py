"""`unclip-jax plan`: a stage's train step compiled for a TPU topology on this CPU machine.

Needs libtpu (the `tpu` extra) for the compiles; without it those tests skip and say so.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from unclip_jax.config import ConfigError, load_config
from unclip_jax.models.clip import ClipConfig
from unclip_jax.training import plan as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# The issue asks for these to skip, saying why, on a machine without the tpu extra (CI has it).
NO_LIBTPU = "libtpu is not installed (pip install -e '.[tpu]')"
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
TOPOLOGY = "v5e:2x2"  # 4 chips of 16 GiB


def config(spec: str, **overrides):
    return load_config(f"{ROOT}/configs/{spec}", overrides)


@pytest.fixture(scope="module")
def devices():
    return P.topology_devices(TOPOLOGY)


def _param_count(c, clip_config=None):
    from unclip_jax.training.stages import build_step_spec

    spec = build_step_spec(c, clip_config)
    shapes = jax.eval_shape(spec.init_params, jax.random.key(0))
    return sum(math.prod(x.value.shape) for x in jax.tree.leaves(shapes, is_leaf=_boxed))


def _boxed(x):
    return hasattr(x, "value") and hasattr(x, "names")


@needs_libtpu
def test_a_replicated_plan_holds_every_param_on_every_chip(devices):
    c = config("prior.py:tiny")
    clip_config = P.planned_clip_config(c, f"{ROOT}/configs/prior.py:tiny")
    plan = P.plan_train_step(c, devices, topology=TOPOLOGY, clip_config=clip_config)
    assert plan.chip == "v5e" and plan.num_chips == 4 and plan.hbm == 16 * P.GIB
    assert plan.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    n = _param_count(c, clip_config)
    assert plan.num_params == n
    # float32 params, their EMA and Adam's two moments, whole on each chip.
    assert plan.params == plan.ema_params == 4 * n
    assert plan.opt_state >= 2 * plan.params
    # One row of the 8 per chip: z_i (16 floats), 16 ids and 16 mask bytes.
    assert plan.batch == 2 * (16 * 4 + 16 * 4 + 16)
    assert plan.fits and plan.peak < 64 * 2**20 and plan.flops > 0
    # The compiler's arguments are what the shardings say each chip holds, and more: the
    # TPU's (8, 128) tiles pad this tiny model's small dimensions.
    held = plan.params + plan.ema_params + plan.opt_state + plan.frozen + plan.batch
    assert held <= plan.arguments <= 3 * held


@needs_libtpu
def test_fsdp_splits_params_and_optimizer_state_over_the_chips(devices):
    c = config("prior.py:tiny")
    clip_config = P.planned_clip_config(c, f"{ROOT}/configs/prior.py:tiny")
    replicated = P.plan_train_step(c, devices, clip_config=clip_config)
    fsdp = P.plan_train_step(
        config("prior.py:tiny", **{"mesh.data": 1, "mesh.fsdp": -1}),
        devices,
        clip_config=clip_config,
    )
    assert fsdp.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    # Most params shard 4 ways (a few small ones, e.g. odd-sized biases, stay whole).
    assert fsdp.params < 0.4 * replicated.params
    assert fsdp.opt_state < 0.4 * replicated.opt_state


@needs_libtpu
def test_a_step_that_does_not_fit_gets_the_settings_that_do(devices):
    c = config("upsampler.py:tiny")
    small = P.plan_train_step(c, devices)
    hbm = int(small.peak * 0.9)  # a chip just too small for the config as it is
    plan, tried = P.plan_with_fixes(c, devices, hbm_bytes=hbm, max_tries=3)
    assert not plan.fits and tried
    # Each try adds a setting to the one before, cheapest first: FSDP, then bfloat16, ...
    assert tried[0].settings == {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
    for before, after in itertools.pairwise(tried):
        assert before.settings.items() <= after.settings.items()
    assert tried[-1].fits or len(tried) == 3
    report = P.format_plan(plan, tried)
    assert "DOES NOT FIT" in report and "--config.mesh.fsdp=-1" in report
    if tried[-1].fits:
        assert "fits with:" in report


def test_candidate_fixes_stop_at_one_row_per_chip():
    c = config("decoder.py:tiny", **{"train.batch_size": 16})
    fixes = list(P.candidate_fixes(c, 4))
    assert fixes[0] == {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
    assert fixes[1]["train.compute_dtype"] == "bfloat16"
    assert fixes[2]["train.remat"] is True
    assert [f["train.batch_size"] for f in fixes[3:]] == [8, 4]


@needs_libtpu
@pytest.mark.parametrize(
    "topology,chips,chip",
    [("v4:2x2x1", 4, "v4"), ("v5p:2x2x1", 4, "v5p"), ("v6e:2x2", 4, "v6e"), ("v5e:4x4", 16, "v5e")],
)
def test_each_generation_plans_one_device_per_chip(topology, chips, chip):
    devices = P.topology_devices(topology)
    assert len(devices) == chips
    assert P.CHIPS[devices[0].device_kind].name == chip


def test_an_unknown_topology_is_named():
    with pytest.raises(ConfigError, match="unknown TPU topology 'v9:4x4'"):
        P.topology_devices("v9:4x4")


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(P.LibtpuMissingError, match=r"pip install -e '\.\[tpu\]'"):
        P.topology_devices("v5e:2x2")


def test_the_frozen_clip_comes_from_the_clip_config_next_to_the_stage(tmp_path):
    c = config("decoder.py:paper")
    clip_config = P.planned_clip_config(c, f"{ROOT}/configs/decoder.py:paper")
    assert clip_config.projection_dim == 1024 and clip_config.vision.patch_size == 16
    # prior.py:paper_ar plans with clip.py:paper
    ar = P.planned_clip_config(config("prior.py:paper_ar"), f"{ROOT}/configs/prior.py:paper_ar")
    assert ar == clip_config
    # The upsampler has no frozen CLIP.
    assert P.planned_clip_config(config("upsampler.py:paper"), "configs/upsampler.py") is None
    # A CLIP directory: only its config.json is read.
    (tmp_path / "config.json").write_text(
        json.dumps(
            ClipConfig.from_model_config(config("clip.py:karlo").model.to_dict()).to_hf_dict()
        )
    )
    from_dir = P.planned_clip_config(config("decoder.py:karlo"), "x", str(tmp_path))
    assert from_dir.projection_dim == 768


@needs_libtpu
def test_a_clip_that_does_not_fit_the_stage_is_an_error_naming_the_key(devices):
    c = config("decoder.py:tiny", **{"model.vocab_size": 1024})
    wrong = P.planned_clip_config(c, "configs/decoder.py", f"{ROOT}/configs/clip.py:shapes")
    with pytest.raises(ConfigError, match=r"'model\.clip_dim' is 16.*needs 128"):
        P.plan_train_step(c, devices, clip_config=wrong)


@needs_libtpu
def test_a_batch_that_does_not_split_over_the_mesh_is_named(devices):
    c = config("upsampler.py:tiny", **{"train.batch_size": 6})
    with pytest.raises(ConfigError, match=r"'train\.batch_size' is 6.*data x fsdp = 4 x 1"):
        P.plan_train_step(c, devices)


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "unclip_jax.cli", "plan", "--topology", TOPOLOGY, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@needs_libtpu
def test_the_plan_command_prints_the_plan_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    tiny = f"{ROOT}/configs/upsampler.py:tiny"
    run = _plan_cli(
        "--config", tiny, "--json", str(out), "--config.mesh.data=1", "--config.mesh.fsdp=-1"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mesh data=1 x fsdp=4 x tensor=1" in run.stdout and ": fits" in run.stdout
    record = json.loads(out.read_text())
    assert record["fits"] and record["num_chips"] == 4
    assert record["overrides"] == {"mesh.data": "1", "mesh.fsdp": "-1"}
    # Too little HBM and no fixes: exit status 1, the verdict in the report.
    run = _plan_cli("--config", tiny, "--hbm-gib", "0.001", "--no-fixes")
    assert run.returncode == 1 and "DOES NOT FIT" in run.stdout


@needs_libtpu
def test_the_frozen_clip_shards_over_fsdp_like_the_params(devices):
    """A decoder's frozen CLIP is laid out by its params' logical names: with FSDP over the 4
    chips each holds about a quarter of it, not all of it."""
    spec = f"{ROOT}/configs/decoder.py:tiny"
    clip_config = P.planned_clip_config(config("decoder.py:tiny"), spec)
    replicated = P.plan_train_step(
        config("decoder.py:tiny", **{"mesh.data": 4, "mesh.fsdp": 1}),
        devices,
        clip_config=clip_config,
    )
    fsdp = P.plan_train_step(
        config("decoder.py:tiny", **{"mesh.data": 1, "mesh.fsdp": -1}),
        devices,
        clip_config=clip_config,
    )
    assert fsdp.frozen < 0.4 * replicated.frozen
