"""AOT memory plans: compile a stage's train step for a TPU topology on any machine.

`plan_train_step(config, devices)` lowers and compiles the same step `train_and_evaluate`
runs (same optimizer, state layout, batch sharding, frozen inputs and donation) for the
devices of a TPU topology description (`topology_devices("v5e:16x16")`, which needs `libtpu`
but no TPU), and reads XLA's per-chip memory and FLOP counts. `plan_with_fixes` also tries,
when the step does not fit the chip's HBM, the settings that lower memory (FSDP over every
chip, bfloat16 compute, rematerialisation, a smaller batch) and reports which ones fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unclip_jax.config import ConfigError, apply_overrides, load_config
from unclip_jax.models.clip import ClipConfig
from unclip_jax.parallel import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    batch_sharding,
    make_mesh,
)
from unclip_jax.training.loop import frozen_layout_shardings
from unclip_jax.training.optim import make_optimizer
from unclip_jax.training.stages import build_step_spec, needs_clip
from unclip_jax.training.state import abstract_state, state_partition_specs, state_shardings
from unclip_jax.training.step import compile_train_step, make_train_step

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: its topology prefix, HBM per chip and peak dense bf16 FLOP/s."""

    name: str
    hbm_bytes: int
    peak_flops: float


# Google Cloud's published per-chip figures (HBM, bf16 peak), keyed by JAX's device_kind.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12),
}
TOPOLOGY_FORM = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


class LibtpuMissingError(RuntimeError):
    """Planning for a TPU topology needs libtpu's compiler, which is not installed."""


def topology_devices(name: str) -> list[Any]:
    """The devices of TPU topology `name` ("v5e:16x16", "v5p:4x4x4", "v4:2x2x2", "v6e:8x8"),
    compiled for from this machine with libtpu (no TPU needed).

    Raises ConfigError for a name not of that form or one libtpu refuses, and
    LibtpuMissingError (saying how to install it) when libtpu is absent.
    """
    match = TOPOLOGY_FORM.match(name)
    if match is None:
        raise ConfigError(
            f"unknown TPU topology {name!r}: give GENERATION:AxB[xC] with GENERATION one of "
            "v4, v5e, v5p, v6e (e.g. v5e:16x16, v5p:4x4x4)"
        )
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise LibtpuMissingError(
            "planning for a TPU topology needs libtpu's compiler (no TPU needed): "
            "pip install -e '.[tpu]'"
        ) from err
    from jax.experimental import topologies

    dims = [int(d) for d in match.groups()[1:] if d is not None]
    bounds = (min(2, dims[0]), min(2, dims[1]), 1)  # 4 chips per host, as on the pod slices
    # Only compiling: no TPU is opened, so several processes (parallel plans, test workers)
    # may load libtpu at once; without this the second fails on /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=name,
            # v4's two TensorCores act as one device per chip (megacore), as JAX runs it on
            # a v4 slice; libtpu's "default" would plan for two half-chips.
            chip_config_name="megacore" if match.group(1) == "v4" else "default",
            chips_per_host_bounds=bounds,
            num_slices=1,
        )
    except Exception as err:  # libtpu raises XlaRuntimeError/ValueError for shapes it rejects
        raise ConfigError(f"libtpu does not know TPU topology {name!r}: {err}") from err
    return list(topology.devices)


