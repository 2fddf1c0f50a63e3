"""Metrics to TensorBoard event files (tensorboardX, no TensorFlow) and to metrics.jsonl.

Only process 0 writes; on the others every method is a no-op, so callers need no checks.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax


class MetricsWriter:
    """Appends {"step": ..., name: value, ...} lines to WORKDIR/metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, start_step: int = 0) -> None:
        """Opens the writers; a run resumed at `start_step` first drops what it logged after it.

        (A run that crashed after its last checkpoint logged steps it will now run again.)
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if start_step > 0 and os.path.exists(path):
                kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"),
                purge_step=start_step + 1 if start_step > 0 else None,
            )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSONL line and one TensorBoard point per scalar."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if math.isfinite(value):  # e.g. an empty timestep bucket: in the JSONL only
                self._tb.add_scalar(name, value, int(step))

    def write_text(self, step: int, name: str, text: str) -> None:
        """A text entry in TensorBoard (e.g. the config at start)."""
        if self.enabled:
            self._tb.add_text(name, text, int(step))

    def write_images(self, step: int, name: str, images: Any) -> None:
        """A batch of uint8 NHWC images as one TensorBoard image grid entry."""
        if self.enabled:
            self._tb.add_images(name, images, int(step), dataformats="NHWC")

    def close(self) -> None:
        """Flushes and closes the files."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
