"""The decoder alone on `shapes`: how often it draws what it is told, given the TRUE z_i.

Samples a trained shapes decoder on test combinations whose (colour, shape) pair was seen in
training, conditioned on each test image's own CLIP embedding and caption (no prior), and
reads the five attributes back by plain image analysis (`evaluation.shapes_reader`) at the
decoder's resolution (and shape by the prompt's size and shape). This separates the decoder's
limits from the prior's and CLIP's: the demo's seen-pair rate cannot exceed it. Prints one
JSON line of accuracies.

    python benchmarks/decoder_oracle.py --decoder DEMO/decoder --clip DEMO/clip/clip \
        --data-dir DEMO/data [--num 96] [--set guidance_scale=5 --set steps=50 ...]

`--set` changes one decoder sampling setting (config.sampling keys); the default sampler is
DDIM, 25 steps, at the decoder config's guidance (the demo's is `--set steps=2,2,2,4 --set
guidance_scale=1.75`, `demo.SAMPLING`). `--ablate` asks which conditioning the decoder
reads: `caption` decodes from z_i alone, `z_i` from the caption alone (z_i replaced by the
learned null embedding, as guidance training drops it), `shuffle_z_i` gives each prompt
another test image's z_i (fixed permutation), so the scores say what the caption alone
still steers.
`--x0-at T` reads, instead of samples, the decoder's one-step x0 estimate from the test images
themselves noised to training timestep T (guided as the sampler is; `Cascade.predict_x0`),
and `--x0-at T --noisy` the noised image x_t / sqrt(abar_t) itself (no model): where in t the
decoder's drawing goes wrong, and whether it denoises better than the noisy input reads.
`--repeats K` samples every prompt K times (noise seeds seed, ..., seed + K - 1) and reports
each repeat's all-five rate beside the scores over all K: the sampling noise of one figure,
to weigh against the spread between decoders trained with other seeds.
`--save PNG` writes the (first repeat's) images read, grouped by the prompt's size and shape,
each captioned with its prompt and what was read wrong.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from unclip_jax import diffusion as D
from unclip_jax.data.images import to_uint8
from unclip_jax.data.pipeline import open_dataset
from unclip_jax.data.shapes import ATTRIBUTES, NUM_COMBINATIONS, SHAPES, SIZES, is_held_out
from unclip_jax.data.show import caption_grid
from unclip_jax.evaluation.attribute_probe import label_accuracy, stack_labels
from unclip_jax.evaluation.shapes_reader import read_shapes_image
from unclip_jax.sampling.cascade import Cascade, PipelineSpec, parse_settings

ABLATIONS = ("none", "caption", "z_i", "shuffle_z_i")


def seen_examples(data_dir: str, resolution: int, num: int) -> list[dict]:
    """`num` test examples of distinct combinations whose (colour, shape) pair was seen,
    spread over the 540 (the first 540 test examples hold each combination once)."""
    test = open_dataset(f"shapes:{resolution}", "test", data_dir=data_dir)
    seen = [i for i in range(NUM_COMBINATIONS) if not is_held_out(test[i]["labels"])]
    picked = np.linspace(0, len(seen) - 1, num).round().astype(int)
    return [test[seen[j]] for j in picked]


def shape_by_kind(read: list[dict], labels: list[dict]) -> dict[str, float]:
    """Shape read right, by the prompt's size and shape ("small square": ...): where the
    decoder's drawing fails (small squares and triangles drawn as blobs read as circles)."""
    right: dict[str, list[bool]] = {}
    for got, label in zip(read, labels, strict=True):
        kind = f"{list(SIZES)[label['size']]} {SHAPES[label['shape']]}"
        right.setdefault(kind, []).append(got["shape"] == label["shape"])
    return {kind: round(float(np.mean(hits)), 2) for kind, hits in sorted(right.items())}


def save_grid(path: str, images: list[np.ndarray], read: list[dict], examples: list[dict]) -> None:
    """The images as a captioned PNG grid, grouped by the prompt's size and shape, each
    caption the prompt and the attributes `read` got wrong ("wrong: shape" ...)."""

    def kind(e: dict) -> tuple[int, int]:
        return e["labels"]["size"], e["labels"]["shape"]

    order = sorted(range(len(images)), key=lambda i: kind(examples[i]))
    captions = []
    for i in order:
        wrong = [a for a in ATTRIBUTES if read[i][a] != examples[i]["labels"][a]]
        captions.append(f"{examples[i]['caption']} | wrong: {', '.join(wrong) or '-'}")
    grid = caption_grid([images[i] for i in order], captions, scale=4)
    grid.save(path)