def planned_clip_config(
    config: ml_collections.ConfigDict, config_spec: str, clip: str | None = None
) -> ClipConfig | None:
    """The frozen CLIP's sizes for planning a stage conditioned on one (None for others).

    `clip` is a CLIP directory (its config.json is read, no weights) or a CLIP stage config
    (`configs/clip.py:paper`). Without it: the config's `clip.dir`, when it is a directory,
    else the `clip.py` next to the stage's config file at the stage's variant (or the part of
    it before "_", so `prior.py:paper_ar` plans with `clip.py:paper`).
    """
    if not needs_clip(config):
        return None
    if clip is None and config.get("clip", {}).get("dir") and os.path.isdir(config.clip.dir):
        clip = config.clip.dir
    if clip is not None:
        if os.path.isdir(clip):
            path = os.path.join(clip, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    return ClipConfig.from_hf_dict(json.load(f))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"no config.json in CLIP directory {clip!r}") from err
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} is not JSON: {err}") from err
        clip_config = load_config(clip)
        if clip_config.get("stage") != "clip":
            raise ConfigError(f"--clip {clip!r} is not a CLIP directory or a clip stage config")
        return ClipConfig.from_model_config(clip_config.model.to_dict())
    sibling = os.path.join(os.path.dirname(config_spec.split(":")[0]), "clip.py")
    variant = config.get("variant", "")
    for candidate in (variant, variant.split("_")[0]):
        try:
            return planned_clip_config(config, config_spec, f"{sibling}:{candidate}")
        except (ConfigError, FileNotFoundError):
            continue
    raise ConfigError(
        f"the {config.stage} stage's train step runs a frozen CLIP: say which with --clip "
        "(configs/clip.py:VARIANT, or a CLIP directory)"
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-chip memory and compute of one compiled train step.

    The state's parts (params, EMA, optimizer state), the frozen inputs and the batch are the
    bytes each chip holds of them under the step's shardings, before the TPU's tiled layout
    pads small dimensions (which matters for tiny models only); `arguments`, `outputs`,
    `aliased` (outputs written over donated arguments), `temporaries` and `code` are XLA's
    memory analysis of the compiled step, and `peak` = arguments + outputs - aliased +
    temporaries + code, what must fit in `hbm`.
    """

    topology: str
    chip: str
    num_chips: int
    mesh: dict[str, int]
    batch_size: int
    compute_dtype: str
    settings: dict[str, Any]
    params: int
    ema_params: int
    opt_state: int
    frozen: int
    batch: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    hbm: int
    flops: float
    peak_flops: float
    num_params: int
    compile_seconds: float
    compiler_error: str = ""  # the compiler's refusal (out of HBM), when it refused

    @property
    def peak(self) -> int:
        """Bytes a chip needs at the step's peak."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        """Whether the step's peak fits the chip's HBM (and the compiler accepted it)."""
        return not self.compiler_error and self.peak <= self.hbm

    @property
    def seconds_at_peak(self) -> float:
        """The step's time if every chip ran its FLOPs at the chip's peak rate (a lower bound)."""
        return self.flops / self.peak_flops

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values, with the derived peak, fits and time."""
        out = dataclasses.asdict(self)
        out.update(peak=self.peak, fits=self.fits, seconds_at_peak=self.seconds_at_peak)
        return out


def _bytes_per_chip(tree: Any) -> int:
    """Bytes of the largest shard of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _refused_temporaries(message: str) -> int:
    """The temporaries' bytes in the TPU compiler's out-of-HBM message (0 if not found)."""
    match = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    if not match:
        return 0
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def plan_train_step(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    *,
    topology: str = "",
    clip_config: ClipConfig | None = None,
    hbm_bytes: int | None = None,
    settings: dict[str, Any] | None = None,
) -> Plan:
    """Compiles `config`'s train step for `devices` (a TPU topology's) and reads its memory.

    The mesh is the config's (`mesh.*`, laid out on the physical topology); `hbm_bytes`
    replaces the chip's HBM (e.g. to plan for part of it); `settings` is only recorded (the
    overrides that made `config`, for the report). Raises ConfigError when the batch does not
    split over the mesh's batch axes.
    """
    devices = list(devices)
    chip = CHIPS.get(devices[0].device_kind)
    if chip is None:
        raise ConfigError(
            f"no HBM figure for device kind {devices[0].device_kind!r}; known: {', '.join(CHIPS)}"
        )
    spec = build_step_spec(config, clip_config)
    mesh = make_mesh(config.mesh, devices, physical_layout=devices[0].platform == "tpu")
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = config.train.batch_size
    if batch_size % batch_ways:
        raise ConfigError(
            f"config key 'train.batch_size' is {batch_size}: it must split over the mesh's "
            f"batch axes, data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}"
        )
    tx, lr_schedule = make_optimizer(config.optim, config.train.steps)
    shardings = state_shardings(state_partition_specs(spec.init_params, tx, mesh), mesh)
    state = abstract_state(spec.init_params, tx, shardings)
    rows = batch_sharding(mesh)
    batch = jax.tree.map(
        lambda r: jax.ShapeDtypeStruct((batch_size, *r.shape), r.dtype, sharding=rows),
        spec.batch_row,
    )
    frozen_sharding = frozen_layout_shardings(spec.frozen, spec.frozen_layout, mesh)
    frozen = ()
    if spec.frozen is not None:
        if not isinstance(frozen_sharding, jax.sharding.Sharding):
            leaf_shardings = frozen_sharding
        else:
            leaf_shardings = jax.tree.map(lambda _: frozen_sharding, spec.frozen)
        frozen = (
            jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                spec.frozen,
                leaf_shardings,
            ),
        )
    step = compile_train_step(
        make_train_step(
            spec.loss_fn,
            tx,
            ema_decay=config.optim.ema_decay,
            compute_dtype=config.train.get("compute_dtype", "float32"),
            lr_schedule=lr_schedule,
        ),
        shardings,
        rows,
        frozen_sharding,
    )
    start = time.perf_counter()
    # A TPU executable in the persistent compilation cache could not be read back on this
    # machine (jax decides once per process whether the cache is on, so turning it off here
    # would not do; a minimum compile time nothing reaches keeps the plan out of it).
    min_time_was = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            compiled = step.lower(state, batch, *frozen).compile()
        memory, error = compiled.memory_analysis(), ""
    except jax.errors.JaxRuntimeError as err:
        # The TPU compiler refuses a program whose temporaries exceed HBM; its message says
        # by how much ("... HLO temporaries (43.48G) exceeds available HBM ...").
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        compiled, memory, error = None, None, str(err).splitlines()[0]
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time_was)
    seconds = time.perf_counter() - start
    held = {
        "params": _bytes_per_chip(state.params),
        "ema_params": _bytes_per_chip(state.ema_params),
        "opt_state": _bytes_per_chip(state.opt_state),
        "frozen": _bytes_per_chip(frozen),
        "batch": _bytes_per_chip(batch),
    }
    if memory is not None:
        compiler = dict(
            arguments=int(memory.argument_size_in_bytes),
            outputs=int(memory.output_size_in_bytes),
            aliased=int(memory.alias_size_in_bytes),
            temporaries=int(memory.temp_size_in_bytes),
            code=int(memory.generated_code_size_in_bytes),
        )
    else:
        # What the compiler did not report: the arguments are what the shardings hold, the
        # new state is written over the donated one, the temporaries its message's figure.
        state_bytes = _bytes_per_chip(state)
        compiler = dict(
            arguments=state_bytes + held["frozen"] + held["batch"],
            outputs=state_bytes,
            aliased=state_bytes,
            temporaries=_refused_temporaries(error),
            code=0,
        )
    return Plan(
        topology=topology,
        chip=chip.name,
        num_chips=len(devices),
        mesh={axis: int(mesh.shape[axis]) for axis in MESH_AXES},
        batch_size=batch_size,
        compute_dtype=config.train.get("compute_dtype", "float32"),
        settings=dict(settings or {}),
        **held,
        **compiler,
        hbm=int(hbm_bytes if hbm_bytes is not None else chip.hbm_bytes),
        flops=float(_cost(compiled).get("flops", "nan")) if compiled else float("nan"),
        peak_flops=chip.peak_flops,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        compile_seconds=seconds,
    )


