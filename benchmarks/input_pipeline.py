"""Input pipeline throughput on `shapes`: batches per second the host delivers.

    python benchmarks/input_pipeline.py [--resolution 64] [--batch 256] [--workers 0 2] [--cache]
        [--decoder-only]

Prints batches/s and images/s for each worker count, for the decoder's view (float image +
caption) and the upsamplers' views (crop + blur / BSR). `--cache` times each view a second
time from memory (`data.cache`, `MemoizedSource`): the first `batch * batches` examples read
once, then the same examples again (the epochs after the first). Compare with the seconds per train step
of the stage that consumes the batches (the data issue asks for the pipeline to be at least 5x
faster than the decoder trains on `shapes`).
"""

from __future__ import annotations

import argparse
import time

from unclip_jax.data.pipeline import (
    MemoizedSource,
    SourceSlice,
    image_caption,
    make_pipeline,
    open_dataset,
    upsampler_views,
)


def time_pipeline(source, *, batch: int, transform, workers: int, batches: int) -> float:
    """Seconds per batch in steady state: wall time of `batches` batches after the first."""
    it = make_pipeline(
        source,
        global_batch_size=batch,
        seed=0,
        transform=transform,
        process_index=0,
        process_count=1,
        worker_count=workers,
    )
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache", action="store_true", help="also time from memory")
    parser.add_argument(
        "--decoder-only", action="store_true", help="skip the upsampler views (and their builds)"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    source = open_dataset(f"shapes:{args.resolution}", "train", data_dir=args.data_dir)
    print(
        f"shapes:{args.resolution} train: {len(source)} examples "
        f"(opened/built in {time.perf_counter() - start:.1f} s)"
    )
    views = {
        "decoder (image + caption)": (source, image_caption),
    }
    # The upsamplers' views on the images they train on: 1/4 crops of the high-res image.
    upsamplers = () if args.decoder_only else ((args.resolution * 2, 2, "blur"), (256, 4, "bsr"))
    for resolution, scale, kind in upsamplers:
        high = open_dataset(f"shapes:{resolution}", "train", data_dir=args.data_dir)
        views[f"upsampler {resolution}px/{scale} 1/4 crop + {kind}"] = (
            high,
            upsampler_views(scale=scale, crop_fraction=0.25, kind=kind),
        )
    for name, (data, transform) in views.items():
        sources = {"": data}
        if args.cache:
            memo = MemoizedSource(
                SourceSlice(data, 0, min(len(data), args.batch * (args.batches + 1)))
            )
            for i in range(len(memo)):
                memo[i]  # the first epoch: every example decoded once
            sources[" (cache)"] = memo
        for tag, source in sources.items():
            for workers in args.workers if not tag else [0]:
                seconds = time_pipeline(
                    source,
                    batch=args.batch,
                    transform=transform,
                    workers=workers,
                    batches=args.batches,
                )
                print(
                    f"{name + tag:44s} workers={workers}: {1 / seconds:7.2f} batches/s, "
                    f"{args.batch / seconds:8.0f} images/s"
                )


if __name__ == "__main__":
    main()
