"""How a stage plugs into training: one `Stage` built from its config, in one registry.

A stage (prior, decoder, upsampler, CLIP, ...) supplies:
- `init_params(rng)`: the model's params, with logical axis names on every param
  (`nn.with_logical_partitioning`), called under `jax.eval_shape` and `jax.jit`;
- `loss_fn(params, batch, rng, frozen) -> (loss, metrics)`: on the GLOBAL batch, params in
  the compute dtype; metrics are scalars (or 1-D arrays, logged per element);
- optional `frozen`: a pytree of arrays the loss reads but never trains (e.g. the conditioning
  CLIP's params, cast by the stage to the compute dtype), passed to `loss_fn` as `frozen`;
  replicated on every device, or laid out by `frozen_layout`: the same tree with
  `nn.LogicallyPartitioned` leaves where an array shards by its logical axis names like a
  param (a frozen CLIP of a billion params need not sit whole on every chip);
- `make_data(process_index, process_count)`: this process's iterator of host-local batches
  (numpy pytrees of batch_size / process_count rows) with get_state/set_state;
- optional `hooks`: periodic evaluation or sample grids, run on every process.

Register a builder `(config, workdir=None) -> Stage` under the config's `stage` name (workdir
is where the stage keeps files that must not change across resumes, e.g. a tokenizer):

    @register_stage("decoder")
    def build_decoder(config, workdir=None):
        model = Decoder(**config.model)
        return Stage(init_params=..., loss_fn=..., make_data=...)

and `unclip-jax train --config configs/decoder.py:tiny --workdir DIR` trains it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from unclip_jax.config import ConfigError
from unclip_jax.training.checkpoint import DataIterator
from unclip_jax.training.metrics import MetricsWriter
from unclip_jax.training.state import InitParams, TrainState
from unclip_jax.training.step import LossFn


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook sees: the step just completed, the state, the mesh, where to write."""

    step: int
    state: TrainState
    mesh: jax.sharding.Mesh
    workdir: str
    writer: MetricsWriter


@dataclasses.dataclass(frozen=True)
class Hook:
    """Runs `fn(ctx)` every `every` steps (and at the last step); it may return scalars to log."""

    name: str
    every: int
    fn: Callable[[HookContext], dict[str, float] | None]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A stage's train step with nothing read from disk: what `unclip-jax plan` compiles.

    The stage's builder makes its `init_params` and `loss_fn` the same way (one function in
    the stage's module serves both). `batch_row` holds the ShapeDtypeStructs of one example
    as the stage's data pipeline gives it (a global batch adds the leading batch axis);
    `frozen` those of the frozen inputs (None: the stage has none).
    """

    init_params: InitParams
    loss_fn: LossFn
    batch_row: Any
    frozen: Any = None
    frozen_layout: Any = None  # as Stage.frozen_layout


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything stage-specific that the generic loop needs."""

    init_params: InitParams
    loss_fn: LossFn
    make_data: Callable[[int, int], DataIterator]
    hooks: Sequence[Hook] = ()
    frozen: Any = None
    # `frozen`'s tree with nn.LogicallyPartitioned leaves for the arrays that shard by their
    # logical names (the rest replicated); None: every frozen array replicated.
    frozen_layout: Any = None


# builder(config, workdir=...) -> Stage; workdir (None outside a run) is where a stage keeps
# files that must stay fixed across resumes (e.g. a tokenizer trained at the first start).
StageBuilder = Callable[..., Stage]
_REGISTRY: dict[str, StageBuilder] = {}
# spec_builder(config, clip_config) -> StepSpec; clip_config is the frozen CLIP's ClipConfig
# for the stages conditioned on one (None for the others).
StepSpecBuilder = Callable[..., StepSpec]
_SPEC_REGISTRY: dict[str, StepSpecBuilder] = {}
# The stages whose train step runs a frozen CLIP (their StepSpec needs its ClipConfig).
CLIP_CONDITIONED: set[str] = set()
# Modules that register the project's stages when imported (added as stages land).
STAGE_MODULES: tuple[str, ...] = (
    "unclip_jax.training.clip_stage",
    "unclip_jax.training.decoder_stage",
    "unclip_jax.training.prior_stage",
    "unclip_jax.training.upsampler_stage",
)


def stage_pipeline(
    config: ml_collections.ConfigDict,
    source: Any,
    transform: Any,
    process_index: int,
    process_count: int,
) -> DataIterator:
    """A stage's `make_data`: this process's batches of `source` through `transform`, with the
    config's global batch size, seed and `data.workers`, and with `data.cache` each example
    kept in memory after its first read (use with functools.partial)."""
    from unclip_jax.data.pipeline import MemoizedSource, make_pipeline

    return make_pipeline(
        MemoizedSource(source) if config.data.get("cache", False) else source,
        global_batch_size=config.train.batch_size,
        seed=config.train.seed,
        transform=transform,
        process_index=process_index,
        process_count=process_count,
        worker_count=config.data.get("workers", 0),
    )


def register_stage(name: str) -> Callable[[StageBuilder], StageBuilder]:
    """Decorator: registers `builder(config) -> Stage` as the stage called `name`."""

    def register(builder: StageBuilder) -> StageBuilder:
        _REGISTRY[name] = builder
        return builder

    return register


def register_step_spec(
    name: str, *, clip_conditioned: bool = False
) -> Callable[[StepSpecBuilder], StepSpecBuilder]:
    """Decorator: registers `spec_builder(config, clip_config) -> StepSpec` for stage `name`
    (`clip_conditioned`: its step runs a frozen CLIP, whose ClipConfig it needs)."""

    def register(builder: StepSpecBuilder) -> StepSpecBuilder:
        _SPEC_REGISTRY[name] = builder
        if clip_conditioned:
            CLIP_CONDITIONED.add(name)
        return builder

    return register


def needs_clip(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.stage`'s train step runs a frozen CLIP (the decoder's, the prior's)."""
    registered_stages()
    return config.get("stage") in CLIP_CONDITIONED


def build_step_spec(config: ml_collections.ConfigDict, clip_config: Any = None) -> StepSpec:
    """The StepSpec of `config.stage` (a ConfigError names the stages that have one, or says
    that this stage needs the frozen CLIP's `clip_config`)."""
    registered_stages()
    name = config.get("stage")
    if name not in _SPEC_REGISTRY:
        raise ConfigError(
            f"stage {name!r} has no train step to plan; stages: {', '.join(sorted(_SPEC_REGISTRY))}"
        )
    if name in CLIP_CONDITIONED and clip_config is None:
        raise ConfigError(f"the {name} stage's train step runs a frozen CLIP: give its config")
    return _SPEC_REGISTRY[name](config, clip_config)


def registered_stages() -> list[str]:
    """The names of every registered stage."""
    for module in STAGE_MODULES:
        importlib.import_module(module)
    return sorted(_REGISTRY)


def build_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> Stage:
    """The Stage for `config.stage`, or a ConfigError listing the registered ones."""
    names = registered_stages()
    name = config.get("stage")
    if name not in _REGISTRY:
        raise ConfigError(
            f"no trainable stage {name!r} is registered; registered stages: "
            f"{', '.join(names) or '(none yet)'}"
        )
    return _REGISTRY[name](config, workdir=workdir)