def candidate_fixes(config: ml_collections.ConfigDict, num_chips: int) -> Iterator[dict]:
    """Override dicts that lower a step's memory, cheapest change to the recipe first.

    Each adds to the one before: FSDP over every chip (params and optimizer state split
    num_chips ways), bfloat16 compute, rematerialisation of the model's blocks
    (`train.remat`), then the global batch halved until one row per chip (a smaller batch
    changes the recipe: more steps or another lr may be needed).
    """
    fix: dict[str, Any] = {}
    mesh = config.mesh
    if not (mesh.data == 1 and mesh.tensor == 1 and mesh.fsdp in (-1, num_chips)):
        fix = {**fix, "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
        yield fix
    if config.train.get("compute_dtype", "float32") != "bfloat16":
        fix = {**fix, "train.compute_dtype": "bfloat16"}
        yield fix
    if not config.train.get("remat", False):
        fix = {**fix, "train.remat": True}
        yield fix
    batch = config.train.batch_size
    while batch // 2 >= num_chips and (batch // 2) % num_chips == 0:
        batch //= 2
        yield {**fix, "train.batch_size": batch}


def plan_with_fixes(
    config: ml_collections.ConfigDict,
    devices: Sequence[Any],
    *,
    topology: str = "",
    clip_config: ClipConfig | None = None,
    hbm_bytes: int | None = None,
    max_tries: int = 6,
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[Plan, list[Plan]]:
    """The config's plan and, if it does not fit, the plans of `candidate_fixes` in order until
    one fits (at most `max_tries` more compiles): (plan, tried), tried[-1] the one that fits
    when any does. `progress` gets a line before and after each compile (they take minutes
    for the paper's models)."""
    kwargs = dict(topology=topology, clip_config=clip_config, hbm_bytes=hbm_bytes)
    progress("compiling the config as it is ...")
    plan = plan_train_step(config, devices, **kwargs)
    progress(_verdict(plan))
    tried: list[Plan] = []
    if plan.fits:
        return plan, tried
    for fix in candidate_fixes(config, len(devices)):
        if len(tried) >= max_tries:
            break
        progress(f"compiling with {_flags(fix)} ...")
        tried.append(plan_train_step(apply_overrides(config, fix), devices, settings=fix, **kwargs))
        progress(_verdict(tried[-1]))
        if tried[-1].fits:
            break
    return plan, tried


def _verdict(plan: Plan) -> str:
    peak = f"{'>= ' if plan.compiler_error else ''}{_size(plan.peak)}"
    fits = "fits" if plan.fits else "does not fit"
    return f"  peak {peak} of {_size(plan.hbm)}: {fits} ({plan.compile_seconds:.0f} s)"


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps them at least 1 (GiB at most)."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _flags(settings: dict[str, Any]) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in settings.items())


def format_plan(plan: Plan, tried: Sequence[Plan] = ()) -> str:
    """The plan as the report `unclip-jax plan` prints, then what was tried if it does not fit."""
    mesh = " x ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    per_chip = plan.batch_size // max(1, plan.mesh["data"] * plan.mesh["fsdp"])
    refused = bool(plan.compiler_error)
    lines = [
        f"topology {plan.topology or '?'}: {plan.num_chips} x TPU {plan.chip} "
        f"({_size(plan.hbm)} HBM each); mesh {mesh}",
        f"train step: {plan.num_params / 1e6:,.1f}M params, batch {plan.batch_size} "
        f"({per_chip} per chip), compute {plan.compute_dtype}"
        + (", remat" if plan.settings.get("train.remat") else "")
        + f"; compiled in {plan.compile_seconds:.0f} s",
        "per chip:",
        f"  params            {_size(plan.params)}",
        f"  EMA params        {_size(plan.ema_params)}",
        f"  optimizer state   {_size(plan.opt_state)}",
        f"  frozen inputs     {_size(plan.frozen)}",
        f"  batch             {_size(plan.batch)}",
        f"  temporaries       {'>= ' if refused else ''}{_size(plan.temporaries)}",
        f"  code              {_size(plan.code)}",
    ]
    if refused:
        lines.append(f"  peak              >= {_size(plan.peak)}: DOES NOT FIT {_size(plan.hbm)}")
        lines.append(f"  (the compiler refused: {plan.compiler_error})")
    else:
        verdict = "fits" if plan.fits else f"DOES NOT FIT (over by {_size(plan.peak - plan.hbm)})"
        lines.append(f"  peak              {_size(plan.peak)} of {_size(plan.hbm)}: {verdict}")
        lines.append(
            f"FLOPs per step: {plan.flops / 1e12:,.2f} TFLOP per chip, "
            f"{plan.flops * plan.num_chips / 1e15:,.3f} PFLOP in all; at the chip's bf16 peak "
            f"{plan.seconds_at_peak:.3f} s per step (a lower bound)"
        )
    if not plan.fits:
        if not tried:
            lines.append("nothing else was tried (--no-fixes, or no setting left to change)")
        for t in tried:
            peak = f"{'>= ' if t.compiler_error else ''}{_size(t.peak)}"
            lines.append(
                f"  with {_flags(t.settings)}: peak {peak}, "
                + ("fits" if t.fits else "does not fit")
            )
        if tried and tried[-1].fits:
            lines.append(f"fits with: {_flags(tried[-1].settings)}")
        elif tried:
            lines.append("none of these fits: use a larger topology or a chip with more HBM")
    return "\n".join(lines)
