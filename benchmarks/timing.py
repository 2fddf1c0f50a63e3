"""Wall-clock timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so
this folder is on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, *, warmup: bool = False) -> float:
    """Median wall time of `fn()` over `repeats` calls (after one untimed call if `warmup`).
    `fn` must block until its work is done (e.g. `jax.block_until_ready` inside)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
