"""The training loop that trains any registered stage: `train_and_evaluate(config, workdir)`.

It reads top to bottom: set-up, mesh, optimizer and state layout, data, restore or start,
compile, the loop, the final save. Nothing in it is stage-specific (see `stages.py` for how a
stage plugs in).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from unclip_jax.parallel import batch_sharding, describe_mesh, global_batch, make_mesh
from unclip_jax.training.checkpoint import (
    checkpoint_manager,
    read_checkpoint_config,
    restore_checkpoint,
    restore_subtrees,
    save_checkpoint,
)
from unclip_jax.training.metrics import MetricsWriter
from unclip_jax.training.optim import make_optimizer
from unclip_jax.training.stages import HookContext, Stage, build_stage
from unclip_jax.training.state import (
    TrainState,
    abstract_state,
    create_state,
    state_partition_specs,
    state_shardings,
)
from unclip_jax.training.step import compile_train_step, make_train_step

log = logging.getLogger("unclip_jax.train")


class NonFiniteError(FloatingPointError):
    """A metric became NaN or infinite; the message names the step and the metric."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose params do not fit this config (another model size or layout)."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
    }


def check_checkpoint_fits(manager: Any, step: int, target: TrainState, what: str) -> None:
    """Raises CheckpointMismatchError naming the first param whose shape or presence differs."""
    saved = manager.item_metadata(step)["state"]
    saved_tree = saved.tree if hasattr(saved, "tree") else saved
    saved_shapes = _flat_shapes(saved_tree["params"])
    wanted = _flat_shapes(target.params)
    for name in sorted(set(saved_shapes) | set(wanted)):
        if saved_shapes.get(name) != wanted.get(name):
            raise CheckpointMismatchError(
                f"{what} at step {step} in {manager.directory} does not fit this config: param "
                f"{name!r} is {saved_shapes.get(name, 'absent')} there and "
                f"{wanted.get(name, 'absent')} here (a checkpoint from another config?)"
            )


