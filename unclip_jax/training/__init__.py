"""Training any stage: the train state, AdamW, the jitted step, orbax checkpoints, the loop.

How a stage plugs in is described in `unclip_jax.training.stages`.
"""

from unclip_jax.training.checkpoint import (
    DataIterator,
    checkpoint_manager,
    restore_checkpoint,
    restore_subtrees,
    save_checkpoint,
)
from unclip_jax.training.export import export_params, flatten_params
from unclip_jax.training.loop import (
    CheckpointMismatchError,
    NonFiniteError,
    saved_config,
    train_and_evaluate,
)
from unclip_jax.training.metrics import MetricsWriter, read_metrics
from unclip_jax.training.optim import learning_rate_schedule, make_optimizer
from unclip_jax.training.stages import Hook, HookContext, Stage, build_stage, register_stage
from unclip_jax.training.state import (
    TrainState,
    abstract_state,
    create_state,
    state_partition_specs,
    state_shardings,
)
from unclip_jax.training.step import LossFn, compile_train_step, make_train_step

__all__ = [
    "CheckpointMismatchError",
    "DataIterator",
    "Hook",
    "HookContext",
    "LossFn",
    "MetricsWriter",
    "NonFiniteError",
    "Stage",
    "TrainState",
    "abstract_state",
    "build_stage",
    "checkpoint_manager",
    "compile_train_step",
    "create_state",
    "export_params",
    "flatten_params",
    "learning_rate_schedule",
    "make_optimizer",
    "make_train_step",
    "read_metrics",
    "register_stage",
    "restore_checkpoint",
    "restore_subtrees",
    "save_checkpoint",
    "saved_config",
    "state_partition_specs",
    "state_shardings",
    "train_and_evaluate",
]