def noised(cascade: Cascade, x0: jax.Array, t: np.ndarray, keys: jax.Array) -> jax.Array:
    """x_t / sqrt(abar_t) for x0 noised to t with the noise `Cascade.predict_x0` draws from
    the same keys: what the decoder's x0 estimate is given, on x0's scale."""
    diffusion = cascade.decoder_weights.config.diffusion
    sched = D.make_schedule(diffusion.schedule, diffusion.num_steps)
    x_t = D.q_sample(x0=x0, t=t, noise=D.row_normal(keys, x0.shape), sched=sched)
    return x_t / np.sqrt(np.asarray(sched.alphas_cumprod)[t])[:, None, None, None]


def main() -> None:
    """Parses the flags, samples, prints the accuracies."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", required=True, help="decoder training workdir or stage dir")
    p.add_argument("--clip", required=True, help="the CLIP directory the decoder trained with")
    p.add_argument("--data-dir", required=True, help="where the shapes build lies")
    p.add_argument("--num", type=int, default=96, help="test combinations sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--ablate",
        choices=ABLATIONS,
        default="none",
        help="drop or scramble one conditioning input (see the module docstring)",
    )
    p.add_argument(
        "--x0-at",
        type=int,
        default=None,
        metavar="T",
        help="read the decoder's x0 estimate from the test images noised to timestep T",
    )
    p.add_argument(
        "--noisy",
        action="store_true",
        help="with --x0-at: read x_T / sqrt(abar_T), the noised images themselves",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="sample every prompt this many times (noise seeds seed, seed + 1, ...); the scores "
        "are over all samples, with each repeat's all-five rate beside them",
    )
    p.add_argument("--save", metavar="PNG", help="write the first repeat's images as a grid")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.noisy and args.x0_at is None:
        p.error("--noisy reads the images noised by --x0-at T: give --x0-at")
    settings = {"decoder": {"method": "ddim", "steps": "25"}}
    settings["decoder"].update(
        parse_settings([f"decoder.{s}" for s in args.set]).get("decoder", {})
    )
    cascade = Cascade(PipelineSpec(decoder=args.decoder, clip=args.clip), settings=settings)
    examples = seen_examples(args.data_dir, cascade.decoder_resolution, args.num)
    start = time.perf_counter()
    inputs = cascade.image_inputs([np.asarray(e["image"]) for e in examples])
    z_i = cascade.image_embeddings(cascade.put(inputs["clip_pixels"]))
    tokens = cascade.put(cascade.tokenize([str(e["caption"]) for e in examples]))
    rows = len(examples)
    if args.ablate == "shuffle_z_i":
        # A permutation without fixed points: every prompt gets another image's z_i.
        order = np.random.default_rng(args.seed).permutation(rows)
        z_i = z_i[np.roll(order, 1)[np.argsort(order)]]
    drop = {"caption": "drop_text", "z_i": "drop_image"}.get(args.ablate)
    dropped = {drop: cascade.put(np.ones(rows, bool))} if drop else {}
    cond = cascade.decoder_cond(z_i, tokens, **dropped)
    labels = [e["labels"] for e in examples]
    if args.x0_at is not None:  # the test images and their t, on the devices once
        t = np.full(rows, args.x0_at, np.int32)
        x0 = cascade.put(inputs["x0"])
    read, hits = [], []
    for repeat in range(args.repeats):
        # Repeat r draws every image's noise from seed + r: a fresh sample of each prompt.
        keys = jax.random.split(jax.random.key(args.seed + repeat), rows)
        if args.x0_at is None:
            images = np.asarray(cascade.decode(cond, keys))
        elif args.noisy:
            images = np.asarray(noised(cascade, x0, t, keys))
        else:
            images = np.asarray(cascade.predict_x0(cond, x0, cascade.put(t), keys))
        pictures = [to_uint8(im) for im in images]
        read_now = [read_shapes_image(picture) for picture in pictures]  # once, for all below
        if args.save and repeat == 0:
            save_grid(args.save, pictures, read_now, examples)
        hits.append(label_accuracy(stack_labels(read_now), stack_labels(labels))["all_attributes"])
        read += read_now
    scores = label_accuracy(stack_labels(read), stack_labels(labels * args.repeats))
    result = {k: round(v, 3) for k, v in scores.items()}
    if args.repeats > 1:
        # The spread of the repeats is the sampling noise of one figure; compare it with the
        # spread between decoders (train seeds) before calling a decoder better.
        result["all_attributes_by_repeat"] = [round(h, 3) for h in hits]
    result.update(
        shape_by_kind=shape_by_kind(read, labels * args.repeats),
        num=len(examples),
        repeats=args.repeats,
        ablate=args.ablate,
        x0_at=args.x0_at,
        noisy=args.noisy,
        settings=cascade.settings["decoder"],
        step=cascade.decoder_weights.step,
        seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
