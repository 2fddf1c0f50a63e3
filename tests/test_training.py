"""The generic training machinery, on the stand-in stage and 8 fake CPU devices."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from standin import build_standin, standin_config

from unclip_jax.training import (
    CheckpointMismatchError,
    Hook,
    NonFiniteError,
    Stage,
    checkpoint_manager,
    export_params,
    flatten_params,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    read_metrics,
    train_and_evaluate,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _train(workdir, stage=None, stop_after=None, **train_overrides):
    config = standin_config(**train_overrides)
    return train_and_evaluate(config, str(workdir), stage=stage, stop_after=stop_after)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_position(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
    with open(path) as f:
        return json.load(f)["position"]


def test_resume_is_bitwise(tmp_path):
    straight = _train(tmp_path / "a", steps=10)
    _train(tmp_path / "b", steps=10, stop_after=5)
    assert checkpoint_manager(tmp_path / "b" / "checkpoints", read_only=True).latest_step() == 5
    resumed = _train(tmp_path / "b", steps=10)
    _assert_trees_equal(straight.params, resumed.params)
    _assert_trees_equal(straight.ema_params, resumed.ema_params)
    _assert_trees_equal(straight.opt_state, resumed.opt_state)
    _assert_trees_equal(straight.rng, resumed.rng)
    assert int(resumed.step) == 10
    assert _data_position(tmp_path / "a", 10) == _data_position(tmp_path / "b", 10) == 10
    # The resumed run logged the steps it ran, after those of the first run.
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 11))


def test_restoring_onto_another_mesh_gives_the_same_values_and_training_goes_on(tmp_path):
    straight = _train(tmp_path / "straight", steps=6)
    first = _train(tmp_path / "run", steps=6, stop_after=4)
    config = standin_config(steps=6)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    restored = train_and_evaluate(config, str(tmp_path / "run"), stop_after=4)  # nothing to run
    _assert_trees_equal(first.params, restored.params)
    _assert_trees_equal(first.ema_params, restored.ema_params)
    _assert_trees_equal(first.opt_state, restored.opt_state)
    fc1 = restored.params["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # Two more steps on the new mesh reach the straight run's losses, up to the order of the
    # cross-device sums (float32 rounding; Adam turns it into small param differences where a
    # gradient is near zero, so compare the losses).
    train_and_evaluate(config, str(tmp_path / "run"))
    del straight
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    straight_losses = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    np.testing.assert_allclose(losses, straight_losses, rtol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(commands, env, timeout=240):
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outputs


def test_two_processes_reach_the_losses_of_one(tmp_path):
    script = os.path.join(HERE, "standin_main.py")
    base_env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one_env = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    codes, outs = _run_processes([[sys.executable, script, str(tmp_path / "one"), "6"]], one_env)
    assert codes == [0], outs[0][-3000:]

    two_env = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    coordinator = f"localhost:{_free_port()}"
    commands = [
        [sys.executable, script, str(tmp_path / "two"), "6", coordinator, "2", str(i)]
        for i in range(2)
    ]
    codes, outs = _run_processes(commands, two_env)
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outs)

    one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(one) == len(two) == 6
    # Same global batches and rng; only the order of cross-device reductions may differ.
    np.testing.assert_allclose(two, one, rtol=1e-5)
    # Each process saved its own data position.
    data_dir = tmp_path / "two" / "checkpoints" / "6" / "data"
    saved = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    for name in saved:
        assert json.loads((data_dir / name).read_text()) == {"position": 6}


def test_a_nan_stops_the_run_naming_the_step_and_never_reaches_a_checkpoint(tmp_path):
    # Step 6 is a checkpoint step but not a log step: its NaN must be caught before the save.
    config = standin_config(steps=12, checkpoint_every=3, log_every=5)
    config.data.nan_at_step = 6
    with pytest.raises(NonFiniteError, match=r"non-finite metric at step 6: loss=nan"):
        train_and_evaluate(config, str(tmp_path))
    manager = checkpoint_manager(tmp_path / "checkpoints", read_only=True)
    assert manager.all_steps() == [3]
    for leaf in export_params_tree(tmp_path, 3).values():
        assert np.all(np.isfinite(leaf))


def test_a_non_finite_step_leaves_the_state_exactly_as_it_was():
    config = standin_config()
    stage = build_standin(config)
    tx, schedule = make_optimizer(config.optim, 10)
    state = _new_state_for_test(stage, tx)
    step = make_train_step(stage.loss_fn, tx, ema_decay=0.9, lr_schedule=schedule)
    bad = {"x": np.full((16, 16), np.nan, np.float32)}
    new_state, metrics = jax.jit(step)(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    _assert_trees_equal(new_state, state)  # params, EMA, optimizer count and step


def _new_state_for_test(stage, tx):
    from unclip_jax.parallel import make_mesh
    from unclip_jax.training import create_state, state_partition_specs, state_shardings

    mesh = make_mesh(dict(data=8))
    shardings = state_shardings(state_partition_specs(stage.init_params, tx, mesh), mesh)
    return create_state(stage.init_params, tx, shardings, seed=0)


def export_params_tree(workdir, step):
    out = os.path.join(workdir, f"params_{step}.safetensors")
    export_params(str(workdir), out, step=step)
    return load_file(out)


def test_export_writes_every_param_once_with_its_shape(tmp_path):
    state = _train(tmp_path / "run", steps=4, checkpoint_every=2)
    expected = flatten_params(jax.device_get(state.params))
    out = tmp_path / "out" / "params.safetensors"
    assert export_params(str(tmp_path / "run"), str(out)) == 4
    got = load_file(str(out))
    assert sorted(got) == sorted(expected)
    assert "fc1/kernel" in got and got["fc1/kernel"].shape == (32, 64)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    ema = (
        load_file(str(tmp_path / "ema.safetensors"))
        if export_params(str(tmp_path / "run"), str(tmp_path / "ema.safetensors"), ema=True)
        else None
    )
    for name, value in flatten_params(jax.device_get(state.ema_params)).items():
        np.testing.assert_array_equal(ema[name], value)
    assert export_params(str(tmp_path / "run"), str(tmp_path / "s2.safetensors"), step=2) == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        export_params(str(tmp_path / "run"), str(tmp_path / "s3.safetensors"), step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
        export_params(str(tmp_path / "nowhere"), str(out))
    assert os.path.exists(out)  # a failed export leaves an existing file alone


def test_the_cli_exports(tmp_path):
    _train(tmp_path, steps=2, checkpoint_every=2)
    out = tmp_path / "p.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip_jax",
            "export",
            "--workdir",
            str(tmp_path),
            "--ema",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "fc1/kernel" in load_file(str(out))


def test_a_checkpoint_from_another_config_is_named(tmp_path):
    _train(tmp_path / "a", steps=2, checkpoint_every=2)
    config = standin_config(steps=4)
    config.model.hidden = 48
    with pytest.raises(CheckpointMismatchError, match=r"another config: model.hidden: 64 -> 48"):
        train_and_evaluate(config, str(tmp_path / "a"))
    # Initialising from a run of another size names the param that does not fit.
    config.train.init_from = str(tmp_path / "a")
    with pytest.raises(
        CheckpointMismatchError, match=r"param 'fc1/bias' is \(64,\) there and \(48,\) here"
    ):
        train_and_evaluate(config, str(tmp_path / "b"))


def test_resuming_with_another_optimizer_set_up_is_a_named_error(tmp_path):
    _train(tmp_path, steps=2, checkpoint_every=2)
    config = standin_config(steps=4)
    config.optim.grad_clip = 0.0  # one transformation fewer in the optimizer chain
    with pytest.raises(CheckpointMismatchError, match="another state structure"):
        train_and_evaluate(config, str(tmp_path))


def test_resuming_with_a_changed_batch_size_warns(tmp_path, caplog):
    _train(tmp_path, steps=2, checkpoint_every=2)
    with caplog.at_level("WARNING", logger="unclip_jax.train"):
        _train(tmp_path, steps=3, batch_size=32)
    assert "train.batch_size: 16 -> 32" in caplog.text


def test_a_resumed_run_rewrites_the_metrics_it_logged_after_its_checkpoint(tmp_path):
    _train(tmp_path, steps=6, checkpoint_every=4)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run died after logging step 6
    _train(tmp_path, steps=6, checkpoint_every=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_init_from_takes_another_runs_params_and_starts_at_step_zero(tmp_path):
    source = _train(tmp_path / "source", steps=3, checkpoint_every=3)
    config = standin_config(steps=1)
    config.train.init_from = str(tmp_path / "source")
    config.optim.lr = 0.0  # so that after one step the params are still the source's
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.0
    state = train_and_evaluate(config, str(tmp_path / "target"))
    _assert_trees_equal(state.params, source.params)
    assert int(state.step) == 1
    config.train.init_from = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"train\.init_from: no checkpoints directory"):
        train_and_evaluate(config, str(tmp_path / "other"))


def test_sigterm_saves_and_stops_cleanly_then_the_run_resumes(tmp_path):
    base = build_standin(standin_config())

    def preempt(ctx):
        if ctx.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stage = Stage(
        init_params=base.init_params,
        loss_fn=base.loss_fn,
        make_data=base.make_data,
        hooks=(Hook("preempt", 1, preempt),),
    )
    # One process checks for SIGTERM every step, whatever log_every is.
    state = _train(tmp_path, stage=stage, steps=10, checkpoint_every=100, log_every=5)
    assert int(state.step) == 3
    assert checkpoint_manager(tmp_path / "checkpoints", read_only=True).latest_step() == 3
    assert int(_train(tmp_path, steps=10, checkpoint_every=100).step) == 10


def test_keeps_the_last_k_checkpoints_and_every_mth(tmp_path):
    _train(tmp_path, steps=12, checkpoint_every=2, keep_checkpoints=2, keep_every=4)
    steps = checkpoint_manager(tmp_path / "checkpoints", read_only=True).all_steps()
    assert sorted(steps) == [4, 8, 10, 12]


def test_logs_metrics_to_jsonl_and_tensorboard_and_the_run_info(tmp_path):
    _train(tmp_path, steps=4, log_every=2)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "mse", "grad_norm", "lr", "steps_per_sec"):
        assert np.isfinite(records[-1][key])
    # A 1-D metric (the loss per quarter of the timesteps) is logged per element; a quarter
    # no example of the window fell in is NaN and does not stop the run.
    assert {f"loss_by_t/{i}" for i in range(4)} <= set(records[-1])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["mesh"].startswith("data=4 fsdp=2 tensor=1 on 8 devices")
    assert info["versions"]["jax"].startswith("0.10") and "git_revision" in info
    assert info["config"]["train"]["steps"] == 4


def test_learning_rate_warms_up_then_decays_by_cosine():
    optim = standin_config().optim.to_dict()
    optim.update(lr=1.0, warmup_steps=10, schedule="cosine")
    lr = learning_rate_schedule(optim, total_steps=110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.5, abs=1e-6)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-6)
    optim["schedule"] = "constant"
    assert float(learning_rate_schedule(optim, 110)(100)) == 1.0


def test_bfloat16_compute_runs_the_matmuls_in_bfloat16_and_keeps_float32_params(tmp_path):
    config = standin_config(compute_dtype="bfloat16")
    stage = build_standin(config)
    tx, _ = make_optimizer(config.optim, 10)
    state = _new_state_for_test(stage, tx)
    step = make_train_step(stage.loss_fn, tx, ema_decay=0.9, compute_dtype="bfloat16")
    batch = {"x": np.zeros((16, 16), np.float32)}
    jaxpr = str(jax.make_jaxpr(step)(state, batch))
    dots = [line for line in jaxpr.splitlines() if "dot_general" in line or "conv_general" in line]
    # Every matmul and convolution of the model runs in bfloat16; the one float32 dot_general
    # is the stand-in's per-timestep loss bucketing (f32[4]), which is metric arithmetic.
    assert len(dots) >= 8
    assert all("bf16" in line or "f32[4]" in line for line in dots), dots
    final = _train(tmp_path, steps=2, compute_dtype="bfloat16")
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(final.params))
    assert np.isfinite(read_metrics(tmp_path)[-1]["loss"])


def test_a_key_newer_than_a_checkpoint_resumes_at_the_value_its_absence_means():
    """A run saved before `diffusion.timestep_power` existed resumes under a config that sets
    it to 1 (uniform t, what the old run trained with), and not under another value."""
    from unclip_jax.training.loop import compare_configs

    saved = {"diffusion": {"schedule": "cosine"}, "model": {"channels": 32}}
    current = {
        "diffusion": {"schedule": "cosine", "timestep_power": 1.0},
        "model": {"channels": 32, "patch_size": 1},
    }
    assert compare_configs(saved, current) == ([], [])
    current["diffusion"]["timestep_power"] = 0.5
    current["model"]["patch_size"] = 2
    assert compare_configs(saved, current) == (
        ["diffusion.timestep_power: 'absent' -> 0.5", "model.patch_size: 'absent' -> 2"],
        [],
    )
