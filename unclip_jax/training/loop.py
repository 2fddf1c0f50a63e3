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

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from unclip_jax.config import ABSENT_MEANS, flatten_config
from unclip_jax.parallel import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    describe_mesh,
    global_batch,
    logical_shardings,
    make_mesh,
    place,
    replicated_sharding,
)
from unclip_jax.training.checkpoint import (
    checkpoint_manager,
    first_shape_mismatch,
    read_checkpoint_config,
    restore_checkpoint,
    restore_subtrees,
    save_checkpoint,
    saved_state_metadata,
)
from unclip_jax.training.files import workdir_path
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
from unclip_jax.training.step import GUARDED_METRICS, compile_train_step, make_train_step

log = logging.getLogger("unclip_jax.train")


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite; the message names the step and metric."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit this run (another model, layout or process count)."""


# Config keys that must match for a checkpoint to be resumed (another value means another
# model), and keys whose change is allowed on resume but breaks bitwise continuation.
MUST_MATCH = ("stage", "model", "diffusion", "kind", "embedding")
SHOULD_MATCH = ("train.batch_size", "train.seed", "train.steps", "optim", "clip")


def compare_configs(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys that must match but differ, keys that should match but differ), as 'k: a -> b'.

    A key one config lacks counts as its `ABSENT_MEANS` value, if it has one."""
    a, b = flatten_config(saved), flatten_config(current)
    must, should = [], []
    missing = object()
    for key in sorted(set(a) | set(b)):
        default = ABSENT_MEANS.get(key, missing)
        if a.get(key, default) == b.get(key, default):
            continue
        line = f"{key}: {a.get(key, 'absent')!r} -> {b.get(key, 'absent')!r}"
        if any(key == p or key.startswith(p + ".") for p in MUST_MATCH):
            must.append(line)
        elif any(key == p or key.startswith(p + ".") for p in SHOULD_MATCH):
            should.append(line)
    return must, should


def check_checkpoint_fits(manager: Any, step: int, target: TrainState, what: str) -> None:
    """Raises CheckpointMismatchError naming the first param whose shape or presence differs."""
    saved, _ = saved_state_metadata(manager, step)
    mismatch = first_shape_mismatch(saved["params"], target.params)
    if mismatch:
        name, there, here = mismatch
        raise CheckpointMismatchError(
            f"{what} at step {step} in {manager.directory} does not fit this config: param "
            f"{name!r} is {there} there and {here} here (a checkpoint from another config?)"
        )


def _resume(manager: Any, step: int, target: TrainState, config_dict: dict[str, Any]) -> tuple:
    """(state, data state) of `step`, after checking that it fits this run."""
    must, should = compare_configs(read_checkpoint_config(manager, step), config_dict)
    if must:
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {manager.directory} was written with another "
            f"config: {'; '.join(must)}"
        )
    if should:
        log.warning(
            "resuming with changed settings (not a bitwise continuation): %s", "; ".join(should)
        )
    check_checkpoint_fits(manager, step, target, "the checkpoint")
    try:
        state, data_state, _ = restore_checkpoint(manager, target, step)
    except FileNotFoundError as err:
        raise CheckpointMismatchError(f"cannot resume the data position: {err}") from err
    except ValueError as err:  # orbax: the saved tree differs (e.g. another optimizer chain)
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {manager.directory} has another state structure "
            f"(another optimizer set-up?): {err}"
        ) from err
    return state, data_state


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
    """Sets flag['stop'] on SIGTERM (preemption) while the loop and its final save run."""
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


def _nanmean(values: list[float]) -> float:
    """The mean of the finite values, NaN (without numpy's warning) when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Device metrics as floats; a 1-D metric `m` becomes `m/0`, `m/1`, ..."""
    values: dict[str, float] = {}
    for name, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        if value.ndim == 0:
            values[name] = float(value)
        else:
            values.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return values


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stage: Stage | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Trains `config.stage` in `workdir` to `config.train.steps`, resuming if it can.

    A workdir that holds a checkpoint resumes from its latest one. Otherwise the run starts
    from scratch, or, with `train.init_from` set to another run's workdir, from that run's
    params and EMA params (a fresh optimizer and step 0). `stop_after` ends this invocation
    (with a checkpoint) once the state reaches that step, without changing the run's
    schedule: a later invocation continues it exactly. Returns the final state.
    """
    # ---- set-up -------------------------------------------------------------------------
    workdir = workdir_path(workdir)
    is_main = jax.process_index() == 0
    train = config.train
    stage = stage if stage is not None else build_stage(config, workdir)
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

    # ---- data: this process's share of every global batch ------------------------------
    data = stage.make_data(jax.process_index(), jax.process_count())

    # ---- restore, or start (optionally from another run's weights) ---------------------
    manager = checkpoint_manager(
        os.path.join(workdir, "checkpoints"),
        keep=train.get("keep_checkpoints", 3),
        keep_every=train.get("keep_every", 0),
    )
    writer, bar = None, None
    try:
        latest = manager.latest_step()
        if latest is not None:
            state, data_state = _resume(manager, latest, target, config_dict)
            data.set_state(data_state)
            log.info("resumed from step %d in %s", latest, workdir)
        else:
            state = create_state(stage.init_params, tx, shardings, train.seed)
            if train.get("init_from"):
                state = _init_from(state, train.init_from, target)

        # ---- compile ----------------------------------------------------------------------
        frozen_shardings = frozen_layout_shardings(stage.frozen, stage.frozen_layout, mesh)
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
            frozen_shardings,
        )
        # Frozen inputs go to the devices once, as the stage gave them (a stage casts what it
        # wants in the compute dtype, e.g. a CLIP, and keeps what needs float32).
        frozen = () if stage.frozen is None else (place(stage.frozen, frozen_shardings),)

        # ---- log the start ----------------------------------------------------------------
        start = int(jax.device_get(state.step))
        writer = MetricsWriter(workdir, enabled=is_main, start_step=start)
        if is_main:
            info = run_info(mesh)
            log.info("config:\n%s", json.dumps(config_dict, indent=2, sort_keys=True))
            log.info("run: %s", json.dumps(info))
            record = {"start_step": start, **info, "config": config_dict}
            epath.Path(workdir, "run_info.json").write_text(json.dumps(record, indent=2))
            writer.write_text(start, "config", json.dumps(config_dict, indent=2, sort_keys=True))

        # ---- the loop ---------------------------------------------------------------------
        end = train.steps if stop_after is None else min(train.steps, stop_after)
        preempt_every = 1 if jax.process_count() == 1 else train.get("preemption_check_every", 10)
        bar = tqdm(total=train.steps, initial=start, disable=not is_main, desc="train")
        window: list[dict[str, float]] = []
        pending: tuple[int, dict[str, jax.Array]] | None = None
        step = start
        tick, tick_step = time.perf_counter(), start

        def check(step_done: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
            values = _host_metrics(metrics)
            bad = {k: values[k] for k in GUARDED_METRICS if not math.isfinite(values[k])}
            if bad:
                names = ", ".join(f"{k}={v}" for k, v in bad.items())
                raise NonFiniteError(
                    f"non-finite metric at step {step_done}: {names}; the update was not "
                    f"applied and the run stopped (last checkpoint: {manager.latest_step()})"
                )
            return values

        with (
            _preemption_flag() as preempted,
            jax.set_mesh(mesh),
            nn.logical_axis_rules(LOGICAL_AXIS_RULES),  # for the models' activation constraints
        ):
            while step < end:
                batch = global_batch(next(data), mesh)
                state, metrics = step_fn(state, batch, *frozen)
                step += 1
                # Check the previous step while this one runs (one step in flight) ...
                if pending is not None:
                    window.append(check(*pending))
                pending = (step, metrics)
                hooks_due = [h for h in stage.hooks if step % h.every == 0 or step == end]
                log_due = step % train.log_every == 0 or step == end
                # ... but this step's own before anything logs or reads its state.
                if hooks_due or log_due:
                    window.append(check(*pending))
                    pending = None

                if log_due:
                    now = time.perf_counter()
                    means = {k: _nanmean([w.get(k, np.nan) for w in window]) for k in window[-1]}
                    means["steps_per_sec"] = (step - tick_step) / max(now - tick, 1e-9)
                    writer.write_scalars(step, means)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
                    window, tick, tick_step = [], now, step
                bar.update(1)

                for hook in hooks_due:
                    # The state is donated to the next step: hooks use it during the call only.
                    scalars = hook.fn(HookContext(step, state, mesh, workdir, writer))
                    if scalars:
                        writer.write_scalars(
                            step, {f"{hook.name}/{k}": v for k, v in scalars.items()}
                        )

                save_due = step % train.checkpoint_every == 0
                stop = step % preempt_every == 0 and _any_process(preempted["stop"])
                if (save_due or stop) and pending is not None:
                    window.append(check(*pending))  # never save a step that is not checked
                    pending = None
                if save_due or stop:
                    save_checkpoint(manager, state, data_state=data.get_state(), config=config_dict)
                if stop:
                    log.warning("SIGTERM: saved step %d and stopped", step)
                    break
            if pending is not None:
                check(*pending)

            # ---- the final save -----------------------------------------------------------
            if manager.latest_step() != step:
                save_checkpoint(
                    manager, state, data_state=data.get_state(), config=config_dict, force=True
                )
            manager.wait_until_finished()
    finally:
        manager.wait_until_finished()
        manager.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return state


def frozen_layout_shardings(frozen: Any, layout: Any, mesh: jax.sharding.Mesh) -> Any:
    """The shardings of a stage's frozen inputs: by the logical names of `layout`'s boxed
    leaves, the rest replicated; all replicated without a layout; None without frozen inputs."""
    if frozen is None:
        return None
    if layout is None:
        return replicated_sharding(mesh)
    return logical_shardings(layout, mesh)


def _init_from(state: TrainState, source: str, target: TrainState) -> TrainState:
    """`state` with params and EMA params taken from the latest checkpoint of another run."""
    directory = source
    if os.path.basename(source.rstrip("/")) != "checkpoints":
        directory = os.path.join(source, "checkpoints")
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"train.init_from: no checkpoints directory at {directory!r}")
    with checkpoint_manager(directory, read_only=True) as other:
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