def _git_revision() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """What a run logs at its start: mesh, devices, processes, package versions, git revision."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "mesh": describe_mesh(mesh),
        "devices": sorted({d.device_kind for d in jax.devices()}),
        "platform": jax.default_backend(),
        "process_count": jax.process_count(),
        "versions": versions,
        "git_revision": _git_revision(),
    }


@contextlib.contextmanager
def _preemption_flag() -> Iterator[dict[str, bool]]:
    """Sets flag['stop'] on SIGTERM (preemption) for the duration of the loop."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        del signum, frame
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler, no preemption saves
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stage: Stage | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Trains `config.stage` in `workdir` to `config.train.steps`, resuming if it can.

    `stop_after` ends this invocation (with a checkpoint) once the state reaches that step,
    without changing the run's schedule: a later invocation continues it exactly.

    A workdir that holds a checkpoint resumes from its latest one. Otherwise the run starts
    from scratch, or, with `train.init_from` set to another run's workdir, from that run's
    params and EMA params (a fresh optimizer and step 0). Returns the final state.
    """
    # ---- set-up -------------------------------------------------------------------------
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    train = config.train
    stage = stage if stage is not None else build_stage(config)
    config_dict = json.loads(json.dumps(config.to_dict(), default=list))
    if train.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size {train.batch_size} does not split over "
            f"{jax.process_count()} processes"
        )

    # ---- mesh ---------------------------------------------------------------------------
    mesh = make_mesh(config.mesh)

    # ---- optimizer and the state's layout over the mesh --------------------------------
    tx, lr_schedule = make_optimizer(config.optim, train.steps)
    specs = state_partition_specs(stage.init_params, tx, mesh)
    shardings = state_shardings(specs, mesh)
    target = abstract_state(stage.init_params, tx, shardings)

    # ---- data: this process's slice of every global batch -----------------------------
    data = stage.make_data(jax.process_index(), jax.process_count())

    # ---- restore, or start (optionally from another run's weights) ---------------------
    manager = checkpoint_manager(
        os.path.join(workdir, "checkpoints"),
        keep=train.get("keep_checkpoints", 3),
        keep_every=train.get("keep_every", 0),
    )
    latest = manager.latest_step()
    if latest is not None:
        check_checkpoint_fits(manager, latest, target, "the checkpoint")
        state, data_state, _ = restore_checkpoint(manager, target, latest)
        data.set_state(data_state)
        log.info("resumed from step %d in %s", latest, workdir)
    else:
        state = create_state(stage.init_params, tx, shardings, train.seed)
        if train.get("init_from"):
            state = _init_from(state, train.init_from, target)

    # ---- compile ------------------------------------------------------------------------
    step_fn = compile_train_step(
        make_train_step(
            stage.loss_fn,
            tx,
            ema_decay=config.optim.ema_decay,
            compute_dtype=train.get("compute_dtype", "float32"),
            lr_schedule=lr_schedule,
        ),
        shardings,
        batch_sharding(mesh),
    )

    # ---- log the start ------------------------------------------------------------------
    writer = MetricsWriter(workdir, enabled=is_main)
    start = int(jax.device_get(state.step))
    if is_main:
        info = run_info(mesh)
        log.info("config:\n%s", json.dumps(config_dict, indent=2, sort_keys=True))
        log.info("run: %s", json.dumps(info))
        with open(os.path.join(workdir, "run_info.json"), "w", encoding="utf-8") as f:
            json.dump({"start_step": start, **info, "config": config_dict}, f, indent=2)
        writer.write_text(start, "config", json.dumps(config_dict, indent=2, sort_keys=True))

    # ---- the loop -----------------------------------------------------------------------
    end = train.steps if stop_after is None else min(train.steps, stop_after)
    bar = tqdm(total=train.steps, initial=start, disable=not is_main, desc="train")
    window: list[dict[str, float]] = []
    pending: tuple[int, dict[str, jax.Array]] | None = None
    step = start
    tick, tick_step = time.perf_counter(), start

    def check(step_done: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteError(
                f"non-finite metric at step {step_done}: {names}; the update was not applied "
                f"and the run stopped (last checkpoint: {manager.latest_step()})"
            )
        return values

    try:
        with _preemption_flag() as preempted, jax.set_mesh(mesh):
            while step < end:
                batch = global_batch(next(data), mesh)
                state, metrics = step_fn(state, batch)
                step += 1
                # Check the previous step while this one runs (one step in flight).
                if pending is not None:
                    window.append(check(*pending))
                pending = (step, metrics)

                if step % train.log_every == 0 or step == end:
                    window.append(check(*pending))
                    pending = None
                    now = time.perf_counter()
                    means = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                    means["steps_per_sec"] = (step - tick_step) / max(now - tick, 1e-9)
                    writer.write_scalars(step, means)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
                    window, tick, tick_step = [], now, step
                bar.update(1)

                for hook in stage.hooks:
                    if step % hook.every == 0 or step == train.steps:
                        ctx = HookContext(step, state, mesh, workdir, writer)
                        scalars = hook.fn(ctx)
                        if scalars:
                            writer.write_scalars(
                                step, {f"{hook.name}/{k}": v for k, v in scalars.items()}
                            )

                stop = step % train.log_every == 0 and _any_process(preempted["stop"])
                if step % train.checkpoint_every == 0 or stop:
                    save_checkpoint(manager, state, data_state=data.get_state(), config=config_dict)
                if stop:
                    log.warning("SIGTERM: saved step %d and stopped", step)
                    break
            if pending is not None:
                check(*pending)

        # ---- the final save -------------------------------------------------------------
        if manager.latest_step() != step:
            save_checkpoint(
                manager, state, data_state=data.get_state(), config=config_dict, force=True
            )
    finally:
        manager.wait_until_finished()
        bar.close()
        writer.close()
    return state


def _init_from(state: TrainState, source: str, target: TrainState) -> TrainState:
    """`state` with params and EMA params taken from the latest checkpoint of another run."""
    directory = source
    if os.path.basename(source.rstrip("/")) != "checkpoints":
        directory = os.path.join(source, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"train.init_from: no checkpoints directory at {directory!r}")
    other = checkpoint_manager(directory, read_only=True)
    step = other.latest_step()
    if step is None:
        raise FileNotFoundError(f"train.init_from: no checkpoint in {directory!r}")
    check_checkpoint_fits(other, step, target, "train.init_from's checkpoint")
    restored, _ = restore_subtrees(
        directory, {"params": target.params, "ema_params": target.ema_params}, step
    )
    log.info("initialised params from %s step %d", directory, step)
    return state.replace(params=restored["params"], ema_params=restored["ema_params"])


def saved_config(workdir: str) -> dict[str, Any]:
    """The config saved with a workdir's latest checkpoint."""
    return read_checkpoint_config(
        checkpoint_manager(os.path.join(workdir, "checkpoints"), read_only=True)
    )
