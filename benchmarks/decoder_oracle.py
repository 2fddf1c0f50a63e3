"""The decoder alone on `shapes`: how often it draws what it is told, given the TRUE z_i.

Samples a trained shapes decoder on test combinations whose (colour, shape) pair was seen in
training, conditioned on each test image's own CLIP embedding and caption (no prior), and
reads the five attributes back by plain image analysis (`evaluation.shapes_reader`) at the
decoder's resolution. This separates the decoder's limits from the prior's and CLIP's: the
demo's seen-pair rate cannot exceed it. Prints one JSON line of accuracies.

    python benchmarks/decoder_oracle.py --decoder DEMO/decoder --clip DEMO/clip/clip \
        --data-dir DEMO/data [--num 96] [--set guidance_scale=5 --set steps=50 ...]

`--set` changes one decoder sampling setting (config.sampling keys); the default sampler is
the demo's (DDIM, 25 steps). `--ablate` asks which conditioning the decoder reads: `caption`
decodes from z_i alone, `z_i` from the caption alone (z_i replaced by the learned null
embedding, as guidance training drops it), `shuffle_z_i` gives each prompt another test
image's z_i (fixed permutation), so the scores say what the caption alone still steers.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from unclip_jax.data.images import to_uint8
from unclip_jax.data.pipeline import open_dataset
from unclip_jax.data.shapes import NUM_COMBINATIONS, is_held_out
from unclip_jax.evaluation.shapes_reader import attribute_accuracy
from unclip_jax.sampling.cascade import Cascade, PipelineSpec, parse_settings

ABLATIONS = ("none", "caption", "z_i", "shuffle_z_i")


def seen_examples(data_dir: str, resolution: int, num: int) -> list[dict]:
    """`num` test examples of distinct combinations whose (colour, shape) pair was seen,
    spread over the 540 (the first 540 test examples hold each combination once)."""
    test = open_dataset(f"shapes:{resolution}", "test", data_dir=data_dir)
    seen = [i for i in range(NUM_COMBINATIONS) if not is_held_out(test[i]["labels"])]
    picked = np.linspace(0, len(seen) - 1, num).round().astype(int)
    return [test[seen[j]] for j in picked]


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
    args = p.parse_args()
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
    keys = jax.random.split(jax.random.key(args.seed), len(examples))
    rows = len(examples)
    if args.ablate == "shuffle_z_i":
        # A permutation without fixed points: every prompt gets another image's z_i.
        order = np.random.default_rng(args.seed).permutation(rows)
        z_i = z_i[np.roll(order, 1)[np.argsort(order)]]
    drop = {"caption": "drop_text", "z_i": "drop_image"}.get(args.ablate)
    dropped = {drop: cascade.put(np.ones(rows, bool))} if drop else {}
    cond = cascade.decoder_cond(z_i, tokens, **dropped)
    images = np.asarray(cascade.decode(cond, keys))
    scores = attribute_accuracy([to_uint8(im) for im in images], [e["labels"] for e in examples])
    result = {k: round(v, 3) for k, v in scores.items()}
    result.update(
        num=len(examples),
        ablate=args.ablate,
        settings=cascade.settings["decoder"],
        step=cascade.decoder_weights.step,
        seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
