"""Metrics to TensorBoard event files (tensorboardX, no TensorFlow) and to metrics.jsonl.

Only process 0 writes; on the others every method is a no-op, so callers need no checks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from unclip_jax.training.files import is_remote


class MetricsWriter:
    """Appends {"step": ..., name: value, ...} lines to WORKDIR/metrics.jsonl and TensorBoard.

    The workdir may be a URI (gs://...): object stores cannot append, so there the JSONL is
    kept in memory and the whole file rewritten at each write (a few thousand lines at most).
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None, start_step: int = 0) -> None:
        """Opens the writers; a run resumed at `start_step` first drops what it logged after it.

        (A run that crashed after its last checkpoint logged steps it will now run again.)
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._path = epath.Path(workdir, "metrics.jsonl")
        self._lines: list[str] | None = None  # the whole file, for a workdir that is a URI
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step > 0 and self._path.exists():
                kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
                self._path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            if is_remote(workdir):
                self._lines = [json.dumps(r) + "\n" for r in kept]
            else:
                self._jsonl = self._path.open("a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                str(epath.Path(workdir, "tensorboard")),
                purge_step=start_step + 1 if start_step > 0 else None,
            )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSONL line and one TensorBoard point per scalar."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        if self._lines is None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        else:
            self._lines.append(json.dumps(record) + "\n")
            self._path.write_text("".join(self._lines))
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
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl, in order."""
    text = epath.Path(workdir, "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
