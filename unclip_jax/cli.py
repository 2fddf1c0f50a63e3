"""The `unclip-jax` command line: one subcommand per job.

Each subcommand is a `Command` in `COMMANDS`: its name, a one-line help, a function that adds
its arguments and the function that runs it. Later capabilities add theirs here; `--help`
lists every one. Config overrides (`--config.KEY=VALUE`) are passed through to the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from unclip_jax.config import (
    ConfigError,
    apply_overrides,
    config_to_json,
    iterate_sweep,
    load_config,
    parse_override_args,
)
from unclip_jax.convert import karlo as convert_karlo


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `add_args(parser)` declares its flags, `run(args, overrides)` runs it."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, dict[str, str]], int]


def _add_config_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """The required `--config FILE[:VARIANT]` every config-driven command takes."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE[:VARIANT]",
        help=f"{what}, e.g. configs/decoder.py:tiny; override fields with --config.KEY=VALUE",
    )


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    _add_config_arg(parser, "a stage config")
    parser.add_argument(
        "--sweep", action="store_true", help="print every point of the file's sweep() instead"
    )


def _run_config(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if args.sweep:
        for point, config in iterate_sweep(args.config):
            print(f"# {point}")
            print(config_to_json(apply_overrides(config, overrides)))
        return 0
    print(config_to_json(load_config(args.config, overrides)))
    return 0


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    _add_config_arg(parser, "the stage config")
    parser.add_argument(
        "--workdir",
        required=True,
        help="checkpoints, metrics and logs go here; a workdir with a checkpoint resumes from it",
    )
    parser.add_argument(
        "--init-from",
        metavar="WORKDIR",
        default=None,
        help="start from another run's params (a fresh optimizer, step 0); "
        "same as --config.train.init_from",
    )
    _add_distributed_args(parser)


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process runs")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (TPU pods: no other flag)",
    )
    group.add_argument("--coordinator", default=None, help="host:port of process 0 (CPU/GPU)")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def _start_distributed(args: argparse.Namespace) -> None:
    from unclip_jax.parallel import initialize_distributed

    given = [args.coordinator, args.num_processes, args.process_id]
    if not args.distributed and any(v is not None for v in given):
        raise ConfigError(
            "--coordinator, --num-processes and --process-id join a multi-process run: "
            "add --distributed"
        )

    initialize_distributed(
        enabled=args.distributed,
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


# XLA CPU flags measured faster for a stage (benchmarks/README.md). The U-Nets' convolutions
# run faster on Eigen than in YNNPACK fusions (decoder bench step 3.87 -> 3.33 s), while the
# transformers' matmuls are faster in YNNPACK (CLIP shapes step 105 ms vs 138 ms without it).
# Only the CPU backend reads them; a flag the user already set in XLA_FLAGS is left alone.
CPU_XLA_FLAGS: dict[str, tuple[str, ...]] = {
    "decoder": ("--xla_cpu_experimental_ynn_fusion_type=",),
    "upsampler": ("--xla_cpu_experimental_ynn_fusion_type=",),
    "sample": ("--xla_cpu_experimental_ynn_fusion_type=",),  # the cascade's time is U-Nets'
}
# Not for the demo's stages: its small U-Nets, on one CPU device per core, run faster WITH
# YNNPACK's fusions (jaxlib 0.10.2's default): the `shapes` decoder's step on 2 devices
# 0.0336 s against 0.0481 s with them off (`benchmarks/cpu_devices.py --ynn off on`); in the
# demo's loops on 2 devices, the decoder 17.1-17.2 steps/s against 11.5-12.8, the upsampler
# 8.4-8.5 against 5.5-5.9 (benchmarks/README.md, "The caption dropped less").


def _set_cpu_xla_flags(stage: str, cpu_devices: int = 1, *, stage_flags: bool = True) -> None:
    """Puts the stage's CPU_XLA_FLAGS (unless `stage_flags` is False) in XLA_FLAGS (before JAX
    starts) and, where `cpu_devices` > 1, asks for that many CPU devices instead of JAX's one."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    wanted = CPU_XLA_FLAGS.get(stage, ()) if stage_flags else ()
    if cpu_devices > 1:
        wanted += (f"--xla_force_host_platform_device_count={cpu_devices}",)
    for flag in wanted:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


def _run_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import logging

    from unclip_jax.training import CheckpointMismatchError, NonFiniteError, train_and_evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.init_from:
        overrides = {**overrides, "train.init_from": args.init_from}
    config = load_config(args.config, overrides)
    _set_cpu_xla_flags(config.stage)  # before anything starts a JAX backend
    _start_distributed(args)
    try:
        train_and_evaluate(config, args.workdir)
    except (NonFiniteError, CheckpointMismatchError, FileNotFoundError) as err:
        print(f"unclip-jax train: error: {err}", file=sys.stderr)
        return 1
    return 0


def _add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the run to export")
    parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--ema", action="store_true", help="export the EMA params")
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE.safetensors|DIR",
        help="one flat safetensors file, or with --stage-dir a stage directory",
    )
    parser.add_argument(
        "--stage-dir",
        action="store_true",
        help="write a stage directory (config.json, params.safetensors and the files the stage "
        "fitted) that `unclip-jax sample --pipeline` takes",
    )


def _run_export(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from unclip_jax.training import export_params

    if overrides:
        raise ConfigError("export takes no --config overrides")
    try:
        if args.stage_dir:
            from unclip_jax.sampling.load import export_stage_dir

            step = export_stage_dir(args.workdir, args.out, ema=args.ema, step=args.step).step
        else:
            step = export_params(args.workdir, args.out, step=args.step, ema=args.ema)
    except FileNotFoundError as err:
        print(f"unclip-jax export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {'EMA ' if args.ema else ''}params of step {step} to {args.out}")
    return 0


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    build = sub.add_parser(
        "build",
        help="turn a folder of captioned images or webdataset tars "
        "into a tfds array_record dataset",
    )
    build.add_argument(
        "--source",
        required=True,
        help="a folder (image + same-named .txt) or a webdataset .tar / folder of .tar shards",
    )
    build.add_argument("--resolution", type=int, required=True)
    build.add_argument("--out", required=True)
    build.add_argument(
        "--min-size",
        type=int,
        default=None,
        help="smallest shorter side kept (default: the resolution)",
    )
    build.add_argument("--test-fraction", type=float, default=0.01)
    show = sub.add_parser("show", help="write N examples as PNGs, a captioned grid and a manifest")
    show.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="shapes:64 for the built-in set, or a built dataset's folder",
    )
    show.add_argument("--split", default="train")
    show.add_argument("--n", type=int, default=16)
    show.add_argument("--out", required=True)
    _add_dataset_args(show)


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Where built-in datasets live, and which `shapes` build to use."""
    parser.add_argument("--data-dir", default=None, help="where built-in datasets are built")
    parser.add_argument(
        "--shapes-train-size",
        type=int,
        default=None,
        help="examples in the built-in set's train split (default 50,000)",
    )
    parser.add_argument(
        "--shapes-test-size",
        type=int,
        default=None,
        help="examples in the built-in set's test split (default 5,400)",
    )


def _shapes_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The `shapes` sizes given on the command line, as load_shapes keywords."""
    given = (("train_size", args.shapes_train_size), ("test_size", args.shapes_test_size))
    return {name: value for name, value in given if value is not None}


def _run_data(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if overrides:
        raise ConfigError("data takes no --config overrides")
    from unclip_jax.data.image_text import build_image_text
    from unclip_jax.data.show import show_dataset
    from unclip_jax.data.sources import SourceError

    try:
        if args.data_command == "build":
            report = build_image_text(
                args.source,
                args.resolution,
                args.out,
                min_size=args.min_size,
                test_fraction=args.test_fraction,
            )
            print(f"wrote {report.path}")
            print("written: " + ", ".join(f"{k} {v}" for k, v in report.written.items()))
            print("skipped: " + ", ".join(f"{k} {v}" for k, v in report.skipped.items()))
            if not sum(report.written.values()):
                print("unclip-jax data build: error: no example survived", file=sys.stderr)
                return 1
        else:
            sizes = _shapes_sizes(args)
            rows = show_dataset(
                args.data, args.split, args.n, args.out, data_dir=args.data_dir, **sizes
            )
            print(f"wrote {len(rows)} examples, grid.png and manifest.jsonl to {args.out}")
    except (SourceError, FileNotFoundError, ValueError) as err:
        print(f"unclip-jax data {args.data_command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _add_embed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip", required=True, help="a CLIP checkpoint directory (HF layout)")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="shapes:64 for the built-in set, or a built dataset's folder",
    )
    parser.add_argument("--out", required=True, help="where the clip-retrieval shards go")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="rows per shard (default: min(10,000, rows / processes))",
    )
    _add_dataset_args(parser)
    _add_distributed_args(parser)


def _run_embed(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import logging

    from unclip_jax.convert.hf_clip import CheckpointKeyError
    from unclip_jax.data.sources import SourceError
    from unclip_jax.embed_job import embed_dataset

    if overrides:
        raise ConfigError("embed takes no --config overrides")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _start_distributed(args)
    try:
        sizes = _shapes_sizes(args)
        report = embed_dataset(
            args.clip,
            args.data,
            args.out,
            split=args.split,
            batch_size=args.batch_size,
            dtype=args.dtype,
            shard_size=args.shard_size,
            data_dir=args.data_dir,
            **sizes,
        )
    except (FileNotFoundError, CheckpointKeyError, SourceError, ValueError) as err:
        print(f"unclip-jax embed: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.rows} rows in shards {report.written}; already complete: {report.skipped}"
    )
    return 0


def _add_cascade_args(parser: argparse.ArgumentParser, *, seed_help: str) -> None:
    """The trained stages to sample with and how (shared by sample, vary, interpolate and
    textdiff)."""
    parser.add_argument(
        "--pipeline",
        required=True,
        nargs="+",
        metavar="FILE|DIR",
        help="a pipeline JSON file naming the clip, prior(s), decoder and upsamplers, or the "
        "stages' workdirs / stage directories themselves",
    )
    parser.add_argument("--out", required=True, help="the folder the images go to")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--prior", default=None, help="which prior of the pipeline (default: its first)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="change a sampling setting, e.g. decoder.guidance_scale=3, prior.steps=ddim25, "
        "prior.num_candidates=4, upsampler.steps=ddim7, decoder.method=ddim, decoder.eta=0.5 "
        "(repeatable; defaults: each stage's config)",
    )
    parser.add_argument(
        "--raw-params", action="store_true", help="sample with the params, not the EMA params"
    )
    parser.add_argument(
        "--fsdp",
        type=int,
        default=1,
        help="shard the params over this many devices (models too large for one device's "
        "memory); the batch is split over all devices either way",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the models' compute dtype (bfloat16 for TPUs and GPUs)",
    )
    parser.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="XLA's persistent compilation cache, so a second run does not compile again "
        "(default: $UNCLIP_JAX_CACHE or ~/.cache/unclip-jax/jax; 'off' disables it)",
    )


def _set_compile_cache(path: str | None) -> None:
    import os

    import jax

    if path == "off":
        return
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
        path = os.environ.get("UNCLIP_JAX_CACHE") or os.path.join(base, "unclip-jax", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _open_cascade(args: argparse.Namespace) -> Any:
    import jax

    from unclip_jax.parallel import make_mesh
    from unclip_jax.sampling.cascade import Cascade, parse_settings, read_pipeline

    settings = parse_settings(args.set)
    spec = read_pipeline(args.pipeline)
    if jax.device_count() % args.fsdp:
        raise ConfigError(f"--fsdp {args.fsdp} does not divide the {jax.device_count()} devices")
    mesh = make_mesh({"data": -1, "fsdp": args.fsdp})
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    return Cascade(
        spec,
        prior=args.prior,
        settings=settings,
        mesh=mesh,
        ema=not args.raw_params,
        dtype=dtype,
    )


def _cascade_errors() -> tuple[type[BaseException], ...]:
    from unclip_jax.convert.hf_clip import CheckpointKeyError

    return (FileNotFoundError, ValueError, CheckpointKeyError)


def _add_sample_args(parser: argparse.ArgumentParser) -> None:
    _add_cascade_args(parser, seed_help="image (p, j) of a seed is the same in every run")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a caption (repeatable)")
    prompts.add_argument("--prompt-file", help="one caption per line (any number)")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per global batch (default: 4 per device of the batch axes)",
    )
    _add_distributed_args(parser)


def _run_sample(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import logging

    from unclip_jax.sampling.generate import generate_to_dir, read_prompts

    if overrides:
        raise ConfigError("sample takes no --config overrides; use --set STAGE.KEY=VALUE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _set_cpu_xla_flags("sample")
    _start_distributed(args)
    _set_compile_cache(args.compile_cache)
    try:
        prompts = read_prompts(args.prompt_file) if args.prompt_file else args.prompt
        cascade = _open_cascade(args)
        report = generate_to_dir(
            cascade, prompts, args.out, n=args.n, seed=args.seed, batch_size=args.batch_size
        )
    except _cascade_errors() as err:
        print(f"unclip-jax sample: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report.written} images to {args.out} ({report.skipped} were there already)")
    return 0


def _add_vary_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    _add_cascade_args(parser, seed_help="the variations' noise")
    parser.add_argument("--n", type=int, default=4, help="variations per image")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0 for variety)")


def _add_interpolate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs=2, metavar="IMAGE", help="the two ends, A and B")
    _add_cascade_args(parser, seed_help="the upsamplers' noise (and x_T with --noise fixed)")
    parser.add_argument("--steps", type=int, default=8, help="frames, A and B included")
    parser.add_argument(
        "--noise",
        choices=("slerp", "fixed"),
        default="slerp",
        help="x_T slerped between the two images' DDIM inversions, or one random x_T",
    )


def _add_textdiff_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE")
    _add_cascade_args(parser, seed_help="the upsamplers' noise")
    parser.add_argument("--from", dest="source", required=True, help="a caption of the image")
    parser.add_argument("--to", dest="target", required=True, help="the caption to move to")
    parser.add_argument("--steps", type=int, default=6, help="frames, the image included")
    parser.add_argument(
        "--max-theta", type=float, default=0.5, help="how far towards the text diff (0..1)"
    )


def _run_manipulation(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import os

    from unclip_jax.sampling import manipulate

    if overrides:
        raise ConfigError(f"{args.command} takes no --config overrides; use --set")
    _set_cpu_xla_flags("sample")
    _set_compile_cache(args.compile_cache)
    try:
        cascade = _open_cascade(args)
        if args.command == "vary":
            images = manipulate.load_images(args.images)
            frames = manipulate.variations(cascade, images, n=args.n, seed=args.seed, eta=args.eta)
            written = []
            for i, (path, strip) in enumerate(zip(args.images, frames, strict=True)):
                # Numbered: two inputs of the same name from different folders stay apart.
                stem = f"{i:02d}_{os.path.splitext(os.path.basename(path))[0]}"
                written += manipulate.write_strip(strip, args.out, stem)[:1]
        elif args.command == "interpolate":
            a, b = manipulate.load_images(args.images)
            frames = manipulate.interpolate(
                cascade, a, b, steps=args.steps, noise=args.noise, seed=args.seed
            )
            written = manipulate.write_strip(frames, args.out, "interpolate")[:1]
        else:
            (image,) = manipulate.load_images([args.image])
            frames = manipulate.text_diff(
                cascade,
                image,
                source=args.source,
                target=args.target,
                steps=args.steps,
                max_theta=args.max_theta,
                seed=args.seed,
            )
            written = manipulate.write_strip(frames, args.out, "textdiff")[:1]
    except _cascade_errors() as err:
        print(f"unclip-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} and the single frames")
    return 0


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="a folder written by unclip-jax sample")
    parser.add_argument("--clip", required=True, help="the CLIP whose features score them")
    parser.add_argument(
        "--real",
        required=True,
        metavar="SPEC",
        help="the real images: shapes:R for the built-in set (adds the attribute reading), or "
        "a built dataset's folder",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-real", type=int, default=5_400, help="real images to compare to")
    parser.add_argument(
        "--num-probe",
        type=int,
        default=5_000,
        help="for shapes: labelled train images that fit the CLIP-feature attribute probe "
        "(0: no probe)",
    )
    parser.add_argument(
        "--inception",
        default=None,
        metavar="FILE",
        help="local Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-*.pth, or the "
        "same tensors as .safetensors): adds FID in Inception features",
    )
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the scores")
    _add_dataset_args(parser)


def _run_eval(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import json

    from unclip_jax.clip import load_pretrained
    from unclip_jax.convert.hf_clip import CheckpointKeyError
    from unclip_jax.data.pipeline import open_dataset
    from unclip_jax.data.sources import SourceError
    from unclip_jax.evaluation.inception import load_inception
    from unclip_jax.evaluation.runner import evaluate_samples, format_scores

    if overrides:
        raise ConfigError("eval takes no --config overrides")
    try:
        clip = load_pretrained(args.clip)
        source = open_dataset(args.real, args.split, data_dir=args.data_dir, **_shapes_sizes(args))
        real = [source[i]["image"] for i in range(min(len(source), args.num_real))]
        shapes = args.real.startswith("shapes")
        probe = None
        if shapes and args.num_probe:
            train = open_dataset(args.real, "train", data_dir=args.data_dir, **_shapes_sizes(args))
            probe = [train[i] for i in range(min(len(train), args.num_probe))]
        inception = load_inception(args.inception) if args.inception else None
        scores = evaluate_samples(
            args.samples, clip, real, shapes=shapes, probe_examples=probe, inception=inception
        )
    except (FileNotFoundError, ValueError, ImportError, SourceError, CheckpointKeyError) as err:
        print(f"unclip-jax eval: error: {err}", file=sys.stderr)
        return 2
    print(format_scores(scores))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=2)
    return 0


def _sweep() -> Any:
    from unclip_jax import sweep

    return sweep


def _add_plan_args(parser: argparse.ArgumentParser) -> None:
    _add_config_arg(
        parser, "the stage config whose train step to plan (mesh.*, train.remat, ... overridable)"
    )
    parser.add_argument(
        "--topology",
        required=True,
        metavar="GEN:AxB[xC]",
        help="a TPU topology: v5e:16x16, v5p:4x4x4, v4:4x4x4, v6e:8x8, ... (needs libtpu: "
        "pip install -e '.[tpu]'; no TPU needed)",
    )
    parser.add_argument(
        "--clip",
        default=None,
        metavar="SPEC|DIR",
        help="the frozen CLIP of a decoder or prior: a CLIP stage config (configs/clip.py:paper) "
        "or a CLIP directory (only its config.json is read); default: clip.dir, else the "
        "clip.py next to --config at the same variant",
    )
    parser.add_argument(
        "--hbm-gib", type=float, default=None, help="plan for this much HBM per chip instead"
    )
    parser.add_argument(
        "--no-fixes",
        action="store_true",
        help="do not try other settings when the step does not fit",
    )
    parser.add_argument(
        "--max-tries", type=int, default=6, help="settings to try when it does not fit"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the plan(s) here")


def _run_plan(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import json
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for TPU runs on any machine
    from unclip_jax.training.plan import (
        GIB,
        LibtpuMissingError,
        format_plan,
        plan_train_step,
        plan_with_fixes,
        planned_clip_config,
        topology_devices,
    )

    config = load_config(args.config, overrides)
    try:
        clip_config = planned_clip_config(config, args.config, args.clip)
        devices = topology_devices(args.topology)
    except (LibtpuMissingError, FileNotFoundError) as err:
        print(f"unclip-jax plan: error: {err}", file=sys.stderr)
        return 2
    kwargs = dict(
        topology=args.topology,
        clip_config=clip_config,
        hbm_bytes=None if args.hbm_gib is None else int(args.hbm_gib * GIB),
    )
    if args.no_fixes:
        plan, tried = plan_train_step(config, devices, **kwargs), []
    else:
        plan, tried = plan_with_fixes(
            config,
            devices,
            max_tries=args.max_tries,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            **kwargs,
        )
    print(format_plan(plan, tried))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            record = {"config": args.config, "overrides": overrides, **plan.to_dict()}
            json.dump({**record, "tried": [t.to_dict() for t in tried]}, f, indent=2)
    return 0 if plan.fits else 1


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="every stage's run and output go here")
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps everywhere: a coarse result, fast"
    )
    parser.add_argument(
        "--preset",
        default=None,
        help=argparse.SUPPRESS,  # "test": the tiny configs, for tests
    )
    parser.add_argument(
        "--steps",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="train steps of one stage (clip, prior, decoder, upsampler), repeatable",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="sample only the first N test prompts"
    )
    parser.add_argument(
        "--stage",
        default=None,
        help=argparse.SUPPRESS,  # run one stage in this process (what the demo's children do)
    )


def _run_demo(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import logging
    import os

    from unclip_jax.demo import demo_cpu_devices, parse_steps, run_demo, run_stage

    if overrides:
        raise ConfigError("demo takes no --config overrides; use --steps STAGE=N")
    preset = args.preset or ("quick" if args.quick else "full")
    steps = parse_steps(args.steps)
    try:
        if args.stage is None:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            run_demo(args.workdir, preset=preset, steps=steps, num_prompts=args.num_prompts)
            return 0
        # One stage, in the process the demo started for it: its CPU devices before JAX
        # starts (not CPU_XLA_FLAGS: see there), its log in a file (the terminal keeps the
        # progress bar).
        _set_cpu_xla_flags(args.stage, cpu_devices=demo_cpu_devices(args.stage), stage_flags=False)
        log_dir = os.path.join(args.workdir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
            filename=os.path.join(log_dir, f"{args.stage}.log"),
        )
        _set_compile_cache(None)
        run_stage(
            args.workdir, args.stage, preset=preset, steps=steps, num_prompts=args.num_prompts
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"unclip-jax demo: error: {err}", file=sys.stderr)
        return 2
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        name="demo",
        help="the whole cascade on the built-in shapes set: train every stage, sample, evaluate",
        add_args=_add_demo_args,
        run=_run_demo,
    ),
    Command(
        name="config",
        help="print a stage config as JSON after overrides (or every point of its sweep)",
        add_args=_add_config_args,
        run=_run_config,
    ),
    Command(
        name="train",
        help="train a stage from its config (resumes a workdir that has a checkpoint)",
        add_args=_add_train_args,
        run=_run_train,
    ),
    Command(
        name="data",
        help="build datasets from images + captions, and look at any dataset",
        add_args=_add_data_args,
        run=_run_data,
    ),
    Command(
        name="embed",
        help="embed a dataset with a CLIP into clip-retrieval shards (resumable)",
        add_args=_add_embed_args,
        run=_run_embed,
    ),
    Command(
        name="sample",
        help="text to images through the cascade, sharded over every device (resumable)",
        add_args=_add_sample_args,
        run=_run_sample,
    ),
    Command(
        name="vary",
        help="variations of images: their CLIP embedding decoded with DDIM eta > 0",
        add_args=_add_vary_args,
        run=_run_manipulation,
    ),
    Command(
        name="interpolate",
        help="frames between two images: slerp of z_i, x_T from their DDIM inversions",
        add_args=_add_interpolate_args,
        run=_run_manipulation,
    ),
    Command(
        name="textdiff",
        help="move an image along a caption change: slerp of z_i towards z_t(to) - z_t(from)",
        add_args=_add_textdiff_args,
        run=_run_manipulation,
    ),
    Command(
        name="eval",
        help="score samples: Frechet distance in CLIP features, CLIP score, precision/recall, "
        "and shapes attributes",
        add_args=_add_eval_args,
        run=_run_eval,
    ),
    Command(
        name="sweep",
        help="train one run per point of a config's sweep() (one workdir each), then summarise "
        "their final metrics (also launch/sweep.py)",
        add_args=lambda parser: _sweep().add_args(parser),
        run=lambda args, overrides: _sweep().run(args, overrides),
    ),
    Command(
        name="plan",
        help="compile a stage's train step for a TPU topology (on any machine) and print its "
        "per-chip memory, FLOPs and whether it fits; exit status 1 when it does not",
        add_args=_add_plan_args,
        run=_run_plan,
    ),
    Command(
        name="convert",
        help="import published weights: a diffusers Karlo (unCLIP) directory -> our stage "
        "directories, its CLIP text tower and a pipeline file for `sample`",
        add_args=convert_karlo.add_args,
        run=convert_karlo.run,
    ),
    Command(
        name="export",
        help="write a run's params (or EMA params) as one flat safetensors file",
        add_args=_add_export_args,
        run=_run_export,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command in COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="unclip-jax",
        description="unCLIP (DALL-E 2's cascade) in JAX/Flax: train, sample and evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_args(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for a usage or config error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_override_args(rest)
        command = next(c for c in COMMANDS if c.name == args.command)
        return command.run(args, overrides)
    except ConfigError as err:
        print(f"unclip-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
