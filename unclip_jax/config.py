"""Stage configs: load `configs/<stage>.py:<variant>`, apply dotted overrides, expand sweeps.

A config file is an ml_collections file (it also works with `ml_collections.config_flags`):
it defines `get_config(arg)` returning a ConfigDict for a named variant, and `sweep()`
yielding dicts of dotted overrides. Everything a user can mistype gets one `ConfigError`
that names the mistyped thing and lists what would have been valid.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Every stage config has these fields; the training loop and launch tools rely on them.
SHARED_TRAIN_FIELDS = ("steps", "batch_size", "seed", "checkpoint_every", "log_every")


class ConfigError(ValueError):
    """A config file, variant, key or value that cannot be used, named in the message."""


def unknown_variant(arg: str, variants: Iterable[str], *, stage: str) -> ConfigError:
    """The error a config file's `get_config` raises for a variant it does not define."""
    valid = ", ".join(sorted(variants))
    return ConfigError(f"unknown {stage} config variant {arg!r}; valid variants: {valid}")


def _import_config_module(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    spec = importlib.util.spec_from_file_location(f"_unclip_config_{digest}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    return module


def _split_spec(spec: str) -> tuple[str, str | None]:
    """'configs/decoder.py:tiny' -> ('configs/decoder.py', 'tiny'); no ':' -> default variant."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_config_file(spec: str) -> ConfigDict:
    """Loads `path[:variant]` and returns the variant's config, locked against new keys."""
    path, arg = _split_spec(spec)
    module = _import_config_module(path)
    config = module.get_config() if arg is None else module.get_config(arg)
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    config.lock()
    validate_config(config)
    return config


def _valid_keys_message(node: ConfigDict, prefix: str) -> str:
    keys = sorted(node.keys())
    where = f" under {prefix!r}" if prefix else ""
    return f"valid keys{where}: {', '.join(keys)}"


def _resolve(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    """The ConfigDict that holds dotted `key`, and the leaf name; ConfigError if unknown."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"unknown config key {key!r}: {prefix!r} is a value, not a group")
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {'.'.join([*parts[:depth], close[0]])!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {key!r}{hint}; {_valid_keys_message(node, prefix)}"
            )
        if depth == len(parts) - 1:
            return node, part
        node = node[part]
    raise AssertionError("unreachable")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, current: Any, value: Any) -> Any:
    """`value` converted to the type of the field's current value, or ConfigError."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key {key!r} expects {expected}, got {value!r}")

    if isinstance(current, ConfigDict):
        raise ConfigError(
            f"config key {key!r} is a group; override its fields instead "
            f"({_valid_keys_message(current, key)})"
        )
    if current is None:
        # An optional field: strings are parsed as Python literals where they are one.
        if isinstance(value, str):
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad("a bool (true/false)")
    if isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        raise bad("an int")
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a float")
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        raise bad("a string")
    if isinstance(current, (tuple, list)):
        parsed = value
        if isinstance(value, str):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise bad("a tuple such as (1, 2, 3)") from None
            if not isinstance(parsed, (tuple, list)):
                parsed = (parsed,)
        if not isinstance(parsed, (tuple, list)):
            raise bad("a tuple")
        kinds = {type(v) for v in current}
        if len(kinds) == 1:  # a homogeneous tuple (channel_mult=(1, 2, 4)) stays homogeneous
            kind = kinds.pop()
            numeric = kind is float and all(isinstance(v, (int, float)) for v in parsed)
            if not numeric and not all(type(v) is kind for v in parsed):
                raise bad(f"a tuple of {kind.__name__}")
            parsed = [kind(v) for v in parsed]
        return type(current)(parsed)
    return value


# Keys newer than the configs some checkpoints were written with, and what their absence
# means (the builders, the loss and validate_config read their defaults here): a run saved before the key
# existed resumes under a config that sets it to that value.
ABSENT_MEANS: dict[str, Any] = {
    "diffusion.timestep_power": 1.0,
    "diffusion.timestep_uniform_share": 0.0,
    "diffusion.edge_weight": 0.0,
    "model.patch_size": 1,
    "model.coord_channels": False,
    "model.pixel_head": 0,
    "model.self_condition": False,
    "data.embeddings_dir": "",
    "data.caption_states": False,
}


# Fields with a closed set of values, wherever a config has them.
CHOICES: dict[str, tuple[str, ...]] = {
    "diffusion.schedule": ("cosine", "linear"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.variance": ("fixed_small", "fixed_large", "learned_range"),
    "diffusion.loss": ("mse", "hybrid"),
    "sampling.method": ("ddpm", "ddim", "karlo"),
    "sampling.uncond_text": ("drop", "empty"),
    "optim.schedule": ("constant", "cosine"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "model.text_encoder": ("clip", "transformer"),
    "degradation.kind": ("none", "blur", "bsr"),
}

# Probabilities, wherever a config has them.
PROBABILITY_FIELDS = (
    "guidance.clip_drop_prob",
    "guidance.text_drop_prob",
    "diffusion.timestep_uniform_share",
)


# Integer fields with a lower bound, wherever a config has them.
POSITIVE_FIELDS: dict[str, int] = {
    "train.steps": 1,
    "train.batch_size": 1,
    "train.seed": 0,
    "train.checkpoint_every": 1,
    "train.log_every": 1,
    "train.keep_checkpoints": 0,
    "train.keep_every": 0,
    "train.preemption_check_every": 1,
    "diffusion.num_steps": 2,
    "model.patch_size": 1,
}


def validate_config(config: ConfigDict) -> None:
    """Raises ConfigError for a value outside its field's choices or a shared field missing."""
    for key, choices in CHOICES.items():
        head, _, leaf = key.partition(".")
        if head in config and leaf in config[head] and config[head][leaf] not in choices:
            raise ConfigError(
                f"config key {key!r} is {config[head][leaf]!r}; valid values: {', '.join(choices)}"
            )
    for key, minimum in POSITIVE_FIELDS.items():
        head, _, leaf = key.partition(".")
        if head in config and leaf in config[head] and config[head][leaf] < minimum:
            raise ConfigError(
                f"config key {key!r} is {config[head][leaf]!r}; it must be at least {minimum}"
            )
    for key in PROBABILITY_FIELDS:
        head, _, leaf = key.partition(".")
        if head in config and leaf in config[head] and not 0 <= config[head][leaf] <= 1:
            raise ConfigError(f"config key {key!r} is {config[head][leaf]!r}; it must be in [0, 1]")
    if "sampling" in config and "diffusion" in config:
        from unclip_jax.diffusion.schedules import space_timesteps

        try:
            space_timesteps(config.diffusion.num_steps, config.sampling.steps)
            if config.sampling.get("method") == "karlo" and not (
                str(config.sampling.steps).strip().isdigit()
                and config.diffusion.get("schedule") == "cosine"
            ):
                raise ValueError(
                    "sampling method 'karlo' takes a number of steps ('25') of a cosine schedule"
                )
        except ValueError as err:
            raise ConfigError(
                f"config key 'sampling.steps' is {config.sampling.steps!r}: {err}"
            ) from None
    missing = [f for f in SHARED_TRAIN_FIELDS if "train" not in config or f not in config.train]
    if missing:
        raise ConfigError(
            f"config has no train.{missing[0]} (every stage needs train.{{{', '.join(SHARED_TRAIN_FIELDS)}}})"
        )
    if "diffusion" in config:
        power = config.diffusion.get("timestep_power", ABSENT_MEANS["diffusion.timestep_power"])
        if not power > 0:
            raise ConfigError(
                f"config key 'diffusion.timestep_power' is {power!r}; it must be > 0 (1: uniform t)"
            )
        edge = config.diffusion.get("edge_weight", ABSENT_MEANS["diffusion.edge_weight"])
        if edge < 0 or (edge and config.get("stage") == "prior"):
            raise ConfigError(
                f"config key 'diffusion.edge_weight' is {edge!r}; it must be >= 0, and 0 for the "
                "prior (it weighs image pixels by the outlines they lie on; z_i has none)"
            )
        loss, variance = config.diffusion.get("loss"), config.diffusion.get("variance")
        if (loss == "hybrid") != (variance == "learned_range"):
            raise ConfigError(
                f"config keys 'diffusion.loss' ({loss!r}) and 'diffusion.variance' "
                f"({variance!r}) disagree: the 'hybrid' loss is what trains a "
                "'learned_range' variance, so set both or neither"
            )


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> ConfigDict:
    """Returns a copy of `config` with dotted `overrides` applied, each checked and typed.

    Values may be Python values (from `sweep()`) or strings (from the command line); strings
    are parsed to the type of the field they replace.
    """
    config = ConfigDict(config.to_dict())  # a copy: the caller's config stays as it was
    for key, value in overrides.items():
        parent, leaf = _resolve(config, key)
        coerced = _coerce(key, parent[leaf], value)
        with parent.ignore_type():
            parent[leaf] = coerced
    config.lock()
    validate_config(config)
    return config


def parse_override_args(args: Sequence[str], *, flag: str = "config") -> dict[str, str]:
    """Parses `--config.a.b=v` / `--config.a.b v` arguments into {'a.b': 'v'}.

    Raises ConfigError for any argument that is not such an override.
    """
    prefix = f"--{flag}."
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(prefix):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like {prefix}KEY=VALUE")
        body = arg[len(prefix) :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value")
        if not key:
            raise ConfigError(f"override {arg!r} names no key")
        overrides[key] = value
        i += 1
    return overrides


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
    """Loads `path[:variant]` and applies dotted overrides (strings or Python values)."""
    config = load_config_file(spec)
    return apply_overrides(config, overrides or {})


def sweep_overrides(spec: str) -> list[dict[str, Any]]:
    """The override dicts the config file's `sweep()` yields (each checked against the config)."""
    return [point for point, _ in iterate_sweep(spec)]


def iterate_sweep(spec: str) -> Iterator[tuple[dict[str, Any], ConfigDict]]:
    """(overrides, config) for every point of the file's sweep, on top of the variant.

    Every point is checked before the first is yielded, so a bad sweep fails before any run.
    """
    path, _ = _split_spec(spec)
    module = _import_config_module(path)
    if not hasattr(module, "sweep"):
        raise ConfigError(f"config file {path!r} defines no sweep()")
    base = load_config_file(spec)
    points = [dict(point) for point in module.sweep()]
    configs = [apply_overrides(base, point) for point in points]  # raises on a bad point
    yield from zip(points, configs, strict=True)


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b.c": value} (tuples as lists, as they come back from JSON),
    for comparing a saved config with the current one key by key."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_to_json(config: ConfigDict) -> str:
    """The config as stable, human-readable JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# Blocks the stage config files share, so that every stage spells the same field the same way.
# ---------------------------------------------------------------------------------------------


def train_block(
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    checkpoint_every: int,
    log_every: int,
    keep_checkpoints: int = 3,
    keep_every: int = 0,
    compute_dtype: str = "float32",
    remat: bool = False,
    preemption_check_every: int = 10,
) -> dict[str, Any]:
    """`train.*`: the fields every stage shares (batch_size is the global batch).

    keep_checkpoints: the last K checkpoints kept; keep_every: every M-th step kept too (0:
    none); compute_dtype: 'float32' or 'bfloat16' for the forward and backward pass (params
    stay float32); remat: the trained model recomputes each block's activations in the
    backward pass instead of keeping them (less memory, about a third more compute; the same
    params, so a run may turn it on or off when it resumes); init_from: another run's workdir
    to take initial weights from;
    preemption_check_every: how often the processes of a multi-process run agree on a
    SIGTERM (one process checks every step).
    """
    return dict(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        keep_checkpoints=keep_checkpoints,
        keep_every=keep_every,
        compute_dtype=compute_dtype,
        remat=remat,
        init_from="",
        preemption_check_every=preemption_check_every,
    )


def image_data_block(
    *, resolution: int, train_size: int = 0, test_size: int = 0, cache: bool = True
) -> dict[str, Any]:
    """`data.*` of the stages that train on images (CLIP, decoder, upsamplers).

    dataset: "shapes" (rendered at `resolution`; train_size / test_size pick a build, 0 the
    default 50,000 / 5,400) or "image_text" (built by `unclip-jax data build` at data_dir);
    workers: decoding processes (0: in this one); cache: each decoded example kept in memory
    after its first read, so the epochs after the first skip the PNG decoding
    (`data.pipeline.MemoizedSource`): the built-in shapes splits fit in RAM, the paper's
    datasets do not (their variants set it False).
    """
    return dict(
        dataset="shapes",
        resolution=resolution,
        data_dir="",
        train_size=train_size,
        test_size=test_size,
        workers=0,
        cache=cache,
    )


def mesh_block(*, data: int = -1, fsdp: int = 1, tensor: int = 1) -> dict[str, int]:
    """`mesh.*`: device mesh axis sizes; -1 means "all the devices the others leave"."""
    return dict(data=data, fsdp=fsdp, tensor=tensor)


def optim_block(
    *,
    lr: float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.9999,
) -> dict[str, Any]:
    """`optim.*`: AdamW with the paper's knobs and the EMA decay."""
    return dict(
        lr=lr,
        warmup_steps=warmup_steps,
        schedule=schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
    )


def diffusion_block(
    *,
    schedule: str = "cosine",
    num_steps: int = 1000,
    prediction: str = "eps",
    variance: str = "fixed_small",
    loss: str = "mse",
    vlb_weight: float = 0.001,
    timestep_power: float = 1.0,
    timestep_uniform_share: float = 0.0,
    edge_weight: float = 0.0,
) -> dict[str, Any]:
    """`diffusion.*`: the forward process and what the model predicts (see unclip_jax.diffusion).

    loss 'hybrid' is L_simple + vlb_weight * L_vlb and needs variance 'learned_range'.
    timestep_power p draws training timesteps t = floor(N u^p), u ~ U[0, 1): 1 is the paper's
    uniform t, p < 1 puts more of the steps at high noise (density of t/N: (1/p) s^(1/p - 1));
    a `timestep_uniform_share` of the draws is uniform instead, a floor under the low-noise
    density that p < 1 all but removes.
    edge_weight lambda > 0 (images only, not in the paper) weighs each pixel's squared error by
    1 + lambda e, e the clean image's edge indicator (`losses.edge_map`): the objects'
    outlines get a larger share of the loss than flat background.
    """
    return dict(
        schedule=schedule,
        num_steps=num_steps,
        prediction=prediction,
        variance=variance,
        loss=loss,
        vlb_weight=vlb_weight,
        timestep_power=timestep_power,
        timestep_uniform_share=timestep_uniform_share,
        edge_weight=edge_weight,
    )


def sampling_block(
    *,
    steps: str,
    method: str = "ddpm",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    clip_x0: float = 1.0,
    dynamic_threshold: float = 0.0,
) -> dict[str, Any]:
    """`sampling.*`: respaced steps ('250', 'ddim50', '10,10,5'), sampler, guidance, x0 clip.

    method: "ddpm" (ancestral), "ddim" (with `eta`), or "karlo": ancestral steps exactly as
    diffusers' `UnCLIPScheduler` takes them for Karlo (`steps` a number N: its spacing
    round(i 999 / (N - 1)) and its float32 schedule arithmetic, `diffusion.karlo_schedule`),
    for imported Karlo weights. clip_x0 0 disables static clipping; dynamic_threshold is the
    percentile (e.g. 0.995) of Imagen's dynamic thresholding, 0 to disable.
    """
    return dict(
        steps=steps,
        method=method,
        eta=eta,
        guidance_scale=guidance_scale,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
    )
