"""`unclip-jax demo`: the whole cascade on the built-in `shapes` set, on one machine.

Stages (DEMO_STAGES), in order, each in a process of its own and each resumable (a rerun
skips what is done and resumes what is not), writing under the workdir:

    clip/       train the shapes CLIP (its Hugging Face export in clip/clip)
    embed/      embed the train and test splits with it (clip-retrieval shards)
    prior/      train the diffusion prior on the shards
    decoder/    train the decoder on images and captions
    upsampler/  train one upsampler (32 -> 64 px)
    pipeline.json, demo_grid.png, samples/ (one image per test combination), scores.json,
    logs/STAGE.log, timings.json

The step counts of each preset are in PRESETS; `--steps STAGE=N` changes one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from unclip_jax.config import ConfigError, load_config

log = logging.getLogger("unclip_jax.demo")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STAGES = ("clip", "prior", "decoder", "upsampler")
# Everything the demo runs, in order; each is resumable.
DEMO_STAGES = ("clip", "embed", "prior", "decoder", "upsampler", "sample", "eval")
STAGE_HELP = {
    "clip": "train CLIP on shapes",
    "embed": "CLIP embeddings of the train and test images",
    "prior": "train the diffusion prior (caption -> image embedding)",
    "decoder": "train the decoder (image embedding + caption -> 32 px image)",
    "upsampler": "train the upsampler (32 px -> 64 px)",
    "sample": "sample the grid and one image per test combination",
    "eval": "score the samples",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """What one demo preset trains and samples."""

    steps: dict[str, int]  # train steps per stage of STAGES
    train_size: int = 0  # `shapes` train examples for CLIP and the decoder (0: all 50,000)
    prompts: int | None = None  # test prompts sampled (None: all 540 combinations)
    sampling: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> steps


# "full" and "quick" run the `shapes` configs; "test" the `tiny` ones (seconds, for the tests).
# The decoder is compute-bound at the demo's length (benchmarks/README.md, "What the decoder's
# budget buys"), so it takes the budget's slack: 4,000 steps rather than 3,000 took the demo's
# seen pairs from all five 0.247 to 0.302 (shape 0.48 -> 0.53, position 0.55 -> 0.61) for
# 150 s more; the config's 32 channels at each level (were 64) run 8,000 steps in that time:
# 0.313 (position 0.67), 23:30 in all on an idle 2-core machine; with the config's pixel head
# 0.389, 28:45 on a slow day for the machine; with the CLIP at lr 5e-4, 0.604 (README, "The
# demo"). The upsampler's 1,000 steps (were 300; on the quarter crops of `stage_configs`,
# about a minute more than 300 steps on half crops): on the same 450 decoder images (the
# edge-weighted decoder given the true z_i, 0.762 read at 32 px), all five right 0.793 after
# them against 0.682 after 300 steps, which left grain and stray pixels that moved the
# object's box (benchmarks/README.md, "Outlines weighted"). The decoder's 12,000 steps (were
# 8,000): given the true z_i it drew all five right for 0.858 of 450 seen-pair prompts against
# 0.778-0.796 (small squares 0.43 against 0.16-0.24); 16,000 read 0.898 (small squares 0.51)
# but took the demo over 30 minutes on a fast day (benchmarks/README.md, "The decoder's
# length, again", and "One CPU device per core, and the decoded examples kept"). With
# YNNPACK's fusions on (cli.py) 12,000 steps take 675 s and the demo 21 minutes; the slack is
# left to the machine's slow hours (up to 1.3x), not spent on steps.
PRESETS: dict[str, Preset] = {
    "full": Preset({"clip": 1_200, "prior": 600, "decoder": 12_000, "upsampler": 1_000}),
    # --quick checks that every stage runs (its samples get the background right and little
    # else): 5:13 with 150 CLIP and 240 decoder steps and 108 prompts, over its 5 minutes,
    # most of it start-up and compiles; with 100, 200 and 96 (three full batches of
    # SAMPLE_BATCH), 4:08 on the same machine the same hour.
    "quick": Preset(
        {"clip": 100, "prior": 100, "decoder": 200, "upsampler": 30},
        train_size=10_000,
        prompts=96,
        sampling={"prior": "10", "decoder": "10"},
    ),
    "test": Preset({"clip": 2, "prior": 2, "decoder": 2, "upsampler": 2}),
}
# The demo samples with DDIM (the configs' 50-64 DDPM steps made 8.5 s per image on 2 cores)
# in batches of 32 (4 per device wastes a CPU), on evenly strided steps that start at t = 999.
# (DDIM's own spacing, "ddim25", which inversion uses, starts at t = 960, where abar = 0.004:
# it would take x_T's pure noise for a faint image.) The decoder's 15 steps draw what its 25
# drew (given the true z_i, all five right for 0.249 of 450 seen-pair prompts against 0.253;
# 20: 0.256) in 0.6x the time. The upsampler's 3 steps keep what the decoder drew: on the same
# 450 decoder images (all five 0.216 at 32 px), 0.216 after 3 steps, 0.204 after 5 and 0.178
# after 10 (position 0.458 against 0.509, size 0.849 against 0.896: more steps of a 300-step
# upsampler move what the reader measures).
# The decoder's 10 steps are spaced "2,2,2,4" (2 in each of t < 250, 250-499, 500-749, and 4
# in 750-999), at guidance 1.75 rather than its config's 2 (against the empty caption,
# configs/decoder.py): the trained decoder rounds small squares' corners at low t, where
# evenly strided steps spend most of their calls, while shape and place are settled at high
# t. Given the true z_i, 450 seen-pair prompts, all five right for 0.920 against 0.889 with 15
# even steps at guidance 2 (small squares 0.61 against 0.45), and 0.920 against 0.898 on a
# second decoder trained 16,000 steps (benchmarks/README.md, "The decoder's CLIP out of its
# step, and its sampler's steps").
SAMPLING = {
    "prior": {"method": "ddim", "steps": "25"},
    "decoder": {"method": "ddim", "steps": "2,2,2,4", "guidance_scale": 1.75},
    "upsampler": {"method": "ddim", "steps": "3"},
}
SAMPLE_BATCH = 32


# The demo stages that run a U-Net, whose many small ops one XLA CPU device runs on one core.
UNET_STAGES = ("decoder", "upsampler", "sample")


def demo_cpu_devices(stage: str) -> int:
    """CPU devices a demo stage runs on: 2 for the U-Net stages where the process may use 2
    cores or more, else JAX's one.

    One XLA CPU device runs a small U-Net's larger convolutions on both cores but most of its
    fusions (the GroupNorm reductions, the elementwise ops) on one; with one device per core,
    each a half of every batch, both cores run every op: the decoder's train step took 0.0455 s
    against 0.055 s on one device (4 devices: 0.062 s), and the demo's sample stage took 43 s
    against 65. The transformers (CLIP, its embedding pass, the prior) keep both cores busy on
    one device: in interleaved runs the CLIP stage ran 4.8-5.4 steps/s on two devices and
    4.9-5.2 on one (benchmarks/README.md, "One CPU device per core")."""
    if stage not in UNET_STAGES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 if (cores or 1) >= 2 else 1


# Labelled real images that fit the evaluation's CLIP-feature attribute probe.
PROBE_EXAMPLES = 5_000
# Prompts of the grid: seen (colour, shape) pairs and the three held-out ones.
GRID_PROMPTS = (
    "a small red circle in the top left on a gray background",
    "a large blue square in the center on a white background",
    "a large yellow triangle in the bottom right on a black background",
    "a small purple circle in the top right on a white background",
    "a large green triangle in the center on a gray background",  # held out
    "a small purple square in the bottom left on a black background",  # held out
    "a large orange circle in the center on a white background",  # held out
    "a large orange square in the top left on a gray background",
)


def _stage_config(stage: str, variant: str, overrides: Mapping[str, Any]) -> Any:
    path = os.path.join(CONFIGS, f"{stage}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the demo needs the repository's configs/ (no {path})")
    return load_config(f"{path}:{variant}", dict(overrides))


def stage_configs(workdir: str, preset: str, steps: Mapping[str, int]) -> dict[str, Any]:
    """The four stage configs of the demo, wired to each other's outputs in `workdir`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown demo preset {preset!r}; presets: {', '.join(PRESETS)}")
    unknown = sorted(set(steps) - set(STAGES))
    if unknown:
        raise ConfigError(f"--steps names no stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    counts = {**PRESETS[preset].steps, **steps}
    variant = "tiny" if preset == "test" else "shapes"
    clip_dir = os.path.join(workdir, "clip", "clip")
    embed = os.path.join(workdir, "embed")
    common: dict[str, Any] = {"data.data_dir": os.path.join(workdir, "data")}
    if PRESETS[preset].train_size:
        common["data.train_size"] = PRESETS[preset].train_size
    extra: dict[str, dict[str, Any]] = {
        "clip": {"eval.every": 0} if preset == "test" else {},
        "prior": {
            "clip.dir": clip_dir,
            "data.embeddings_dir": os.path.join(embed, "train"),
            "data.test_embeddings_dir": os.path.join(embed, "test"),
            "eval.every": 0,
        },
        # z_i read from the embed stage's shards rather than made by the frozen CLIP in each
        # step (and the caption states, below, once per distinct caption): 0.0566 s a step
        # against 0.0602 s on 2 devices (benchmarks/README.md, "The decoder's CLIP out of its
        # step").
        "decoder": {
            "clip.dir": clip_dir,
            "samples.every": 0,
            "data.embeddings_dir": os.path.join(embed, "train"),
        },
        "upsampler": {"samples.every": 0},
    }
    if preset == "test":  # the tiny decoder makes 16 px images: a 16 -> 32 upsampler
        extra["upsampler"].update({"model.low_resolution": 16, "model.resolution": 32})
    else:
        # 32 -> 64 px rather than the config's 32 -> 128: sampling 540 images at 128 px cost
        # four times as much, and 64 px already shows every attribute. It trains on crops of
        # 16 px, 1/4 of its 64 px as the config's rule (and the paper's) has it, 32 a batch:
        # half the pixels of the 32 px crops of 16 it took before, so 1,000 steps in 244 s
        # against 487 s, and on the same 450 decoder images all five right 0.793 after both
        # (benchmarks/README.md, "The upsampler on quarter crops").
        resolution = 64
        extra["upsampler"].update(
            {
                "model.resolution": resolution,
                "data.resolution": resolution,
                "train_crop": resolution // 4,
                "train.batch_size": 32,
            }
        )
    configs = {}
    for stage in STAGES:
        overrides = {**extra[stage], "train.steps": counts[stage]}
        if stage in ("clip", "decoder"):
            overrides.update(common)
        elif stage == "upsampler":  # its own, smaller build at its own resolution
            overrides["data.data_dir"] = common["data.data_dir"]
        config = _stage_config(stage, variant, overrides)
        if stage == "decoder":  # only a decoder on CLIP's text (not `tiny`'s) reads states
            config.data.caption_states = config.model.text_encoder == "clip"
        # A short run must still warm up and average: warm-up at most a tenth of the steps,
        # and an EMA whose horizon (1 / (1 - decay)) is at most a tenth of them too.
        steps = counts[stage]
        config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, steps // 10))
        config.optim.ema_decay = min(config.optim.ema_decay, max(0.0, 1.0 - 10.0 / steps))
        configs[stage] = config
    return configs


def _train(stage: str, config: Any, workdir: str) -> None:
    from unclip_jax.training import train_and_evaluate

    log.info("demo: training %s for %d steps", stage, config.train.steps)
    train_and_evaluate(config, workdir)


def _shapes_sizes(data: Any) -> dict[str, int]:
    return {k: data[k] for k in ("train_size", "test_size") if data.get(k)}


def test_prompts(data: Any) -> list[str]:
    """One caption per attribute combination of the test split of a config's `data` block
    (the first 540 examples hold each combination once)."""
    from unclip_jax.data.pipeline import open_dataset
    from unclip_jax.data.shapes import NUM_COMBINATIONS

    test = open_dataset(
        f"shapes:{data.resolution}", "test", data_dir=data.data_dir, **_shapes_sizes(data)
    )
    return [str(test[i]["caption"]) for i in range(min(NUM_COMBINATIONS, len(test)))]


def run_stage(
    workdir: str,
    stage: str,
    *,
    preset: str = "full",
    steps: Mapping[str, int] | None = None,
    num_prompts: int | None = None,
) -> None:
    """Runs (or resumes) one stage of DEMO_STAGES in this process."""
    configs = stage_configs(workdir, preset, steps or {})
    clip_dir = os.path.join(workdir, "clip", "clip")
    data = configs["clip"].data
    if stage in STAGES:
        _train(stage, configs[stage], os.path.join(workdir, stage))
    elif stage == "embed":
        from unclip_jax.embed_job import embed_dataset

        for split in ("train", "test"):
            embed_dataset(
                clip_dir,
                f"shapes:{data.resolution}",
                os.path.join(workdir, "embed", split),
                split=split,
                data_dir=data.data_dir,
                **_shapes_sizes(data),
            )
    elif stage == "sample":
        _sample(workdir, data, PRESETS[preset], num_prompts)
    elif stage == "eval":
        _evaluate(workdir, configs["upsampler"])
    else:
        raise ConfigError(f"unknown demo stage {stage!r}; stages: {', '.join(DEMO_STAGES)}")


def _sample(workdir: str, data: Any, preset: Preset, num_prompts: int | None) -> None:
    from unclip_jax.sampling.cascade import Cascade, read_pipeline
    from unclip_jax.sampling.generate import generate_to_dir

    pipeline = os.path.join(workdir, "pipeline.json")
    with open(pipeline, "w", encoding="utf-8") as f:
        json.dump(
            {
                "clip": "clip/clip",
                "prior": "prior",
                "decoder": "decoder",
                "upsamplers": ["upsampler"],
            },
            f,
            indent=2,
        )
    settings = {k: {**v, "steps": preset.sampling.get(k, v["steps"])} for k, v in SAMPLING.items()}
    cascade = Cascade(read_pipeline([pipeline]), settings=settings)
    grid = os.path.join(workdir, "grid")
    generate_to_dir(cascade, list(GRID_PROMPTS), grid, n=1, seed=0, batch_size=SAMPLE_BATCH)
    os.replace(os.path.join(grid, "grid.png"), os.path.join(workdir, "demo_grid.png"))
    prompts = test_prompts(data)
    num_prompts = num_prompts or preset.prompts
    prompts = prompts[:num_prompts] if num_prompts else prompts
    samples = os.path.join(workdir, "samples")
    generate_to_dir(cascade, prompts, samples, n=1, seed=0, batch_size=SAMPLE_BATCH)


def _evaluate(workdir: str, upsampler_config: Any) -> None:
    from unclip_jax.clip import load_pretrained
    from unclip_jax.data.pipeline import open_dataset
    from unclip_jax.evaluation.runner import evaluate_samples

    data = upsampler_config.data  # real images at the resolution of the samples
    real_source = open_dataset(
        f"shapes:{upsampler_config.model.resolution}",
        "test",
        data_dir=data.data_dir,
        **_shapes_sizes(data),
    )
    real = [real_source[i]["image"] for i in range(len(real_source))]
    train = open_dataset(
        f"shapes:{upsampler_config.model.resolution}",
        "train",
        data_dir=data.data_dir,
        **_shapes_sizes(data),
    )
    probe = [train[i] for i in range(min(len(train), PROBE_EXAMPLES))]
    clip = load_pretrained(os.path.join(workdir, "clip", "clip"))
    scores = evaluate_samples(
        os.path.join(workdir, "samples"), clip, real, shapes=True, probe_examples=probe
    )
    with open(os.path.join(workdir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)


def _stage_command(
    workdir: str,
    stage: str,
    preset: str,
    steps: Mapping[str, int],
    num_prompts: int | None,
) -> list[str]:
    cmd = [sys.executable, "-m", "unclip_jax.cli", "demo", "--workdir", workdir]
    cmd += ["--preset", preset, "--stage", stage]
    for name, value in steps.items():
        cmd += ["--steps", f"{name}={value}"]
    if num_prompts:
        cmd += ["--num-prompts", str(num_prompts)]
    return cmd


def run_demo(
    workdir: str,
    *,
    preset: str = "full",
    steps: Mapping[str, int] | None = None,
    num_prompts: int | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) every stage of the demo and returns the evaluation's scores.

    Each stage runs in a process of its own (`unclip-jax demo --stage NAME`), which asks for
    the stage's CPU devices before JAX starts (`demo_cpu_devices`; XLA's other CPU flags at
    their defaults, measured fastest for the demo's models: `cli.CPU_XLA_FLAGS`) and logs to
    WORKDIR/logs/NAME.log; the terminal shows one progress bar per stage. Wall times go to
    WORKDIR/timings.json."""
    from unclip_jax.evaluation.runner import format_scores

    steps = dict(steps or {})
    stage_configs(workdir, preset, steps)  # a bad preset or --steps fails before any work
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    timings_path = os.path.join(workdir, "timings.json")
    timings: dict[str, float] = {}  # this invocation's (a resumed stage's is short)
    for i, stage in enumerate(DEMO_STAGES, 1):
        print(f"demo [{i}/{len(DEMO_STAGES)}] {stage}: {STAGE_HELP[stage]}", flush=True)
        start = time.perf_counter()
        cmd = _stage_command(workdir, stage, preset, steps, num_prompts)
        code = subprocess.run(cmd, check=False).returncode
        if code:
            log_file = os.path.join(workdir, "logs", f"{stage}.log")
            raise RuntimeError(f"demo stage {stage} failed (exit status {code}); see {log_file}")
        elapsed = time.perf_counter() - start
        timings[stage] = round(elapsed, 1)
        with open(timings_path, "w", encoding="utf-8") as f:
            json.dump(timings, f, indent=2)
        print(f"demo [{i}/{len(DEMO_STAGES)}] {stage}: done in {elapsed:.0f} s", flush=True)
    with open(os.path.join(workdir, "scores.json"), encoding="utf-8") as f:
        scores = json.load(f)
    print(format_scores(scores))
    print(f"demo: {workdir}/demo_grid.png, {workdir}/samples/, {workdir}/scores.json")
    return scores


def parse_steps(pairs: list[str]) -> dict[str, int]:
    """['prior=300'] -> {'prior': 300}."""
    out = {}
    for pair in pairs:
        stage, sep, value = pair.partition("=")
        if not sep or not value.isdigit():
            raise ConfigError(f"--steps {pair!r}: expected STAGE=N, e.g. decoder=2000")
        out[stage] = int(value)
    return out
