"""The demo decoder's train step with its CLIP conditioning made in the step or read ready-made.

    python benchmarks/decoder_conditioning.py --workdir DEMO [--devices 2] [--repeats 20]
        [--rounds 3]

DEMO is a demo workdir past its embed stage (`unclip-jax demo --workdir DEMO --stage clip`,
then `--stage embed`). Both steps are the demo decoder's (`demo.stage_configs`, the `full`
preset) built by the stage builder, on the same examples: "in_step" runs the frozen CLIP's
image and text towers on each batch (the config without `data.embeddings_dir`), "read" takes
z_i from the embed stage's shards and the caption states from the table made at the start
(`data.embeddings_dir`, `data.caption_states`: the demo's way). The two jitted steps (batch
sharded over `--devices` CPU devices, params replicated, as the train loop runs them) are
timed in alternating rounds in one process, so a machine that slows down slows both. The
last line is JSON:
    {"task": "decoder_conditioning", "s_per_step": {"in_step": ..., "read": ...}, "speedup": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> None:
    """Times both steps and prints their seconds per step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a demo workdir past its embed stage")
    parser.add_argument("--devices", type=int, default=2, help="XLA CPU devices (the demo's 2)")
    parser.add_argument("--repeats", type=int, default=20, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per step")
    args = parser.parse_args(argv)
    embed = os.path.join(args.workdir, "embed", "train")
    if not os.path.isdir(embed):
        sys.exit(f"{embed} does not exist: run the demo's clip and embed stages first")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )

    import flax.linen as nn
    import jax
    import optax
    from timing import median_seconds

    from unclip_jax.demo import stage_configs
    from unclip_jax.parallel import replicate
    from unclip_jax.parallel.batch import global_batch
    from unclip_jax.parallel.mesh import make_mesh
    from unclip_jax.training.stages import build_stage
    from unclip_jax.training.state import TrainState
    from unclip_jax.training.step import make_train_step

    read = stage_configs(args.workdir, "full", {})["decoder"]
    in_step = read.copy_and_resolve_references()
    in_step.data.update(embeddings_dir="", caption_states=False)
    mesh = make_mesh(read.mesh)
    steps = {}
    for name, config in (("in_step", in_step), ("read", read)):
        stage = build_stage(config)
        batch = global_batch(next(stage.make_data(0, 1)), mesh)
        params = nn.meta.unbox(jax.jit(stage.init_params)(jax.random.key(0)))
        tx = optax.adam(1e-4)
        state = replicate(
            TrainState(
                step=jax.numpy.zeros((), jax.numpy.int32),
                params=params,
                ema_params=params,
                opt_state=tx.init(params),
                rng=jax.random.key_data(jax.random.key(1)),
            ),
            mesh,
        )
        frozen = replicate(stage.frozen, mesh)
        step = jax.jit(make_train_step(stage.loss_fn, tx, ema_decay=0.999))

        def run(step=step, state=state, batch=batch, frozen=frozen) -> None:
            jax.block_until_ready(step(state, batch, frozen))

        run()  # compile
        steps[name] = run
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, run in steps.items():
            times[name].append(median_seconds(run, args.repeats))
    s_per_step = {name: round(statistics.median(t), 5) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:8s} s/step per round: {', '.join(f'{x:.4f}' for x in t)}")
    print(
        json.dumps(
            {
                "task": "decoder_conditioning",
                "devices": args.devices,
                "s_per_step": s_per_step,
                "speedup": round(s_per_step["in_step"] / s_per_step["read"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
