"""Orbax checkpoints: the train state, each process's data-iterator state and the config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Saves are asynchronous (training
goes on while the arrays are written); every process joins each save. Restores go onto an
abstract state whose leaves carry the target shardings, which also reshards onto a mesh of
another shape.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from unclip_jax.training.state import TrainState


class DataIterator(Protocol):
    """A host-local batch iterator whose position can be saved and restored as JSON."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


class ProcessLocalJsonHandler(ocp.CheckpointHandler):
    """Writes each process's data-iterator state to `process_<i>-of-<n>.json` (like grain's)."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: ProcessLocalJsonSave) -> None:  # type: ignore[override]
        """Writes this process's iterator state."""
        directory.mkdir(parents=True, exist_ok=True)
        self._path(directory).write_text(json.dumps(args.state, sort_keys=True))

    def restore(self, directory: epath.Path, args: ProcessLocalJsonRestore | None = None) -> Any:  # type: ignore[override]
        """Reads this process's iterator state."""
        path = self._path(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint was written by a run with another "
                "number of processes"
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        """No metadata beyond the files themselves."""
        return None


@ocp.args.register_with_handler(ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessLocalJsonSave(ocp.args.CheckpointArgs):
    """Save args: this process's JSON-able state."""

    state: Any


@ocp.args.register_with_handler(ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessLocalJsonRestore(ocp.args.CheckpointArgs):
    """Restore args (none needed)."""


ITEMS = ("state", "data", "config")


def checkpoint_manager(
    directory: str | epath.Path,
    *,
    keep: int = 3,
    keep_every: int = 0,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` checkpoints plus every `keep_every`-th step (0: none)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        keep_period=keep_every if keep_every > 0 else None,
        enable_async_checkpointing=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        epath.Path(directory),
        options=options,
        item_names=ITEMS,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ProcessLocalJsonHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    *,
    data_state: Mapping[str, Any],
    config: Mapping[str, Any],
    force: bool = False,
) -> bool:
    """Starts an async save of the state at its step; returns whether a save was started."""
    step = int(jax.device_get(state.step))
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ProcessLocalJsonSave(dict(data_state)),
            config=ocp.args.JsonSave(dict(config)),
        ),
        force=force,
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, target: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """(state, this process's data state, config dict) of `step` (default: the latest).

    `target` is the abstract state (ShapeDtypeStructs with shardings) to restore onto.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ProcessLocalJsonRestore(),
            config=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.data, restored.config


def read_checkpoint_config(
    manager: ocp.CheckpointManager, step: int | None = None
) -> dict[str, Any]:
    """The config JSON saved with a checkpoint (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore_subtrees(
    directory: str | epath.Path, targets: Mapping[str, Any], step: int | None = None
) -> tuple[dict[str, Any], int]:
    """Restores only the named parts of a saved state (e.g. params, ema_params) and the step.

    `targets` maps state field names to abstract trees; leaves with a sharding come back as
    sharded jax.Arrays, leaves without one as host numpy arrays. Used to initialise from
    another run (whose optimizer may differ) and to export weights.
    """
    manager = ocp.CheckpointManager(
        epath.Path(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=("state",),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint at step {step} in {directory}; steps: {sorted(manager.all_steps())}"
        )
    targets = dict(targets)
    with manager:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=targets,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
                    partial_restore=True,
                )
            ),
        )
    return dict(restored.state), step


def saved_state_metadata(
    manager: ocp.CheckpointManager, step: int | None = None
) -> tuple[Any, int]:
    """(tree of ShapeDtypeStructs of the saved state, step), without reading any array."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint at step {step} in {manager.directory}; "
            f"steps: {sorted(manager.all_steps())}"
        )
    saved = manager.item_metadata(step)["state"]
    tree = saved.tree if hasattr(saved, "tree") else saved
    shapes = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
        tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )
    return shapes, step


def first_shape_mismatch(have: Any, want: Any) -> tuple[str, Any, Any] | None:
    """(param path, its shape in `have`, in `want`) of the first param (in path order) absent
    from one tree or shaped differently ('absent' for a missing one); None when they fit."""
    a = {k: tuple(np.shape(v)) for k, v in param_paths(have).items()}
    b = {k: tuple(np.shape(v)) for k, v in param_paths(want).items()}
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return name, a.get(name, "absent"), b.get(name, "absent")
    return None


def param_paths(tree: Any) -> dict[str, Any]:
    """{'a/b/kernel': leaf}: the leaves of a params tree by their paths joined with '/'."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
